"""``brainmets evaluate``: a trained run scored on a held-out prepared cache.

Patient-level metrics at the run's saved threshold and threshold-free, each with a 95% CI
(Wilson score for the proportions, percentile bootstrap for the rest); operating points for
target sensitivities chosen on the run's own validation predictions (never on the evaluated
patients); plots; and the run report refreshed. Probabilities and thresholds are on the
run's reported scale (calibrated when the run is, see ``brainmets.model.probability``).
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.special import expit

from brainmets import rundir
from brainmets.backends import BackendSpec, load_backend
from brainmets.config import EvaluateConfig, load_config
from brainmets.data.cache import PatientCache
from brainmets.inference import score_cache
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.metrics import evaluate_predictions
from brainmets.model.probability import Calibration
from brainmets.ranking import RankingVerdict

log = logging.getLogger(__name__)

# Rows of the printed summary: (key in metrics.json, label).
_SUMMARY_ROWS = [
    ("auc", "AUC"),
    ("average_precision", "average precision"),
    ("f1", "F1"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("accuracy", "accuracy"),
    ("brier", "Brier score"),
    ("mean_pos", "mean p+"),
    ("mean_neg", "mean p-"),
    ("separation", "separation"),
]


def _three_places(x: float) -> str:
    """``x`` to 3 decimals, without the "-0.000" of a tiny negative number."""
    return f"{round(x, 3) + 0.0:.3f}"


@dataclass
class EvaluationSummary:
    metrics: dict
    predictions: pd.DataFrame
    out_dir: Path

    @property
    def text(self) -> str:
        m, ci = self.metrics["metrics"], self.metrics["ci"]
        scale = Calibration.from_sidecar(self.metrics).describe()
        verdict = RankingVerdict.from_sidecar({"ranking": self.metrics.get("model_ranking")})
        warning = [] if verdict is None or verdict.ranks else [f"WARNING: {verdict.warning()}"]
        lines = warning + [
            f"{m['n']} patients ({m['n_pos']} positive) at threshold "
            f"{self.metrics['threshold']:.3f}; probabilities and thresholds: {scale}"
        ]
        for key, label in _SUMMARY_ROWS:
            if key not in m:
                continue
            value = m.get(key)
            lo, hi = ci.get(key, [None, None])
            shown = "n/a" if value is None else _three_places(value)
            if lo is not None and hi is not None:
                shown += f"  (95% CI {_three_places(lo)} to {_three_places(hi)})"
            lines.append(f"  {label:<18} {shown}")
        lines.append(f"  separation band    {self.metrics['separation_band']}")
        for point in self.metrics.get("operating_points", []):
            if point.get("threshold") is None:
                continue
            pm = point["metrics"]
            lines.append(
                f"  at sensitivity >= {point['target_sensitivity']:.2f} on {point['chosen_on']}: "
                f"threshold {point['threshold']:.3f}, sensitivity {pm['sensitivity']:.3f}, "
                f"specificity {pm['specificity']:.3f}"
            )
        lines.append(f"written to {self.out_dir}")
        return "\n".join(lines)


def _training_overlap(run: Path, evaluated: pd.Series) -> dict[str, int] | None:
    """How many evaluated patients the run trained or validated on (then it is no hold-out);
    None when the run has no splits.csv to tell."""
    path = run / rundir.SPLITS
    if not path.is_file() and (run / rundir.FOLDS).is_file():  # an ensemble: its folds
        folds = pd.read_csv(run / rundir.FOLDS, dtype={"patient_id": str})
        splits = folds.assign(split="train")  # each trained K-1 members and validated one
    elif not path.is_file():
        return None
    else:
        splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    seen = splits[splits["patient_id"].isin(set(evaluated))]
    counts = {k: int(v) for k, v in seen["split"].value_counts().items() if k in ("train", "val")}
    if counts:
        log.warning(
            "evaluated patients the run has seen: %s; these figures are not a held-out "
            "evaluation (use --split test or a separate cache)",
            counts,
        )
    return counts


def evaluate_run(
    run: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    out_dir: str | Path | None = None,
    n_boot: int | None = None,
    backend: BackendSpec | None = None,
    seed: int = 0,
    progress: bool = True,
    settings: EvaluateConfig | None = None,
) -> EvaluationSummary:
    """``settings``: the ``evaluate.*`` keys to use (default: the run's config.yaml)."""
    from brainmets.evaluate.plots import write_evaluation_plots
    from brainmets.evaluate.report import write_report

    run = Path(run)
    out = Path(out_dir) if out_dir else run / rundir.EVALUATION
    if settings is None:
        settings = (
            load_config(run / rundir.CONFIG).evaluate
            if (run / rundir.CONFIG).is_file()
            else EvaluateConfig()
        )
    n_boot = n_boot if n_boot is not None else settings.n_boot
    targets = settings.sensitivity_targets

    trained = load_backend(run, backend)
    cache = PatientCache(data)
    ids = cache.patient_ids
    if split is not None:
        ids = cache.index.loc[cache.index["split"] == split, "patient_id"].tolist()
        if not ids:
            present = sorted(set(cache.index["split"].fillna("").astype(str)) - {""})
            close = difflib.get_close_matches(split, present, n=1)
            if close:  # a typo of a split the cache has
                raise ValueError(
                    f"{data}: no patient has split {split!r}; did you mean --split {close[0]}? "
                    f"(splits in this cache: {', '.join(present)})"
                )
            raise ValueError(
                f"{data}: no patient has split {split!r} (splits in this cache: "
                f"{', '.join(present) or 'none'}). Give test patients a split column value "
                f"'{split}' in the labels CSV and run prepare again, or evaluate a separate "
                "held-out cache without --split"
            )
    out.mkdir(parents=True, exist_ok=True)  # after every input checks out: a typo leaves none
    predictions = score_cache(trained, cache, ids, progress=progress)

    overlap = _training_overlap(run, predictions["patient_id"])
    val_labels = val_plain = None
    val_path = run / rundir.VAL_PREDICTIONS
    if not val_path.is_file():  # an ensemble chooses on its out-of-fold predictions
        val_path = run / rundir.OOF_PREDICTIONS
    if val_path.is_file():
        val = pd.read_csv(val_path, dtype={"patient_id": str})
        # Its probability is on the reported scale; the sigmoid comes back from the logit
        # (older runs without one stored the sigmoid itself).
        val_labels = val["label"].to_numpy()
        val_plain = expit(val["logit"]) if "logit" in val else val["probability"].to_numpy()
    labels = predictions["label"].to_numpy()
    probs = predictions["probability"].to_numpy()
    # Ranked, called and thresholds chosen on the plain sigmoid, where the run chose its own
    # threshold; probability-valued metrics and the thresholds shown on the reported scale.
    plain = expit(predictions["logit"].to_numpy())
    predictions["decision"] = trained.decision(predictions["logit"])  # as predict calls it
    calibrated = trained.calibration.method != "none"
    metrics = evaluate_predictions(
        labels,
        plain,
        trained.plain_threshold,
        n_boot=n_boot,
        seed=seed,
        sensitivity_targets=targets,
        val_labels=val_labels,
        val_probs=val_plain,
        reported=trained.calibration.from_plain if calibrated else None,
    )
    metrics["calibration"] = trained.calibration.to_json()
    metrics["data"] = str(data)
    metrics["split"] = split
    metrics["seen_in_training"] = overlap
    metrics["model_epoch"] = trained.sidecar.get("epoch")  # the model.json load_trained read
    metrics["model_best_metric"] = trained.sidecar.get("best_metric")
    metrics["model_ranking"] = trained.sidecar.get("ranking")  # the run's own verdict
    atomic_write_text(out / rundir.EVALUATION_METRICS, json.dumps(metrics, indent=2))
    atomic_write_csv(out / rundir.PREDICTIONS, predictions)
    write_evaluation_plots(
        labels,
        probs,
        trained.threshold,
        out,
        plain=(plain, trained.plain_threshold) if calibrated else None,
        reported=trained.calibration.from_plain if calibrated else None,
    )
    if out == run / rundir.EVALUATION:
        write_report(run)
    else:  # the report shows RUN/evaluation only; a second evaluation must not replace it
        log.info("%s/report.html not refreshed: it shows %s/evaluation", run, run)
    return EvaluationSummary(metrics, predictions, out)
