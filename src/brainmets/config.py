"""One typed configuration for every step, loaded from YAML and validated.

Every section is a pydantic model with ``extra="forbid"``, so an unknown or ill-typed key is
an error that names it. Defaults are the specification's values where it states one
(docs/architecture.md), except for the departures listed there with their reasons; a key the
specification leaves open says in its description what we chose and why.

``load_config(path, overrides)`` applies ``key.sub=value`` overrides (values parsed as YAML,
so ``train.epochs=3`` is an int and ``model.pretrained=none`` is the string "none").
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``epochs: true`` is a slip, not 1: pydantic's lax mode would take a YAML boolean for
        any int or float field. Strings such as "1e-3" (YAML 1.1 reads them as text) stay
        accepted, which strict mode would refuse."""
        annotation = cls.model_fields[info.field_name].annotation
        if not _takes_number(annotation):
            return value
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, bool) for v in values):
            raise ValueError(f"expected a number, got {value!r}")
        return value


def _takes_number(annotation: Any) -> bool:
    """Whether a field's type holds numbers but no booleans: int, float, and unions, lists and
    tuples of them (float | None, tuple[int, int, int], list[float], float | "native")."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    return any(_takes_number(arg) for arg in get_args(annotation))


class PreprocessConfig(_Section):
    """Steps 1, 2 and 4 of the preprocessing, done once by ``prepare`` and cached."""

    slice_mm: float | Literal["native"] = Field(
        5.0,
        description="slab thickness along the slice normal (mm), one for every scanner's "
        'series; "native" keeps the slices',
    )
    window_center: float = Field(40.0, description="brain window centre (HU)")
    window_width: float = Field(80.0, description="brain window width (HU): clip to [0, 80]")
    size: int = Field(256, ge=16, le=1024, description="slices are resized to size x size")
    min_slices: int = Field(
        8, ge=1, description="fewer slices is not a head CT series (localizer, summary)"
    )

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
    cache: str | None = Field(None, description="prepared cache folder (brainmets prepare --out)")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="validation share of patients without a manifest split"
    )
    folds: int = Field(
        1,
        ge=1,
        description="k-fold cross-validation when > 1: stratified, seeded folds over every "
        "patient whose manifest split is not test (train and val are pooled); "
        "train --folds K trains all K and their ensemble",
    )
    fold: int = Field(0, ge=0, description="this run's validation fold when folds > 1")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    device_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="hold the train/val slices on the device as uint8 (auto: on CUDA when "
        "they take at most a quarter of the free memory)",
    )

    @field_validator("device_cache", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads a bare on/off as a boolean; the user meant the word.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} must be < data.folds={self.folds}")
        return self


class ModelConfig(_Section):
    arch: Literal["resnet50", "resnet34", "resnet18"] = Field(
        "resnet50", description="backbone; resnet18/34 are for quick CPU demos and tests only"
    )
    pretrained: str = Field(
        "none",
        description="RadImageNet (official or Keras-converted) or torchvision-layout weights "
        'file; "none" = random init',
    )
    conv1_reduce: Literal["mean", "sum"] = Field(
        "mean", description="RGB conv1 -> 1 channel: mean (specified) or sum of the filters"
    )
    pooling: Literal["max", "mean", "lse", "attention"] = Field(
        "max", description="slice logits -> patient logit"
    )
    lse_temperature: float = Field(1.0, gt=0.0, description="temperature of lse pooling")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="dropout in the head")
    hidden: int = Field(512, ge=1, description="width of the head's hidden layer")
    normalization: Literal["zscore", "minus_one_to_one"] = Field(
        "zscore", description="per-slice z-score (specified) or the window mapped to [-1, 1]"
    )
    stride_in_1x1: bool = Field(
        False,
        description="ResNet v1 bottlenecks (stride in the first 1x1 conv), as the "
        "Keras-converted RadImageNet weights need; resnet50 only",
    )


class StageLR(_Section):
    head: float = Field(5e-5, gt=0, description="learning rate of the head (all stages)")
    layer4: float = Field(1e-5, gt=0, description="learning rate of layer4 (stages 2-3)")
    layer3: float = Field(5e-6, gt=0, description="learning rate of layer3 (stage 3)")


class WeightDecay(_Section):
    backbone: float = Field(1e-4, ge=0, description="AdamW decay of backbone parameters")
    head: float = Field(1e-3, ge=0, description="AdamW decay of head parameters")
    exempt_norm_and_bias: bool = Field(
        False,
        description="no decay on biases and BatchNorm parameters (common practice; the "
        "specification gives each block one decay and exempts nothing)",
    )


class ConfidenceLoss(_Section):
    enabled: bool = Field(False, description="add the confidence-separation term")
    target: float = Field(0.30, ge=0.0, le=1.0, description="T in max(0, T - sep)^2")
    weight: float = Field(0.15, ge=0.0, description="lambda of the confidence term")


class AugmentSide(_Section):
    """Augmentation strength for one class (see AugmentConfig for the defaults' reasons)."""

    rotate_deg: float = Field(ge=0, le=180, description="uniform rotation in [-r, r] degrees")
    scale: float = Field(ge=0, lt=1, description="uniform zoom in [1-s, 1+s]")
    translate: float = Field(ge=0, lt=1, description="shift up to this fraction of the image")
    flip_prob: float = Field(ge=0, le=1, description="left-right flip probability")
    noise_std: float = Field(ge=0, description="Gaussian noise in window units (1.0 = 80 HU)")
    gamma: float = Field(ge=0, lt=1, description="gamma in [1-g, 1+g]")
    contrast: float = Field(ge=0, lt=1, description="contrast factor in [1-c, 1+c]")


def _mild_augment() -> AugmentSide:
    # Mild, for both classes: a 3 mm metastasis is 3-4 pixels at 256^2 and strong zoom or
    # rotation would interpolate it into its surroundings; equal strengths because any
    # difference between the classes' augmentation is a label the network can read.
    return AugmentSide(
        rotate_deg=7.0,
        scale=0.05,
        translate=0.04,
        flip_prob=0.5,
        noise_std=0.01,
        gamma=0.05,
        contrast=0.05,
    )


class AugmentConfig(_Section):
    """Augmentation strengths per class, the same for both by default.

    The specification asks for milder augmentation on positives; equal defaults are a
    departure (docs/architecture.md): any difference between the classes is a label the
    network can read. Class-dependent strengths stay possible, and ``train`` warns when they
    differ."""

    enabled: bool = Field(True, description="augmentation of the training slices")
    positive: AugmentSide = Field(default_factory=_mild_augment)
    negative: AugmentSide = Field(default_factory=_mild_augment)

    def class_dependent(self) -> list[str]:
        """The strengths set differently for the two classes ("rotate_deg 7 vs 15", ...)."""
        pos, neg = self.positive.model_dump(), self.negative.model_dump()
        return [f"{k} {pos[k]:g} vs {neg[k]:g}" for k in pos if pos[k] != neg[k]]


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1, description="epochs in all")
    stage_epochs: tuple[int, int, int] = Field(
        (0, 5, 12), description="first epoch of stage 1 (head), 2 (+layer4), 3 (+layer3)"
    )
    lr: StageLR = Field(default_factory=StageLR)
    weight_decay: WeightDecay = Field(default_factory=WeightDecay)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    lr_warmup_epochs: float = Field(
        0.0,
        ge=0,
        description="ramp every learning rate linearly from 0 over this many epochs (steps "
        "counted from the start of training)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="after the warm-up: constant (the specification's one rate per stage) or "
        "a cosine decay to 0 at the last epoch, so that the weights settle; pair cosine with "
        "best_metric: last",
    )
    # With pos_fraction 0.4 a batch of 10 holds 4 positives and 6 negatives: the specified 1:1.5.
    batch_patients: int = Field(
        10,
        ge=2,
        description="patients per batch (all their slices); under torchrun, of all processes",
    )
    pos_fraction: float = Field(0.4, gt=0.0, lt=1.0, description="share of positives per batch")
    max_slices: int | None = Field(
        None, ge=1, description="train on a random window of at most this many slices"
    )
    pad_slices: bool = Field(
        False,
        description="pad shorter patients to max_slices by repeating their end slices: every "
        "training batch has one shape (cuDNN autotuning, compile without recompiles); "
        "max pooling only",
    )
    pos_weight: float | None = Field(None, gt=0, description="BCE weight of positives")
    # On by default: the BatchNorm layers of a random backbone hold the initial mean 0 /
    # variance 1, not the statistics of their inputs. Frozen blocks would normalise with them,
    # and a block unfrozen later would be validated (eval mode, running statistics) with
    # statistics far from the batch statistics it trained with.
    bn_calibration_patients: int = Field(
        48,
        ge=0,
        description="with model.pretrained none: estimate the random backbone's BatchNorm "
        "statistics from this many training patients before stage 1 (all of them when fewer; "
        "0 = off, keeping mean 0 / variance 1)",
    )
    confidence: ConfidenceLoss = Field(default_factory=ConfidenceLoss)
    ema_epochs: float = Field(
        0.0,
        ge=0,
        description="> 0: validate, select and save an exponential moving average of the "
        "weights over about this many epochs (train/ema.py) instead of the weights; 0 = off",
    )
    device: str = Field(
        "auto", description="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)"
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    compile: bool = Field(False, description="torch.compile the model")
    best_metric: Literal["auc", "auc_then_val_loss", "f1", "val_loss", "separation", "last"] = (
        Field(
            "auc_then_val_loss",
            description="rule that picks the epoch of model.safetensors from its validation "
            "metrics (brainmets.train.selection): highest AUC, ties to the lowest validation "
            "loss (auc alone keeps the first epoch to saturate AUC, while the logits and the "
            "threshold still move); its F1 threshold is saved with it",
        )
    )
    calibration: Literal["platt", "none"] = Field(
        "platt",
        description="reported probabilities: platt = sigmoid(a * logit + b) fitted on the best "
        "epoch's validation patients (needs 5 of each class; decisions and AUC unchanged); "
        "none = sigmoid of the patient logit",
    )
    zero_sensitivity_patience: int = Field(
        3,
        ge=1,
        description="warn after this many epochs in a row with validation sensitivity 0 at "
        "the operating threshold, or at 0.5 (and again every as many epochs while it lasts)",
    )
    oscillation_window: int = Field(
        6, ge=3, description="epochs of validation loss the oscillation warning looks at"
    )
    oscillation_spread: float = Field(
        0.2,
        gt=0,
        description="oscillation warning: the window's validation loss must span at least this "
        "share of its median (and go up and down, brainmets.train.health)",
    )
    allow_chance: bool = Field(
        False,
        description="brainmets train exits 0 even when the model is not shown to rank its "
        "validation patients (otherwise exit 3, after the warning); train --allow-chance sets "
        "it, and train --resume keeps it",
    )
    log_every: int = Field(10, ge=1, description="read the loss back every this many steps")
    checkpoint_every: int = Field(
        200, ge=1, description="also save the resume state every this many steps"
    )

    @field_validator("stage_epochs", mode="before")
    @classmethod
    def _three_stages(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) != 3:
            raise ValueError(
                f"needs the first epoch of each of the 3 stages, e.g. [0, 5, 12]; got {list(v)}"
            )
        return v

    @field_validator("stage_epochs")
    @classmethod
    def _stages_ordered(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not (v[0] == 0 and v[0] <= v[1] <= v[2]):
            raise ValueError("stage_epochs must start at 0 and be non-decreasing, e.g. [0, 5, 12]")
        return v

    @model_validator(mode="after")
    def _pad_needs_a_length(self) -> TrainConfig:
        if self.pad_slices and self.max_slices is None:
            raise ValueError("train.pad_slices needs train.max_slices (the length to pad to)")
        return self


class EvaluateConfig(_Section):
    n_boot: int = Field(
        1000,
        ge=0,
        description="bootstrap resamples for the 95% CIs of AUC, F1 and the other non-proportions "
        "(0: none); sensitivity, specificity, PPV, NPV and accuracy get Wilson intervals",
    )
    sensitivity_targets: list[float] = Field(
        default_factory=lambda: [0.90, 0.95],
        description="extra operating points, chosen on validation predictions",
    )


class Config(_Section):
    name: str = Field("run", description="run name (default folder runs/NAME)")
    seed: int = Field(0, description="seeds the split, sampler, augmentation and init")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _padding_needs_max_pooling(self) -> Config:
        # A repeated slice leaves a max unchanged but adds weight to a mean, lse or attention.
        if self.train.pad_slices and self.model.pooling != "max":
            raise ValueError(
                f"train.pad_slices needs model.pooling=max (got {self.model.pooling!r}): the "
                "repeated end slices would weigh in the pooled patient logit"
            )
        return self

    def config_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Values the specification states; every other key is ours to choose (its meaning says why).
SPECIFIED = {
    "preprocess.window_center": "40",
    "preprocess.window_width": "80",
    "preprocess.size": "256",
    "model.arch": "resnet50",
    "model.pretrained": "RadImageNet",
    "model.conv1_reduce": "mean",
    "model.pooling": "max",
    "model.dropout": "0.4",
    "model.hidden": "512",
    "model.normalization": "z-score per slice",
    "train.epochs": "40",
    "train.stage_epochs": "0 / 5 / 12",
    "train.lr.head": "5e-5",
    "train.lr.layer4": "1e-5",
    "train.lr.layer3": "5e-6",
    "train.weight_decay.backbone": "1e-4",
    "train.weight_decay.head": "1e-3",
    "train.grad_clip": "1.0",
    "train.pos_fraction": "pos:neg 1:1.5",
    "train.pos_weight": "optional",
    "train.confidence.enabled": "optional",
    "train.confidence.target": "0.30",
    "train.confidence.weight": "0.15",
}


def reference_rows(section: BaseModel | None = None, prefix: str = "") -> list[tuple[str, ...]]:
    """(key, default, specified value, meaning) for every leaf key, in declaration order."""
    section = Config() if section is None else section
    rows: list[tuple[str, ...]] = []
    for name, info in type(section).model_fields.items():
        key, value = f"{prefix}{name}", getattr(section, name)
        if isinstance(value, BaseModel):
            rows += reference_rows(value, f"{key}.")
        else:
            rows.append((key, json.dumps(value), SPECIFIED.get(key, ""), info.description or ""))
    return rows


def reference_markdown() -> str:
    """The config reference table of docs/config.md, generated from the models themselves."""
    lines = ["| key | default | specified | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {s} | {m} |" for k, d, s, m in reference_rows()]
    return "\n".join(lines)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


# Named starting points (``brainmets config --preset NAME > my.yaml``), as overrides of the
# defaults: every entry is a key of the config reference.
PRESETS: dict[str, list[str]] = {
    # The specified configuration: the defaults (ResNet-50 at 256^2, 40 epochs, 0 / 5 / 12).
    "spec": [],
    # The CPU demo's configuration (brainmets demo without a GPU): the same three-stage
    # curriculum, only shorter, sized for a few CPU cores. ResNet-18 at 128^2, 16 epochs with
    # stages at 0 / 1 / 2, learning rate 1e-3 for every trained block and batches of 5 patients
    # (2 positives, 3 negatives), so that a few minutes of training hold ~24 optimiser steps per
    # epoch instead of ~10.
    "cpu-small": [
        "model.arch=resnet18",
        "preprocess.size=128",
        "train.epochs=16",
        "train.stage_epochs=[0, 1, 2]",
        "train.lr.head=1.0e-3",
        "train.lr.layer4=1.0e-3",
        "train.lr.layer3=1.0e-3",
        "train.batch_patients=5",
        # Loading a uint8 volume is ~1 ms; worker processes would only take cores from the model.
        "data.num_workers=0",
        "evaluate.n_boot=500",
    ],
}
PRESET_SUMMARIES = {
    "spec": "the specified configuration: ResNet-50 at 256^2, 40 epochs, stages at 0 / 5 / 12 "
    "(a GPU's work)",
    "cpu-small": "the CPU demo's: ResNet-18 at 128^2, 16 epochs, stages at 0 / 1 / 2, learning "
    "rate 1e-3, batches of 5 (minutes per epoch on a few CPU cores)",
}


def preset_overrides(name: str) -> list[str]:
    """The overrides of preset ``name``; an unknown name is an error that lists the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    return list(PRESETS[name])


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
    try:
        return key, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"--set {text}: the value {raw!r} is not valid YAML ({problem}); "
            "quote it for the shell, e.g. --set 'train.stage_epochs=[0,5,12]'"
        ) from err


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config model (sections and their fields)."""
    keys = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, f"{key}.")
    return keys


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, _known_keys(Config), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            lines.append(f"  {loc}: unknown key{hint}")
        elif e["type"] == "model_type":  # a section given one value, e.g. train.lr=1e-3
            keys = [k for k in _known_keys(Config) if k.startswith(f"{loc}.")]
            example = keys[0] if keys else f"{loc}.KEY"
            lines.append(
                f"  {loc}: a section, not a value; set its keys ({', '.join(keys)}), "
                f"e.g. --set {example}=..."
            )
        else:
            lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` laid over ``defaults`` section by section, so that setting one key of a
    section (``augment.negative.noise_std``) keeps the defaults of its siblings."""
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(_merged(Config().model_dump(mode="json"), tree))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    preset: str | None = None,
) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``preset``: a name of :data:`PRESETS`, laid under the file (the file's keys win, and the
    overrides win over both)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    base: dict[str, Any] = {}
    if preset is not None:
        for text in preset_overrides(preset):
            key, value = parse_override(text)
            _set_dotted(base, key, value)
        source = f"preset {preset}"
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
        if preset is not None:
            source = f"{source} over preset {preset}"
    tree = _merged(base, tree)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source = f"{source} + --set {' '.join(overrides)}"
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)


_REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated by `python -m brainmets.config --markdown > docs/config.md`; do not edit by hand
(tests/test_docs.py keeps this file equal to the generated text). -->

One YAML file configures every step: `prepare` reads `preprocess.*`, `train` reads everything,
`evaluate` reads `evaluate.*`. `brainmets config > my.yaml` prints the defaults to start from;
`brainmets config --preset cpu-small > my.yaml` the CPU demo's configuration (ResNet-18 at
128², 16 epochs, stages at 0 / 1 / 2), each key it changes marked `[preset cpu-small]`.

- The file is validated when it is loaded: an unknown key (with the nearest known key as a
  suggestion) or a value of the wrong type is an error that names the key.
- A file may set only some keys; setting one key of a section keeps the defaults of the others.
- `--set key.sub=value` overrides one key on the command line (repeatable); the value is read
  as YAML, so `--set train.epochs=3` is a number and `--set 'train.stage_epochs=[0,5,12]'` a list.
- Every run writes its resolved config to `RUN/config.yaml`; `brainmets train --resume RUN`
  reads it back.
- [`default.yaml`](../src/brainmets/configs/default.yaml) holds the keys a user usually sets,
  with their defaults.

**specified** is the value the [specification](architecture.md#specification) states; an empty
cell is a choice of ours, explained in its meaning. Where a default departs from the
specification, [the architecture page](architecture.md#departures-from-the-specification) says
how and why.
"""


def reference_page() -> str:
    """docs/config.md: how the config is used, then the reference table."""
    return f"{_REFERENCE_INTRO}\n{reference_markdown()}\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m brainmets.config [--markdown]``: the defaults as YAML, or docs/config.md."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m brainmets.config",
        description="Print the default configuration as YAML, or its reference as markdown.",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="the reference page (docs/config.md) instead"
    )
    args = parser.parse_args(argv)
    sys.stdout.write(reference_page() if args.markdown else dump_config(Config()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
