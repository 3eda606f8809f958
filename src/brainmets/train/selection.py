"""Which epoch's weights (and their F1 threshold) become ``model.safetensors``.

Every rule ranks the epochs by their validation row of ``metrics.csv``; the threshold is always
the specified one, the best F1 of the 0.05-0.95 sweep on that epoch's validation patients. A
rule is applied online (each epoch is compared with the best so far, so the saved weights are
those of the chosen epoch) and can be replayed offline on a finished run's history
(``replay``), which is how ``benchmarks/selection_transfer.py`` compares them.

Rules (``train.best_metric``):

- ``auc``: highest validation AUC, first epoch reaching it. AUC ignores the threshold and
  saturates on a small validation set, while the logits, and so the F1 threshold, keep moving.
- ``auc_then_val_loss``: highest validation AUC; among epochs that tie on it, the lowest
  validation loss, i.e. the best-calibrated logits at that ranking quality.
- ``f1``: highest validation F1 at the swept threshold, ties to the lowest validation loss:
  the rule looks at the decision the product will make.
- ``val_loss``: lowest validation loss.
- ``separation``: highest mean p+ - mean p- (plain sigmoid).
- ``last``: the final epoch, threshold swept on its validation patients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

RULES = ("auc", "auc_then_val_loss", "f1", "val_loss", "separation", "last")

# The metrics.csv column that summarises each rule in one number (for the end-of-run line).
HEADLINE = {
    "auc": "auc",
    "auc_then_val_loss": "auc",
    "f1": "f1",
    "val_loss": "val_loss",
    "separation": "sigmoid_separation",
    "last": "epoch",
}


def _value(row: Mapping[str, Any], key: str, sign: float) -> float:
    value = row.get(key)
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return -math.inf  # an undefined metric never wins over a defined one
    return sign * float(value)


def rank(rule: str, row: Mapping[str, Any]) -> tuple[float, ...]:
    """A key that is larger for a better epoch under ``rule``."""
    if rule == "auc":
        return (_value(row, "auc", 1.0),)
    if rule == "auc_then_val_loss":
        return _value(row, "auc", 1.0), _value(row, "val_loss", -1.0)
    if rule == "f1":
        return _value(row, "f1", 1.0), _value(row, "val_loss", -1.0)
    if rule == "val_loss":
        return (_value(row, "val_loss", -1.0),)
    if rule == "separation":  # the sigmoid's (metrics.csv before it had the column: separation)
        return (
            _value(row, "sigmoid_separation" if "sigmoid_separation" in row else "separation", 1.0),
        )
    if rule == "last":
        return (float(row["epoch"]),)
    raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")


def improves(rule: str, row: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool:
    """Whether epoch ``row`` replaces ``best`` (None: no epoch chosen yet)."""
    return best is None or rank(rule, row) > rank(rule, best)


def replay(rule: str, history: Sequence[Mapping[str, Any]], *_: Any) -> tuple[int, float]:
    """(epoch, threshold on the sigmoid) that ``rule`` would have saved from a run's metrics
    rows."""
    best = None
    for row in history:
        if improves(rule, row, best):
            best = row
    if best is None:
        raise ValueError("no epochs to choose from")
    return int(best["epoch"]), float(best.get("sigmoid_threshold", best["threshold"]))
