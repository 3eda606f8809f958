"""Pretrained backbone weights from a file the user passes (nothing is downloaded).

Layouts understood (detected from the keys, after stripping ``module.`` / ``model.`` prefixes):

- ``radimagenet``: the official RadImageNet PyTorch ``ResNet50.pt``, a state dict of
  ``nn.Sequential(*list(resnet50.children())[:-2])`` saved as ``backbone``: ``backbone.<i>.…``
  with i the torchvision children 0-7 (0 conv1, 1 bn1, 4-7 layer1-layer4), no fc.
- ``torchvision``: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` …; ``fc.*`` (and any
  head of ours) is ignored. conv1 may have 3 input channels or 1.
- the Keras-converted RadImageNet ResNet-50, in either layout above or with Keras's layer names
  (``conv1_conv``, ``conv2_block1_1_conv``, ``conv2_block1_0_bn`` …, with ``kernel`` / ``gamma``
  / ``beta`` / ``moving_mean`` / ``moving_variance`` or PyTorch's tensor names, kernels as Keras
  stores them [h, w, in, out] or as PyTorch does). Two differences from torchvision's network:
  - every conv has a bias. Each conv feeds a BatchNorm, where a bias b only shifts the input:
    BN(x + b) with running mean m equals BN(x) with m - b, in training too (the batch mean
    absorbs b). So the biases are folded into the running means, exactly.
  - each downsampling bottleneck strides in its first 1x1 conv (ResNet v1), not in the 3x3
    (torchvision's v1.5). The network must be built that way: ``model.stride_in_1x1: true``.
    Loading such weights into a v1.5 network, or v1.5 weights into a v1 network, is refused,
    because either computes a different function than the weights were trained for.

Refused: Keras ``.h5`` files themselves (convert them to a state dict first).

Formats: ``.safetensors``; ``.pt`` / ``.pth`` / ``.bin`` only through
``torch.load(weights_only=True)`` (never unpickle arbitrary objects); the state dict may be nested
under ``state_dict`` or ``model``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from brainmets.io import file_sha256, safe_reason
from brainmets.model.resnet import CONV1_REDUCTIONS, BrainMetsNet

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
_PREFIXES = ("module.", "model.")
_NESTING_KEYS = ("state_dict", "model")
# torchvision children index -> our module name (2 = relu, 3 = maxpool: no parameters).
_RADIMAGENET_CHILDREN = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
# Conv biases, in our key names: torchvision's ResNet convs have none, Keras's all do.
_CONV_BIAS = re.compile(r"^(conv1|layer\d\.\d+\.(conv\d|downsample\.0))\.bias$")
_KERAS_NAME = re.compile(r"conv\d_block\d+_\d_(conv|bn)|conv1_conv|conv1_bn")
# The layer name may come after a prefix (h5py dumps repeat it: conv1_conv/conv1_conv/kernel:0,
# or put the model's name first: resnet50/conv1_conv/kernel:0); the tensor name is last.
_KERAS_KEY = re.compile(
    r"(?:^|[/.])(?:conv1_(?P<stem>conv|bn)|conv(?P<stage>[2-5])_block(?P<block>\d+)_"
    r"(?P<unit>[0-3])_(?P<kind>conv|bn))[./](?:[\w/.]*[/.])?(?P<tensor>\w+?)(?::\d+)?$"
)
_KERAS_TENSORS = {
    "kernel": "weight",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_MIN_COVERAGE = 0.5
_MAX_RUNNING_VAR = 1e5

_USE_INSTEAD = (
    "Use the official RadImageNet PyTorch ResNet50.pt (keys backbone.0 ... backbone.7), a "
    "torchvision-style ResNet-50 state dict (conv1.weight, layer1.0.conv1.weight, ...) or the "
    "Keras-converted weights as a state dict (with model.stride_in_1x1: true)."
)


@dataclass
class LoadReport:
    """What :func:`load_pretrained_backbone` did with each tensor of the file."""

    layout: str
    loaded: list[str] = field(default_factory=list)  # our keys that received a tensor
    missing: list[str] = field(default_factory=list)  # backbone keys the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file keys that mapped to nothing
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # file keys dropped on purpose (fc.*)
    source: str = ""
    sha256: str = ""  # of the weights file: what a download is checked against

    def __str__(self) -> str:
        lines = [
            f"pretrained backbone from {self.source or '?'} (layout {self.layout}): "
            f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored",
            f"  SHA-256 of {Path(self.source).name or '?'}: {self.sha256 or '?'} (recorded in "
            "model.json; compare it with the checksum published beside the download)",
        ]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def warn_random_init(bn_calibration_patients: int = 0) -> str:
    """Log (and return) a loud warning that the backbone trains from random initialisation,
    saying what to do about it."""
    batchnorm = (
        f"Its BatchNorm statistics are estimated from {bn_calibration_patients} training "
        "patients first (train.bn_calibration_patients)."
        if bn_calibration_patients
        else "train.bn_calibration_patients is 0, so its frozen BatchNorm layers normalise "
        "with mean 0 / variance 1, which describe no data: set it to e.g. 48."
    )
    message = (
        "model.pretrained is 'none': the ResNet backbone starts from RANDOM weights. The "
        "specified system is pretrained on RadImageNet; from scratch, a cohort of hundreds of "
        "patients will give far weaker results. Pass RadImageNet's ResNet50.pt with --set "
        f"model.pretrained=/path/to/ResNet50.pt (see the README) unless this is a test. {batchnorm}"
    )
    log.warning("!" * 20 + " " + message + " " + "!" * 20)
    return message


def load_pretrained_backbone(
    model: BrainMetsNet, path: str | Path, *, conv1_reduce: str | None = None
) -> LoadReport:
    """Load backbone weights from ``path`` into ``model`` (conv1 ... layer4; the head is left).

    Args:
        model: the network to fill in place.
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file in a supported layout.
        conv1_reduce: ``mean`` or ``sum`` over the input channels of an RGB conv1; defaults to
            ``model.conv1_reduce``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unsupported format or layout (Keras), a file that cannot be read safely,
            or one that matched no backbone tensor.
    """
    path = Path(path)
    reduce = conv1_reduce or model.conv1_reduce
    if reduce not in CONV1_REDUCTIONS:
        raise ValueError(
            f"conv1_reduce={reduce!r} is not supported; choose one of {CONV1_REDUCTIONS}"
        )
    state = _strip_prefixes(read_state_dict(path))
    layout = detect_layout(state, path)
    report = LoadReport(layout=layout, source=str(path), sha256=file_sha256(path))
    mapped = _map_keys(state, layout, report)
    conv_biases = [key for key in mapped if _CONV_BIAS.match(key)]
    keras = layout == "keras" or bool(conv_biases)
    evidence = mapped[conv_biases[0]][0] if conv_biases else next(iter(state), "")
    _check_stride_placement(model, keras, path, [evidence])
    if keras:
        folded = _fold_conv_biases(mapped, conv_biases, report)
        report.layout = (
            f"{layout}, Keras-converted: {folded} conv biases folded into BatchNorm running "
            "means, stride in the 1x1 conv"
        )

    targets = {
        key: value
        for key, value in model.state_dict().items()
        if key.split(".", 1)[0] in _BACKBONE_ROOTS
    }
    accepted: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, target in targets.items():
        if key not in mapped:
            # num_batches_tracked only matters for BN momentum=None; old checkpoints lack it.
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
            continue
        source_key, value = mapped.pop(key)
        if layout == "keras":
            value = _from_keras_kernel(value, target)
        if key == "conv1.weight":
            value = adapt_conv1_weight(value, reduce)
        if value.shape != target.shape:
            mismatched.append(
                f"{key} (file key {source_key}): file {tuple(value.shape)}, "
                f"model {tuple(target.shape)}"
            )
            continue
        accepted[key] = value.to(target.dtype)
        report.loaded.append(key)
    if mismatched:
        # Names that fit with shapes that do not: weights of another architecture (a
        # ResNet-18 file and a ResNet-50 share most names). Half-loaded, training would go on
        # from a network that is neither pretrained nor consistently random.
        shown = "; ".join(mismatched[:3]) + (" ..." if len(mismatched) > 3 else "")
        raise ValueError(
            f"{path}: {len(mismatched)} tensors do not fit this {model.arch} backbone, e.g. "
            f"{shown}. Is the file for another architecture (model.arch)?"
        )
    report.unexpected += [source_key for source_key, _ in mapped.values()]

    _check_coverage(report, targets, path)
    _check_batchnorm(accepted, report)
    model.load_state_dict(accepted, strict=False)
    log.info("%s", report)
    return report


def adapt_conv1_weight(weight: Tensor, reduce: str = "mean") -> Tensor:
    """An RGB conv1 weight [64, 3, k, k] -> single channel [64, 1, k, k].

    ``mean`` (specified) keeps the filters' shape but divides the response to a grey image by 3;
    ``sum`` keeps the response of the RGB network to that grey image replicated to three
    channels, which is the activation scale the pretrained (possibly frozen) bn1 expects.
    """
    if weight.ndim != 4 or weight.shape[1] == 1:
        return weight
    if reduce == "mean":
        return weight.mean(dim=1, keepdim=True)
    if reduce == "sum":
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(f"conv1_reduce={reduce!r} is not supported; choose one of {CONV1_REDUCTIONS}")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read the tensors of a weights file safely (safetensors or ``weights_only`` torch.load)."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        raise ValueError(
            f"{path}: Keras weights files ({suffix}) are not read. Save the model's weights as "
            "a state dict (.safetensors or .pt, Keras layer names are fine) and set "
            f"model.stride_in_1x1: true. {_USE_INSTEAD}"
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError: a header that does not parse
            raise ValueError(
                f"{path}: not a readable safetensors file ({safe_reason(error)}); it is damaged "
                "or another format under a .safetensors name"
            ) from error
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported weights format {suffix!r}; use .safetensors or one of "
            f"{TORCH_SUFFIXES} (read with torch.load(weights_only=True))"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, zip errors...
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({safe_reason(error)}). "
            "If it holds a "
            "pickled model object rather than a state dict, re-save model.state_dict() from code "
            "you trust, or convert it to .safetensors."
        ) from error
    return _unnest(obj, path)


def detect_layout(state: Mapping[str, Tensor], path: Path) -> str:
    """``radimagenet``, ``torchvision`` or ``keras`` (Keras's layer names)."""
    if any(_KERAS_NAME.search(k) for k in state):
        return "keras"
    if any(re.match(r"backbone\.\d", k) for k in state):
        return "radimagenet"
    if any(k.split(".", 1)[0] in _BACKBONE_ROOTS for k in state):
        return "torchvision"
    sample = ", ".join(list(state)[:5])
    raise ValueError(
        f"{path}: no ResNet backbone keys found (first keys: {sample or 'none'}). {_USE_INSTEAD}"
    )


def _check_stride_placement(
    model: BrainMetsNet, keras: bool, path: Path, evidence: list[str]
) -> None:
    """Keras-converted weights need ResNet v1 bottlenecks, all others torchvision's v1.5."""
    if keras and not model.stride_in_1x1:
        raise ValueError(
            f"{path}: these are Keras-converted ResNet-50 weights (e.g. {evidence[0]!r}): Keras "
            "puts the stride of each downsampling block in the first 1x1 conv, torchvision in "
            "the 3x3 conv, so they need that network: set model.stride_in_1x1: true (--set "
            "model.stride_in_1x1=true)"
        )
    if not keras and model.stride_in_1x1:
        raise ValueError(
            f"{path}: model.stride_in_1x1 is true, but these weights have no conv biases and no "
            "Keras layer names: they are torchvision-style (stride in the 3x3 conv) and would "
            "compute a different function; set model.stride_in_1x1: false"
        )


def _batchnorm_of(conv_key: str) -> str:
    """The BatchNorm that follows a conv, in our key names."""
    if conv_key == "conv1.bias":
        return "bn1"
    if conv_key.endswith("downsample.0.bias"):
        return conv_key[: -len("0.bias")] + "1"
    block, conv = conv_key[: -len(".bias")].rsplit(".", 1)
    return f"{block}.bn{conv[len('conv') :]}"


def _fold_conv_biases(
    mapped: dict[str, tuple[str, Tensor]], conv_biases: list[str], report: LoadReport
) -> int:
    """Fold each conv bias b into the running mean m of the BatchNorm after it (m - b)."""
    folded = 0
    for key in conv_biases:
        source_key, bias = mapped.pop(key)
        mean_key = f"{_batchnorm_of(key)}.running_mean"
        if mean_key not in mapped:
            report.warnings.append(f"{source_key}: no {mean_key} to fold this conv bias into")
            report.unexpected.append(source_key)
            continue
        mean_source, mean = mapped[mean_key]
        mapped[mean_key] = (mean_source, mean.float() - bias.float().reshape(mean.shape))
        folded += 1  # said in report.layout; not "ignored": the bias is in the running mean
    return folded


def _map_keys(
    state: Mapping[str, Tensor], layout: str, report: LoadReport
) -> dict[str, tuple[str, Tensor]]:
    """File keys -> {our key: (file key, tensor)}; unmapped keys go to the report."""
    mapped: dict[str, tuple[str, Tensor]] = {}
    for source_key, value in state.items():
        key = _to_our_key(source_key, layout)
        if key is None:
            root = source_key.split(".", 1)[0]
            # A classifier is expected in a checkpoint and deliberately not used.
            if root in ("fc", "head", "classifier", "attention"):
                report.ignored.append(source_key)
            else:
                report.unexpected.append(source_key)
            continue
        mapped[key] = (source_key, value)
    return mapped


def _to_our_key(source_key: str, layout: str) -> str | None:
    if layout == "keras":
        return _keras_to_our_key(source_key)
    if layout == "radimagenet":
        match = re.match(r"backbone\.(\d+)\.(.+)$", source_key)
        if match is None or match.group(1) not in _RADIMAGENET_CHILDREN:
            return None
        return f"{_RADIMAGENET_CHILDREN[match.group(1)]}.{match.group(2)}"
    return source_key if source_key.split(".", 1)[0] in _BACKBONE_ROOTS else None


def _keras_to_our_key(source_key: str) -> str | None:
    """``conv3_block2_1_conv.kernel`` -> ``layer2.1.conv1.weight`` and so on: Keras's stage
    S (2-5) is layerS-1, its blocks count from 1, unit 0 is the shortcut (downsample)."""
    match = _KERAS_KEY.search(source_key)
    if match is None:
        return None
    tensor = _KERAS_TENSORS.get(match["tensor"], match["tensor"])
    if match["stem"]:
        return f"{'conv1' if match['stem'] == 'conv' else 'bn1'}.{tensor}"
    block = f"layer{int(match['stage']) - 1}.{int(match['block']) - 1}"
    unit, kind = match["unit"], match["kind"]
    if unit == "0":
        return f"{block}.downsample.{0 if kind == 'conv' else 1}.{tensor}"
    return f"{block}.{kind}{unit}.{tensor}"


def _from_keras_kernel(value: Tensor, target: Tensor) -> Tensor:
    """A conv kernel stored by Keras as [h, w, in, out] in PyTorch's [out, in, h, w] order."""
    if value.ndim == 4 and value.shape != target.shape:
        candidate = value.permute(3, 2, 0, 1)
        if candidate.shape == target.shape or (
            candidate.shape[0] == target.shape[0] and candidate.shape[2:] == target.shape[2:]
        ):  # conv1: 3 input channels, reduced to 1 below
            return candidate.contiguous()
    return value


def _check_coverage(report: LoadReport, targets: Mapping[str, Tensor], path: Path) -> None:
    counted = [k for k in targets if not k.endswith("num_batches_tracked")]
    loaded = [k for k in report.loaded if not k.endswith("num_batches_tracked")]
    if not loaded:
        raise ValueError(
            f"{path}: matched none of the {len(counted)} backbone tensors "
            f"(layout {report.layout}). {_USE_INSTEAD}\n{report}"
        )
    coverage = len(loaded) / len(counted)
    if coverage < _MIN_COVERAGE:
        report.warnings.append(
            f"matched only {len(loaded)} of {len(counted)} backbone tensors ({coverage:.0%}): "
            "is this file for the same architecture?"
        )


def _check_batchnorm(accepted: Mapping[str, Tensor], report: LoadReport) -> None:
    """Warn about BatchNorm statistics no trained ResNet would have."""
    for key, value in accepted.items():
        if key.endswith("running_var"):
            if not torch.isfinite(value).all() or (value < 0).any():
                report.warnings.append(f"{key} has negative or non-finite running variances")
            elif value.max() > _MAX_RUNNING_VAR:
                report.warnings.append(
                    f"{key} has running variances up to {value.max():.3g}, far outside the "
                    "usual range: are the BatchNorm buffers in the right order?"
                )
        elif key.endswith("running_mean") and not torch.isfinite(value).all():
            report.warnings.append(f"{key} has non-finite running means")
    variances = [v for k, v in accepted.items() if k.endswith("running_var")]
    means = [v for k, v in accepted.items() if k.endswith("running_mean")]
    if (
        variances
        and all(bool((v == 1).all()) for v in variances)
        and all(bool((m == 0).all()) for m in means)
    ):
        report.warnings.append(
            "every BatchNorm has running_mean 0 and running_var 1: the statistics were never "
            "trained (a freshly initialised network?)"
        )


def _unnest(obj: object, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping):
        nested = [k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got {type(obj)}")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP (``module.``) and wrapper (``model.``) prefixes, however deeply stacked, and a
    ``backbone.`` in front of torchvision names (``backbone.layer1…``, not RadImageNet's
    ``backbone.4…``)."""
    stripped = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith("backbone.") and key.split(".")[1] in (*_BACKBONE_ROOTS, "fc"):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped
