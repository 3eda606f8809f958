"""On-device input normalisation: uint8 cache -> [0, 1] brain window -> network input.

The cache stores the brain window [0, 80] HU as uint8 (0..255); ``uint8_to_unit`` maps it back to
window units in [0, 1]. Augmentation works in those units, and normalisation runs last, batched
on the device:

- ``zscore`` (preprocessing step 3 of the specification): per slice, mean 0 and standard deviation 1 over
  its H x W pixels.
- ``minus_one_to_one``: ``2x - 1``, the [-1, 1] range RadImageNet's official PyTorch weights
  were trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZATIONS = ("zscore", "minus_one_to_one")


def uint8_to_unit(x: Tensor) -> Tensor:
    """Cached uint8 window values (0..255) -> float32 window units in [0, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor from the cache, got {x.dtype}")
    return x.to(torch.float32).mul_(1.0 / 255.0)


def normalize_slices(x: Tensor, mode: str = "zscore", eps: float = 1e-6) -> Tensor:
    """Normalise slices ``[S, 1, H, W]`` (float, window units in [0, 1]) for the network.

    ``zscore`` uses each slice's own mean and (population) standard deviation over H and W. A
    slice whose standard deviation is at most ``eps`` (a constant slice: all air, or all
    clipped at the window's upper bound) becomes zeros rather than NaN or an amplified rounding
    error.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {mode!r}; choose one of {NORMALIZATIONS}")
    if not x.is_floating_point():
        raise TypeError(f"expected float slices in window units, got {x.dtype}; see uint8_to_unit")
    if x.ndim < 2:
        raise ValueError(f"expected slices [..., H, W], got shape {tuple(x.shape)}")
    if mode == "minus_one_to_one":
        return x * 2.0 - 1.0
    var, mean = torch.var_mean(x, dim=(-2, -1), correction=0, keepdim=True)
    std = var.sqrt()
    # Two passes over the pixels (subtract, scale); the per-slice factor is 0 for flat slices.
    scale = torch.where(std > eps, std.reciprocal(), 0.0)
    return (x - mean) * scale
