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

import numpy as np
import pandas as pd
from scipy.special import expit

from brainmets import rundir
from brainmets.backends import BackendSpec, load_backend
from brainmets.config import EvaluateConfig, load_config
from brainmets.data.cache import PatientCache
from brainmets.data.lesions import SeriesFiles, place_lesions, read_lesion_truth
from brainmets.data.series_index import read_index
from brainmets.evaluate import DEFAULT_MARGIN_MM, DEFAULT_TOP_K
from brainmets.evaluate.localisation import LOCALISATION_PNG
from brainmets.evaluate.subgroups import MIN_PER_CLASS, format_subgroups
from brainmets.inference import score_cache
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.metrics import evaluate_predictions
from brainmets.model.probability import Calibration
from brainmets.ranking import RankingVerdict

log = logging.getLogger(__name__)

MAX_LOCALISATION_FIGURES = 6

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
        lines += localisation_lines(self.metrics.get("localisation"))
        subgroups = self.metrics.get("subgroups")
        if subgroups and subgroups.get("groups"):
            lines.append(
                f"subgroups (series fields from the {subgroups['fields_from']}; no figure below "
                f"{subgroups['min_per_class']} patients of a class):"
            )
            lines += format_subgroups(subgroups["groups"])
        lines.append(f"written to {self.out_dir}")
        return "\n".join(lines)


def _estimate(entry: dict, digits: int = 3) -> str:
    """ "0.938 (95% CI 0.717 to 0.989; chance 0.41)" of a localisation measure."""
    if entry.get("value") is None:
        return f"n/a ({entry.get('n', 0)} to measure)"
    lo, hi = entry.get("ci") or [None, None]
    ci = f"95% CI {lo:.{digits}f} to {hi:.{digits}f}; " if lo is not None and hi is not None else ""
    chance = entry.get("chance")
    return (
        f"{entry['value']:.{digits}f}  ({ci}{entry['successes']}/{entry['n']}; chance {chance:.2f})"
    )


def localisation_lines(loc: dict | None) -> list[str]:
    """The localisation measures as lines of the terminal summary (none without them)."""
    if not loc:
        return []
    lines = [
        f"localisation against {loc['lesions_file']}: {loc['true_positive_patients']} true "
        f"positives of {loc['positive_patients_with_lesions']} positive patients with lesions "
        f"({loc['lesions_placed']} lesions)",
        f"  top-slice hit rate {_estimate(loc['top_slice_hit_rate'])}  Wilson; within "
        f"{loc['slab_tolerance']} slab of a lesion",
    ]
    pointing = loc["pointing_game"]
    cell, ceiling = pointing.get("heatmap_cell_mm"), pointing.get("resolution_ceiling")
    lines.append(
        f"  pointing game      {_estimate(pointing)}  Wilson; peak within radius + "
        f"{loc['margin_mm']:g} mm"
        + (f"; Grad-CAM cell {cell:.0f} mm, best reachable {ceiling:.2f}" if cell and ceiling
           is not None else "")
    )  # fmt: skip
    detection = loc["lesion_detection"]
    lines.append(
        f"  lesion detection   {_estimate(detection)}  Wilson; a slab through it among the "
        f"top {loc['top_k']} slices"
    )
    for band, entry in detection["by_diameter"].items():
        lines.append(f"    {band:<16} {_estimate(entry)}")
    missing = len(loc["lesions_not_placed"])
    if missing or loc["positives_without_lesions"]:
        lines.append(
            f"  not measured: {missing} lesions that could not be placed, "
            f"{len(loc['positives_without_lesions'])} positive patients without lesion truth "
            "(listed in metrics.json)"
        )
    return lines


def training_overlap(run: Path, evaluated: pd.Series) -> dict[str, int] | None:
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


def select_patients(cache: PatientCache, split: str | None) -> list[str]:
    """The cache's patients of ``split`` (all without one); a split no patient has is an error
    that names the splits there are (and the nearest, for a typo)."""
    ids = cache.patient_ids
    if split is None:
        return ids
    data = cache.root
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
    return ids


def _add_reviewer_measures(
    metrics: dict,
    trained,
    cache: PatientCache,
    predictions: pd.DataFrame,
    out: Path,
    *,
    truth: list | None,
    options: dict,
) -> None:
    """Subgroups, and with lesion truth the localisation measures, into ``metrics`` (and their
    tables and figure into ``out``)."""
    from brainmets.evaluate.localisation import localise, write_localisation_tables
    from brainmets.evaluate.plots import plot_localisation
    from brainmets.evaluate.subgroups import series_fields, subgroup_metrics

    ids = predictions["patient_id"].tolist()
    index = read_index(options["series_index"]) if options["series_index"] else None
    files = SeriesFiles(index.files if index is not None else None)  # shared: one walk a folder
    placed = None
    if truth is not None:
        placed = place_lesions(truth, cache, ids, files)
        result = localise(
            trained,
            cache,
            predictions,
            placed,
            top_k=options["top_k"],
            margin_mm=options["margin_mm"],
        )
        metrics["localisation"] = {"lesions_file": str(options["lesions"]), **result.summary}
        write_localisation_tables(result, out)
        # Misses first: a reader should see where the model looked when it was wrong.
        shown = sorted(result.views, key=lambda v: (v.hit and v.pointing, -v.probability))
        plot_localisation(shown[:MAX_LOCALISATION_FIGURES], out / LOCALISATION_PNG,
                          options["margin_mm"])  # fmt: skip
    fields = series_fields(cache, ids, index, files)
    metrics["subgroups"] = {
        "fields_from": "series index" if options["series_index"] else "source headers",
        "min_per_class": MIN_PER_CLASS,
        "groups": subgroup_metrics(
            predictions,
            fields,
            trained.plain_threshold,
            placed=placed,
            n_boot=options["n_boot"],
            seed=options["seed"],
        ),
    }


def _run_settings(run: Path) -> EvaluateConfig:
    """The ``evaluate.*`` keys of the run's config.yaml (defaults when it has none)."""
    config = run / rundir.CONFIG
    return load_config(config).evaluate if config.is_file() else EvaluateConfig()


def _validation_scores(run: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Labels and plain-sigmoid probabilities of the patients the run chose on: its validation
    patients, or an ensemble's out-of-fold ones; (None, None) when neither is there."""
    path = run / rundir.VAL_PREDICTIONS
    if not path.is_file():
        path = run / rundir.OOF_PREDICTIONS
    if not path.is_file():
        return None, None
    val = pd.read_csv(path, dtype={"patient_id": str})
    # Its probability is on the reported scale; the sigmoid comes back from the logit (older
    # runs without one stored the sigmoid itself).
    plain = expit(val["logit"].to_numpy()) if "logit" in val else val["probability"].to_numpy()
    return val["label"].to_numpy(), plain


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
    lesions: str | Path | None = None,
    top_k: int = DEFAULT_TOP_K,
    margin_mm: float = DEFAULT_MARGIN_MM,
    series_index: str | Path | None = None,
) -> EvaluationSummary:
    """Score ``data`` (or its ``split``) with the run and write metrics.json, predictions.csv
    and plots to ``out_dir`` (default RUN/evaluation, then report.html is refreshed);
    ``settings``: the ``evaluate.*`` keys to use (default: the run's config.yaml).

    With ``lesions`` (a lesion CSV, brainmets.data.lesions) the localisation measures are
    added (brainmets.evaluate.localisation: top-slice hit rate, pointing game with
    ``margin_mm``, lesion detection among the ``top_k`` slices). Subgroup measures are always
    added; their series fields come from ``series_index`` (a ``brainmets index`` folder) when
    given, else from the source headers.
    """
    from brainmets.evaluate.plots import write_evaluation_plots
    from brainmets.evaluate.report import write_report

    run = Path(run)
    truth = read_lesion_truth(lesions) if lesions is not None else None
    out = Path(out_dir) if out_dir else run / rundir.EVALUATION
    settings = settings or _run_settings(run)
    n_boot = n_boot if n_boot is not None else settings.n_boot
    targets = settings.sensitivity_targets

    # Grad-CAM (the pointing game) comes from PyTorch weights, whatever scores the slices.
    trained = load_backend(run, backend, grad_cam=truth is not None)
    cache = PatientCache(data)
    ids = select_patients(cache, split)
    out.mkdir(parents=True, exist_ok=True)  # after every input checks out: a typo leaves none
    predictions = score_cache(trained, cache, ids, progress=progress)

    overlap = training_overlap(run, predictions["patient_id"])
    val_labels, val_plain = _validation_scores(run)
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
    _add_reviewer_measures(
        metrics,
        trained,
        cache,
        predictions.assign(plain=plain),
        out,
        truth=truth,
        options={"lesions": lesions, "top_k": top_k, "margin_mm": margin_mm,
                 "series_index": series_index, "n_boot": n_boot, "seed": seed},
    )  # fmt: skip
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
