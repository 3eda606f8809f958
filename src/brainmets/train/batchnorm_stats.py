"""BatchNorm calibration of a randomly initialised backbone before the curriculum starts.

A freshly initialised torchvision ResNet has BatchNorm running statistics (mean 0, variance 1).
The curriculum keeps frozen blocks in eval mode, so in stage 1 (and for stem .. layer2 all
run long) those layers normalise with statistics that describe no data at all: they are
identities, and the scale and offset of the features reaching the trainable blocks are
whatever the random convolutions happen to produce (the skull, saturated at the top of the
brain window, dominates them). With pretrained weights the statistics were estimated on the
pretraining data and are left alone.

``calibrate_batchnorm`` runs training slices (un-augmented, normalised exactly as in
training) through the backbone with every BatchNorm layer in train mode and ``momentum=None``
(a cumulative average over all batches), the data-dependent initialisation of AdaBN (Li et
al. 2016) and of timm's ``--bn-*`` recalibration. Weights are not touched; only
``running_mean``, ``running_var`` and ``num_batches_tracked`` change. Enabled by
``train.bn_calibration_patients`` > 0 together with ``model.pretrained: none``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from brainmets.data.dataset import PatientBatch


def _backbone_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("head")
    ]


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[PatientBatch],
    inputs: Callable[[PatientBatch], torch.Tensor],
    device: torch.device,
) -> int:
    """Re-estimate the running statistics of every backbone BatchNorm layer of ``model``
    (a ``BrainMetsNet``) from ``batches``; ``inputs`` turns a batch (on the device) into the
    normalised slices the model sees. Returns the number of slices used.

    The model's train/eval modes and the layers' momenta are restored afterwards.
    """
    norms = _backbone_batchnorms(model)
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs by its count of updates
        m.train()
    slices = 0
    try:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            x = inputs(batch)
            model.forward_features(x)
            slices += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return slices


def norm_statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm running mean and variance of ``model`` (a few MB at most)."""
    return {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


def restore_non_finite_norm_statistics(
    model: torch.nn.Module, snapshot: dict[str, torch.Tensor]
) -> list[str]:
    """Put back the snapshot's value of every running statistic that is no longer finite;
    returns their names.

    A skipped step leaves the weights alone, but its forward pass has already folded the
    non-finite activations into the running statistics of the BatchNorm layers that train.
    Evaluation uses those, so every validation logit would become NaN and training end.
    One host sync per call: it runs once per epoch.
    """
    buffers = dict(model.named_buffers())
    names = list(snapshot)
    finite = (
        torch.stack([torch.isfinite(buffers[n]).all() for n in names]).tolist() if names else []
    )
    poisoned = [n for n, ok in zip(names, finite, strict=True) if not ok]
    for name in poisoned:
        buffers[name].copy_(snapshot[name])
    return poisoned
