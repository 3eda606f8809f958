"""Which torch device a command runs on, and small host tensors sent to it without a wait."""

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


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without making the host wait for queued work.

    Through pinned memory (PyTorch's caching host allocator, so cheap after the first calls):
    a copy from pageable memory would wait for the device's queue, and the next batch could
    no longer be launched while this one runs.
    """
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
