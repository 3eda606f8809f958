"""Pretrained weights: synthetic checkpoints in each layout met in the wild.

Names and shapes come from a real torchvision ResNet-50 state dict; the values are random and
distinct, so a tensor that lands in the wrong place, or is transposed, reshaped or rescaled on
the way, cannot compare equal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from brainmets.model.pretrained import load_pretrained_backbone, warn_random_init
from brainmets.model.resnet import BrainMetsNet

# torchvision children index of each backbone module in RadImageNet's nn.Sequential.
RADIMAGENET_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict (with fc) holding random, trained-looking values."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in torchvision.models.resnet50(weights=None).state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.1
        else:
            state[key] = torch.randn(value.shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def model() -> BrainMetsNet:
    return BrainMetsNet("resnet50")


def _radimagenet(state):
    return {
        f"backbone.{RADIMAGENET_INDEX[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v
        for k, v in state.items()
        if not k.startswith("fc.")
    }


def _save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def _assert_backbone_equals(model, state, conv1):
    """Every backbone tensor of the model equals the torchvision source tensor of that name."""
    ours = model.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key == "conv1.weight":
            continue
        assert torch.equal(ours[key], value), key
    torch.testing.assert_close(ours["conv1.weight"], conv1, rtol=0, atol=0)


LAYOUTS = {
    "torchvision.safetensors": lambda s: s,
    "torchvision.pt": lambda s: s,
    "module_prefix.pth": lambda s: {f"module.{k}": v for k, v in s.items()},
    "model_prefix.pt": lambda s: {f"model.{k}": v for k, v in s.items()},
    "ddp_in_wrapper.pt": lambda s: {f"model.module.{k}": v for k, v in s.items()},
    "nested_state_dict.pth": lambda s: {"epoch": 90, "state_dict": s},
    "nested_model.bin": lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},
    "backbone_prefix.pt": lambda s: {f"backbone.{k}": v for k, v in s.items()},
    "radimagenet.pt": _radimagenet,
    "radimagenet.safetensors": _radimagenet,
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_map_every_tensor_unchanged(tmp_path, model, torchvision_state, name):
    path = _save(LAYOUTS[name](torchvision_state), tmp_path / name)
    report = load_pretrained_backbone(model, path)

    assert report.layout == ("radimagenet" if "radimagenet" in name else "torchvision")
    assert report.missing == [] and report.unexpected == [] and report.warnings == []
    assert len(report.loaded) == 318  # 53 convs/BNs worth of tensors incl. num_batches_tracked
    assert sorted(report.ignored) == ([] if "radimagenet" in name else ["fc.bias", "fc.weight"])
    conv1 = torchvision_state["conv1.weight"].mean(dim=1, keepdim=True)
    _assert_backbone_equals(model, torchvision_state, conv1)
    assert "318 tensors loaded" in str(report)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_conv1_reduction_of_rgb_filters(tmp_path, torchvision_state, reduce):
    model = BrainMetsNet("resnet50", conv1_reduce="sum" if reduce == "mean" else "mean")
    path = _save(torchvision_state, tmp_path / "w.safetensors")
    load_pretrained_backbone(model, path, conv1_reduce=reduce)  # the argument wins
    rgb = torchvision_state["conv1.weight"]
    expected = rgb.sum(1, keepdim=True) if reduce == "sum" else rgb.mean(1, keepdim=True)
    torch.testing.assert_close(model.conv1.weight.detach(), expected, rtol=0, atol=0)


def test_model_conv1_reduce_is_the_default(tmp_path, torchvision_state):
    model = BrainMetsNet("resnet50", conv1_reduce="sum")
    load_pretrained_backbone(model, _save(torchvision_state, tmp_path / "w.safetensors"))
    expected = torchvision_state["conv1.weight"].sum(1, keepdim=True)
    torch.testing.assert_close(model.conv1.weight.detach(), expected, rtol=0, atol=0)


def test_single_channel_conv1_is_taken_as_is(tmp_path, model, torchvision_state):
    state = dict(torchvision_state)
    state["conv1.weight"] = torch.randn(64, 1, 7, 7)
    load_pretrained_backbone(model, _save(state, tmp_path / "grey.safetensors"))
    _assert_backbone_equals(model, state, state["conv1.weight"])


def test_own_checkpoint_head_is_ignored(tmp_path, torchvision_state):
    """Backbone from one of our runs: the head is not touched."""
    source = BrainMetsNet("resnet50").state_dict()
    target = BrainMetsNet("resnet50")
    head_before = target.head[0].weight.detach().clone()
    report = load_pretrained_backbone(target, _save(source, tmp_path / "ours.safetensors"))
    assert report.unexpected == [] and "head.0.weight" in report.ignored
    assert torch.equal(target.head[0].weight, head_before)
    assert torch.equal(target.layer2[1].conv2.weight, source["layer2.1.conv2.weight"])


def _keras_reference() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A Keras-style ResNet-50 built in PyTorch: torchvision's, with the downsampling stride
    moved to the first 1x1 conv and a bias on every conv, random trained-looking values, in
    eval mode; and its state dict in torchvision names."""
    generator = torch.Generator().manual_seed(1)
    net = torchvision.models.resnet50(weights=None)
    for layer in (net.layer2, net.layer3, net.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.bias = torch.nn.Parameter(torch.randn(module.out_channels, generator=generator))
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 1, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.1, generator=generator)
    return net.eval(), {k: v.clone() for k, v in net.state_dict().items()}


_KERAS_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
             "running_var": "moving_variance"}  # fmt: skip


def _keras_names(state):
    """The same tensors under Keras's layer names, conv kernels as Keras stores them
    [h, w, in, out], BatchNorm as gamma / beta / moving_mean / moving_variance."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
            continue
        if parts[0] in ("conv1", "bn1"):
            name = "conv1_conv" if parts[0] == "conv1" else "conv1_bn"
        else:
            stage, block = int(parts[0][len("layer") :]) + 1, int(parts[1]) + 1
            module = (
                parts[2] if parts[2] != "downsample" else ("conv0" if parts[3] == "0" else "bn0")
            )
            name = f"conv{stage}_block{block}_{module[-1]}_{module[:-1]}"
        tensor = parts[-1]
        if name.endswith("_conv"):
            if tensor == "weight":
                tensor, value = "kernel", value.permute(2, 3, 1, 0).contiguous()
        else:
            tensor = _KERAS_BN[tensor]
        out[f"{name}/{tensor}:0"] = value
    return out


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("keras_biases.pt", lambda s: s),
        ("keras_biases_radimagenet.safetensors", _radimagenet),
        ("keras_names.safetensors", _keras_names),
        # as an h5py dump names them: the layer twice, under the model's name
        (
            "keras_h5py.safetensors",
            lambda s: {f"resnet50/{k.split('/')[0]}/{k}": v for k, v in _keras_names(s).items()},
        ),
    ],
)
def test_keras_converted_weights_compute_what_keras_computed(tmp_path, name, build):
    """The Keras-converted RadImageNet ResNet-50, in torchvision names, RadImageNet names or
    Keras's own names and kernel order: in a ResNet v1 network (model.stride_in_1x1) the conv
    biases are folded into BatchNorm, and the backbone then computes exactly the reference
    network's features for a grey image (conv1 summed over RGB, so that they are comparable)."""
    reference, state = _keras_reference()
    path = _save(build(state), tmp_path / name)
    ours = BrainMetsNet("resnet50", conv1_reduce="sum", stride_in_1x1=True).eval()
    report = load_pretrained_backbone(ours, path)
    assert "Keras-converted: 53 conv biases folded" in report.layout
    assert report.missing == [] and report.unexpected == [] and report.warnings == []
    # In float64: fifty random float32 layers amplify summation-order differences to 1e-4,
    # which would hide a real error of that size. The fold itself rounds in float32 (~1e-7).
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        expected = torch.flatten(
            torch.nn.Sequential(*list(reference.double().children())[:-1])(
                grey.expand(-1, 3, -1, -1)
            ),
            1,
        )
        got = ours.double().forward_features(grey)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # The same weights in torchvision's v1.5 network would compute something else: refused.
    with pytest.raises(ValueError, match=r"Keras-converted .* model\.stride_in_1x1=true"):
        load_pretrained_backbone(BrainMetsNet("resnet50"), path)


def test_torchvision_weights_are_refused_by_a_resnet_v1(tmp_path, torchvision_state):
    path = _save(torchvision_state, tmp_path / "tv.pt")
    with pytest.raises(ValueError, match="model.stride_in_1x1 is true, but these weights"):
        load_pretrained_backbone(BrainMetsNet("resnet50", stride_in_1x1=True), path)


def test_stride_in_1x1_moves_only_the_downsampling_strides():
    v1, v15 = BrainMetsNet("resnet50", stride_in_1x1=True), BrainMetsNet("resnet50")
    for name in ("layer2", "layer3", "layer4"):
        assert getattr(v1, name)[0].conv1.stride == (2, 2) == getattr(v15, name)[0].conv2.stride
        assert getattr(v1, name)[0].conv2.stride == (1, 1) == getattr(v15, name)[0].conv1.stride
    assert v1.architecture()["stride_in_1x1"] is True
    x = torch.rand(1, 1, 64, 64)
    assert v1.eval().forward_features(x).shape == v15.eval().forward_features(x).shape
    with pytest.raises(ValueError, match="bottleneck"):
        BrainMetsNet("resnet18", stride_in_1x1=True)


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("RadImageNet-ResNet50_notop.h5", b"\x89HDF\r\n", ValueError, "Keras weights files"),
        ("weights.onnx", b"onnx", ValueError, "unsupported weights format"),
        ("weights.pt", b"not a zip file", ValueError, "weights_only=True"),
    ],
)
def test_unsupported_files_are_refused(tmp_path, model, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_pretrained_backbone(model, path)


def test_pickled_model_object_is_not_unpickled(tmp_path, model):
    path = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)
    with pytest.raises(ValueError, match="state_dict"):
        load_pretrained_backbone(model, path)


def test_missing_file(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained_backbone(model, tmp_path / "nope.pt")


def test_file_matching_nothing_is_an_error(tmp_path, model):
    path = _save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no ResNet backbone keys"):
        load_pretrained_backbone(model, path)


def test_right_names_with_no_fitting_shape_is_an_error(tmp_path, model, torchvision_state):
    state = {k: v.reshape(-1)[:1] for k, v in torchvision_state.items() if v.ndim}
    path = _save(state, tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match="265 tensors do not fit this resnet50 backbone"):
        load_pretrained_backbone(model, path)


def test_other_architecture_is_refused(tmp_path):
    """A ResNet-18 file shares names with ResNet-50 but few shapes: half-loaded, training
    would start from a network neither pretrained nor consistently random."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match=r"tensors do not fit this resnet50 backbone, e\.g\. "
                       r"layer1\.0\.conv1\.weight .*another architecture \(model\.arch\)"):  # fmt: skip
        load_pretrained_backbone(BrainMetsNet(), _save(state, tmp_path / "r18.safetensors"))


def test_partial_file_warns(tmp_path, torchvision_state):
    model = BrainMetsNet("resnet50")
    layer4 = {k: v for k, v in torchvision_state.items() if k.startswith("layer4")}
    report = load_pretrained_backbone(model, _save(layer4, tmp_path / "l4.safetensors"))
    assert any("matched only" in w for w in report.warnings)
    assert "layer1.0.conv1.weight" in report.missing
    assert torch.equal(model.layer4[2].bn3.running_var, layer4["layer4.2.bn3.running_var"])


def test_one_shape_mismatch_is_refused_and_nothing_loaded(tmp_path, torchvision_state):
    model = BrainMetsNet("resnet50")
    before = model.layer2[0].conv1.weight.detach().clone()
    state = dict(torchvision_state)
    state["layer1.0.conv2.weight"] = torch.randn(64, 64, 1, 1)
    with pytest.raises(ValueError, match=r"1 tensors do not fit .* layer1\.0\.conv2\.weight"):
        load_pretrained_backbone(model, _save(state, tmp_path / "w.safetensors"))
    assert torch.equal(model.layer2[0].conv1.weight, before)  # no half-loaded network


@pytest.mark.parametrize(
    ("value", "message"),
    [(1e7, "far outside the usual range"), (-1.0, "negative or non-finite")],
)
def test_implausible_batchnorm_variance_warns(tmp_path, torchvision_state, value, message):
    state = dict(torchvision_state)
    state["layer3.1.bn2.running_var"] = torch.full((256,), value)
    report = load_pretrained_backbone(BrainMetsNet(), _save(state, tmp_path / "w.safetensors"))
    assert any(message in w and "layer3.1.bn2.running_var" in w for w in report.warnings)


def test_untrained_batchnorm_statistics_warn(tmp_path):
    fresh = torchvision.models.resnet50(weights=None).state_dict()
    report = load_pretrained_backbone(BrainMetsNet(), _save(fresh, tmp_path / "w.safetensors"))
    assert any("never trained" in w for w in report.warnings)


def test_warn_random_init_is_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="brainmets.model.pretrained"):
        message = warn_random_init()
    assert "RANDOM" in message
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
