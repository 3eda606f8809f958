"""Class-conditional augmentation on the device, for a whole flat batch of slices at once.

Input and output are float slices [S, 1, H, W] in brain-window units ([0, 1] = [0, 80] HU),
before normalisation (z-scoring comes after augmentation, as specified). Every patient draws
its own parameters, with strengths taken from ``augment.positive`` or ``augment.negative``
according to its label. By default both sides hold the same mild strengths, so that a 3-4 pixel
metastasis is not interpolated or drowned away and the augmentation says nothing about the
label (``class_dependent_warning`` says why when a config makes them differ).

Spatial: one affine per patient (rotation, isotropic scale, translation, left-right flip),
shared by all of its slices so that the stack stays consistent; the per-slice matrices are
gathered by ``patient_index`` and the whole batch is resampled by one ``grid_sample`` call
(bilinear, zero padding = air). The flip is left-right only: heads are roughly symmetric
about the mid-sagittal plane, while an upside-down head is not a plausible scan.

Intensity, drawn per patient, in window units: contrast (a factor in [1-c, 1+c] scaling each
slice about its own mean), gamma (``x ** g`` with g log-uniform in [1-gamma, 1+gamma]: a
factor and its inverse about equally likely; P(g < 1) is 0.51 at gamma 0.05), then Gaussian
noise per pixel (``noise_std`` in window units: 0.01 = 0.8 HU); finally clipped to [0, 1], the
range of the stored window.

All randomness comes from a ``torch.Generator`` on the batch's device, so a run is reproducible
and a resumed run continues the same stream (its state is saved with the training state).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from brainmets.config import AugmentConfig, AugmentSide

_SIDE_FIELDS = ("rotate_deg", "scale", "translate", "flip_prob", "noise_std", "gamma", "contrast")


def class_dependent_warning(cfg: AugmentConfig) -> str | None:
    """The warning ``train`` gives when the two classes are augmented differently, or None."""
    if not cfg.enabled or not (differences := cfg.class_dependent()):
        return None
    return (
        "augment.positive and augment.negative differ (positive vs negative: "
        f"{', '.join(differences)}): the network can read the label from how strongly a "
        "patient was rotated, zoomed, shifted or altered in intensity instead of from lesions "
        "(on lesion-free heads with random labels, negatives rotated, zoomed and shifted twice "
        "as far as positives gave held-out AUC 0.87 from the augmentation alone; "
        "docs/benchmarks.md), and that shortcut does not exist at inference. Use equal "
        "strengths unless you have measured that your difference carries no label"
    )


def _side_table(positive: AugmentSide, negative: AugmentSide, device: torch.device) -> Tensor:
    """[2, F] strengths: row 0 negatives, row 1 positives (indexed by the label)."""
    rows = [[float(getattr(side, f)) for f in _SIDE_FIELDS] for side in (negative, positive)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


class PatientDraws(NamedTuple):
    """One batch's random parameters, one row per patient."""

    theta: Tensor
    """[P, 2, 3] ``affine_grid`` matrices (output -> input, normalised coordinates)."""
    contrast: Tensor
    """[P] factor about each slice's mean."""
    gamma: Tensor
    """[P] exponent."""
    noise_std: Tensor
    """[P] standard deviation of the pixel noise, window units."""


class ClassConditionalAugment:
    """Per-patient random affine + intensity augmentation, strengths chosen by label.

    Args:
        positive, negative: strengths for positive and negative patients.

    Call with ``(images [S,1,H,W] float in [0,1], patient_index long [S], labels [P],
    generator)``; returns augmented images of the same shape, in [0, 1].
    """

    def __init__(self, positive: AugmentSide, negative: AugmentSide) -> None:
        self.positive = positive
        self.negative = negative
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> ClassConditionalAugment:
        return cls(cfg.positive, cfg.negative)

    def _strengths(self, labels: Tensor) -> Tensor:
        """[P, F] strengths of each patient's side, columns as ``_SIDE_FIELDS``."""
        # Built once per device: a host-to-device copy every step would stall the stream.
        table = self._tables.get(labels.device)
        if table is None:
            table = _side_table(self.positive, self.negative, labels.device)
            self._tables[labels.device] = table
        return table[(labels > 0.5).long()]

    def draw(self, labels: Tensor, generator: torch.Generator) -> PatientDraws:
        """Every patient's parameters from one ``rand`` call and a few whole-batch operations
        (a handful of kernels per step instead of one per parameter and field)."""
        rotate_deg, scale, translate, flip_prob, noise_std, gamma, contrast = self._strengths(
            labels
        ).unbind(1)
        n = labels.shape[0]
        # Columns: angle, zoom, shift x, shift y, flip, contrast, gamma.
        u = torch.rand((n, 7), generator=generator, device=labels.device)
        centred = u * 2.0 - 1.0  # U(-1, 1)
        angle = centred[:, 0] * rotate_deg * (math.pi / 180.0)
        zoom = 1.0 + centred[:, 1] * scale
        # Normalised coordinates span 2 units per image side.
        shift = centred[:, 2:4] * (2.0 * translate[:, None])
        sign = torch.where(u[:, 4] < flip_prob, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [cos * sign, -sin, shift[:, 0], sin * sign, cos, shift[:, 1]], dim=1
        ).view(n, 2, 3)
        # Log-uniform in [1 - gamma, 1 + gamma] (multiplicative: P(g < 1) = 0.51 at 0.05).
        low, high = torch.log1p(-gamma), torch.log1p(gamma)
        return PatientDraws(
            theta=theta,
            contrast=1.0 + centred[:, 5] * contrast,
            gamma=torch.exp(torch.lerp(low, high, u[:, 6])),
            noise_std=noise_std,
        )

    def __call__(
        self,
        images: Tensor,
        patient_index: Tensor,
        labels: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(
                f"expected float slices [S, 1, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        images = images.float()
        labels = labels.to(images.device)
        draws = self.draw(labels, generator)
        grid = F.affine_grid(draws.theta[patient_index], list(images.shape), align_corners=False)
        out = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return self._intensity(out, patient_index, draws, generator)

    def _intensity(
        self, x: Tensor, patient_index: Tensor, draws: PatientDraws, generator: torch.Generator
    ) -> Tensor:
        # One gather of the per-patient values for all slices, as [S, 1, 1, 1] columns.
        per_slice = torch.stack([draws.contrast, draws.gamma, draws.noise_std], dim=1)
        contrast, gamma, noise_std = per_slice[patient_index].view(-1, 3, 1, 1).split(1, dim=1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.lerp(mean, x, contrast)  # (x - mean) * contrast + mean
        # Gamma is only defined for non-negative inputs; the clip is the window's own range.
        x = x.clamp(0.0, 1.0).pow(gamma)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.addcmul(x, noise, noise_std).clamp(0.0, 1.0)
