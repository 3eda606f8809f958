"""torchrun (DDP): joining the process group, the collectives the trainer uses, and the one
collective with gradients.

Each rank takes a disjoint share of every global batch; the trainer rebuilds its DDP wrapper
whenever the curriculum changes the trainable set, so frozen parameters are never registered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def reduce_mean(self, value: float) -> float:
        return float(np.mean(self.all_gather(value)))


def init_distributed(device_spec: str) -> DistInfo:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not device_spec.startswith("cpu")
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        owns_group=owns,
    )


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank, concatenated in rank order; gradients flow back to each rank's
    own part (so a loss term over the whole batch trains every rank's patients)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))
