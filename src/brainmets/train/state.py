"""Where training stands, and the random-number states that make a resume exact.

``last_state.pt`` (``torch.save``, read back with ``weights_only=True``) holds a
:class:`TrainState`, the weights, the optimiser, the curriculum stage and the RNG states of
python, numpy, torch and the augmentation generator of every rank. Everything else random is a
pure function of (seed, epoch), so a resumed run continues the uninterrupted one bit for bit on
CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainmets.io import atomic_write
from brainmets.model.checkpoint import load_weights_only

STATE_FORMAT = 1


@dataclass
class TrainState:
    """Where training stands; saved in ``last_state.pt``."""

    epoch: int = 0  # epoch in progress (or the next to start)
    batch: int = 0  # batches of ``epoch`` already done
    global_step: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    zero_sensitivity_epochs: int = 0
    skipped_steps: int = 0  # whole run
    # Running sums of the epoch in progress, so a mid-epoch resume reports the same loss.
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    epoch_skipped: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def python_rng_state() -> Any:
    return random.getstate()


def numpy_rng_state() -> dict[str, Any]:
    state = np.random.get_state(legacy=False)
    return {
        "key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    key = state["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["pos"], state["has_gauss"], state["gauss"]))


def capture_rng(augment: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch (and CUDA on a GPU) and the
    augmentation generator."""
    state = {
        "python": python_rng_state(),
        "numpy": numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "augment": augment.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], augment: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`capture_rng` saved."""
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    augment.set_state(state["augment"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_resume_state(path: Path, payload: dict[str, Any]) -> None:
    """``last_state.pt``, written atomically: a kill while saving leaves the previous one."""
    payload = {"format": STATE_FORMAT, **payload}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read_resume_state(path: Path, device: torch.device) -> dict[str, Any]:
    """``last_state.pt`` read back as tensors only (nothing is unpickled), in a format this
    version writes."""
    payload = load_weights_only(path, device)
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: unsupported resume state format {found!r}")
    return payload
