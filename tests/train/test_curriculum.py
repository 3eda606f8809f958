"""Curriculum: stage schedule, frozen sets, parameter groups, and what one step may change."""

from __future__ import annotations

import pytest
import torch

from brainmets.config import StageLR, WeightDecay
from brainmets.model.resnet import BrainMetsNet
from brainmets.train.curriculum import (
    build_optimizer,
    build_param_groups,
    stage_for_epoch,
    trainable_blocks,
)
from brainmets.train.losses import patient_loss
from brainmets.train.trainer import clip_and_step

SPEC_STAGES = (0, 5, 12)


@pytest.mark.parametrize(
    ("epoch", "stage"), [(0, 1), (4, 1), (5, 2), (11, 2), (12, 3), (39, 3), (100, 3)]
)
def test_stage_for_epoch_follows_the_specified_schedule(epoch, stage):
    assert stage_for_epoch(epoch, SPEC_STAGES) == stage


def test_stage_boundaries_are_configurable_and_may_skip_a_stage():
    assert [stage_for_epoch(e, (0, 2, 2)) for e in range(4)] == [1, 1, 3, 3]


@pytest.mark.parametrize(
    ("stage", "blocks"),
    [(1, ("head",)), (2, ("layer4", "head")), (3, ("layer3", "layer4", "head"))],
)
def test_trainable_blocks(stage, blocks):
    assert trainable_blocks(stage) == blocks


def test_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="stage"):
        trainable_blocks(4)


@pytest.fixture
def model() -> BrainMetsNet:
    torch.manual_seed(0)
    return BrainMetsNet(arch="resnet18", hidden=8)


def _staged(model: BrainMetsNet, stage: int) -> list[dict]:
    model.set_trainable(trainable_blocks(stage))
    return build_param_groups(model, stage, StageLR(), WeightDecay())


@pytest.mark.parametrize("exempt", [False, True])
@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (1, {"head": (5e-5, 1e-3)}),
        (3, {"layer3": (5e-6, 1e-4), "layer4": (1e-5, 1e-4), "head": (5e-5, 1e-3)}),
    ],
)
def test_param_groups_have_specified_lr_and_decay(model, stage, expected, exempt):
    """As specified, every parameter of a block decays at the block's rate; with the
    exemption, biases and BatchNorm parameters (the 1-D ones) do not."""
    model.set_trainable(trainable_blocks(stage))
    groups = build_param_groups(model, stage, StageLR(), WeightDecay(exempt_norm_and_bias=exempt))
    got = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert got == {
        f"{block}/{kind}": (lr, 0.0 if exempt and kind == "norm_and_bias" else wd)
        for block, (lr, wd) in expected.items()
        for kind in ("weights", "norm_and_bias")
    }
    for g in groups:
        assert all((p.ndim >= 2) == g["name"].endswith("/weights") for p in g["params"])


def test_param_groups_hold_exactly_the_trainable_parameters(model):
    groups = _staged(model, 2)
    grouped = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for b in ("layer4", "head") for p in model.block_parameters()[b]}
    assert grouped == trainable == expected


def test_rebuilt_optimizer_carries_state_of_parameters_that_stay(model):
    model.set_trainable(trainable_blocks(1))
    first = build_optimizer(model, 1, StageLR(), WeightDecay())
    for p in model.head.parameters():
        p.grad = torch.ones_like(p)
    first.step()
    model.set_trainable(trainable_blocks(2))
    second = build_optimizer(model, 2, StageLR(), WeightDecay(), previous=first)
    head_weight = model.head[0].weight
    assert second.state[head_weight] is first.state[head_weight]
    assert all(p not in second.state for p in model.layer4.parameters())


def _one_step(model: BrainMetsNet, stage: int) -> dict[str, torch.Tensor]:
    """Snapshot the state dict, take one training step in ``stage``, return the snapshot."""
    model.set_trainable(trainable_blocks(stage))
    optimizer = build_optimizer(
        model, stage, StageLR(head=1e-2, layer4=1e-2, layer3=1e-2), WeightDecay()
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 32, 32, generator=g)
    out = model(x, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    loss, _ = patient_loss(out.patient_logits, torch.tensor([1.0, 0.0]))
    loss.backward()
    clip_and_step(optimizer, 1.0)
    return before


def _changed(model: BrainMetsNet, before: dict[str, torch.Tensor]) -> set[str]:
    """Top-level modules (conv1, bn1, layer1 .. head) with any tensor that moved."""
    after = model.state_dict()
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize(
    ("stage", "may_change", "must_change"),
    [
        (1, {"head"}, {"head"}),
        (2, {"layer4", "head"}, {"layer4", "head"}),
        (3, {"layer3", "layer4", "head"}, {"layer3", "layer4", "head"}),
    ],
)
def test_one_step_changes_only_the_trainable_blocks(model, stage, may_change, must_change):
    # Weights AND BatchNorm buffers (running mean/var, num_batches_tracked) are compared.
    before = _one_step(model, stage)
    changed = _changed(model, before)
    assert changed <= may_change
    assert must_change <= changed


def test_warm_up_then_cosine_reaches_every_rate_once_and_ends_near_zero():
    from brainmets.train.curriculum import lr_factor

    factors = [lr_factor(step, 100, 10, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert max(factors) == pytest.approx(1.0) and factors[10] == 1.0
    assert all(b <= a for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.01
    assert [lr_factor(s, 100, 0, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_scaled_rates_keep_the_ratio_between_blocks(model):
    from brainmets.train.curriculum import scale_learning_rates

    model.set_trainable(trainable_blocks(3))
    optimizer = build_optimizer(model, 3, StageLR(), WeightDecay())
    scale_learning_rates(optimizer, StageLR(), 0.5)
    rates = {g["name"].split("/")[0]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"layer3": 2.5e-6, "layer4": 5e-6, "head": 2.5e-5}
