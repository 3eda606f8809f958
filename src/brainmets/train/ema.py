"""An exponential moving average of a network's weights (as timm's ``ModelEmaV3``).

At a high learning rate and small batches the weights, and with them the logit scale the
threshold is chosen on, move a lot from one epoch to the next. The average of the recent
weights moves less. The horizon is given in epochs, so that one setting means the same on a
100-patient cohort (a dozen steps an epoch) and on a 10,000-patient one: the per-step decay
is ``1 - 1 / (horizon_epochs x steps per epoch)``, and, as in timm, it is warmed up from
``(1 + n) / (10 + n)`` so that the first steps do not keep the random initial weights.

Floating-point parameters and buffers (BatchNorm running statistics) are averaged; integer
buffers (BatchNorm's step counts) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The averaged copy of ``model`` (``.module``), updated after each optimiser step."""

    def __init__(self, model: nn.Module, horizon_epochs: float, steps_per_epoch: int) -> None:
        if horizon_epochs <= 0 or steps_per_epoch < 1:
            raise ValueError(
                f"an average needs a horizon > 0 epochs and >= 1 step an epoch, got "
                f"{horizon_epochs} and {steps_per_epoch}"
            )
        self.decay = 1.0 - 1.0 / max(horizon_epochs * steps_per_epoch, 1.0)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def decay_now(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.decay_now()
        averaged, current = [], []
        for ours, theirs in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if not ours.is_floating_point():
                ours.copy_(theirs)
                continue
            averaged.append(ours)
            # A skipped step's forward can leave non-finite BatchNorm statistics in the model
            # until the epoch ends (train/batchnorm_stats.py); the average keeps its own then.
            current.append(torch.where(torch.isfinite(theirs), theirs.detach(), ours))
        torch._foreach_lerp_(averaged, current, weight)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
