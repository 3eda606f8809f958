"""The ensemble benchmarks run end to end at tiny sizes and write the fields the tables in
docs/benchmarks.md are read from (not a speed test)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow  # three ONNX exports: ~1 min
def test_the_export_benchmark_times_one_graph_against_one_per_member(tmp_path):
    out = tmp_path / "export.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ensemble_export.py"), "--members", "2", "--size", "32",
         "--chunk", "4", "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["max_abs_diff_between_the_two"] <= 1e-5  # the same logits either way
    for name in ("one_graph", "graph_per_member"):
        assert math.isfinite(report["slices_per_second"][name]) and len(report["rates"][name]) == 2
    assert report["one_graph_over_per_member"]["rounds"] == 2


def test_the_transfer_table_states_the_goal_per_method():
    sys.path.insert(0, str(BENCHMARKS))
    from ensemble_transfer import markdown

    rows = []
    for cohort, auc, sens in (("a", 0.95, 0.8), ("b", 0.97, 0.6), ("c", 0.7, 0.9)):
        rows.append({"cohort": cohort, "method": "ensemble", "threshold": 0.4,
                     "estimate_patients": 80, "estimate_sensitivity": 0.9,
                     "estimate_specificity": 0.9, "test_auc": auc, "test_sensitivity": sens,
                     "test_specificity": 0.8, "sens_gap": sens - 0.9, "spec_gap": -0.1})  # fmt: skip
    table = markdown(pd.DataFrame(rows))
    # Mean |gap| over cohorts of (|sens gap| + |spec gap|) / 2: (0.1 + 0.2 + 0.05) / 3; two
    # cohorts learned (AUC >= 0.90), one of them holds both rates at 0.75.
    assert "| `ensemble` | 0.117 | 2 / 3 | 1 / 2 | 0.77 / 0.80 |" in table
