"""Epoch selection rules replayed on a run's validation rows."""

from __future__ import annotations

import math

import pytest

from brainmets.train.selection import RULES, improves, replay


def _row(epoch, auc, f1, val_loss, threshold, separation=0.1):
    return {"epoch": epoch, "auc": auc, "f1": f1, "val_loss": val_loss,
            "threshold": threshold, "separation": separation}  # fmt: skip


# AUC saturates at epoch 1 while the logits keep moving; F1 at the swept threshold and the
# loss go on improving (the situation where the saved operating point did not hold).
HISTORY = [
    _row(0, 0.60, 0.50, 0.69, 0.40),
    _row(1, 1.00, 0.75, 0.50, 0.08),
    _row(2, 1.00, 0.95, 0.30, 0.35),
    _row(3, 0.98, 0.95, 0.25, 0.45, separation=0.5),
    _row(4, math.nan, math.nan, 0.40, 0.50),
]


@pytest.mark.parametrize(
    ("rule", "epoch", "threshold"),
    [
        ("auc", 1, 0.08),
        ("auc_then_val_loss", 2, 0.35),
        ("f1", 3, 0.45),
        ("val_loss", 3, 0.45),
        ("separation", 3, 0.45),
        ("last", 4, 0.50),
    ],
)
def test_each_rule_picks_its_epoch_and_that_epochs_threshold(rule, epoch, threshold):
    assert replay(rule, HISTORY) == (epoch, threshold)


def test_an_undefined_metric_never_replaces_a_defined_one():
    assert not improves("auc", HISTORY[4], HISTORY[0])
    assert improves("auc", HISTORY[0], None)


def test_every_rule_is_a_config_choice():
    from typing import get_args

    from brainmets.config import TrainConfig

    assert set(get_args(TrainConfig.model_fields["best_metric"].annotation)) == set(RULES)
    with pytest.raises(ValueError, match="unknown selection rule"):
        replay("youden", HISTORY)
