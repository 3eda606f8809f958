"""An ensemble loads wherever a run does: its score is its members' average computed by hand,
its id binds members, combination, threshold and calibration, and its export (one graph of every
member) scores as PyTorch does under onnxruntime and on a real Triton server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit, logit

from brainmets.backends import BackendSpec, load_backend
from brainmets.cli import main
from brainmets.data.cache import PatientCache
from brainmets.export import triton_config
from brainmets.heatmaps import grad_cam
from brainmets.inference import load_trained
from brainmets.io import file_sha256
from brainmets.model.checkpoint import save_checkpoint
from brainmets.model.resnet import BrainMetsNet
from brainmets.train.ensemble import build_ensemble

from .triton_server import TritonServer, missing

CPU = BackendSpec(device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def cache(tiny_ensemble, head_ct_studies, tmp_path_factory) -> Path:
    """Five of the generated studies prepared as the ensemble's members were (48 px)."""
    root = tmp_path_factory.mktemp("ens-cache")
    labels = pd.read_csv(head_ct_studies.parent / "labels.csv", dtype=str).head(5)
    labels.to_csv(root / "labels.csv", index=False)
    assert main(["-q", "index", str(head_ct_studies), "--out", str(root / "index"),
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["-q", "prepare", "--labels", str(root / "labels.csv"), "--index",
                 str(root / "index"), "--out", str(root / "cache"), "--workers", "1",
                 "--set", "preprocess.size=48"]) == 0  # fmt: skip
    return root / "cache"


@pytest.fixture(scope="module")
def arrays(cache) -> list[np.ndarray]:
    reader = PatientCache(cache)
    return [np.asarray(reader.load(pid)) for pid in reader.patient_ids[:6]]


def _members(cv: Path):
    return [load_trained(cv / f"fold-{k}", "cpu") for k in range(2)]


@pytest.mark.parametrize("combine", ["mean_logit", "mean_probability"])
def test_the_ensemble_scores_the_average_of_its_members_computed_by_hand(
    tiny_ensemble, arrays, tmp_path, combine
):
    folder = tiny_ensemble
    if combine != "mean_logit":  # another ensemble of the same fold runs
        folder = build_ensemble([tiny_ensemble], tmp_path / "ens", combine=combine).folder
    ensemble = load_backend(folder, CPU)
    got = ensemble.scorer(arrays)
    outputs = [m.scorer(arrays) for m in _members(tiny_ensemble)]
    members = np.stack([o.patient_logits.numpy() for o in outputs], axis=1).astype(np.float64)
    expected = members.mean(1) if combine == "mean_logit" else logit(expit(members).mean(1))
    assert members.std(axis=1).min() > 1e-3  # the members disagree: the average is tested
    np.testing.assert_allclose(got.patient_logits.numpy(), expected, atol=1e-5)
    mean_slices = np.mean([o.slice_logits.numpy() for o in outputs], axis=0)
    np.testing.assert_allclose(got.slice_logits.numpy(), mean_slices, atol=1e-5)
    starts = np.cumsum([0] + [len(a) for a in arrays])
    tops = [
        s + int(np.argmax(mean_slices[s:e])) for s, e in zip(starts[:-1], starts[1:], strict=True)
    ]
    assert got.top_slice.tolist() == tops
    meta = json.loads((folder / "ensemble.json").read_text())
    assert ensemble.model_id == meta["model_id"] and ensemble.plain_threshold == meta["threshold"]
    assert len({ensemble.model_id, *(m.model_id for m in _members(tiny_ensemble))}) == 3


def test_grad_cam_of_an_ensemble_is_its_members_maps_averaged(tiny_ensemble, arrays):
    ensemble = load_backend(tiny_ensemble, CPU)
    slices = ensemble.scorer.network_inputs(torch.from_numpy(arrays[0][:2].copy()))
    by_hand = np.mean([grad_cam(m.model, slices) for m in _members(tiny_ensemble)], axis=0)
    np.testing.assert_allclose(grad_cam(ensemble.model, slices), by_hand, atol=1e-6)


def test_an_edited_ensemble_or_a_replaced_member_is_refused(tiny_ensemble, tmp_path):
    folder = shutil.copytree(tiny_ensemble, tmp_path / "cv")
    meta = json.loads((folder / "ensemble.json").read_text())
    (folder / "ensemble.json").write_text(json.dumps({**meta, "threshold": 0.3}))
    with pytest.raises(ValueError, match="ensemble.json: edited after it was written"):
        load_backend(folder, CPU)
    (folder / "ensemble.json").write_text(json.dumps(meta))
    torch.manual_seed(99)  # fold 1 trained again: another model than the ensemble combined
    sidecar = json.loads((folder / "fold-1" / "model.json").read_text())
    keep = {k: sidecar[k] for k in ("preprocess", "normalization", "threshold", "epoch")}
    save_checkpoint(BrainMetsNet("resnet18"), folder / "fold-1" / "model.safetensors", keep)
    with pytest.raises(ValueError, match=r"fold-1 holds model \w+, but .* combined from model"):
        load_backend(folder, CPU)


@pytest.fixture(scope="module")
def exported(tiny_ensemble, tmp_path_factory) -> Path:
    """A copy of the ensemble with its export and a Triton repository."""
    folder = shutil.copytree(tiny_ensemble, tmp_path_factory.mktemp("ens-export") / "cv")
    assert main(["-q", "export", str(folder), "--triton", str(folder.parent / "triton"),
                 "--triton-backend", "python", "--max-batch", "16"]) == 0  # fmt: skip
    return folder


def test_the_export_is_one_graph_of_every_member_bound_to_the_ensemble(exported):
    import onnx

    sidecar = json.loads((exported / "export" / "brainmets.json").read_text())
    meta = json.loads((exported / "ensemble.json").read_text())
    assert sidecar["format"] == "brainmets-ensemble-onnx"
    assert sidecar["model_id"] == meta["model_id"] and sidecar["members"] == meta["members"]
    assert sidecar["onnx"]["output"]["shape"] == [-1, 2]
    assert sidecar["onnx"]["max_abs_diff_vs_pytorch"] <= 1e-4
    graph = onnx.load(str(exported / "export" / "model.onnx")).graph
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:] == [2]
    config = (exported.parent / "triton" / "brainmets" / "config.pbtxt").read_text()
    assert "dims: [ 2 ]" in config and "reshape" not in config
    # A run's configuration but for the members' axis of the output:
    run_config = triton_config("brainmets", 48, 16, sidecar["model_id"], backend="python")
    assert config.replace("dims: [ 2 ]", "dims: [ 1 ]\n    reshape: { shape: [ ] }") == run_config


def test_onnxruntime_scores_the_ensemble_as_pytorch_does_and_refuses_an_edited_export(
    exported, arrays, tmp_path
):
    expected = load_backend(exported, CPU).scorer(arrays)
    for source in (exported, exported / "export"):  # the ensemble folder, or its export alone
        got = load_backend(source, BackendSpec("onnxruntime", device="cpu")).scorer(arrays)
        np.testing.assert_allclose(got.patient_logits, expected.patient_logits, atol=1e-4)
        assert torch.equal(got.top_slice, expected.top_slice)
    edited = shutil.copytree(exported / "export", tmp_path / "edited")
    sidecar = json.loads((edited / "brainmets.json").read_text())
    (edited / "brainmets.json").write_text(json.dumps({**sidecar, "threshold": 0.2}))
    with pytest.raises(ValueError, match="brainmets.json: edited after export"):
        load_backend(edited, BackendSpec("onnxruntime", device="cpu"))
    other = build_ensemble([exported], tmp_path / "other", combine="mean_probability").folder
    with pytest.raises(ValueError, match="was exported from ensemble .* export it again"):
        load_backend(other, BackendSpec("onnxruntime", device="cpu", onnx=exported / "export"))
    assert file_sha256(exported / "export" / "model.onnx") == sidecar["onnx"]["sha256"]


def test_predict_scores_the_ensemble_alike_on_torch_onnxruntime_and_triton(
    exported, cache, tmp_path
):
    reason = missing()
    if reason:  # as tests/backends/test_triton_server.py: a failure under CI
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(reason)
    tables = {}
    with TritonServer(exported.parent / "triton", tmp_path / "tritonserver") as server:
        for name, extra in (("torch", []), ("onnxruntime", ["--backend", "onnxruntime"]),
                            ("triton", ["--backend", "triton", "--url", server.url])):  # fmt: skip
            out = tmp_path / f"{name}.csv"
            assert main(["-q", "predict", str(exported), str(cache), "--out", str(out),
                         "--device", "cpu", *extra]) == 0  # fmt: skip
            tables[name] = pd.read_csv(out, dtype={"patient_id": str})
    meta = json.loads((exported / "ensemble.json").read_text())
    for name, table in tables.items():
        assert set(table["model"]) == {meta["model_id"]}, name
        np.testing.assert_allclose(table["probability"], tables["torch"]["probability"],
                                   atol=1e-4, err_msg=name)  # fmt: skip
        assert table["decision"].tolist() == tables["torch"]["decision"].tolist(), name


def _verdict(verdict: str) -> dict:
    """A fold run's ranking record as training writes it (``brainmets.ranking``)."""
    separation = 0.6 if verdict == "ranks" else 0.01
    reasons = [] if verdict == "ranks" else [
        f"separation (mean p+ - mean p-) {separation} on the plain sigmoid is in the poor band "
        "(< 0.10)"
    ]  # fmt: skip
    return {"verdict": verdict, "auc": 0.9, "auc_ci": [0.7, 1.0], "n_boot": 1000, "n_pos": 2,
            "n_neg": 2, "reasons": reasons, "scale": "plain sigmoid", "separation": separation,
            "separation_band": "excellent" if verdict == "ranks" else "poor"}  # fmt: skip


def _with_verdicts(tiny_ensemble: Path, to: Path, verdicts: list[str]) -> Path:
    folder = shutil.copytree(tiny_ensemble, to)
    for k, verdict in enumerate(verdicts):
        path = folder / f"fold-{k}" / "model.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "ranking": _verdict(verdict)}))
    return folder


def test_a_fold_that_does_not_rank_its_own_patients_can_be_left_out(
    tiny_ensemble, arrays, tmp_path
):
    """``members="ranking"`` keeps the folds whose own verdict shows they rank: the left-out
    fold's patients choose nothing, it scores nothing, and the summary and the report name it.
    By default every fold is kept."""
    folder = _with_verdicts(tiny_ensemble, tmp_path / "cv", ["ranks", "does_not_rank"])
    summary = build_ensemble([folder], folder, members="ranking")
    meta = summary.meta
    assert [m["run"] for m in meta["members"]] == ["fold-0"]
    assert [(x["run"], x["fold"]) for x in meta["left_out"]] == [("fold-1", 1)]
    assert "not shown to rank" in meta["left_out"][0]["reason"]
    own = pd.read_csv(folder / "fold-0" / "val_predictions.csv", dtype={"patient_id": str})
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"patient_id": str})
    assert oof["patient_id"].tolist() == own["patient_id"].tolist()
    assert meta["oof"]["patients"] == len(own)
    ensemble = load_backend(folder, CPU)
    member = _members(folder)[0]
    np.testing.assert_allclose(ensemble.scorer(arrays).patient_logits.numpy(),
                               member.scorer(arrays).patient_logits.numpy(), atol=1e-6)  # fmt: skip
    assert "1 of 2 folds" in summary.text and "fold 1 left out" in summary.text
    assert main(["-q", "report", str(folder)]) == 0
    report = (folder / "report.html").read_text()
    assert "does_not_rank (left out)" in report and "was left out of the ensemble" in report

    assert main(["-q", "ensemble", str(folder), "--out", str(tmp_path / "all"),
                 "--allow-chance"]) == 0  # fmt: skip
    every = json.loads((tmp_path / "all" / "ensemble.json").read_text())
    assert "was left out of the ensemble" not in (tmp_path / "all" / "report.html").read_text()
    assert [m["fold"] for m in every["members"]] == [0, 1] and every["left_out"] == []
    assert every["model_id"] != meta["model_id"]


def test_when_no_fold_ranks_every_fold_is_kept(tiny_ensemble, tmp_path):
    folder = _with_verdicts(tiny_ensemble, tmp_path / "cv", ["does_not_rank", "does_not_rank"])
    meta = build_ensemble([folder], folder, members="ranking").meta
    assert [m["fold"] for m in meta["members"]] == [0, 1] and meta["left_out"] == []
    folder = _with_verdicts(tiny_ensemble, tmp_path / "cv2", ["undetermined", "ranks"])
    assert build_ensemble([folder], folder, members="ranking").meta["left_out"] == []  # unknown
