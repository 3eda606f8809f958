"""Three-stage fine-tuning curriculum: which blocks train when, and their optimiser groups.

Stage 1 (epochs ``stage_epochs[0]..``): head only.  Stage 2: + layer4.  Stage 3: + layer3.
Frozen blocks are handled by ``BrainMetsNet.set_trainable`` (``requires_grad=False``,
BatchNorm kept in eval mode, run under ``no_grad``); this module picks the blocks and builds
AdamW parameter groups for the trainable ones.

Weight decay, as specified, applies to every trainable parameter of a block: backbone 1e-4,
head 1e-3, biases and BatchNorm scales and shifts included. Each block gets two groups, its
weights of rank >= 2 (conv kernels, linear matrices) and its 1-D parameters, so that
``train.weight_decay.exempt_norm_and_bias: true`` can take the decay off the second (the
convention of timm and torchvision: decaying a BatchNorm scale towards 0 shrinks the
activations it normalises, and decaying a bias pulls towards an arbitrary offset rather than
penalising complexity).

The learning rates of the groups are the configured ones, scaled at every step by
``lr_factor`` when ``train.lr_warmup_epochs`` or ``train.lr_schedule`` ask for a warm-up or a
decay (the specification has neither, and neither is on by default; see docs/benchmarks.md
for the warm-up and cosine candidate measured against the constant rate).

When the stage changes, the optimiser is rebuilt for the new trainable set, carrying the AdamW
state (moments and step count) of the parameters that keep training. The head's moment
estimates stay valid across the boundary, while newly unfrozen blocks start from zero moments
with their own step count, so AdamW's bias correction warms them up as at the start of
training. Rebuilding (instead of adding groups in place) keeps the group layout a pure
function of the stage, which is what makes a resumed optimiser state loadable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from brainmets.config import StageLR, WeightDecay

STAGE_BLOCKS: dict[int, tuple[str, ...]] = {
    1: ("head",),
    2: ("layer4", "head"),
    3: ("layer3", "layer4", "head"),
}


def stage_for_epoch(epoch: int, stage_epochs: tuple[int, int, int] | list[int]) -> int:
    """The curriculum stage (1, 2 or 3) that ``epoch`` (0-based) belongs to."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    _, start2, start3 = stage_epochs
    if epoch >= start3:
        return 3
    if epoch >= start2:
        return 2
    return 1


def trainable_blocks(stage: int) -> tuple[str, ...]:
    """Blocks trained in ``stage``; every other block of ``BrainMetsNet.BLOCKS`` is frozen."""
    try:
        return STAGE_BLOCKS[stage]
    except KeyError:
        raise ValueError(f"stage must be one of {sorted(STAGE_BLOCKS)}, got {stage}") from None


def _block_lr(block: str, lr: StageLR) -> float:
    return float(getattr(lr, block))


def build_param_groups(
    model: nn.Module, stage: int, lr: StageLR, weight_decay: WeightDecay
) -> list[dict[str, Any]]:
    """AdamW groups for the trainable blocks of ``stage``: ``"<block>/weights"`` (conv and
    linear weights) and ``"<block>/norm_and_bias"`` (biases, BatchNorm scales and shifts), each
    with its block's learning rate and decay, or none for the second with
    ``exempt_norm_and_bias``; empty groups are left out.

    Only parameters with ``requires_grad`` are included, so call ``model.set_trainable``
    first.
    """
    blocks = model.block_parameters()
    groups: list[dict[str, Any]] = []
    for block in trainable_blocks(stage):
        decay = weight_decay.head if block == "head" else weight_decay.backbone
        params = [p for p in blocks[block] if p.requires_grad]
        weights = [p for p in params if p.ndim >= 2]
        norm_and_bias = [p for p in params if p.ndim < 2]
        # The specification gives one decay per block for all of its parameters; the exemption
        # is the usual refinement (decaying a BatchNorm scale only fights the normalisation).
        other = 0.0 if weight_decay.exempt_norm_and_bias else decay
        for suffix, members, wd in (
            ("weights", weights, decay),
            ("norm_and_bias", norm_and_bias, other),
        ):
            if members:
                groups.append(
                    {
                        "name": f"{block}/{suffix}",
                        "params": members,
                        "lr": _block_lr(block, lr),
                        "weight_decay": wd,
                    }
                )
    if not groups:
        raise ValueError(f"stage {stage} has no trainable parameters; was set_trainable called?")
    return groups


def build_optimizer(
    model: nn.Module,
    stage: int,
    lr: StageLR,
    weight_decay: WeightDecay,
    previous: torch.optim.Optimizer | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable blocks of ``stage``, carrying ``previous``'s per-parameter
    state for the parameters that keep training (see the module docstring).

    The fused implementation is used: it is the fastest on GPU and, with the ``found_inf``
    flag the trainer sets, skips a non-finite step on the device without a host sync.
    """
    groups = build_param_groups(model, stage, lr, weight_decay)
    optimizer = torch.optim.AdamW(groups, fused=True)
    if previous is not None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param in previous.state:
                    optimizer.state[param] = previous.state[param]
    return optimizer


def lr_factor(step: int, total_steps: int, warmup_steps: float, schedule: str) -> float:
    """Multiplier of every block's learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (the first step gets a small, non-zero rate), then
    ``constant`` (1.0) or ``cosine`` (from 1.0 down to 0 at ``total_steps``). A pure function
    of the step, so a resumed run continues the same schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be constant or cosine, got {schedule!r}")
    span = max(total_steps - warmup_steps, 1.0)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scale_learning_rates(optimizer: torch.optim.Optimizer, lr: StageLR, factor: float) -> None:
    """Set every group's rate to its block's configured rate times ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = _block_lr(group["name"].split("/")[0], lr) * factor
