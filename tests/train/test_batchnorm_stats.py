"""BatchNorm calibration of a random backbone: statistics from data, weights untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmets.config import Config, PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.data.dataset import collate_patients
from brainmets.data.normalize import normalize_slices, uint8_to_unit
from brainmets.model.resnet import BrainMetsNet
from brainmets.train.batchnorm_stats import (
    calibrate_batchnorm,
    norm_statistics,
    restore_non_finite_norm_statistics,
)
from brainmets.train.trainer import train

SIZE = 32


def _head_slices(rng: np.random.Generator, n: int) -> torch.Tensor:
    """uint8 [n, 1, SIZE, SIZE]: a saturated skull ring around grey brain, air outside."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    img = np.where(r < 11, 110, np.where(r < 14, 255, 0)).astype(np.float64)
    img = img[None] + rng.normal(0, 12, size=(n, SIZE, SIZE)) * (r < 11)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).unsqueeze(1)


def _batches(rng: np.random.Generator, count: int):
    for b in range(count):
        items = [(_head_slices(rng, 3), torch.zeros(0), float(b % 2), f"P{b}{k}") for k in (0, 1)]
        yield collate_patients(items)


def _inputs(batch) -> torch.Tensor:
    return normalize_slices(uint8_to_unit(batch.images), "zscore")


def test_statistics_match_the_data_and_weights_and_modes_are_kept():
    torch.manual_seed(0)
    model = BrainMetsNet(arch="resnet18", hidden=8)
    model.set_trainable(("layer4", "head"))  # stem .. layer3 frozen (eval mode)
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    assert torch.equal(model.bn1.running_mean, torch.zeros(64))

    batches = list(_batches(np.random.default_rng(0), 3))
    slices = calibrate_batchnorm(model, batches, _inputs, torch.device("cpu"))

    assert slices == 3 * 2 * 3
    # bn1's statistics are those of conv1's output over all calibration slices.
    with torch.no_grad():
        conv = model.conv1(torch.cat([_inputs(b) for b in batches]))
    torch.testing.assert_close(model.bn1.running_mean, conv.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.bn1.running_var, conv.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-4)
    assert not torch.equal(model.layer4[1].bn2.running_var, torch.ones(512))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if "num_batches" not in k)
    # Momenta restored; the frozen prefix is back in eval mode, the trainable part in train.
    assert model.bn1.momentum == 0.1 and model.layer4[0].bn1.momentum == 0.1
    assert not model.bn1.training and model.layer4[0].bn1.training and model.training


def test_calibrated_frozen_features_are_normalised():
    """After calibration the frozen stem's BatchNorm output has ~zero mean, ~unit variance per
    channel on the data (with the initial statistics it is the raw convolution output)."""
    torch.manual_seed(0)
    model = BrainMetsNet(arch="resnet18", hidden=8)
    model.set_trainable(("head",))
    rng = np.random.default_rng(1)
    calibrate_batchnorm(model, list(_batches(rng, 4)), _inputs, torch.device("cpu"))
    x = _inputs(next(_batches(np.random.default_rng(2), 1)))
    with torch.no_grad():
        h = model.bn1(model.conv1(x))
    assert h.mean(dim=(0, 2, 3)).abs().max() < 0.25
    assert h.var(dim=(0, 2, 3)).mean() == pytest.approx(1.0, abs=0.25)


def _config(cache, calibration: int, pretrained: str = "none") -> Config:
    return Config.model_validate(
        {
            "seed": 1,
            "data": {"cache": str(cache), "num_workers": 0, "val_fraction": 0.3},
            "model": {"arch": "resnet18", "hidden": 8, "pretrained": pretrained},
            "train": {
                "epochs": 1,
                "batch_patients": 4,
                "bn_calibration_patients": calibration,
                "checkpoint_every": 100,
            },
        }
    )


@pytest.mark.parametrize(("calibration", "calibrated"), [(0, False), (3, True)])
def test_trainer_calibrates_only_when_asked(tmp_path, calibration, calibrated):
    rng = np.random.default_rng(0)
    patients = [(f"P{i}", i % 2, _head_slices(rng, 3)[:, 0].numpy()) for i in range(8)]
    cache = tmp_path / "cache"
    build_cache_from_arrays(cache, patients, PreprocessConfig(size=SIZE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(cache, calibration), tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    state = torch.load(tmp_path / "run/checkpoints/last_state.pt", weights_only=True)
    # bn1 is frozen all through this one-epoch stage-1 run: it moves only by calibration.
    moved = not torch.equal(state["model"]["bn1.running_mean"], torch.zeros(64))
    assert moved == calibrated
    log = (tmp_path / "run/train.log").read_text()
    assert ("calibrated on 9 slices of 3 training patients" in log) == calibrated


def test_statistics_poisoned_by_a_skipped_step_are_restored():
    """A non-finite forward pass is skipped by the optimiser, but the BatchNorm layers that
    train have already folded it into their running statistics: evaluation would then give
    NaN for every patient. The epoch's end puts back the last finite values."""
    torch.manual_seed(0)
    model = BrainMetsNet(arch="resnet18", hidden=8)
    model.set_trainable(("layer4", "head"))
    model.train()
    x = torch.rand(2, 1, 32, 32)
    model.forward_features(x)  # a finite step moves the statistics
    snapshot = norm_statistics(model)
    model.forward_features(x * 2)  # another finite step: these values must stay
    kept = norm_statistics(model)
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    model.forward_features(bad)
    assert not torch.isfinite(model.layer4[0].bn1.running_var).all()

    poisoned = restore_non_finite_norm_statistics(model, snapshot)
    assert "layer4.0.bn1.running_var" in poisoned
    after = norm_statistics(model)
    for name, value in after.items():
        expected = snapshot[name] if name in poisoned else kept[name]
        assert torch.equal(value, expected), name
    assert not any(name.startswith(("bn1.", "layer1.")) for name in poisoned)  # frozen: untouched
    model.eval()
    assert torch.isfinite(model.forward_head(model.forward_features(x))).all()
    assert restore_non_finite_norm_statistics(model, snapshot) == []
