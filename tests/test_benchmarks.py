"""The benchmark harness runs end to end (tiny sizes, CPU) and every section yields numbers.

Not a speed test: the figures of a 2-core CPU at 32 px mean nothing. What this holds is that
the command the README gives still runs, that no section fails silently (a failing section
prints its traceback and leaves NaN, which is what is checked here), and that the JSON has the
fields the README's tables are read from.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from timing import Candidate, measure_in_turn, median_rate, paired_ratio  # noqa: E402

TINY = [
    "--device", "cpu", "--arch", "resnet18", "--size", "32", "--cohort", "8", "--patients", "2",
    "--min-slices", "3", "--max-slices", "5", "--steps", "1", "--warmup", "0", "--workers", "0",
    "--infer-slices", "8", "--infer-passes", "2", "--static-slices", "4", "--dicom-patients", "2",
    "--no-compile", "--rounds", "3",
]  # fmt: skip
ROUNDS = int(TINY[TINY.index("--rounds") + 1])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """A benchmark script as the README runs it; fails the test with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_pipeline_benchmark_measures_every_section(tmp_path):
    out = tmp_path / "pipeline.json"
    done = _run("pipeline_throughput.py", *TINY, "--json", str(out))
    report = json.loads(out.read_text())

    assert report["complete"]
    assert set(report["results"]) == {"stage1", "stage2", "stage3", "inference"}
    for name, row in report["results"].items():
        assert _finite(row["pipeline"]) and _finite(row["reference"]), (name, done.stdout)
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"], name
        # Interleaved: every workload timed in every round, the ratio taken round by round.
        pipeline, reference = (row["rates"][k] for k in ("pipeline" if name == "inference"
                               else "pipeline_resident", "reference"))  # fmt: skip
        assert len(pipeline) == len(reference) == ROUNDS, name
        per_round = sorted(a / b for a, b in zip(pipeline, reference, strict=True))
        assert row["ratio"] == pytest.approx(per_round[ROUNDS // 2]), name
    for stage in ("stage1", "stage2", "stage3"):
        row = report["results"][stage]
        for variant in ("loader", "resident", "static"):
            assert _finite(row[f"pipeline_{variant}"]), (stage, variant, done.stdout)
            assert _finite(row[f"ratio_{variant}"]), (stage, variant)
    dicom = report["dicom"]
    for key in (
        "decode_slices_per_s",
        "decode_preprocess_slices_per_s",
        "prepare_end_to_end_slices_per_s",
        "predict_end_to_end_slices_per_s",
    ):
        assert _finite(dicom[key]), (key, done.stdout)
    assert dicom["slices"] > 0 and dicom["workers"] >= 1
    assert "workload" in done.stdout and "from 512^2 DICOM" in done.stdout  # the printed table


@pytest.mark.slow
def test_pipeline_benchmark_sections_and_variants_can_be_chosen(tmp_path):
    out = tmp_path / "inference-only.json"
    _run("pipeline_throughput.py", *TINY, "--sections", "inference", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"inference"} and report["dicom"] is None

    out = tmp_path / "static-only.json"
    _run("pipeline_throughput.py", *TINY, "--sections", "train", "--variants", "static",
         "--json", str(out))  # fmt: skip
    row = json.loads(out.read_text())["results"]["stage1"]
    assert "pipeline_resident" not in row and row["pipeline"] == row["pipeline_static"]

    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "pipeline_throughput.py"), "--variants", "static,fast"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "choose among loader, resident, static" in done.stderr


def _counting(log: list[str], name: str, fail_at: int | None = None) -> Candidate:
    """A workload that records its calls in ``log`` and fails on its ``fail_at``-th run."""
    runs = []

    def run() -> int:
        runs.append(name)
        log.append(name)
        if len(runs) == fail_at:
            raise RuntimeError(f"{name} broke")
        return 10

    return Candidate(run, lambda: log.append(f"warm {name}"))


def test_workloads_are_timed_in_turn_and_a_failure_costs_only_its_own_rounds(capsys):
    import torch

    log: list[str] = []
    candidates = {
        "reference": _counting(log, "reference"),
        "pipeline": _counting(log, "pipeline", fail_at=3),
        "loader": _counting(log, "loader")._replace(alone=True),
    }
    rates = measure_in_turn(candidates, 4, torch.device("cpu"))

    assert log == (
        ["warm reference", "warm pipeline"]
        + ["reference", "pipeline"] * 3  # in turn; the pipeline breaks in round 3
        + ["reference"]
        + ["warm loader"]
        + ["loader"] * 4  # alone: in a block after the others
    )
    assert "pipeline broke" in capsys.readouterr().err
    assert [math.isfinite(r) for r in rates["pipeline"]] == [True, True, False, False]
    assert all(_finite(r) for r in rates["reference"] + rates["loader"])
    assert _finite(median_rate(rates["pipeline"]))  # its two measured rounds still count
    assert paired_ratio(rates, "pipeline", "reference")["rounds"] == 2


def test_the_ratio_is_the_median_of_the_per_round_ratios():
    rates = {"a": [10.0, 30.0, 20.0, math.nan], "ref": [10.0, 10.0, 40.0, 10.0]}
    # Per round: 1.0, 3.0, 0.5 (round 4 unmeasured). The ratio of the median rates would be
    # 20 / 10 = 2.0: one disturbed round of the reference would set it.
    assert paired_ratio(rates, "a", "ref") == {
        "ratio": 1.0, "ratio_min": 0.5, "ratio_max": 3.0, "rounds": 3,
    }  # fmt: skip
    assert math.isnan(paired_ratio(rates, "a", "missing")["ratio"])
    assert math.isnan(median_rate([math.nan])) and median_rate(rates["ref"]) == 10.0


@pytest.mark.slow
def test_step_profile_writes_traces_and_per_step_figures(tmp_path):
    done = _run("profile_step.py", *TINY, "--steps", "2", "--stages", "1", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert set(summary) == {"stage1/pipeline", "stage1/reference"}
    for found in summary.values():
        assert _finite(found["wall_ms"]) and _finite(found["aten_calls"])
    for name in ("stage1-pipeline.json", "stage1-reference.json"):
        assert json.loads((tmp_path / name).read_text())["traceEvents"]
    assert "beyond the reference" in done.stdout


def test_preprocess_benchmark_times_every_step_and_matches_the_reference(tmp_path):
    out = tmp_path / "pre.json"
    _run("preprocess_throughput.py", "--patients", "1", "--repeats", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["ms_per_slice"]) == {
        "decode to HU", "5 mm slabs", "brain window", "resize", "resize, plain PyTorch", "uint8",
    }  # fmt: skip
    assert all(_finite(ms) for ms in report["ms_per_slice"].values())
    assert report["slabs"] < report["slices"]  # 1 mm slices really were averaged into slabs
    assert report["resize_max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_serve_benchmark_measures_reception_and_latency(tmp_path):
    import os

    from serve_throughput import peer

    missing = [tool for tool in ("storescu", "Orthanc") if peer(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install dcmtk orthanc)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "serve.json"
    _run("serve_throughput.py", "--studies", "1", "--rounds", "2", "--matrix", "64", "--slices",
         "10", "12", "--latency-studies", "1", "--arch", "resnet18", "--size", "32",
         "--stable-seconds", "1", "--device", "cpu", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2
    assert _finite(report["serve_per_s"]) and _finite(report["orthanc_per_s"])
    assert report["ratio_min"] <= report["ratio"] <= report["ratio_max"]
    assert len(report["latency_s"]) == 1 and math.isfinite(report["latency_median_s"])


def test_selection_transfer_replays_every_rule_on_recorded_runs(tmp_path):
    """The offline half of the epoch-selection benchmark on a recorded run whose validation
    AUC saturates at epoch 1 with a threshold that misses held-out positives."""
    import pandas as pd

    from brainmets.train.selection import RULES

    folder = tmp_path / "demo-seed0"
    (folder / "run").mkdir(parents=True)
    labels = [1, 1, 0, 0]
    epochs = {  # epoch: (val probabilities, test probabilities)
        0: ([0.6, 0.4, 0.5, 0.3], [0.6, 0.4, 0.5, 0.3]),
        1: ([0.09, 0.2, 0.05, 0.04], [0.07, 0.06, 0.05, 0.04]),
        2: ([0.7, 0.8, 0.2, 0.1], [0.6, 0.9, 0.3, 0.1]),
    }
    rows, history = [], []
    for epoch, (val, test) in epochs.items():
        for split, probs in (("val", val), ("test", test)):
            rows += [
                {"patient_id": f"{split}{i}", "label": y, "probability": p, "logit": 0.0,
                 "epoch": epoch, "split": split}
                for i, (y, p) in enumerate(zip(labels, probs, strict=True))
            ]  # fmt: skip
        threshold = {0: 0.5, 1: 0.08, 2: 0.7}[epoch]
        history.append({"epoch": epoch, "auc": [0.75, 1.0, 1.0][epoch], "f1": [0.5, 0.8, 1.0][epoch],
                        "val_loss": [0.7, 1.5, 0.3][epoch], "separation": 0.1,
                        "threshold": threshold})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "epochs.csv", index=False)
    pd.DataFrame(history).to_csv(folder / "run" / "metrics.csv", index=False)
    (folder / "info.json").write_text(json.dumps({"seed": 0, "setting": "demo",
                                                  "train_seconds": 1.0}))  # fmt: skip

    out = tmp_path / "transfer.json"
    done = _run("selection_transfer.py", "analyse", "--out", str(tmp_path), "--json", str(out))
    result = {row["rule"]: row for row in json.loads(out.read_text())}
    assert set(result) == set(RULES)
    # AUC keeps epoch 1 and its threshold 0.08, which misses a held-out positive (0.07, 0.06).
    assert result["auc"]["epoch"] == 1 and result["auc"]["test_sensitivity"] == 0.0
    assert result["auc_then_val_loss"]["epoch"] == 2
    assert result["auc_then_val_loss"]["test_sensitivity"] == 0.5
    assert "| `auc` |" in done.stdout


def test_onnx_benchmark_times_every_backend_against_pytorch(tmp_path):
    out = tmp_path / "onnx.json"
    done = _run("onnx_throughput.py", "--arch", "resnet18", "--size", "32", "--slices", "4",
                "--chunk", "2", "--rounds", "3", "--levels", "all", "--threads", "0",
                "--torch-threads", "0", "1", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())["resnet18@32"]
    results = report["results"]
    assert set(results) == {"pytorch threads=default", "pytorch threads=1", "best pytorch",
                            "onnxruntime opt=all threads=default",
                            "onnxruntime int8 opt=all threads=default"}  # fmt: skip
    for name, row in results.items():
        assert _finite(row["slices_per_s"]) and len(row["rates"]) == 3, (name, done.stdout)
        if name.startswith("onnxruntime"):
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"] and row["rounds"] == 3
    # Per round, the reference is the faster PyTorch thread count.
    assert results["best pytorch"]["rates"] == [
        max(pair) for pair in zip(results["pytorch threads=default"]["rates"],
                                  results["pytorch threads=1"]["rates"], strict=True)
    ]  # fmt: skip
    assert report["max_abs_diff_slice_logit"]["fp32"] <= 1e-4
