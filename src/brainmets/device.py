"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when there is one, else the CPU; a CUDA device that is not
    there is an error rather than a silent fall-back to the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device
