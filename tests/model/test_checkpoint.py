"""Checkpoints: safetensors + sidecar round trip, wrapper unwrapping, version refusal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import brainmets
from brainmets.model.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from brainmets.model.resnet import BrainMetsNet

SIDECAR = {
    "preprocessing": {"window_hu": [0, 80], "size": 256},
    "normalization": "zscore",
    "threshold": 0.35,
    "config_hash": "0123abcd",
}


class DataParallelLike(nn.Module):
    """Stands in for DDP: the network sits under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _trained_looking_model(**kwargs) -> BrainMetsNet:
    torch.manual_seed(0)
    model = BrainMetsNet("resnet18", **kwargs)
    with torch.no_grad():  # non-default BN statistics, so losing buffers would show
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _logits(model: BrainMetsNet) -> torch.Tensor:
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, torch.tensor([0, 0, 1, 1, 1]), 2).patient_logits


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: m,
        DataParallelLike,
        torch.compile,
        lambda m: DataParallelLike(torch.compile(m)),
    ],
    ids=["bare", "ddp", "compile", "ddp+compile"],
)
def test_round_trip_gives_the_same_logits(tmp_path, wrap):
    model = _trained_looking_model(pooling="attention", lse_temperature=0.5)
    path = tmp_path / "run" / "model.safetensors"
    json_path = save_checkpoint(wrap(model), path, SIDECAR)

    restored, sidecar = load_checkpoint(path)
    assert json_path == path.with_suffix(".json")
    assert not restored.training
    torch.testing.assert_close(_logits(restored), _logits(model), rtol=0, atol=0)
    assert sidecar["architecture"] == model.architecture()
    assert sidecar["architecture"]["pooling"] == "attention"
    assert {k: sidecar[k] for k in SIDECAR} == SIDECAR
    assert sidecar["versions"]["torch"] == torch.__version__
    assert sidecar["versions"]["brainmets"] == brainmets.__version__
    assert sidecar["format_version"] == FORMAT_VERSION
    # Loading is strict, so the keys carry no wrapper prefix; no temporary file is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


def test_sidecar_path_loads_too(tmp_path):
    model = _trained_looking_model()
    save_checkpoint(model, tmp_path / "model.safetensors", SIDECAR)
    restored, _ = load_checkpoint(tmp_path / "model.json")
    torch.testing.assert_close(_logits(restored), _logits(model), rtol=0, atol=0)


def test_channels_last_model_saves(tmp_path):
    model = _trained_looking_model().to(memory_format=torch.channels_last)
    save_checkpoint(model, tmp_path / "model.safetensors", {})
    restored, _ = load_checkpoint(tmp_path / "model.safetensors")
    torch.testing.assert_close(_logits(restored), _logits(model), rtol=1e-5, atol=1e-6)


def test_incompatible_format_version_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(_trained_looking_model(), path, SIDECAR)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"format_version 2 .* reads format_version 1"):
        load_checkpoint(path)


def test_mixed_up_weights_are_refused(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(_trained_looking_model(), first, SIDECAR)
    save_checkpoint(BrainMetsNet("resnet18"), second, SIDECAR)
    first.write_bytes(second.read_bytes())
    with pytest.raises(ValueError, match="checksum does not match"):
        load_checkpoint(first)


@pytest.mark.parametrize(
    ("sidecar", "error", "message"),
    [
        ({"architecture": {}}, ValueError, "reserved"),
        ({"threshold": torch.tensor(0.5)}, ValueError, "not JSON-serialisable"),
    ],
)
def test_bad_sidecars_are_refused(tmp_path, sidecar, error, message):
    with pytest.raises(error, match=message):
        save_checkpoint(_trained_looking_model(), tmp_path / "model.safetensors", sidecar)


def test_only_brainmetsnet_is_saved(tmp_path):
    with pytest.raises(TypeError, match="BrainMetsNet"):
        save_checkpoint(DataParallelLike(nn.Linear(2, 1)), tmp_path / "m.safetensors", {})


def test_missing_sidecar(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(_trained_looking_model(), path, {})
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_checkpoint(path)


def test_a_save_killed_at_any_point_leaves_a_pair_that_loads(tmp_path, monkeypatch):
    """The best model is replaced while training runs; a kill during the save must leave
    either the old pair or the new one, never weights that contradict their sidecar."""
    import os

    from brainmets.model import checkpoint

    path = tmp_path / "model.safetensors"
    old, new = _trained_looking_model(), BrainMetsNet("resnet18", hidden=8)
    save_checkpoint(old, path, {"epoch": 1})
    real_replace = os.replace

    def killed_before_the_last_rename(src, dst):
        if str(src).endswith(".new"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_last_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path, {"epoch": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    model, meta = load_checkpoint(path)  # completes the save
    assert meta["epoch"] == 2 and torch.equal(_logits(model), _logits(new.eval()))
    assert not (tmp_path / "model.safetensors.new").exists()

    def killed_before_the_sidecar(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write_text", killed_before_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(old, path, {"epoch": 3})
    model, meta = load_checkpoint(path)  # the previous pair, whole
    assert meta["epoch"] == 2 and torch.equal(_logits(model), _logits(new.eval()))
