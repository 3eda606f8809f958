"""BrainMetsNet: single-channel torchvision ResNet backbone, slice head and patient pooling.

The network (docs/architecture.md, "Specification"): torchvision ResNet-50 (conv1 ... layer4, global average pool
-> 2048 features), conv1 taking one channel (the brain-windowed CT slice), and the head
``Linear(2048 -> 512) -> ReLU -> Dropout(0.4) -> Linear(512 -> 1)`` giving one logit per slice.
Slice logits are pooled into one logit per patient (``max`` by default, see ``pooling.py``).

The backbone modules sit directly on the model under torchvision's names (``conv1``, ``bn1``,
``layer1`` ...), so our state dict keys are torchvision's and pretrained weights map one to one.

``resnet18`` / ``resnet34`` are a convenience for CPU demos and tests only (same head rule:
``Linear(feat -> hidden) -> ReLU -> Dropout -> Linear(hidden -> 1)`` with feat = 512); the
specified system, and the default, is ``resnet50``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torchvision
from torch import Tensor, nn

from brainmets.model.pooling import POOLING_METHODS, GatedAttentionPooling, pool_patients

BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
BACKBONE_BLOCKS = BLOCKS[:-1]
ARCHITECTURES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet50": torchvision.models.resnet50,
    "resnet18": torchvision.models.resnet18,  # CPU demo / test convenience
    "resnet34": torchvision.models.resnet34,  # CPU demo / test convenience
}
CONV1_REDUCTIONS = ("mean", "sum")

# Child modules of each block; the stem's ReLU and max-pool have no parameters.
_BLOCK_MODULES = {
    "stem": ("conv1", "bn1", "relu", "maxpool"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": ("head", "attention"),
}


class PatientOutput(NamedTuple):
    """What one forward pass over a flat batch of slices returns."""

    patient_logits: Tensor  # [P] float32
    slice_logits: Tensor  # [S] float32
    top_slice: Tensor  # [P] long: flat index of the slice that drove each patient's score


class ParameterCount(NamedTuple):
    total: int
    trainable: int


def _move_stride_to_1x1(net: nn.Module) -> None:
    """ResNet v1: each downsampling bottleneck strides in its first 1x1 conv, not the 3x3.

    Output shapes are the same (a 1x1 conv needs no padding); the function is not, so weights
    trained one way compute something else the other way.
    """
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(net, name)[0]
        if not hasattr(block, "conv3"):
            raise ValueError(
                "stride_in_1x1 applies to bottleneck ResNets (resnet50); resnet18/34 blocks have "
                "no 1x1 conv"
            )
        block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


class BrainMetsNet(nn.Module):
    """Single-channel ResNet slice classifier with patient-level pooling.

    Args:
        arch: ``resnet50`` (specified) or ``resnet18`` / ``resnet34`` (CPU demos and tests).
        pooling: one of ``POOLING_METHODS``; ``max`` as specified.
        conv1_reduce: how :func:`~brainmets.model.pretrained.load_pretrained_backbone` turns an
            RGB conv1 into one channel: ``mean`` (specified) or ``sum`` (keeps the activation
            scale the pretrained bn1 statistics expect for a grey image replicated to RGB).
        dropout: dropout probability in the head (0.4 as specified).
        hidden: width of the head's hidden layer (512 as specified).
        lse_temperature: temperature of ``lse`` pooling (smaller -> closer to max).
        stride_in_1x1: ResNet v1 bottlenecks (the downsampling stride of layer2-4's first block
            in its first 1x1 conv, as in Keras and Caffe) instead of torchvision's v1.5 (in the
            3x3 conv): what the Keras-converted RadImageNet weights were trained with.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        pooling: str = "max",
        conv1_reduce: str = "mean",
        dropout: float = 0.4,
        hidden: int = 512,
        lse_temperature: float = 1.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("arch", arch, tuple(ARCHITECTURES))
        _check_choice("pooling", pooling, POOLING_METHODS)
        _check_choice("conv1_reduce", conv1_reduce, CONV1_REDUCTIONS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not lse_temperature > 0:
            raise ValueError(f"lse_temperature must be > 0, got {lse_temperature}")
        self.arch = arch
        self.pooling = pooling
        self.conv1_reduce = conv1_reduce
        self.dropout = dropout
        self.hidden = hidden
        self.lse_temperature = lse_temperature
        self.stride_in_1x1 = bool(stride_in_1x1)

        resnet = ARCHITECTURES[arch](weights=None)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # Same initialisation torchvision gives its own conv layers.
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        if self.stride_in_1x1:
            _move_stride_to_1x1(self)
        self.feature_dim: int = resnet.fc.in_features
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )
        self.attention = GatedAttentionPooling(self.feature_dim) if pooling == "attention" else None
        self._num_frozen = 0  # length of the frozen prefix of BLOCKS

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (written to the checkpoint sidecar)."""
        return {
            "arch": self.arch,
            "pooling": self.pooling,
            "conv1_reduce": self.conv1_reduce,
            "dropout": self.dropout,
            "hidden": self.hidden,
            "lse_temperature": self.lse_temperature,
            "stride_in_1x1": self.stride_in_1x1,
        }

    # ----------------------------------------------------------------- freezing (curriculum)
    @property
    def frozen_blocks(self) -> tuple[str, ...]:
        return BLOCKS[: self._num_frozen]

    @property
    def trainable_blocks(self) -> tuple[str, ...]:
        return BLOCKS[self._num_frozen :]

    def set_trainable(self, blocks: Iterable[str]) -> None:
        """Train ``blocks``; freeze the others (no gradients, BatchNorm kept in eval mode).

        The frozen blocks must be a prefix of ``BLOCKS`` (``stem`` .. some layer): a frozen
        block behind a trainable one would still need its activations kept for backward, which
        defeats running the frozen part under ``no_grad``.
        """
        trainable = set(blocks)
        unknown = trainable - set(BLOCKS)
        if unknown:
            raise ValueError(f"unknown blocks {sorted(unknown)}; blocks are {list(BLOCKS)}")
        suffixes = [set(BLOCKS[k:]) for k in range(len(BLOCKS) + 1)]
        if trainable not in suffixes:
            allowed = " | ".join(str(list(BLOCKS[k:])) for k in range(len(BLOCKS) + 1))
            raise ValueError(
                f"trainable blocks {sorted(trainable, key=BLOCKS.index)} leave a frozen set that "
                f"is not a prefix of {list(BLOCKS)}; allowed trainable sets: {allowed}"
            )
        self._num_frozen = len(BLOCKS) - len(trainable)
        for name, params in self.block_parameters().items():
            for param in params:
                param.requires_grad_(name in trainable)
        self.train(self.training)  # re-apply eval mode to the newly frozen BatchNorm layers

    def train(self, mode: bool = True) -> BrainMetsNet:
        """Like ``nn.Module.train``, but frozen blocks always stay in eval mode, so the running
        statistics of their BatchNorm layers never move."""
        super().train(mode)
        for block in self.frozen_blocks:
            for module in self._block_modules(block):
                module.eval()
        return self

    def block_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each block of ``BLOCKS`` (for optimiser parameter groups)."""
        return {
            block: [p for module in self._block_modules(block) for p in module.parameters()]
            for block in BLOCKS
        }

    def count_parameters(self) -> dict[str, ParameterCount]:
        """Total and trainable parameter counts per block, plus ``backbone`` and ``total``."""
        counts = {
            block: ParameterCount(
                sum(p.numel() for p in params),
                sum(p.numel() for p in params if p.requires_grad),
            )
            for block, params in self.block_parameters().items()
        }
        backbone = [counts[b] for b in BACKBONE_BLOCKS]
        counts["backbone"] = ParameterCount(*map(sum, zip(*backbone, strict=True)))
        counts["total"] = ParameterCount(
            counts["backbone"].total + counts["head"].total,
            counts["backbone"].trainable + counts["head"].trainable,
        )
        return counts

    def _block_modules(self, block: str) -> list[nn.Module]:
        modules = (getattr(self, name) for name in _BLOCK_MODULES[block])
        return [module for module in modules if module is not None]

    # ----------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Slice features [S, feature_dim] from slices [S, 1, H, W].

        The frozen prefix runs under ``torch.no_grad()``: it keeps no activations for backward,
        which is most of the memory of a ResNet training step in the early curriculum stages.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected slices of shape [S, 1, H, W], got {tuple(x.shape)}")
        num_frozen = min(self._num_frozen, len(BACKBONE_BLOCKS))
        h = x
        with torch.no_grad() if num_frozen else contextlib.nullcontext():
            for block in BACKBONE_BLOCKS[:num_frozen]:
                h = self._run_block(block, h)
            if num_frozen == len(BACKBONE_BLOCKS):
                return _global_average_pool(h)
        for block in BACKBONE_BLOCKS[num_frozen:]:
            h = self._run_block(block, h)
        return _global_average_pool(h)

    def _run_block(self, block: str, h: Tensor) -> Tensor:
        for module in self._block_modules(block):
            h = module(h)
        return h

    def forward_head(self, features: Tensor) -> Tensor:
        """Slice logits [S] from slice features [S, feature_dim]."""
        return self.head(features).squeeze(-1)

    def forward(self, x: Tensor, patient_index: Tensor, num_patients: int) -> PatientOutput:
        """Patient logits for a flat batch of slices.

        Args:
            x: slices of all patients in the batch, concatenated: [S, 1, H, W].
            patient_index: long [S], the patient (0 .. num_patients - 1) of each slice.
            num_patients: P, the number of patients in the batch.
        """
        slice_logits, scores = self.slice_outputs(x)
        patient_logits, top_slice = self.pool(slice_logits, patient_index, num_patients, scores)
        return PatientOutput(patient_logits, slice_logits, top_slice)

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The per-slice part of ``forward``: float32 slice logits [S] and, for attention
        pooling, the attention scores [S] (else None). Slices are scored independently in eval
        mode, which is what lets inference run them in chunks (``model/scoring.py``)."""
        features = self.forward_features(x)
        slice_logits = self.forward_head(features).float()
        scores = self.attention(features) if self.attention is not None else None
        return slice_logits, scores

    def pool(
        self,
        slice_logits: Tensor,
        patient_index: Tensor,
        num_patients: int,
        scores: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Patient logits [P] and top slices [P] with this model's pooling."""
        return pool_patients(
            slice_logits,
            patient_index,
            num_patients,
            self.pooling,
            temperature=self.lse_temperature,
            attention_scores=scores,
        )


def _global_average_pool(h: Tensor) -> Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
