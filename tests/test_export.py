"""ONNX export, the onnxruntime backend and the Triton model repository, on a tiny run trained
on a generated DICOM cohort (synth -> index -> prepare -> train -> export)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper

from brainmets.backends.exported import export_digest
from brainmets.backends.onnx_runtime import load_exported
from brainmets.cli import main
from brainmets.data.cache import PatientCache
from brainmets.export import triton_config
from brainmets.inference import load_trained
from brainmets.io import file_sha256
from brainmets.model.identity import model_id

SIZE = 48
TINY_TRAIN = [
    "--set", "model.arch=resnet18",
    "--set", f"preprocess.size={SIZE}",
    "--set", "train.epochs=2",
    "--set", "train.stage_epochs=[0,1,1]",
    "--set", "train.batch_patients=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """ROOT/run with ROOT/run/export and the Triton repository ROOT/triton."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    assert main(["-q", "synth", str(root / "cohort"), "--patients", "8", "--matrix", "64",
                 "--min-slices", "10", "--max-slices", "12", "--seed", "5",
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["-q", "index", str(root / "cohort" / "dicom"), "--out", str(root / "index"),
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["-q", "prepare", "--labels", str(root / "cohort" / "labels.csv"), "--index",
                 str(root / "index"), "--out", str(root / "cache"), "--workers", "1",
                 "--set", f"preprocess.size={SIZE}"]) == 0  # fmt: skip
    assert main(["-q", "train", "--data", str(root / "cache"), "--out", str(root / "run"),
                 *TINY_TRAIN, "--allow-chance"]) == 0  # fmt: skip  # a tiny run ranks nothing
    assert main(["-q", "export", str(root / "run"), "--triton", str(root / "triton"),
                 "--max-batch", "64"]) == 0  # fmt: skip
    yield root
    torch.set_num_threads(threads)


def _sidecar(folder: Path) -> dict:
    return json.loads((folder / "brainmets.json").read_text())


def _rebind(folder: Path, *, new_id: bool = False, **changes) -> dict:
    """Edit an export's sidecar and recompute its graph checksum and digest, as someone
    deliberately changing the export would; ``new_id`` also gives it the model id its new
    content makes."""
    sidecar = {**_sidecar(folder), **changes}
    sidecar["onnx"] = {**sidecar["onnx"], "sha256": file_sha256(folder / "model.onnx")}
    if new_id:
        sidecar["model_id"] = model_id(sidecar)
    sidecar["digest"] = export_digest(sidecar)
    (folder / "brainmets.json").write_text(json.dumps(sidecar))
    return sidecar


def test_export_is_a_checked_onnx_graph_with_a_free_batch_axis_and_a_json_sidecar(exported):
    export = exported / "run" / "export"
    onnx.checker.check_model(str(export / "model.onnx"), full_check=True)
    graph = onnx.load(str(export / "model.onnx")).graph
    (given,), (returned,) = graph.input, graph.output

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert given.name == "slices" and returned.name == "slice_logit"
    batch, *rest = dims(given)
    assert isinstance(batch, str) and rest == [1, SIZE, SIZE]
    assert dims(returned) == [batch]

    run = json.loads((exported / "run" / "model.json").read_text())
    sidecar = _sidecar(export)
    assert sidecar["model_id"] == run["model_id"] == model_id(run)
    assert sidecar["ranking"] == run["ranking"]  # serve says it of an export too
    for key in ("threshold", "calibration", "preprocess", "normalization", "architecture"):
        assert sidecar[key] == run[key], key
    assert sidecar["pooling"] == {"method": "max", "lse_temperature": 1.0}
    assert sidecar["onnx"]["input"] == {"name": "slices", "shape": [-1, 1, SIZE, SIZE],
                                        "dtype": "float32"}  # fmt: skip
    assert sidecar["onnx"]["output"] == {"name": "slice_logit", "shape": [-1], "dtype": "float32"}
    assert sidecar["onnx"]["opset"] == 18 and sidecar["onnx"]["quantization"] == "none"
    assert sidecar["onnx"]["max_abs_diff_vs_pytorch"] <= 1e-4
    assert {"torch", "onnx", "onnxruntime", "brainmets"} <= set(sidecar["versions"])


def test_onnxruntime_scores_cached_slices_as_pytorch_does(exported):
    cache = PatientCache(exported / "cache")
    arrays = [np.asarray(cache.load(pid)) for pid in cache.patient_ids]
    torch_model = load_trained(exported / "run", "cpu")
    # Chunks of 3 slices: batches of every size up to 3, and a padded last chunk per patient.
    onnx_model = load_exported(exported / "run", device="cpu", chunk=3)
    expected, got = torch_model.scorer(arrays), onnx_model.scorer(arrays)

    slice_logits = expected.slice_logits.numpy()
    assert slice_logits.size == sum(len(a) for a in arrays) and slice_logits.std() > 1e-3
    assert np.abs(got.slice_logits.numpy() - slice_logits).max() <= 1e-4
    assert torch.equal(got.top_slice, expected.top_slice)
    assert np.array_equal(
        onnx_model.decision(got.patient_logits), torch_model.decision(expected.patient_logits)
    )
    # A tiny model's decisions at its own threshold may all be alike; the same order of the
    # eight patient logits means the same decisions at any threshold.
    order = np.argsort(expected.patient_logits.numpy())
    assert np.array_equal(np.argsort(got.patient_logits.numpy()), order)
    assert np.diff(expected.patient_logits.numpy()[order]).min() > 1e-4  # the order is decided


@pytest.mark.slow  # two predicts and Grad-CAM: ~25 s on two busy cores
def test_predict_rows_are_the_same_with_either_backend(exported, tmp_path):
    tables = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.csv"
        extra = ["--heatmaps", str(tmp_path / "heat"), "--top-k", "1"] if backend != "torch" else []
        assert main(["-q", "predict", str(exported / "run"), str(exported / "cache"), "--out", str(out),
                     "--backend", backend, *extra]) == 0  # fmt: skip
        tables[backend] = pd.read_csv(out, dtype={"patient_id": str}, keep_default_na=False)
    plain, onnx_rows = tables["torch"], tables["onnxruntime"]
    assert len(plain) == 8 and (plain["error"] == "").all()
    assert np.allclose(onnx_rows["probability"], plain["probability"], rtol=0, atol=1e-5)
    same = [c for c in plain.columns if c != "probability"]
    pd.testing.assert_frame_equal(onnx_rows[same], plain[same])
    # Grad-CAM stays in PyTorch: the onnxruntime backend draws it from the run's weights.
    heat = pd.read_csv(tmp_path / "heat" / "heatmaps.csv", dtype={"patient_id": str})
    assert sorted(heat["patient_id"]) == sorted(plain["patient_id"])


def test_an_export_folder_alone_predicts_without_the_run(exported, tmp_path, capsys):
    """The folder copied to a CPU server is all it needs: the sidecar carries the threshold,
    calibration and preprocessing check. Heatmaps are the one thing that needs the run."""
    alone = tmp_path / "copied"
    shutil.copytree(exported / "run" / "export", alone)
    cache = str(exported / "cache")
    assert main(["-q", "predict", str(exported / "run"), cache, "--out",
                 str(tmp_path / "torch.csv")]) == 0  # fmt: skip
    assert main(["-q", "predict", str(alone), cache, "--backend", "onnxruntime", "--out",
                 str(tmp_path / "alone.csv")]) == 0  # fmt: skip
    plain, served = (pd.read_csv(tmp_path / f"{name}.csv", dtype={"patient_id": str},
                                 keep_default_na=False) for name in ("torch", "alone"))  # fmt: skip
    assert np.allclose(served["probability"], plain["probability"], rtol=0, atol=1e-5)
    assert served["decision"].tolist() == plain["decision"].tolist()
    assert served["threshold"].tolist() == plain["threshold"].tolist()
    rc = main(["-q", "predict", str(alone), cache, "--backend", "onnxruntime", "--heatmaps",
               str(tmp_path / "heat"), "--out", str(tmp_path / "heat.csv")])  # fmt: skip
    assert rc == 2 and "Grad-CAM heatmaps need the run's PyTorch weights" in capsys.readouterr().err


def _graph(inputs, outputs) -> onnx.ModelProto:
    """A small ONNX model: mean of the first input's pixels -> each output's shape."""
    nodes = [helper.make_node("ReduceMean", [inputs[0].name], ["mean"], keepdims=0, axes=[1, 2, 3])]
    nodes += [helper.make_node("Identity", ["mean"], [out.name]) for out in outputs]
    graph = helper.make_graph(nodes, "other", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


REFUSED = {
    "input named otherwise": ([_value("image", ["b", 1, SIZE, SIZE])], [_value("slice_logit", ["b"])]),
    "another slice size": ([_value("slices", ["b", 1, 64, 64])], [_value("slice_logit", ["b"])]),
    "three channels": ([_value("slices", ["b", 3, SIZE, SIZE])], [_value("slice_logit", ["b"])]),
    "fixed batch": ([_value("slices", [1, 1, SIZE, SIZE])], [_value("slice_logit", [1])]),
    "two outputs": (
        [_value("slices", ["b", 1, SIZE, SIZE])],
        [_value("slice_logit", ["b"]), _value("attention", ["b"])],
    ),
    "double input": (
        [_value("slices", ["b", 1, SIZE, SIZE], TensorProto.DOUBLE)],
        [_value("slice_logit", ["b"], TensorProto.DOUBLE)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_onnx_file_with_another_signature_is_refused(exported, tmp_path, case, capsys):
    folder = tmp_path / "export"
    shutil.copytree(exported / "run" / "export", folder)
    onnx.save(_graph(*REFUSED[case]), folder / "model.onnx")
    _rebind(folder)  # a sidecar forged to match: the signature is checked all the same
    with pytest.raises(ValueError, match="not the slice network") as error:
        load_exported(folder, device="cpu")
    assert str(folder / "model.onnx") in str(error.value)
    # The command line says the same in one line, and scores nothing.
    rc = main(["-q", "predict", str(exported / "run"), str(exported / "cache"), "--backend",
               "onnxruntime", "--onnx", str(folder), "--out", str(tmp_path / "p.csv")])  # fmt: skip
    assert rc == 2 and str(folder / "model.onnx") in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_an_edited_export_is_refused_naming_the_file(exported, tmp_path, capsys):
    """Another graph (even one with the right signature), or a sidecar given another threshold,
    with or without its checksum brought up to date: each refused, naming the file."""
    folder = tmp_path / "export"
    shutil.copytree(exported / "run" / "export", folder)
    original = (folder / "brainmets.json").read_text()
    onnx.save(_graph([_value("slices", ["b", 1, SIZE, SIZE])], [_value("slice_logit", ["b"])]),
              folder / "model.onnx")  # fmt: skip
    with pytest.raises(ValueError, match="not the graph brainmets exported") as error:
        load_exported(folder, device="cpu")
    assert str(folder / "model.onnx") in str(error.value)
    # The sidecar's checksum updated to the new graph: the digest no longer matches.
    sidecar = _sidecar(folder)
    sidecar["onnx"]["sha256"] = file_sha256(folder / "model.onnx")
    (folder / "brainmets.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="edited after export") as error:
        load_exported(folder, device="cpu")
    assert str(folder / "brainmets.json") in str(error.value)

    shutil.copy(exported / "run" / "export" / "model.onnx", folder / "model.onnx")
    for key, value in (("threshold", 0.01), ("normalization", "minus_one_to_one"),
                       ("pooling", {"method": "mean", "lse_temperature": 1.0})):  # fmt: skip
        (folder / "brainmets.json").write_text(original)
        sidecar = _sidecar(folder)
        sidecar[key] = value
        (folder / "brainmets.json").write_text(json.dumps(sidecar))
        rc = main(["-q", "predict", str(folder), str(exported / "cache"), "--backend",
                   "onnxruntime", "--out", str(tmp_path / "p.csv")])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "edited after export" in err and str(folder / "brainmets.json") in err
        assert not (tmp_path / "p.csv").exists()


def test_a_deliberately_rethresholded_export_is_a_new_model(exported, tmp_path):
    """The digest recomputed but the model id kept: refused (the id would name another
    model's decisions). With the id its content gives, it scores as a new model, and only
    without the run, whose model it no longer is."""
    folder = tmp_path / "export"
    shutil.copytree(exported / "run" / "export", folder)
    original = _sidecar(folder)
    _rebind(folder, threshold=0.01)
    with pytest.raises(ValueError, match="edited after export"):
        load_exported(folder, device="cpu")
    rebound = _rebind(folder, threshold=0.01, new_id=True)
    assert rebound["model_id"] != original["model_id"]
    trained = load_exported(folder, device="cpu")
    assert trained.model_id == rebound["model_id"] and trained.plain_threshold == 0.01
    with pytest.raises(ValueError, match="export it again"):
        load_exported(exported / "run", folder, device="cpu")


def test_triton_config_is_a_valid_triton_model_config(exported):
    from tritonclient.grpc import model_config_pb2

    model = exported / "triton" / "brainmets"
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "brainmets" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    (given,), (returned,) = config.input, config.output
    assert (given.name, returned.name) == ("slices", "slice_logit")
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert given.data_type == fp32 and returned.data_type == fp32
    # With max_batch_size > 0 Triton prepends the batch axis: [-1, *dims] must be the graph's
    # signature; the output [batch] is declared [1], reshaped to [].
    assert list(given.dims) == [1, SIZE, SIZE]
    assert list(returned.dims) == [1]
    assert returned.HasField("reshape") and list(returned.reshape.shape) == []
    preferred = list(config.dynamic_batching.preferred_batch_size)
    assert preferred == sorted(preferred) and preferred[-1] == config.max_batch_size
    assert (model / "1" / "model.onnx").read_bytes() == (
        exported / "run" / "export" / "model.onnx"
    ).read_bytes()
    # The version folder is an export of its own: the onnxruntime backend scores from it.
    trained = load_exported(exported / "run", model / "1", device="cpu")
    assert trained.model_id == _sidecar(exported / "run" / "export")["model_id"]


def test_triton_config_field_names_are_checked_by_the_parser():
    """The parse above holds the field names: a misspelt one is an error."""
    from tritonclient.grpc import model_config_pb2

    text = triton_config("m", SIZE, 8).replace("max_batch_size", "max_batch")
    with pytest.raises(text_format.ParseError, match="max_batch"):
        text_format.Parse(text, model_config_pb2.ModelConfig())
    with pytest.raises(ValueError, match="Triton model name"):
        triton_config("../m", SIZE, 8)


@pytest.mark.slow  # a second export: ~15 s on two busy cores
def test_int8_export_is_quantised_and_labelled(exported, tmp_path):
    out = tmp_path / "int8"
    assert main(["-q", "export", str(exported / "run"), "--out", str(out),
                 "--quantize", "int8"]) == 0  # fmt: skip
    sidecar = _sidecar(out)
    assert sidecar["onnx"]["quantization"] == "int8" and sidecar["model_id"].endswith("-int8")
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops
    cache = PatientCache(exported / "cache")
    arrays = [np.asarray(cache.load(pid)) for pid in cache.patient_ids]
    got = load_exported(exported / "run", out, device="cpu").scorer(arrays).slice_logits
    expected = load_trained(exported / "run", "cpu").scorer(arrays).slice_logits
    # Approximate by design: the scores follow the fp32 ones, not equal them.
    assert np.corrcoef(got.numpy(), expected.numpy())[0, 1] > 0.9


@pytest.mark.parametrize(
    ("missing", "argv"),
    [
        ("onnx", "export {run}"),
        ("onnxruntime", "predict {run} {cache} --out {out} --backend onnxruntime"),
        ("tritonclient", "predict {run} {cache} --out {out} --backend triton --url localhost:8001"),
    ],
)
def test_a_missing_optional_package_is_one_line_naming_the_extra(
    exported, tmp_path, capsys, monkeypatch, missing, argv
):
    # As if the extra were not installed: importing it, or any of its modules, fails.
    for name in [missing, *(n for n in sys.modules if n.startswith(missing + "."))]:
        monkeypatch.setitem(sys.modules, name, None)
    paths = {"run": exported / "run", "cache": exported / "cache", "out": tmp_path / "p.csv"}
    rc = main(["-q", *(a.format(**paths) for a in argv.split())])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    extra = "triton" if missing == "tritonclient" else "onnx"
    assert f"pip install 'brainmets[{extra}]'" in err.strip().splitlines()[-1]
