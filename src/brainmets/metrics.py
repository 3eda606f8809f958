"""Patient-level metrics: threshold sweep, operating points, point metrics and their CIs.

Conventions used throughout:

- a patient is called positive when ``probability >= threshold``;
- ``labels`` are 0/1 (one per patient), ``probs`` are probabilities in [0, 1];
- a value that is undefined for the data at hand (AUC with one class, PPV with no positive
  calls, ...) is ``float('nan')``, never an exception, so that a small or skewed validation
  fold cannot stop a training run.

All metrics come from one vectorised kernel (:func:`_weighted_metrics`) that scores many
bootstrap resamples at once. A resample with replacement is a vector of integer patient
weights (how often each patient was drawn), so the patients are sorted by score only once
and every resample reduces to weighted sums; 1,000 resamples of 2,000 patients take well
under a second. The point estimate is the same kernel with all weights equal to one, so
points and intervals can never disagree in definition.

The proportions at a threshold (sensitivity, specificity, PPV, NPV, accuracy) get Wilson
score intervals instead (:func:`confidence_intervals`): at 100 % sensitivity every bootstrap
resample also finds every positive, so the percentile interval collapses to 1.000-1.000,
while the Wilson interval of 20/20 is 0.839-1.000 (what a clinical reader needs to know).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "METRIC_NAMES",
    "THRESHOLDS",
    "best_f1_threshold",
    "bootstrap_ci",
    "check_patient_arrays",
    "confidence_intervals",
    "delong_covariance",
    "delong_test",
    "evaluate_predictions",
    "mcnemar_test",
    "patient_metrics",
    "separation_band",
    "threshold_for_sensitivity",
    "threshold_sweep",
    "wilson_interval",
]

#: The specification's threshold sweep: 0.05, 0.06, ..., 0.95.
THRESHOLDS: np.ndarray = np.round(np.arange(0.05, 0.951, 0.01), 2)

#: Keys of :func:`patient_metrics`, in reporting order.
METRIC_NAMES: tuple[str, ...] = (
    "auc",
    "average_precision",
    "f1",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "brier",
    "mean_pos",
    "mean_neg",
    "separation",
    "n",
    "n_pos",
    "n_neg",
)

COUNT_NAMES = ("n", "n_pos", "n_neg")
#: Binomial proportions at the threshold: Wilson score CIs (success and trial counts below).
PROPORTION_NAMES = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
#: Metrics whose value is a probability: they depend on the scale that is reported (a run's
#: calibration), where every other metric depends only on the ranking and the calls.
PROBABILITY_NAMES = ("brier", "mean_pos", "mean_neg", "separation")
# Resamples scored per block: bounds memory to ~block * n_patients * 8 bytes per array.
_BOOTSTRAP_BLOCK = 250


def check_patient_arrays(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (bool labels, float64 probabilities), both 1-D and non-empty."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels and probs must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probs ({p.size}) differ in length")
    if y.size == 0:
        raise ValueError("no patients: labels and probs are empty")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    if not np.isfinite(p).all():
        raise ValueError(f"probs contain {int((~np.isfinite(p)).sum())} non-finite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1], found [{p.min():.4g}, {p.max():.4g}]")
    return y.astype(bool), p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with nan where den == 0 (the metric is undefined there)."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _confusion(
    yf: np.ndarray, called: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fn, fp, tn) for each row of patient weights ``w`` ([B, n]); ``yf`` is 0./1."""
    # Matrix-vector products: one pass per cell for all resamples.
    return (
        w @ (yf * called),
        w @ (yf * ~called),
        w @ ((1.0 - yf) * called),
        w @ ((1.0 - yf) * ~called),
    )


def _weighted_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """All metrics of :func:`patient_metrics` for each row of ``weights`` ([B, n] counts)."""
    w = np.asarray(weights, dtype=np.float64)
    yf = y.astype(np.float64)
    called = p >= threshold
    tp, fn, fp, tn = _confusion(yf, called, w)
    n_pos, n_neg = tp + fn, fp + tn
    n = n_pos + n_neg
    both = (n_pos > 0) & (n_neg > 0)

    # Threshold-free ranking metrics. Patients sorted by descending score once; equal scores
    # form one group, since no threshold can separate them (sklearn's tie convention).
    order = np.argsort(-p, kind="stable")
    p_sorted = p[order]
    starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])
    w_sorted = w[:, order]
    pos_g = np.add.reduceat(w_sorted * yf[order], starts, axis=1)
    neg_g = np.add.reduceat(w_sorted * (1.0 - yf[order]), starts, axis=1)
    neg_cum = np.cumsum(neg_g, axis=1)
    # AUC = P(score+ > score-) + 0.5 P(tie): positives of a group beat every lower-scoring
    # negative and tie with the negatives of their own group.
    neg_below = neg_cum[:, -1:] - neg_cum
    auc = _ratio((pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1), n_pos * n_neg)
    # Average precision = sum over score cut-offs of (recall step) x (precision there).
    pos_cum = np.cumsum(pos_g, axis=1)
    precision = _ratio(pos_cum, pos_cum + neg_cum)
    ap = _ratio(np.nansum(pos_g * precision, axis=1), n_pos)

    sq_err = (p - yf) ** 2
    mean_pos = _ratio(w @ (yf * p), n_pos)
    mean_neg = _ratio(w @ ((1.0 - yf) * p), n_neg)
    return {
        "auc": np.where(both, auc, np.nan),
        "average_precision": np.where(both, ap, np.nan),
        "f1": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "sensitivity": _ratio(tp, n_pos),
        "specificity": _ratio(tn, n_neg),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, n),
        "brier": _ratio(w @ sq_err, n),
        "mean_pos": mean_pos,
        "mean_neg": mean_neg,
        "separation": mean_pos - mean_neg,
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def patient_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, float]:
    """Point metrics of patient-level predictions at ``threshold``.

    Keys: auc, average_precision (both need both classes), f1, sensitivity, specificity,
    ppv, npv, accuracy, brier, mean_pos, mean_neg, separation (mean_pos - mean_neg), and the
    counts n, n_pos, n_neg (ints). Undefined values are ``nan``. AUC, average precision and
    Brier score equal scikit-learn's ``roc_auc_score``, ``average_precision_score`` and
    ``brier_score_loss``.
    """
    y, p = check_patient_arrays(labels, probs)
    rows = _weighted_metrics(y, p, float(threshold), np.ones((1, y.size)))
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        value = float(rows[name][0])
        out[name] = int(value) if name in COUNT_NAMES else value
    return out


def threshold_sweep(
    labels: ArrayLike, probs: ArrayLike, thresholds: Sequence[float] | np.ndarray = THRESHOLDS
) -> dict[str, np.ndarray]:
    """Every metric of :func:`patient_metrics` at each threshold: name -> array [T]."""
    y, p = check_patient_arrays(labels, probs)
    rows = [_weighted_metrics(y, p, float(t), np.ones((1, y.size))) for t in thresholds]
    return {name: np.array([row[name][0] for row in rows]) for name in METRIC_NAMES}


def best_f1_threshold(
    labels: ArrayLike, probs: ArrayLike, thresholds: Sequence[float] | np.ndarray = THRESHOLDS
) -> tuple[float, float]:
    """The threshold of the sweep with the best F1, and that F1.

    Ties (common on small validation folds, where F1 is flat between two patients' scores)
    go to the threshold closest to 0.5, the calibrated decision point; an exact tie in
    distance goes to the lower threshold, which favours sensitivity (the costlier error in
    metastasis screening is a miss). A validation set with one class has no meaningful
    F1 optimum: the threshold is then 0.5 and its F1 is computed as usual (0.0 or nan).
    """
    y, p = check_patient_arrays(labels, probs)
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("thresholds must be a non-empty 1-D sequence")
    if y.all() or not y.any():
        return 0.5, patient_metrics(y, p, 0.5)["f1"]
    called = p[None, :] >= grid[:, None]
    tp = (called & y).sum(axis=1)
    fp = (called & ~y).sum(axis=1)
    fn = y.sum() - tp
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)  # denominator > 0: there is at least one positive
    ties = np.flatnonzero(np.isclose(f1, f1.max(), rtol=1e-12, atol=0.0))
    # Rounded so that 0.45 and 0.55 count as equally far from 0.5 despite binary floats.
    distance = np.round(np.abs(grid[ties] - 0.5), 9)
    nearest = ties[distance == distance.min()]
    best = nearest[np.argmin(grid[nearest])]
    return float(grid[best]), float(f1[best])


def threshold_for_sensitivity(labels: ArrayLike, probs: ArrayLike, target: float) -> float:
    """The highest threshold whose sensitivity on these patients is at least ``target``.

    Screening users pick an operating point by sensitivity rather than by F1. With
    ``k = ceil(target * n_pos)`` positives that must be called, the answer is the k-th
    highest positive score: any higher threshold misses one of them. Not restricted to the
    sweep grid, so a target is met as tightly as the data allow. ``nan`` when there is no
    positive patient.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = check_patient_arrays(labels, probs)
    positives = np.sort(p[y])[::-1]
    if positives.size == 0:
        return float("nan")
    # The epsilon keeps 0.9 * 10 = 9.000000000000002 from demanding a tenth positive.
    k = max(1, math.ceil(target * positives.size - 1e-9))
    return float(positives[k - 1])


def separation_band(sep: float) -> str:
    """The specification's band for a separation (mean p+ - mean p-).

    poor: sep < 0.10; moderate: 0.10 <= sep < 0.20; good: 0.20 <= sep <= 0.30;
    excellent: sep > 0.30. Lower bounds are inclusive except for "excellent", which the
    specification states as strictly above 0.30. ``nan`` gives "undefined". The value is
    rounded to 10 decimals first, so 0.7 - 0.4 counts as 0.30.
    """
    if sep is None or math.isnan(sep):
        return "undefined"
    sep = round(float(sep), 10)
    if sep < 0.10:
        return "poor"
    if sep < 0.20:
        return "moderate"
    if sep <= 0.30:
        return "good"
    return "excellent"


def _resample_weights(rng: np.random.Generator, n_resamples: int, n: int) -> np.ndarray:
    """[n_resamples, n] draw counts of n patients drawn with replacement, n times each."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def bootstrap_ci(
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every metric of :func:`patient_metrics`.

    Patients are resampled with replacement (the patient is the unit of analysis, so slices
    of one patient never split). A resample in which a metric is undefined (one class, no
    positive calls) is left out of that metric's percentiles only; a metric undefined in
    every resample gets (nan, nan). Seeded: the same inputs and seed give the same intervals.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, p = check_patient_arrays(labels, probs)
    rng = np.random.default_rng(seed)
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, n_boot, _BOOTSTRAP_BLOCK):
        weights = _resample_weights(rng, min(_BOOTSTRAP_BLOCK, n_boot - start), y.size)
        for name, values in _weighted_metrics(y, p, float(threshold), weights).items():
            blocks[name].append(values)
    quantiles = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    out: dict[str, tuple[float, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan metric -> (nan, nan)
        for name in METRIC_NAMES:
            lo, hi = np.nanpercentile(np.concatenate(blocks[name]), quantiles)
            out[name] = (float(lo), float(hi))
    return out


def _proportion_counts(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, tuple]:
    """(successes, trials) of each name in PROPORTION_NAMES."""
    counts = _confusion(y.astype(np.float64), p >= threshold, np.ones((1, y.size)))
    tp, fn, fp, tn = (int(round(c[0])) for c in counts)
    return {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "accuracy": (tp + tn, y.size),
    }


def confidence_intervals(
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """The CIs ``evaluate`` reports: Wilson score intervals for the proportions
    (``PROPORTION_NAMES``), percentile bootstrap (:func:`bootstrap_ci`) for the rest, none for
    the patient counts (they are what was observed, not estimates).

    A proportion with no trials (no positive calls for PPV, ...) gets (nan, nan), as does
    every bootstrap metric when ``n_boot`` is 0 (bootstrap switched off).
    """
    from scipy.stats import binomtest

    y, p = check_patient_arrays(labels, probs)
    if n_boot > 0:
        out = bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
    else:
        out = {name: (math.nan, math.nan) for name in METRIC_NAMES}
    for name in COUNT_NAMES:
        del out[name]
    for name, (k, n) in _proportion_counts(y, p, float(threshold)).items():
        if n == 0:
            out[name] = (math.nan, math.nan)
            continue
        ci = binomtest(k, n).proportion_ci(confidence_level=1.0 - alpha, method="wilson")
        out[name] = (float(ci.low), float(ci.high))
    return out


def _json_float(value: float) -> float | None:
    """nan -> None, since JSON has no nan (json.dump would write the invalid token NaN)."""
    return None if value is None or math.isnan(value) else float(value)


def _json_metrics(metrics: dict[str, float]) -> dict[str, float | int | None]:
    return {k: v if k in COUNT_NAMES else _json_float(v) for k, v in metrics.items()}


def _json_ci(ci: dict[str, tuple[float, float]]) -> dict[str, list[float | None]]:
    return {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in ci.items()}


def _scored(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
    alpha: float,
    reported: Callable[[np.ndarray], np.ndarray] | None,
) -> dict[str, Any]:
    """Metrics and CIs at ``threshold``; with ``reported``, the probability-valued metrics and
    the threshold on the reported scale (the rest does not depend on an increasing map, and is
    computed where saturation cannot tie patients)."""
    metrics = patient_metrics(y, p, threshold)
    ci = confidence_intervals(y, p, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
    if reported is not None:
        q, threshold = reported(p), float(reported(np.array([threshold]))[0])
        on_scale = patient_metrics(y, q, threshold)
        # The same seed: the same resamples as the intervals above.
        ci_on_scale = confidence_intervals(y, q, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
        # One scale for the user: every probability-valued metric on the reported one.
        for name in PROBABILITY_NAMES:
            metrics[name], ci[name] = on_scale[name], ci_on_scale[name]
    return {
        "threshold": _json_float(threshold),
        "metrics": _json_metrics(metrics),
        "ci": _json_ci(ci),
        "separation_band": separation_band(metrics["separation"]),
    }


def evaluate_predictions(
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    sensitivity_targets: Sequence[float] = (),
    val_labels: ArrayLike | None = None,
    val_probs: ArrayLike | None = None,
    alpha: float = 0.05,
    reported: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Everything ``brainmets evaluate`` writes to metrics.json, as a JSON-ready dict.

    Layout::

        {"threshold", "metrics", "ci", "separation_band",      # at the run's threshold
         "ci_level", "ci_methods", "n_boot", "seed",
         "operating_points": [{"target_sensitivity", "chosen_on", "selection_sensitivity",
                               "threshold", "metrics", "ci", "separation_band"}, ...]}

    Undefined values are ``None`` (JSON null); CIs are ``[low, high]`` lists. Each operating
    point's threshold is chosen on the validation arrays when given (``chosen_on:
    "validation"``) and then applied to these arrays; without validation arrays it is chosen
    on these arrays themselves (``chosen_on: "evaluated"``), which is optimistic and says so.
    All bootstrap intervals share the seed, so they come from the same resamples;
    ``ci_methods`` says which metrics have Wilson and which bootstrap intervals.

    ``reported`` maps ``probs`` (and thresholds) increasingly onto the scale the tool reports
    (a run's calibration, :mod:`brainmets.model.probability`). Thresholds are chosen and
    patients ranked and called on ``probs``; the thresholds and the probability-valued metrics
    (Brier score, class means, separation and its band) are then given on the reported scale,
    the one every command shows. So a calibrated probability that rounds to 1.0 can tie
    neither the ranking nor a call.
    """
    y, p = check_patient_arrays(labels, probs)
    if (val_labels is None) != (val_probs is None):
        raise ValueError("val_labels and val_probs must be given together")
    if val_labels is not None:
        sel_y, sel_p = check_patient_arrays(val_labels, val_probs)
        chosen_on = "validation"
    else:
        sel_y, sel_p = y, p
        chosen_on = "evaluated"

    result = _scored(y, p, float(threshold), n_boot, seed, alpha, reported)
    result.update(
        {
            "ci_level": 1.0 - alpha,
            "ci_methods": {
                "wilson": list(PROPORTION_NAMES),
                "bootstrap": [m for m in METRIC_NAMES if m not in PROPORTION_NAMES + COUNT_NAMES]
                if n_boot > 0
                else [],
            },
            "n_boot": int(n_boot),
            "seed": int(seed),
        }
    )
    operating_points = []
    for target in sensitivity_targets:
        t = threshold_for_sensitivity(sel_y, sel_p, float(target))
        point: dict[str, Any] = {"target_sensitivity": float(target), "chosen_on": chosen_on}
        if math.isnan(t):  # no positive patient to choose on: report the gap, do not guess
            point.update({"selection_sensitivity": None, "threshold": None})
        else:
            point["selection_sensitivity"] = _json_float(
                patient_metrics(sel_y, sel_p, t)["sensitivity"]
            )
            point.update(_scored(y, p, t, n_boot, seed, alpha, reported))
        operating_points.append(point)
    result["operating_points"] = operating_points
    return result


# --------------------------------------------------------------------------- paired comparisons


def wilson_interval(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) without trials."""
    from scipy.stats import binomtest

    if trials == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(trials)).proportion_ci(1.0 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def delong_covariance(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several scores of the same patients and DeLong's covariance matrix of them.

    ``scores`` is [K, n] (K scorers of n patients). The fast algorithm of Sun & Xu (2014,
    IEEE Signal Processing Letters 21:1389): the structural components of DeLong et al. (1988)
    from midranks (average ranks of ties) within the positives, within the negatives and over
    both, O(K n log n) instead of the pairwise O(K n_pos n_neg). Needs two patients of each
    class (the components' covariance has n - 1 in its denominator).
    """
    from scipy.stats import rankdata

    y = np.asarray(labels).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.size:
        raise ValueError(f"scores have {s.shape[1]} patients, labels {y.size}")
    pos, neg = s[:, y], s[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs two patients of each class, got {m} positive, {n} negative")
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    tz = rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    # A positive's component: the share of negatives it outranks (ties half); a negative's:
    # the share of positives that outrank it.
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(
    labels: ArrayLike, probs_a: ArrayLike, probs_b: ArrayLike, alpha: float = 0.05
) -> dict[str, Any]:
    """DeLong's test of the difference of two correlated AUCs (B minus A, same patients).

    Returns both AUCs with their DeLong CIs, the difference with its normal-theory CI, z and
    the two-sided p-value. Identical rankings have no variance: difference 0, p 1.
    """
    from scipy.stats import norm

    aucs, cov = delong_covariance(labels, np.vstack([probs_a, probs_b]))
    difference = float(aucs[1] - aucs[0])
    variance = max(0.0, float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]))
    q = float(norm.ppf(1.0 - alpha / 2.0))
    se = math.sqrt(variance)
    if se > 0:
        z = difference / se
        p_value = float(2.0 * norm.sf(abs(z)))
    else:
        z, p_value = (0.0, 1.0) if difference == 0 else (math.copysign(math.inf, difference), 0.0)

    def auc_ci(i: int) -> list[float]:
        half = q * math.sqrt(max(0.0, float(cov[i, i])))
        return [max(0.0, float(aucs[i]) - half), min(1.0, float(aucs[i]) + half)]

    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "ci_a": auc_ci(0),
        "ci_b": auc_ci(1),
        "difference": difference,
        "ci_difference": [difference - q * se, difference + q * se],
        "se_difference": se,
        "z": z,
        "p_value": p_value,
        "correlation": float(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]))
        if cov[0, 0] > 0 and cov[1, 1] > 0
        else None,
    }


MCNEMAR_EXACT_BELOW = 25
"""Discordant pairs below which McNemar's test is the exact binomial one (the chi-square
approximation with continuity correction from there on)."""


def mcnemar_test(correct_a: ArrayLike, correct_b: ArrayLike) -> dict[str, Any]:
    """McNemar's test of paired decisions: do A and B get different patients right?

    ``a_only`` patients A gets right and B wrong, ``b_only`` the reverse; only these discordant
    pairs carry information. Fewer than MCNEMAR_EXACT_BELOW: the exact two-sided binomial test
    of a_only among the discordant at p = 1/2 (statsmodels' ``mcnemar(exact=True)``); more: the
    chi-square statistic (|a_only - b_only| - 1)^2 / (a_only + b_only), 1 degree of freedom.
    """
    from scipy.stats import binomtest, chi2

    a = np.asarray(correct_a).astype(bool)
    b = np.asarray(correct_b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"paired decisions differ in length: {a.size} and {b.size}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    result: dict[str, Any] = {"n": int(a.size), "a_only": a_only, "b_only": b_only,
                              "both": int((a & b).sum()), "neither": int((~a & ~b).sum())}  # fmt: skip
    if discordant == 0:
        return {**result, "method": "no discordant pairs", "statistic": None, "p_value": 1.0}
    if discordant < MCNEMAR_EXACT_BELOW:
        p_value = float(binomtest(a_only, discordant, 0.5).pvalue)
        return {**result, "method": "exact binomial", "statistic": None, "p_value": p_value}
    statistic = (abs(a_only - b_only) - 1.0) ** 2 / discordant
    return {**result, "method": "chi-square, continuity corrected", "statistic": statistic,
            "p_value": float(chi2.sf(statistic, 1))}  # fmt: skip
