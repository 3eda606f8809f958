"""The moving average of the weights: its arithmetic, and a run that selects and saves it,
killed and resumed to the same end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from brainmets.config import Config, PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.train.ema import WeightAverage
from brainmets.train.trainer import TrainingInterrupted, train


def test_the_average_follows_the_warmed_up_decay_and_copies_counts():
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    average = WeightAverage(net, horizon_epochs=2, steps_per_epoch=10)  # decay 1 - 1/20
    assert average.decay == pytest.approx(0.95)
    expected = net[0].weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            net[0].weight.add_(1.0)
            net[1].num_batches_tracked += 1
        decay = min(0.95, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * net[0].weight.detach()
        average.update(net)
    torch.testing.assert_close(average.module[0].weight, expected)
    assert int(average.module[1].num_batches_tracked) == 30
    assert not average.module[0].weight.requires_grad


def test_non_finite_statistics_of_a_skipped_step_do_not_enter_the_average():
    net = nn.BatchNorm1d(3)
    average = WeightAverage(net, 1, 4)
    with torch.no_grad():
        net.running_mean.copy_(torch.tensor([1.0, float("nan"), float("inf")]))
    average.update(net)
    assert torch.isfinite(average.module.running_mean).all()
    assert average.module.running_mean[0] > 0


SIZE = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    patients = []
    for i in range(10):
        label = int(i % 3 == 0)
        volume = rng.integers(20, 110, size=(3, SIZE, SIZE)).astype(np.uint8)
        if label:
            volume[1, 12:16, 14:18] = 240
        patients.append((f"P{i:02d}", label, volume))
    root = tmp_path_factory.mktemp("ema-cache")
    build_cache_from_arrays(root, patients, PreprocessConfig(size=SIZE))
    return root


def _config(cache: Path) -> Config:
    return Config.model_validate(
        {
            "seed": 3,
            "data": {"cache": str(cache), "num_workers": 0, "val_fraction": 0.3},
            "model": {"arch": "resnet18", "hidden": 16},
            "train": {
                "epochs": 3,
                "stage_epochs": [0, 1, 2],
                "batch_patients": 4,
                "lr": {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3},
                "checkpoint_every": 3,
                "ema_epochs": 1.0,
            },
        }
    )


def test_a_run_with_the_average_saves_it_and_resumes_to_the_same_end(cache, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(_config(cache), full, progress=False)
    saved = load_file(full / "model.safetensors")
    last = load_file(full / "checkpoints" / "last.safetensors")  # the weights themselves
    assert any(not torch.equal(saved[k], last[k]) for k in saved if k.startswith("layer4"))
    with pytest.raises(TrainingInterrupted):
        train(_config(cache), stopped, stop_after_steps=4, progress=False)
    train(_config(cache), stopped, resume=True, progress=False)
    resumed = load_file(stopped / "model.safetensors")
    assert saved.keys() == resumed.keys()
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    columns = ["epoch", "val_loss", "auc", "threshold"]
    pd.testing.assert_frame_equal(
        pd.read_csv(full / "metrics.csv")[columns], pd.read_csv(stopped / "metrics.csv")[columns]
    )
