"""``brainmets compare RUN_A RUN_B``: is B really better than A on the same patients?

Both runs score the same held-out patients of one cache. Their AUCs are compared by DeLong's
test for correlated ROC curves (the fast algorithm of Sun & Xu, ``brainmets.metrics``): the
difference B - A with its 95% CI and p-value. Their decisions, each at its own run's
operating threshold, are compared by McNemar's test on the patients one run gets right and
the other wrong: over all patients, and within the positives (sensitivity) and the negatives
(specificity); exact binomial for few discordant pairs. One figure shows both ROC curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from brainmets.backends import BackendSpec, load_backend
from brainmets.data.cache import PatientCache
from brainmets.evaluate.evaluation import select_patients, training_overlap
from brainmets.inference import score_cache
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.metrics import delong_test, mcnemar_test, patient_metrics

COMPARE_JSON = "compare.json"
COMPARE_PREDICTIONS = "compare_predictions.csv"
COMPARE_ROC = "roc_compare.png"


@dataclass
class ComparisonSummary:
    result: dict[str, Any]
    out_dir: Path

    @property
    def text(self) -> str:
        r = self.result
        lines = [f"{r['n']} patients ({r['n_pos']} positive) of {r['data']}"
                 + (f", split {r['split']}" if r["split"] else "")]  # fmt: skip
        for key in ("a", "b"):
            run = r["runs"][key]
            lo, hi = run["auc_ci"]
            lines.append(
                f"  {key.upper()} {run['run']}: AUC {run['auc']:.3f} (DeLong 95% CI {lo:.3f} to "
                f"{hi:.3f}); at its threshold {run['threshold']:.3f}: sensitivity "
                f"{run['sensitivity']:.3f}, specificity {run['specificity']:.3f}"
            )
        d = r["delong"]
        lo, hi = d["ci_difference"]
        lines.append(
            f"  AUC B - A: {d['difference']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}), z "
            f"{d['z']:.2f}, p {d['p_value']:.3g} (DeLong, paired)"
        )
        for name, test in r["mcnemar"].items():
            lines.append(
                f"  decisions, {name}: A alone right {test['a_only']}, B alone right "
                f"{test['b_only']}, p {test['p_value']:.3g} (McNemar, {test['method']})"
            )
        lines.append(
            f"written to {self.out_dir} ({COMPARE_JSON}, {COMPARE_ROC}, {COMPARE_PREDICTIONS})"
        )
        return "\n".join(lines)


def _scores(
    run: Path, cache: PatientCache, ids: list[str], backend: BackendSpec | None, progress: bool
):
    trained = load_backend(run, backend)  # a run or an ensemble
    table = score_cache(trained, cache, ids, progress=progress)
    table["decision"] = trained.decision(table["logit"])
    return trained, table


def _run_summary(run: Path, trained, table: pd.DataFrame, auc_ci: list[float]) -> dict[str, Any]:
    from scipy.special import expit

    m = patient_metrics(table["label"], expit(table["logit"].to_numpy()), trained.plain_threshold)
    return {
        "run": str(run),
        "model_id": trained.model_id,
        "auc": m["auc"],
        "auc_ci": auc_ci,
        "threshold": trained.threshold,
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "seen_in_training": training_overlap(run, table["patient_id"]),
    }


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    out_dir: str | Path | None = None,
    backend: BackendSpec | None = None,
    progress: bool = True,
) -> ComparisonSummary:
    """Score both runs on the same patients and test the difference (see the module)."""
    from brainmets.evaluate.plots import plot_roc_pair

    run_a, run_b = Path(run_a), Path(run_b)
    cache = PatientCache(data)
    ids = select_patients(cache, split)
    trained_a, a = _scores(run_a, cache, ids, backend, progress)
    trained_b, b = _scores(run_b, cache, ids, backend, progress)
    paired = a.merge(b, on=["patient_id", "label"], suffixes=("_a", "_b"), validate="one_to_one")
    labels = paired["label"].to_numpy()
    n_pos = int(labels.sum())
    if min(n_pos, len(labels) - n_pos) < 2:
        raise ValueError(
            f"{data}: {n_pos} positive and {len(labels) - n_pos} negative patients"
            f"{' in split ' + split if split else ''}: DeLong's test needs two of each class"
        )
    # On the logits: AUC depends only on the ranking, and logits keep ties a saturated
    # probability would make.
    delong = delong_test(labels, paired["logit_a"], paired["logit_b"])
    correct_a = paired["decision_a"].to_numpy() == labels
    correct_b = paired["decision_b"].to_numpy() == labels
    positive = labels == 1
    mcnemar = {
        "all patients": mcnemar_test(correct_a, correct_b),
        "positives (sensitivity)": mcnemar_test(correct_a[positive], correct_b[positive]),
        "negatives (specificity)": mcnemar_test(correct_a[~positive], correct_b[~positive]),
    }
    result = {
        "data": str(data),
        "split": split,
        "n": len(labels),
        "n_pos": n_pos,
        "runs": {
            "a": _run_summary(run_a, trained_a, a, delong["ci_a"]),
            "b": _run_summary(run_b, trained_b, b, delong["ci_b"]),
        },
        "delong": delong,
        "mcnemar": mcnemar,
    }
    out = (
        Path(out_dir)
        if out_dir
        else Path(f"compare_{run_a.resolve().name}_vs_{run_b.resolve().name}")
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / COMPARE_JSON, json.dumps(_finite(result), indent=2))
    atomic_write_csv(out / COMPARE_PREDICTIONS, paired)
    lo, hi = delong["ci_difference"]
    plot_roc_pair(
        labels,
        paired["probability_a"],
        paired["probability_b"],
        (f"A {run_a.name}", f"B {run_b.name}"),
        out / COMPARE_ROC,
        note=f"AUC B - A {delong['difference']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}), "
        f"DeLong p {delong['p_value']:.3g}",
    )
    return ComparisonSummary(result, out)


def _finite(value: Any) -> Any:
    """nan and inf as None: JSON has neither."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
