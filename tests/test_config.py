"""The config: specification defaults, validation that names the key, overrides, hashing."""

from __future__ import annotations

import pytest

from brainmets.config import (
    Config,
    ConfigError,
    dump_config,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_are_the_specification():
    cfg = Config()
    assert cfg.preprocess.window_center == 40 and cfg.preprocess.window_width == 80
    assert cfg.preprocess.size == 256 and cfg.preprocess.slice_mm == 5.0
    assert cfg.model.arch == "resnet50" and cfg.model.pooling == "max"
    assert cfg.model.conv1_reduce == "mean" and cfg.model.dropout == 0.4
    assert cfg.train.epochs == 40 and cfg.train.stage_epochs == (0, 5, 12)
    assert (cfg.train.lr.head, cfg.train.lr.layer4, cfg.train.lr.layer3) == (5e-5, 1e-5, 5e-6)
    assert (cfg.train.weight_decay.backbone, cfg.train.weight_decay.head) == (1e-4, 1e-3)
    assert cfg.train.grad_clip == 1.0
    assert (cfg.train.confidence.target, cfg.train.confidence.weight) == (0.30, 0.15)
    # 1:1.5 positives to negatives
    assert cfg.train.pos_fraction == pytest.approx(1 / 2.5)


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("train:\n  epochs: 3\n  epoks: 4\n", "train.epoks"),
        ("model:\n  arch: resnet51\n", "model.arch"),
        ("train:\n  lr:\n    head: -1\n", "train.lr.head"),
        ("preprocess:\n  slice_mm: thick\n", "preprocess.slice_mm"),
        ("train:\n  stage_epochs: [0, 12, 5]\n", "train.stage_epochs"),
        ("bogus: 1\n", "bogus"),
        ("train:\n  epochs: true\n", "train.epochs"),  # a slip, not 1 epoch
        ("train:\n  grad_clip: false\n", "train.grad_clip"),
        ("preprocess:\n  slice_mm: true\n", "preprocess.slice_mm"),  # float | "native"
        ("train:\n  pos_weight: true\n", "train.pos_weight"),  # float | None
        ("train:\n  stage_epochs: [0, true, 12]\n", "train.stage_epochs"),  # a tuple of ints
        ("train:\n  stage_epochs: [0, 5]\n", "train.stage_epochs: Value error, needs the first"),
    ],
)
def test_invalid_keys_are_errors_that_name_them(tmp_path, yaml_text, named):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)
    assert str(path) in str(err.value)


def test_overrides_parse_yaml_values():
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("preprocess.slice_mm=native") == ("preprocess.slice_mm", "native")
    assert parse_override("train.stage_epochs=[0,1,2]") == ("train.stage_epochs", [0, 1, 2])
    cfg = load_config(None, ["train.epochs=3", "model.arch=resnet18", "train.lr.head=1e-3"])
    assert cfg.train.epochs == 3 and cfg.model.arch == "resnet18" and cfg.train.lr.head == 1e-3
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=7", "preprocess.slice_mm=native"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert "epochs: 7" in dump_config(cfg)


def test_preprocess_hash_follows_every_parameter():
    base = Config().preprocess
    seen = {base.config_hash()}
    for change in (
        {"slice_mm": "native"},
        {"window_center": 35.0},
        {"size": 128},
        {"window_width": 100.0},
        {"min_slices": 4},
    ):
        seen.add(base.model_copy(update=change).config_hash())
    assert len(seen) == 6


def test_shipped_default_config_is_the_specification():
    from importlib.resources import files

    shipped = files("brainmets") / "configs" / "default.yaml"
    cfg = load_config(shipped)
    assert cfg == Config(name="brainmets-resnet50")


def test_one_key_of_a_nested_section_keeps_its_siblings(tmp_path):
    cfg = load_config(None, ["augment.negative.noise_std=0.02"])
    assert cfg.augment.negative.noise_std == 0.02
    assert cfg.augment.negative.rotate_deg == Config().augment.negative.rotate_deg
    path = tmp_path / "c.yaml"
    path.write_text("augment:\n  positive:\n    rotate_deg: 3\n")
    assert load_config(path).augment.positive.scale == Config().augment.positive.scale


def test_pad_slices_needs_max_slices_and_on_off_words_stay_words():
    with pytest.raises(ConfigError, match="pad_slices"):
        load_config(None, ["train.pad_slices=true"])
    cfg = load_config(None, ["train.pad_slices=true", "train.max_slices=32"])
    assert cfg.train.pad_slices and cfg.train.max_slices == 32
    with pytest.raises(ConfigError, match="pooling"):
        load_config(None, ["train.pad_slices=true", "train.max_slices=32", "model.pooling=lse"])
    # YAML 1.1 reads bare on/off as booleans; data.device_cache takes them as the words.
    assert load_config(None, ["data.device_cache=off"]).data.device_cache == "off"
    assert load_config(None, ["data.device_cache=on"]).data.device_cache == "on"
