"""The ensemble transfer study's table says what the goal is stated in."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


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
