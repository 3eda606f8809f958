"""BrainMetsNet: parameter counts, freezing curriculum, forward passes."""

from __future__ import annotations

import pytest
import torch

from brainmets.model.resnet import BLOCKS, BrainMetsNet

# Trainable blocks of the three curriculum stages (the specification's "Training").
STAGES = {
    "stage1": ["head"],
    "stage2": ["layer4", "head"],
    "stage3": ["layer3", "layer4", "head"],
}


@pytest.fixture(scope="module")
def resnet50() -> BrainMetsNet:
    return BrainMetsNet("resnet50")


def _small_model(**kwargs) -> BrainMetsNet:
    torch.manual_seed(0)
    return BrainMetsNet("resnet18", **kwargs)


def _batch(lengths=(3, 1, 4), size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.full((n,), p, dtype=torch.long) for p, n in enumerate(lengths)])
    x = torch.randn(index.numel(), 1, size, size, generator=generator)
    return x, index, len(lengths)


def test_head_parameter_count(resnet50):
    counts = resnet50.count_parameters()
    # Linear(2048->512) + Linear(512->1), with biases. The specification states 1,049,089, which is
    # 512 short: it leaves out either the first layer's bias or the last layer's weights.
    assert counts["head"].total == 2048 * 512 + 512 + 512 + 1 == 1_049_601
    # torchvision's ResNet-50 without fc has 23,508,032; conv1 loses two of three input channels.
    assert counts["backbone"].total == 23_508_032 - 2 * 64 * 7 * 7 == 23_501_760
    print(f"\nResNet-50 backbone {counts['backbone'].total:,}, head {counts['head'].total:,}")


@pytest.mark.parametrize(
    ("stage", "trainable"),
    [("stage1", 1_049_601), ("stage2", 16_014_337), ("stage3", 23_112_705)],
)
def test_trainable_parameters_per_curriculum_stage(resnet50, stage, trainable):
    resnet50.set_trainable(STAGES[stage])
    counts = resnet50.count_parameters()
    assert counts["total"].trainable == trainable
    assert counts["total"].total == 24_551_361
    print(f"\n{stage} trainable {trainable:,} of {counts['total'].total:,}")


def test_block_parameters_partition_the_model():
    model = _small_model(pooling="attention")
    groups = model.block_parameters()
    assert tuple(groups) == BLOCKS
    grouped = [id(p) for params in groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert any(p is model.attention.attention_w.weight for p in groups["head"])


@pytest.mark.parametrize(
    "trainable",
    [
        list(BLOCKS),
        [],
        ["head"],
        ["layer1", "layer2", "layer3", "layer4", "head"],
        *STAGES.values(),
    ],
    ids=str,
)
def test_set_trainable_accepts_frozen_prefixes(trainable):
    model = _small_model()
    model.set_trainable(trainable)
    for block, params in model.block_parameters().items():
        assert all(p.requires_grad == (block in trainable) for p in params), block
    assert model.frozen_blocks == tuple(b for b in BLOCKS if b not in trainable)


@pytest.mark.parametrize(
    ("trainable", "message"),
    [
        (["layer3", "head"], "not a prefix"),
        (["stem", "head"], "not a prefix"),
        (["layer4"], "not a prefix"),
        (["fc"], "unknown blocks"),
    ],
)
def test_set_trainable_rejects_other_sets(trainable, message):
    with pytest.raises(ValueError, match=message) as error:
        _small_model().set_trainable(trainable)
    if message == "not a prefix":
        assert "allowed trainable sets" in str(error.value)


def test_frozen_blocks_do_not_move_during_training():
    """An optimiser step in stage 2: frozen weights and BN statistics are bit-identical."""
    model = _small_model()
    model.set_trainable(STAGES["stage2"])
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("layer4")}
    frozen = {k: v for k, v in frozen.items() if not k.startswith("head")}
    layer4_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("layer4")}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    for seed in range(2):
        x, index, num_patients = _batch(seed=seed)
        out = model(x, index, num_patients)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            out.patient_logits, torch.tensor([1.0, 0.0, 1.0])
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    after = model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.layer3.parameters())
    # The trainable layer4 moved: weights and its BatchNorm running statistics.
    changed = [k for k, v in layer4_before.items() if not torch.equal(after[k], v)]
    assert any(k.endswith("conv1.weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)


def test_train_mode_keeps_frozen_batchnorm_in_eval():
    model = _small_model()
    model.set_trainable(STAGES["stage3"])
    model.train()
    assert not model.bn1.training and not model.layer2.training
    assert not model.layer2[0].bn1.training
    assert model.layer3[0].bn1.training and model.head.training
    model.eval()
    assert not model.layer4.training
    model.train()
    assert model.layer4.training and not model.layer1[1].bn2.training


def test_frozen_prefix_runs_without_autograd():
    model = _small_model()
    model.set_trainable(STAGES["stage2"])
    seen = {}
    model.layer3.register_forward_hook(
        lambda m, i, o: seen.update(layer3_grad=torch.is_grad_enabled(), out=o.requires_grad)
    )
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(layer4=o.requires_grad))
    x, _, _ = _batch()
    features = model.forward_features(x)
    assert seen == {"layer3_grad": False, "out": False, "layer4": True}
    assert features.requires_grad

    model.set_trainable(STAGES["stage1"])
    features = model.forward_features(x)
    assert features.grad_fn is None  # stage 1 keeps no backbone graph at all
    assert model.forward_head(features).requires_grad


def test_frozen_prefix_keeps_fewer_activations():
    """Count the tensors autograd saves for backward: a frozen prefix saves none of its own."""

    def saved_tensors(trainable):
        model = _small_model()
        model.set_trainable(trainable)
        count = 0

        def pack(tensor):
            nonlocal count
            count += 1
            return tensor

        x, index, num_patients = _batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, index, num_patients)
        return count

    assert saved_tensors(STAGES["stage1"]) < saved_tensors(STAGES["stage2"])
    assert saved_tensors(STAGES["stage2"]) < saved_tensors(list(BLOCKS))


@pytest.mark.parametrize("pooling", ["max", "mean", "lse", "attention"])
def test_forward_returns_patient_output(pooling):
    model = _small_model(pooling=pooling).eval()
    x, index, num_patients = _batch(lengths=(5, 2, 1))
    out = model(x, index, num_patients)
    assert out.patient_logits.shape == (3,)
    assert out.slice_logits.shape == (8,)
    assert (index[out.top_slice] == torch.arange(3)).all()
    torch.testing.assert_close(out.slice_logits, model.forward_head(model.forward_features(x)))
    if pooling == "max":
        torch.testing.assert_close(out.patient_logits, out.slice_logits[out.top_slice])


def test_slice_logits_do_not_depend_on_batch_neighbours_in_eval():
    model = _small_model().eval()
    x, index, num_patients = _batch()
    whole = model(x, index, num_patients).slice_logits
    alone = model(x[:3], index[:3], 1).slice_logits
    torch.testing.assert_close(alone, whole[:3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "feature_dim"), [("resnet18", 512), ("resnet34", 512)])
def test_demo_architectures_keep_the_head_rule(arch, feature_dim):
    model = BrainMetsNet(arch)
    assert model.feature_dim == feature_dim
    assert model.head[0].in_features == feature_dim and model.head[0].out_features == 512
    assert model.head[2].p == 0.4 and model.head[3].out_features == 1
    assert model.conv1.in_channels == 1


def test_channels_last_and_bf16_autocast():
    model = _small_model().to(memory_format=torch.channels_last)
    model.set_trainable(STAGES["stage2"])
    x, index, num_patients = _batch()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, index, num_patients)
    assert out.patient_logits.dtype == torch.float32
    assert torch.isfinite(out.patient_logits).all()
    out.patient_logits.sum().backward()
    assert model.layer4[0].conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "vgg16"}, "arch"),
        ({"pooling": "median"}, "pooling"),
        ({"conv1_reduce": "max"}, "conv1_reduce"),
        ({"dropout": 1.0}, "dropout"),
        ({"lse_temperature": 0.0}, "lse_temperature"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BrainMetsNet(**kwargs)


def test_forward_rejects_rgb_slices():
    with pytest.raises(ValueError, match=r"\[S, 1, H, W\]"):
        _small_model().forward_features(torch.zeros(2, 3, 32, 32))
