"""One typed configuration for every step, loaded from YAML and validated.

Every section is a pydantic model with ``extra="forbid"``, so an unknown or ill-typed key is
an error that names it. Defaults are the values of the specification (DESIGN.md); the few
keys the specification leaves open carry a comment saying what we chose and why.

``load_config(path, overrides)`` applies ``key.sub=value`` overrides (values parsed as YAML,
so ``train.epochs=3`` is an int and ``model.pretrained=none`` is the string "none").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(_Section):
    """Steps 1, 2 and 4 of the preprocessing, done once by ``prepare`` and cached."""

    # Slab thickness along the slice normal; "native" keeps the scanner's slices.
    slice_mm: float | Literal["native"] = 5.0
    window_center: float = 40.0
    window_width: float = 80.0
    size: int = Field(256, ge=16, le=1024)
    # Fewer slices than this is not a head CT series (localizer, scout, summary).
    min_slices: int = Field(8, ge=1)

    @field_validator("slice_mm")
    @classmethod
    def _positive_thickness(cls, v: float | str) -> float | str:
        if v != "native" and float(v) <= 0:
            raise ValueError("slice_mm must be > 0 or 'native'")
        return v

    @property
    def slab_mm(self) -> float | None:
        return None if self.slice_mm == "native" else float(self.slice_mm)

    def config_hash(self) -> str:
        """Stable digest of every parameter that changes the cached arrays."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class DataConfig(_Section):
    cache: str | None = None  # a prepared cache directory (``brainmets prepare --out``)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # k-fold cross-validation: ``folds`` > 1 makes fold ``fold`` the validation set.
    folds: int = Field(1, ge=1)
    fold: int = Field(0, ge=0)
    num_workers: int = Field(2, ge=0)
    # When several GPUs share a node the whole uint8 cache can be kept resident on the device.
    cache_on_device: bool = False

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} must be < data.folds={self.folds}")
        return self


class ModelConfig(_Section):
    # resnet18/34 exist for quick CPU demos and tests only; the specified model is resnet50.
    arch: Literal["resnet50", "resnet34", "resnet18"] = "resnet50"
    # A RadImageNet (or torchvision-layout) weights file; "none" trains from random init.
    pretrained: str = "none"
    conv1_reduce: Literal["mean", "sum"] = "mean"
    pooling: Literal["max", "mean", "lse", "attention"] = "max"
    lse_temperature: float = Field(1.0, gt=0.0)
    dropout: float = Field(0.4, ge=0.0, lt=1.0)
    hidden: int = Field(512, ge=1)
    normalization: Literal["zscore", "minus_one_to_one"] = "zscore"


class StageLR(_Section):
    head: float = Field(5e-5, gt=0)
    layer4: float = Field(1e-5, gt=0)
    layer3: float = Field(5e-6, gt=0)


class WeightDecay(_Section):
    backbone: float = Field(1e-4, ge=0)
    head: float = Field(1e-3, ge=0)


class ConfidenceLoss(_Section):
    enabled: bool = False
    target: float = Field(0.30, ge=0.0, le=1.0)
    weight: float = Field(0.15, ge=0.0)


class AugmentSide(_Section):
    """Augmentation strength for one class (see AugmentConfig for the defaults' reasons)."""

    rotate_deg: float = Field(ge=0, le=180)
    scale: float = Field(ge=0, lt=1)
    translate: float = Field(ge=0, lt=1)  # fraction of the image size
    flip_prob: float = Field(ge=0, le=1)
    noise_std: float = Field(ge=0)  # in window units (1.0 = 80 HU)
    gamma: float = Field(ge=0, lt=1)  # log-uniform gamma in [1-g, 1+g]
    contrast: float = Field(ge=0, lt=1)  # multiplicative contrast around the mean


def _positive_augment() -> AugmentSide:
    # Mild: a 3 mm metastasis is 3-4 pixels at 256^2; large scale changes or strong noise
    # (0.02 = 1.6 HU) and gamma would erase the 10-50 HU contrast that makes it visible.
    return AugmentSide(
        rotate_deg=7.0,
        scale=0.05,
        translate=0.04,
        flip_prob=0.5,
        noise_std=0.01,
        gamma=0.05,
        contrast=0.05,
    )


def _negative_augment() -> AugmentSide:
    # Strong: negatives carry no small target to protect, and wide variation teaches the
    # model that anatomy, position and noise are not evidence of disease.
    return AugmentSide(
        rotate_deg=15.0,
        scale=0.10,
        translate=0.08,
        flip_prob=0.5,
        noise_std=0.03,
        gamma=0.15,
        contrast=0.10,
    )


class AugmentConfig(_Section):
    enabled: bool = True
    positive: AugmentSide = Field(default_factory=_positive_augment)
    negative: AugmentSide = Field(default_factory=_negative_augment)


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1)
    # First epoch of stage 1 (head), stage 2 (+layer4) and stage 3 (+layer3).
    stage_epochs: tuple[int, int, int] = (0, 5, 12)
    lr: StageLR = Field(default_factory=StageLR)
    weight_decay: WeightDecay = Field(default_factory=WeightDecay)
    grad_clip: float = Field(1.0, gt=0)
    # Patients per batch; with pos_fraction 0.4 a batch of 10 holds 4 positives and 6
    # negatives, the specified 1:1.5.
    batch_patients: int = Field(10, ge=2)
    pos_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    # Longest slice stack per patient fed at once in training (a random contiguous window
    # beyond it); None keeps every slice. Bounds memory for thin-slice outliers.
    max_slices: int | None = Field(None, ge=1)
    pos_weight: float | None = Field(None, gt=0)
    confidence: ConfidenceLoss = Field(default_factory=ConfidenceLoss)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True
    compile: bool = False
    best_metric: Literal["auc", "f1", "separation", "val_loss"] = "auc"
    # Health checks: warn after this many epochs with zero validation sensitivity.
    zero_sensitivity_patience: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    # Resume state (weights, optimiser, RNG, sampler position) is also saved every this many
    # optimiser steps, so a run killed in the middle of a long epoch loses little.
    checkpoint_every: int = Field(200, ge=1)

    @field_validator("stage_epochs")
    @classmethod
    def _stages_ordered(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not (v[0] == 0 and v[0] <= v[1] <= v[2]):
            raise ValueError("stage_epochs must start at 0 and be non-decreasing, e.g. [0, 5, 12]")
        return v


class EvaluateConfig(_Section):
    n_boot: int = Field(1000, ge=0)
    sensitivity_targets: list[float] = Field(default_factory=lambda: [0.90, 0.95])


class Config(_Section):
    name: str = "run"
    seed: int = 0
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def config_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ("train.epochs", 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key, yaml.safe_load(raw) if raw.strip() else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
