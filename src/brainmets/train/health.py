"""Troubleshooting signals read from each epoch's validation predictions and metrics.

Each warning names the state and what to change. The signals:

- **collapse**: every validation patient's sigmoid output is below 0.05, the model calls
  everyone negative.
- **sensitivity 0**: no validation positive reaches the operating threshold (the one
  ``model.safetensors`` would be used with, decided on the sigmoid), or none reaches
  probability 0.5 (on the epoch's reported scale, ``brainmets.train.scale``), for
  ``train.zero_sensitivity_patience`` epochs in a row (said then, and again every as many
  epochs while it lasts). The F1 threshold is swept again every epoch, so the sensitivity in
  ``metrics.csv`` is 0 only when every positive lies below 0.05; the fixed thresholds are where
  a model that does not separate the classes shows it.
- **oscillation** of the validation loss: over the last ``train.oscillation_window`` (k)
  epochs it changes direction at least ``max(1, (k - 2) // 2)`` times, the path it travels (the
  sum of its epoch-to-epoch changes) is at least 3 times its net change from the first to the
  last of them, and its range is at least ``train.oscillation_spread`` times its median. A
  healthy run's validation loss mostly falls (path close to the net change), or wanders within
  a few percent; one that goes up and down by large amounts is not converging. Said when it
  begins and again every ``train.oscillation_window`` epochs while it lasts.
- **sweep edge**: no validation sigmoid output lies inside the specified 0.05-0.95 sweep, so
  every threshold of it makes the same calls, and the chosen threshold is the sweep's edge, not
  a choice.

Warnings have a state. Each epoch's row records which signals hold (``health_signals``) and
which were said (``health_said``); at the end of the run :func:`run_summary` says of every
signal that was said whether it still holds at the last epoch (then once more, with the
remedy) or was resolved ("validation sensitivity was 0 at epochs 2-5; recovered from epoch
6"), so that advice true of the first epochs does not stand over a run that went well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainmets.config import TrainConfig
from brainmets.metrics import THRESHOLDS

# Below this, every validation prediction is near 0: the model has collapsed to "negative".
COLLAPSE_MAX_PROB = 0.05

COLLAPSE_REMEDY = (
    "lower the learning rates (train.lr.*), weigh the positives (train.pos_weight, e.g. "
    "negatives / positives), add the specified confidence term (train.confidence.enabled), "
    "and check that both classes reach the training batches (train.pos_fraction)"
)
ZERO_SENSITIVITY_REMEDY = (
    "reduce augmentation intensity on positives (augment.positive.*; the trade-off: strengths "
    "that differ between the classes are a label the network can read instead of the lesions, "
    "and train warns of it, so lower augment.negative.* alike unless you have measured that "
    "the difference carries no label), weigh the positives (train.pos_weight), add the "
    "specified confidence term (train.confidence.enabled), and check the learning rates "
    "(train.lr.*): a head that does not move leaves every patient at the same score"
)
# An oscillating loss travels this many times further than it gets (path / net change).
_PATH_PER_NET = 3.0

OSCILLATION_REMEDY = (
    "lower the learning rates (train.lr.*, or train.lr_warmup_epochs), use larger batches "
    "(train.batch_patients) or a tighter train.grad_clip"
)


@dataclass(frozen=True)
class ValidationScores:
    """One epoch's validation patients: labels, the sigmoid of the patient logit (where the
    threshold is swept and decisions are taken) and the reported probability."""

    labels: np.ndarray
    sigmoid: np.ndarray
    reported: np.ndarray


@dataclass(frozen=True)
class OperatingThreshold:
    """The threshold the saved model carries: on the sigmoid, and as the user reads it."""

    sigmoid: float
    shown: float


def sensitivity_at(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    """Share of positives with probability >= threshold (nan without positives)."""
    positives = probs[labels == 1]
    return float((positives >= threshold).mean()) if positives.size else float("nan")


def collapse(probs: np.ndarray) -> str | None:
    """``probs``: the sigmoid of the validation patients' logits."""
    if probs.size and probs.max() < COLLAPSE_MAX_PROB:
        return (
            f"validation predictions collapsing toward 0 (the highest patient's sigmoid output "
            f"is {probs.max():.4f}, every patient below {COLLAPSE_MAX_PROB}): {COLLAPSE_REMEDY}"
        )
    return None


def sweep_edge(probs: np.ndarray, threshold: float) -> str | None:
    """``probs`` and ``threshold``: on the sigmoid, where the F1 sweep runs."""
    low, high = float(THRESHOLDS[0]), float(THRESHOLDS[-1])
    if probs.size and not ((probs >= low) & (probs <= high)).any():
        return (
            f"no validation patient's sigmoid output lies inside the F1 sweep {low:.2f}-"
            f"{high:.2f} (min {probs.min():.4f}, max {probs.max():.4f}): every threshold of the "
            f"sweep makes the same calls, and the sweep's edge {threshold:.2f} is no choice"
        )
    return None


def _blind_streak(history: Sequence[Mapping[str, Any]], key: str) -> int:
    """Epochs in a row, up to the last, with sensitivity 0 under ``key``."""
    streak = 0
    for row in reversed(history):
        if row.get(key) != 0.0:
            break
        streak += 1
    return streak


def zero_sensitivity(history: Sequence[Mapping[str, Any]], patience: int) -> str | None:
    """Whether the last ``patience`` rows all have sensitivity 0 at the operating threshold,
    or all at 0.5 (the row keys ``sensitivity_at_operating`` and ``sensitivity_at_half``).

    Said when a streak reaches ``patience`` epochs and again every ``patience`` epochs while it
    lasts: the first epochs of a model trained from random weights often sit below 0.5 for a
    while, and one line then says it, not one line per epoch.
    """
    if not history:
        return None
    last = history[-1]
    thresholds = {
        "operating": f"the operating threshold {last['operating_threshold']:.2f}",
        "half": "probability 0.5",
    }
    streaks = {name: _blind_streak(history, f"sensitivity_at_{name}") for name in thresholds}
    blind = [name for name, streak in streaks.items() if streak >= patience]
    if not blind or not any(streaks[name] % patience == 0 for name in blind):
        return None
    where = " and ".join(f"{thresholds[name]} for {streaks[name]} epochs" for name in blind)
    seeing = [
        f"at {thresholds[name]} it is {last[f'sensitivity_at_{name}']:.2f}"
        for name in thresholds
        if name not in blind
    ]
    return (
        f"validation sensitivity has been 0 at {where}: no validation positive reaches "
        + ("either" if len(blind) > 1 else "it")
        + (f" ({seeing[0]})" if seeing else "")
        + f"; {ZERO_SENSITIVITY_REMEDY}"
    )


def oscillation(val_losses: Sequence[float], window: int, spread: float) -> str | None:
    """Direction changes, path and range of the last ``window`` validation losses (see the
    module text)."""
    recent = np.asarray(list(val_losses[-window:]), dtype=np.float64)
    if recent.size < window or not np.isfinite(recent).all():
        return None
    steps = np.diff(recent)
    flips = int((np.sign(steps[1:]) * np.sign(steps[:-1]) < 0).sum())
    path, net = float(np.abs(steps).sum()), abs(float(recent[-1] - recent[0]))
    relative = float((recent.max() - recent.min()) / max(float(np.median(recent)), 1e-12))
    if flips >= max(1, (window - 2) // 2) and path >= _PATH_PER_NET * net and relative >= spread:
        return (
            f"validation loss oscillating: over the last {window} epochs it changed direction "
            f"{flips} times, travelled {path / max(net, 1e-12):.0f}x its net change and spans "
            f"{relative:.0%} of its median ({recent.min():.3g}-{recent.max():.3g}): "
            f"{OSCILLATION_REMEDY}"
        )
    return None


def epoch_warnings(
    row: dict[str, Any],
    scores: ValidationScores,
    operating: OperatingThreshold,
    history: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
) -> list[str]:
    """The warnings of the epoch of ``row`` (appended to ``history`` by the caller after this).

    Adds to ``row`` what later epochs and :func:`run_summary` need: the operating threshold, the
    sensitivity there and at probability 0.5, the signals that hold and those said.
    """
    labels = scores.labels
    row["operating_threshold"] = float(operating.shown)
    row["sensitivity_at_operating"] = sensitivity_at(labels, scores.sigmoid, operating.sigmoid)
    row["sensitivity_at_half"] = sensitivity_at(labels, scores.reported, 0.5)
    rows = [*history, row]
    losses = [r["val_loss"] for r in rows]
    window, spread = cfg.oscillation_window, cfg.oscillation_spread
    found = {
        "collapse": collapse(scores.sigmoid),
        "sweep_edge": sweep_edge(scores.sigmoid, float(row["sigmoid_threshold"])),
        "zero_sensitivity": zero_sensitivity(rows, cfg.zero_sensitivity_patience),
        "oscillation": oscillation_news(losses, window, spread),
    }
    holds = {
        "collapse": found["collapse"] is not None,
        "sweep_edge": found["sweep_edge"] is not None,
        "zero_sensitivity": _blind(row),
        "oscillation": oscillation(losses, window, spread) is not None,
    }
    row["health_said"] = [name for name, text in found.items() if text]
    row["health_signals"] = [name for name, held in holds.items() if held]
    return [f"epoch {row['epoch']}: {text}" for text in found.values() if text]


def _blind(row: Mapping[str, Any]) -> bool:
    return row.get("sensitivity_at_operating") == 0.0 or row.get("sensitivity_at_half") == 0.0


# What each signal was, the word for its end, and its remedy, for run_summary.
_STATES = {
    "collapse": ("validation predictions collapsed toward 0", "recovered", COLLAPSE_REMEDY),
    "sweep_edge": ("no validation sigmoid output lay inside the F1 sweep", "recovered", ""),
    "zero_sensitivity": ("validation sensitivity was 0", "recovered", ZERO_SENSITIVITY_REMEDY),
    "oscillation": ("the validation loss oscillated", "settled", OSCILLATION_REMEDY),
}


def epoch_ranges(epochs: Sequence[int]) -> str:
    """``[2, 3, 4, 5, 8]`` -> ``"epochs 2-5 and 8"``."""
    spans: list[list[int]] = []
    for epoch in sorted(epochs):
        if spans and epoch == spans[-1][1] + 1:
            spans[-1][1] = epoch
        else:
            spans.append([epoch, epoch])
    words = [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]
    text = ", ".join(words[:-1]) + (" and " if len(words) > 1 else "") + words[-1]
    return ("epoch " if words == [str(epochs[0])] else "epochs ") + text


def run_summary(history: Sequence[Mapping[str, Any]]) -> list[tuple[bool, str]]:
    """(still holds, sentence) for every signal said during the run: resolved when it no
    longer holds at the last epoch, standing (with its remedy) when it does. Nothing for a
    signal never said."""
    if not history:
        return []
    said = {name for row in history for name in row.get("health_said") or ()}
    lines = []
    for name, (was, end, remedy) in _STATES.items():
        if name not in said:
            continue
        holding = [name in (row.get("health_signals") or ()) for row in history]
        held = [int(row["epoch"]) for row, h in zip(history, holding, strict=True) if h]
        where = f" at {epoch_ranges(held)}" if held else ""
        if holding[-1]:
            lines.append((True, f"{was}{where}, and still at the last epoch; {remedy}".strip("; ")))
            continue
        # The first epoch of the final stretch in which it no longer holds.
        since = int(history[-1]["epoch"])
        for row, h in zip(reversed(history), reversed(holding), strict=True):
            if h:
                break
            since = int(row["epoch"])
        lines.append((False, f"{was}{where}; {end} from epoch {since}"))
    return lines


def oscillation_news(val_losses: Sequence[float], window: int, spread: float) -> str | None:
    """:func:`oscillation` of the last epoch, said when it begins and again every ``window``
    epochs while it lasts: a window that oscillates goes on doing so for the next few epochs,
    and one line per epoch would repeat one finding."""
    said = oscillation(val_losses, window, spread)
    if said is None:
        return None
    streak = 1
    while streak < len(val_losses) and oscillation(val_losses[:-streak], window, spread):
        streak += 1
    return said if (streak - 1) % window == 0 else None


def batch_mix_warning(n_pos: int, n_neg: int, pos_fraction: float) -> str | None:
    """When a batch's whole numbers of positives and negatives miss ``pos_fraction`` (the
    specified 1 : 1.5 is 0.4, exact only for batches of a multiple of 5 patients)."""
    if n_pos == 0 or n_neg == 0 or abs(n_pos / (n_pos + n_neg) - pos_fraction) < 1e-9:
        return None
    size = n_pos + n_neg
    return (
        f"train.batch_patients={size} with train.pos_fraction={pos_fraction:g} gives batches "
        f"of {n_pos} positives and {n_neg} negatives, 1 : {n_neg / n_pos:.2g} instead of "
        f"1 : {(1 - pos_fraction) / pos_fraction:.2g}; choose a batch size whose "
        f"{pos_fraction:g} share is a whole number (a multiple of 5 for 0.4) to keep the ratio"
    )
