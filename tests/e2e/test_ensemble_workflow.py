"""An ensemble where a run goes: evaluate and its report, serve (a study sent by C-STORE scores
as predict scores it), and predict sharded over workers (shard tables merged into the table
one worker writes)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from brainmets.backends import BackendSpec
from brainmets.cli import main
from brainmets.config import PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.predict import predict

CPU = BackendSpec(device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_ensemble) -> Path:
    """Nine patients at 48 px (the members' preprocessing), three of them test; the others are
    in the ensemble's folds."""
    folds = pd.read_csv(tiny_ensemble / "folds.csv", dtype={"patient_id": str})
    rng = np.random.default_rng(1)
    ids = [*folds["patient_id"][:6], "NEW1", "NEW2", "NEW3"]
    patients = [
        (pid, i % 2, rng.integers(0, 255, size=(9 + i % 3, 48, 48)).astype(np.uint8))
        for i, pid in enumerate(ids)
    ]
    splits = {pid: "test" for pid in ids[6:]}
    root = tmp_path_factory.mktemp("ens-e2e") / "cache"
    build_cache_from_arrays(root, patients, PreprocessConfig(size=48), splits)
    return root


def test_evaluate_an_ensemble_and_its_report(tiny_ensemble, cache, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_ensemble, tmp_path / "cv")
    assert main(["-q", "evaluate", str(folder), "--data", str(cache), "--n-boot", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 9
    # The six patients of the folds were trained or validated on by the members.
    assert metrics["seen_in_training"] == {"train": 6}
    assert metrics["model_ranking"] == json.loads((folder / "ensemble.json").read_text())["ranking"]
    report = (folder / "report.html").read_text()
    for text in ("Cross-validation", "out-of-fold", "Evaluation metrics"):
        assert text in report, text
    for member in json.loads((folder / "ensemble.json").read_text())["members"]:
        assert f"<code>{member['model_id']}</code>" in report  # a row per fold
    assert "Learning curves not available" not in report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send(port: int, files: list[Path]) -> None:
    """C-STORE every file in one association (pynetdicom as the sending modality)."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="MODALITY")
    for uid in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="BRAINMETS")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_serve_scores_a_study_with_the_ensemble_as_predict_does(
    tiny_ensemble, head_ct_studies, tmp_path
):
    from brainmets.serve.node import Node, NodeConfig
    from brainmets.serve.record import read_status

    study = head_ct_studies / "SYN0006"
    files = sorted(p for p in study.rglob("*") if p.is_file())
    config = NodeConfig(port=_free_port(), stable_seconds=1.0, top_k=1, backend=CPU,
                        poll_seconds=0.2)  # fmt: skip
    node = Node(tiny_ensemble, tmp_path / "store", config)
    node.start()
    try:
        _send(node.port, files)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = read_status(tmp_path / "store")
            if len(rows) and set(rows["state"]) <= {"done", "failed"}:
                break
            time.sleep(0.5)
    finally:
        node.stop()
    row = read_status(tmp_path / "store").iloc[0]
    assert row["state"] == "done", row["error"]
    expected = predict(tiny_ensemble, [study], out_csv=tmp_path / "p.csv", progress=False,
                       workers=1, backend=CPU).table.iloc[0]  # fmt: skip
    assert row["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert row["decision"] == expected["decision"]
    assert (
        row["model"]
        == expected["model"]
        == json.loads((tiny_ensemble / "ensemble.json").read_text())["model_id"]
    )


def test_predict_sharded_over_workers_merges_into_the_table_of_one_worker(
    tiny_run, cache, tmp_path
):
    whole = tmp_path / "whole.csv"
    assert main(["-q", "predict", str(tiny_run), str(cache), "--out", str(whole),
                 "--device", "cpu"]) == 0  # fmt: skip
    out = tmp_path / "sharded" / "predictions.csv"
    heat = tmp_path / "sharded" / "heatmaps"
    shards = []
    for k in (1, 0):  # in any order; the last to finish merges
        assert not out.exists()
        assert main(["-q", "predict", str(tiny_run), str(cache), "--out", str(out), "--device",
                     "cpu", "--num-shards", "2", "--shard-id", str(k), "--heatmaps", str(heat),
                     "--top-k", "1"]) == 0  # fmt: skip
        shards.append(pd.read_csv(out.with_name(f"predictions-shard{k}-of2.csv"), dtype=str))
    ids = [set(s["patient_id"]) for s in shards]
    assert sum(map(len, ids)) == 9 and len(set().union(*ids)) == 9  # disjoint, covering
    assert all(ids)  # every shard had patients (the hash spreads them)
    merged, expected = (pd.read_csv(p, dtype={"patient_id": str}) for p in (out, whole))
    pd.testing.assert_frame_equal(merged, expected)
    index = pd.read_csv(heat / "heatmaps.csv", dtype={"patient_id": str})
    assert sorted(index["patient_id"]) == sorted(expected["patient_id"])


def test_a_shard_outside_the_shards_is_refused(tiny_run, cache, tmp_path, capsys):
    assert main(["predict", str(tiny_run), str(cache), "--out", str(tmp_path / "p.csv"),
                 "--num-shards", "2", "--shard-id", "2"]) == 2  # fmt: skip
    assert "--shard-id 2 must be in [0, --num-shards 2)" in capsys.readouterr().err


def test_compare_an_ensemble_with_one_of_its_members(tiny_ensemble, cache, tmp_path, capsys):
    """compare takes an ensemble as it takes a run: each scores the same patients as evaluate
    scores them, and the paired tests run on those scores."""
    out = tmp_path / "cmp"
    member = tiny_ensemble / "fold-0"
    assert main(["-q", "compare", str(member), str(tiny_ensemble), "--data", str(cache),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads((out / "compare.json").read_text())["runs"]
    for key, run in (("a", member), ("b", tiny_ensemble)):
        assert main(["-q", "evaluate", str(run), "--data", str(cache), "--n-boot", "0",
                     "--device", "cpu", "--out", str(tmp_path / key)]) == 0  # fmt: skip
        scored = json.loads((tmp_path / key / "metrics.json").read_text())["metrics"]["auc"]
        assert result[key]["auc"] == pytest.approx(scored, abs=1e-9)
    assert (
        result["b"]["model_id"]
        == json.loads((tiny_ensemble / "ensemble.json").read_text())["model_id"]
    )
