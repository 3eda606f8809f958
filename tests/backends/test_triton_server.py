"""``--backend triton`` against a real Triton Inference Server: nvidia-pytriton's
``tritonserver`` on loopback, serving the repository ``brainmets export --triton REPO
--triton-backend python`` writes (Triton's Python backend running model.onnx in onnxruntime).

The server loads our config.pbtxt and enforces it (``max_batch_size`` 4 here, so the client
must send chunks of at most 4 slices), and reports the model's metadata as Triton does. One
server for the module: its start-up (~5-15 s) is the dominant cost. Skipped where no server can
run; a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from brainmets.backends import BackendSpec, load_backend
from brainmets.cli import main
from brainmets.export import triton_config, write_triton_model
from brainmets.predict import predict

from .triton_server import TritonServer, missing

MAX_BATCH = 4
SIZE = 48  # the tiny_run's slices


def _require(reason: str | None) -> None:
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def repository(tiny_run, tmp_path_factory) -> Path:
    """REPO with ``brainmets`` (the tiny run, at most 4 slices per request) and ``other``: the
    same graph under a configuration for 64-pixel slices, as a server holding another
    model would report it."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    assert main(["-q", "export", str(tiny_run), "--out", str(repo.parent / "export"), "--triton",
                 str(repo), "--triton-backend", "python", "--max-batch", str(MAX_BATCH)]) == 0  # fmt: skip
    other = repo / "other"
    shutil.copytree(repo / "brainmets", other)
    config = (other / "config.pbtxt").read_text().replace('name: "brainmets"', 'name: "other"')
    (other / "config.pbtxt").write_text(config.replace(f"{SIZE}, {SIZE}", "64, 64"))
    return repo


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    _require(missing())
    with TritonServer(repository, tmp_path_factory.mktemp("tritonserver")) as running:
        # The client reads the sidecar of the export the server serves (an export folder).
        running.export = repository / "brainmets" / "1"
        yield running


def _batches(server: TritonServer, model: str) -> dict[int, int]:
    """Executions of ``model`` on the server, by batch size."""
    import tritonclient.grpc as grpc

    with grpc.InferenceServerClient(server.url) as client:
        (stats,) = client.get_inference_statistics(model).model_stats
    return {int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False)


def test_the_repository_for_the_python_backend_is_the_stock_one_but_for_its_runner(repository):
    config = (repository / "brainmets" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "onnxruntime_onnx" not in config
    assert f"max_batch_size: {MAX_BATCH}" in config
    version = repository / "brainmets" / "1"
    assert {p.name for p in version.iterdir()} == {"model.py", "model.onnx", "brainmets.json"}
    assert (version / "model.onnx").read_bytes() == (
        repository.parent / "export" / "model.onnx"
    ).read_bytes()


def test_the_python_backend_config_parses_and_the_stock_one_stays_the_default(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = triton_config("m", SIZE, 8, backend="python")
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "python" and not config.platform
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert text.replace('backend: "python"\ninstance_group [ { kind: KIND_CPU } ]\n', "") == (
        triton_config("m", SIZE, 8).replace('platform: "onnxruntime_onnx"\n', "")
    )
    with pytest.raises(ValueError, match="Triton backend 'tensorrt' is not supported"):
        triton_config("m", SIZE, 8, backend="tensorrt")

    # Written over a python-backend model, a stock one leaves no stale model.py behind.
    sidecar = {"preprocess": {"size": SIZE}, "model_id": "m1"}
    model = write_triton_model(tmp_path / "m", b"graph", sidecar, max_batch=8, backend="python")
    assert (model / "1" / "model.py").is_file()
    write_triton_model(tmp_path / "m", b"graph", sidecar, max_batch=8)
    assert not (model / "1" / "model.py").exists()
    assert 'platform: "onnxruntime_onnx"' in (model / "config.pbtxt").read_text()


def test_predict_through_a_real_triton_server_scores_as_pytorch(
    server, tiny_run, head_ct_studies, tmp_path
):
    studies = [head_ct_studies / f"SYN000{i}" for i in (1, 2, 3)]
    before = _batches(server, "brainmets")
    assert main(["-q", "predict", str(tiny_run), *map(str, studies), "--out",
                 str(tmp_path / "triton.csv"), "--backend", "triton", "--url", server.url,
                 "--onnx", str(server.export)]) == 0  # fmt: skip
    # The reference in this process (no preprocessing workers to start).
    predict(tiny_run, studies, out_csv=tmp_path / "torch.csv", progress=False, workers=1)
    plain, served = _read(tmp_path / "torch.csv"), _read(tmp_path / "triton.csv")
    assert len(served) == 3
    assert np.allclose(served["probability"], plain["probability"], rtol=0, atol=1e-4)
    same = [c for c in plain.columns if c != "probability"]
    pd.testing.assert_frame_equal(served[same], plain[same])

    # The server holds its max_batch_size of 4: the client sent chunks of at most 4 slices,
    # and a request of 5 is refused.
    after = _batches(server, "brainmets")
    sent = {size: count - before.get(size, 0) for size, count in after.items()}
    assert sum(sent.values()) > 0 and max(s for s, n in sent.items() if n) <= MAX_BATCH
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    given = grpc.InferInput("slices", [MAX_BATCH + 1, 1, SIZE, SIZE], "FP32")
    given.set_data_from_numpy(np.zeros((MAX_BATCH + 1, 1, SIZE, SIZE), np.float32))
    with (
        grpc.InferenceServerClient(server.url) as client,
        pytest.raises(InferenceServerException, match="batch-size must be <= 4"),
    ):
        client.infer("brainmets", [given])


def test_slice_logits_from_the_server_are_pytorchs(server, tiny_run):
    """Every slice logit, not only the patients' maxima, within 1e-4 of PyTorch's."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8) for n in (1, 5, 9)]
    served = load_backend(tiny_run, BackendSpec("triton", url=server.url, onnx=server.export))
    plain = load_backend(tiny_run, BackendSpec("torch", device="cpu"))
    got, expected = served.scorer(arrays), plain.scorer(arrays)
    assert got.slice_logits.shape == (15,)
    assert (got.slice_logits - expected.slice_logits).abs().max() <= 1e-4
    assert (got.patient_logits - expected.patient_logits).abs().max() <= 1e-4


def test_a_served_model_of_other_slices_is_refused_before_anything_is_sent(
    server, tiny_run, head_ct_studies, tmp_path, capsys
):
    rc = main(["-q", "predict", str(tiny_run), str(head_ct_studies / "SYN0001"), "--out",
               str(tmp_path / "p.csv"), "--backend", "triton", "--url", server.url,
               "--onnx", str(server.export), "--triton-model", "other"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"Triton model 'other' at {server.url}: not the slice network" in err
    assert "1, 64, 64], not [batch, 1, 48, 48]" in err
    assert not any(_batches(server, "other").values())

    rc = main(["-q", "predict", str(tiny_run), str(head_ct_studies / "SYN0001"), "--out",
               str(tmp_path / "p.csv"), "--backend", "triton", "--url", server.url,
               "--onnx", str(server.export), "--triton-model", "absent"])  # fmt: skip
    assert rc == 2 and f"Triton model 'absent' at {server.url}" in capsys.readouterr().err


# ------------------------------------------------------------------------------- serve


def _storescu() -> str | None:
    """dcmtk's storescu, not the Python app of the same name pynetdicom puts in our bin."""
    ours = Path(sys.prefix, "bin").resolve()
    for folder in filter(None, os.environ.get("PATH", "").split(os.pathsep)):
        found = shutil.which("storescu", path=folder)
        if found and Path(folder).resolve() != ours:
            return found
    return None


def test_serve_scores_a_received_study_through_the_real_server(
    server, tiny_run, head_ct_studies, tmp_path
):
    """A study sent by dcmtk's storescu to a node scoring on Triton gets predict's PyTorch
    probability; the heatmaps' Grad-CAM stays in the run's PyTorch weights."""
    from brainmets.serve.node import Node, NodeConfig
    from brainmets.serve.record import read_status

    storescu = _storescu()
    _require(None if storescu else "dcmtk's storescu is not installed (apt-get install dcmtk)")
    study = head_ct_studies / "SYN0004"
    config = NodeConfig(
        port=0,
        allow=("STORESCU",),
        stable_seconds=1.0,
        top_k=1,
        poll_seconds=0.2,
        backend=BackendSpec("triton", url=server.url, onnx=server.export),
    )
    node = Node(tiny_run, tmp_path / "store", config)
    port = node.start()
    try:
        subprocess.run(
            [storescu, "-aet", "STORESCU", "-aec", config.ae_title, "+sd", "+r", "-nh",
             "127.0.0.1", str(port), str(study)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = read_status(tmp_path / "store")
            if not rows.empty and set(rows["state"]) <= {"done", "failed"}:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the study was not scored within 120 s")
    finally:
        node.stop()
    row = rows.iloc[0]
    assert row["state"] == "done", row.to_dict()
    assert main(["-q", "predict", str(tiny_run), str(study), "--out", str(tmp_path / "p.csv")]) == 0  # fmt: skip
    expected = _read(tmp_path / "p.csv").iloc[0]
    assert row["probability"] == pytest.approx(expected["probability"], abs=1e-4)
    assert row["decision"] == expected["decision"] and row["model"] == expected["model"]
    uid = pydicom.dcmread(next(p for p in study.rglob("*") if p.is_file())).StudyInstanceUID
    assert row["study_uid"] == uid


# ------------------------------------------------------------------------------- benchmark


@pytest.mark.slow  # its own export and server: ~20 s
def test_the_triton_benchmark_times_both_backends_and_they_agree(tmp_path):
    _require(missing())
    out = tmp_path / "triton.json"
    benchmark = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_throughput.py"
    done = subprocess.run(
        [sys.executable, str(benchmark), "--arch", "resnet18", "--size", "32", "--patients", "2",
         "--slices", "3", "--max-batch", "2", "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["resnet18@32"]
    served = report["results"]["triton (gRPC, loopback)"]
    for row in report["results"].values():
        assert len(row["rates"]) == 2 and all(r > 0 for r in row["rates"]), done.stdout
    assert served["ratio_min"] <= served["ratio"] <= served["ratio_max"]
    assert max(report["max_abs_diff_slice_logit"].values()) <= 1e-4
