"""Troubleshooting signals: short runs driven into each state, and a healthy run that stays
silent; then the definitions on hand-made loss curves."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from brainmets.config import Config, PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.train import trainer as trainer_module
from brainmets.train.health import (
    OperatingThreshold,
    ValidationScores,
    batch_mix_warning,
    epoch_ranges,
    epoch_warnings,
    oscillation,
    oscillation_news,
    run_summary,
    sweep_edge,
    zero_sensitivity,
)
from brainmets.train.trainer import train

SIZE = 32
SIGNALS = {
    "collapse": "collapsing toward 0",
    "zero_sensitivity": "sensitivity has been 0",
    "oscillation": "validation loss oscillating",
    "sweep_edge": "inside the F1 sweep",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """20 patients of 3 slices; positives carry a bright lesion on their middle slice."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    patients = []
    for i in range(20):
        volume = rng.integers(20, 110, size=(3, SIZE, SIZE)).astype(np.uint8)
        if i % 2 == 0:
            volume[1, 12:18, 14:20] = 240
        patients.append((f"P{i:02d}", int(i % 2 == 0), volume))
    build_cache_from_arrays(root, patients, PreprocessConfig(size=SIZE))
    return root


def _config(cache: Path, lr: float, **train) -> Config:
    return Config.model_validate(
        {
            "seed": 3,
            "preprocess": {"size": SIZE},
            "data": {"cache": str(cache), "num_workers": 0, "val_fraction": 0.3},
            "model": {"arch": "resnet18", "hidden": 16},
            "train": {
                "stage_epochs": [0, 1, 2],
                "batch_patients": 5,
                "lr": {"head": lr, "layer4": lr, "layer3": lr},
                "log_every": 100,
                "checkpoint_every": 1000,
                # The runs keep the initial BatchNorm statistics: the states below were tuned
                # on that trajectory, and the frozen heads' bias alone sets their probabilities.
                "bn_calibration_patients": 0,
                **train,
            },
        }
    )


def _signals(caplog) -> set[str]:
    text = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return {name for name, phrase in SIGNALS.items() if any(phrase in t for t in text)}


def _run(cfg: Config, run: Path, caplog) -> set[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brainmets"):
        train(cfg, run, progress=False)
    return _signals(caplog)


@pytest.mark.slow
def test_a_healthy_run_stays_silent(cache_dir, tmp_path, caplog):
    # 3e-4: the validation loss falls steadily (0.69 -> 0.32 over 6 epochs). At 1e-3 it already
    # swings on some CPUs and thread counts (0.53, 0.67, 0.91, 0.25): on the warning's edge.
    assert _run(_config(cache_dir, 3e-4, epochs=6), tmp_path / "run", caplog) == set()


@pytest.mark.slow
def test_a_learning_rate_far_too_high_oscillates_and_collapses(cache_dir, tmp_path, caplog):
    cfg = _config(cache_dir, 0.3, epochs=4, oscillation_window=4)
    signals = _run(cfg, tmp_path / "run", caplog)
    assert {"oscillation", "collapse", "sweep_edge"} <= signals
    message = next(
        r.getMessage() for r in caplog.records if SIGNALS["oscillation"] in r.getMessage()
    )
    assert "lower the learning rates" in message


def _frozen_head(monkeypatch, bias: float) -> None:
    """A head that does not learn: its output bias set to ``bias``, every rate ~0."""
    build = trainer_module._built_model  # the trainer's seam: the network and its weights' origin

    def with_bias(cfg, pretrained):
        model, origin = build(cfg, pretrained)
        with torch.no_grad():
            model.head[-1].bias.fill_(bias)
        return model, origin

    monkeypatch.setattr(trainer_module, "_built_model", with_bias)


def test_a_frozen_head_below_one_half_is_blind_at_one_half(
    cache_dir, tmp_path, caplog, monkeypatch
):
    # Every patient near sigmoid(-2) = 0.12: the swept threshold still finds positives (the
    # sensitivity in metrics.csv is not 0), but at 0.5 none is ever detected.
    _frozen_head(monkeypatch, -2.0)
    cfg = _config(cache_dir, 1e-12, epochs=2, stage_epochs=[0, 5, 5], zero_sensitivity_patience=2)
    assert _run(cfg, tmp_path / "run", caplog) == {"zero_sensitivity"}
    message = next(
        r.getMessage() for r in caplog.records if "sensitivity has been 0" in r.getMessage()
    )
    assert "reduce augmentation intensity on positives" in message
    history = (tmp_path / "run" / "metrics.csv").read_text()
    assert ",0.0,1.0," not in history.splitlines()[-1]  # the swept sensitivity was not 0


def test_a_frozen_head_far_below_collapses_outside_the_sweep(
    cache_dir, tmp_path, caplog, monkeypatch
):
    _frozen_head(monkeypatch, -8.0)
    cfg = _config(cache_dir, 1e-12, epochs=1, stage_epochs=[0, 5, 5])
    assert _run(cfg, tmp_path / "run", caplog) == {"collapse", "sweep_edge"}


# --- the definitions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "warns"),
    [
        ([0.69, 0.66, 0.60, 0.52, 0.45, 0.40], False),  # falling
        ([0.69, 0.67, 0.53, 0.68, 0.84, 0.14], False),  # one bump on the way down
        ([0.50, 0.51, 0.50, 0.51, 0.50, 0.51], False),  # alternating within 2 %
        ([0.60, 0.90, 0.55, 0.95, 0.58, 0.92], True),  # up and down by half its level
        ([10.0, 7.7e3, 8.6e5, 4.1e4, 6.4e5, 1.7e3], True),  # blown up, bouncing
        ([0.69, float("nan"), 0.5, 0.9, 0.4, 0.95], False),  # an undefined epoch: no verdict
        ([0.6, 0.9, 0.5], False),  # fewer epochs than the window
    ],
)
def test_oscillation_definition(losses, warns):
    assert (oscillation(losses, window=6, spread=0.2) is not None) is warns


def test_an_oscillation_is_said_when_it_begins_and_again_after_a_window():
    swinging = [0.6, 0.9] * 8
    assert all(oscillation(swinging[:n], 6, 0.2) for n in range(6, 17))  # every epoch from 6
    said = [n for n in range(1, 17) if oscillation_news(swinging[:n], 6, 0.2)]
    assert said == [6, 12]
    # Falling epochs end the streak (the windows still reaching back to the swing say nothing
    # new); a new swing is news again.
    falling = [0.5, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44]
    losses = [0.6, 0.9] * 3 + falling + [0.9, 0.4] * 3
    said = [n for n in range(1, len(losses) + 1) if oscillation_news(losses[:n], 6, 0.2)]
    assert said == [6, 15]


def test_zero_sensitivity_needs_every_epoch_of_the_patience_blind():
    blind = {"sensitivity_at_operating": 0.0, "sensitivity_at_half": 0.0,
             "operating_threshold": 0.3}  # fmt: skip
    seeing = {**blind, "sensitivity_at_operating": 0.5, "sensitivity_at_half": 0.5}
    half_blind = {**blind, "sensitivity_at_operating": 0.5}
    assert zero_sensitivity([blind, blind, blind], 3) is not None
    assert zero_sensitivity([half_blind, half_blind, blind], 3) is not None
    assert zero_sensitivity([blind, seeing, blind], 3) is None
    assert zero_sensitivity([blind, blind], 3) is None
    # Blind at one threshold, then at the other: no threshold was blind for 3 epochs.
    op_blind = {**blind, "sensitivity_at_half": 0.5}
    assert zero_sensitivity([op_blind, half_blind, op_blind], 3) is None


def test_zero_sensitivity_names_the_blind_threshold_once_per_patience():
    half_blind = {"sensitivity_at_operating": 0.94, "sensitivity_at_half": 0.0,
                  "operating_threshold": 0.24}  # fmt: skip
    said = [zero_sensitivity([half_blind] * n, 3) for n in range(1, 8)]
    assert [text is not None for text in said] == [False, False, True, False, False, True, False]
    assert "at probability 0.5 for 3 epochs" in said[2] and "for 6 epochs" in said[5]
    # The operating threshold still finds positives, and the line says so rather than "blind".
    assert "operating threshold 0.24 it is 0.94" in said[2]
    assert "operating threshold 0.24 for" not in said[2]


def test_sweep_edge_only_when_no_probability_is_inside_the_sweep():
    assert sweep_edge(np.array([0.01, 0.02, 0.97]), 0.05) is not None
    assert sweep_edge(np.array([0.01, 0.06]), 0.05) is None


@pytest.mark.parametrize(
    ("batch", "fraction", "warns"),
    [(10, 0.4, False), (5, 0.4, False), (6, 0.4, True), (4, 0.5, False)],
)
def test_batch_mix_warns_when_whole_patients_miss_the_ratio(batch, fraction, warns):
    n_pos = round(batch * fraction)
    assert (batch_mix_warning(n_pos, batch - n_pos, fraction) is not None) is warns


# --- the state of a warning at the end of the run -------------------------------------------


def _history(blind_epochs: set[int], epochs: int, losses: list[float] | None = None) -> list:
    """Rows as the trainer makes them: positives below every threshold in ``blind_epochs``."""
    cfg = Config().train.model_copy(update={"zero_sensitivity_patience": 2})
    labels = np.array([1, 1, 0, 0])
    history: list[dict] = []
    for epoch in range(epochs):
        blind = epoch in blind_epochs
        probs = np.array([0.2, 0.3, 0.4, 0.1]) if blind else np.array([0.8, 0.7, 0.3, 0.1])
        row = {"epoch": epoch, "sigmoid_threshold": 0.5,
               "val_loss": (losses or [0.5] * epochs)[epoch]}  # fmt: skip
        epoch_warnings(row, ValidationScores(labels, probs, probs),
                       OperatingThreshold(0.5, 0.5), history, cfg)  # fmt: skip
        history.append(row)
    return history


def test_a_warning_that_no_longer_holds_is_summarised_as_resolved():
    history = _history({2, 3, 4, 5}, epochs=9)
    assert run_summary(history) == [
        (False, "validation sensitivity was 0 at epochs 2-5; recovered from epoch 6")
    ]


def test_a_warning_that_still_holds_stands_with_its_remedy():
    ((standing, sentence),) = run_summary(_history({1, 2, 5, 6, 7}, epochs=8))
    assert standing and sentence.startswith(
        "validation sensitivity was 0 at epochs 1-2 and 5-7, and still at the last epoch; reduce"
    )


def test_a_run_without_warnings_ends_without_a_summary():
    assert run_summary(_history(set(), epochs=5)) == []
    assert run_summary(_history({3}, epochs=5)) == []  # one blind epoch: never said


def test_an_oscillation_that_settled_is_resolved():
    losses = [0.6, 0.9, 0.55, 0.95, 0.58, 0.92] + [0.5, 0.45, 0.42, 0.40, 0.39, 0.38, 0.37]
    cfg_window = Config().train.oscillation_window
    assert cfg_window == 6
    summary = run_summary(_history(set(), epochs=len(losses), losses=losses))
    assert summary and not summary[0][0]
    assert summary[0][1].startswith("the validation loss oscillated at epochs 5-")
    assert "settled from epoch" in summary[0][1]


def test_epoch_ranges_reads_like_a_sentence():
    assert epoch_ranges([4]) == "epoch 4"
    assert epoch_ranges([2, 3, 4, 5, 8]) == "epochs 2-5 and 8"
    assert epoch_ranges([1, 3, 5]) == "epochs 1, 3 and 5"
