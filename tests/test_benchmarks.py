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

TINY = [
    "--device", "cpu", "--arch", "resnet18", "--size", "32", "--cohort", "8", "--patients", "2",
    "--min-slices", "3", "--max-slices", "5", "--steps", "1", "--warmup", "0", "--workers", "0",
    "--infer-slices", "8", "--infer-passes", "2", "--static-slices", "4", "--dicom-patients", "2",
    "--no-compile", "--rounds", "3",
]  # fmt: skip
ROUNDS = 3


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
        [sys.executable, str(BENCHMARKS / "pipeline_throughput.py"), "--variants", "fast"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "choose among loader, resident, static" in done.stderr


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
