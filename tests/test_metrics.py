"""Patient-level metrics: hand-computed cases, sklearn agreement, edge cases, bootstrap CIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    roc_auc_score,
)

from brainmets.metrics import (
    METRIC_NAMES,
    THRESHOLDS,
    best_f1_threshold,
    bootstrap_ci,
    confidence_intervals,
    evaluate_predictions,
    patient_metrics,
    separation_band,
    threshold_for_sensitivity,
)


def scored_cohort(n: int, seed: int, shift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A cohort like a trained model's output: positives score higher, scores rounded to
    two decimals so that ties occur (as they do with bf16 logits)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    probs = np.clip(rng.beta(2, 5, n) + shift * labels, 0.0, 1.0)
    return labels, np.round(probs, 2)


# --- point metrics --------------------------------------------------------------------------

# y = [1, 1, 0, 0, 1, 0], p = [0.9, 0.4, 0.6, 0.2, 0.8, 0.1], threshold 0.5:
# calls 1 0 1 0 1 0 -> tp 2, fn 1, fp 1, tn 2. AUC: 0.9 and 0.8 beat all three negatives,
# 0.4 beats two -> 8/9. AP: ranking P P N P -> (1 + 1 + 3/4) / 3. Brier: 0.82 / 6.
HAND = {
    "auc": 8 / 9,
    "average_precision": 2.75 / 3,
    "f1": 2 / 3,
    "sensitivity": 2 / 3,
    "specificity": 2 / 3,
    "ppv": 2 / 3,
    "npv": 2 / 3,
    "accuracy": 4 / 6,
    "brier": 0.82 / 6,
    "mean_pos": 0.7,
    "mean_neg": 0.3,
    "separation": 0.4,
    "n": 6,
    "n_pos": 3,
    "n_neg": 3,
}
# Ties: y = [1, 0, 1, 0], p = [0.5, 0.5, 0.7, 0.2], threshold 0.6: the tied pair counts 1/2 in
# AUC -> (1.5 + 2) / 4; AP cut-offs at 0.7 (precision 1) and 0.5 (precision 2/3) -> 5/6.
TIED = {
    "auc": 0.875,
    "average_precision": 5 / 6,
    "f1": 2 / 3,
    "sensitivity": 0.5,
    "specificity": 1.0,
    "ppv": 1.0,
    "npv": 2 / 3,
    "accuracy": 0.75,
    "mean_pos": 0.6,
    "mean_neg": 0.35,
}


@pytest.mark.parametrize(
    ("labels", "probs", "threshold", "expected"),
    [
        ([1, 1, 0, 0, 1, 0], [0.9, 0.4, 0.6, 0.2, 0.8, 0.1], 0.5, HAND),
        ([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2], 0.6, TIED),
        # Perfect ranking, threshold between the classes.
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5, {"auc": 1.0, "f1": 1.0, "accuracy": 1.0}),
        # Inverted classifier: AUC 0, every call wrong.
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.5, {"auc": 0.0, "f1": 0.0, "accuracy": 0.0}),
        # A score equal to the threshold is a positive call.
        ([1, 0], [0.5, 0.49], 0.5, {"sensitivity": 1.0, "specificity": 1.0}),
    ],
    ids=["hand", "ties", "perfect", "inverted", "threshold-inclusive"],
)
def test_patient_metrics_hand_computed(labels, probs, threshold, expected):
    metrics = patient_metrics(np.array(labels), np.array(probs), threshold)
    assert list(metrics) == list(METRIC_NAMES)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("seed", range(5))
def test_patient_metrics_match_sklearn(seed):
    labels, probs = scored_cohort(300, seed)
    metrics = patient_metrics(labels, probs, 0.45)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert metrics["average_precision"] == pytest.approx(
        average_precision_score(labels, probs), abs=1e-12
    )
    assert metrics["brier"] == pytest.approx(brier_score_loss(labels, probs), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(labels, probs >= 0.45), abs=1e-12)
    assert metrics["separation"] == pytest.approx(
        probs[labels == 1].mean() - probs[labels == 0].mean()
    )


def test_random_classifier_has_auc_near_half():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 4000)
    metrics = patient_metrics(labels, rng.random(4000), 0.5)
    assert metrics["auc"] == pytest.approx(0.5, abs=0.03)
    assert abs(metrics["separation"]) < 0.03
    assert separation_band(metrics["separation"]) == "poor"


@pytest.mark.parametrize(
    ("labels", "probs", "undefined", "defined"),
    [
        # Only negatives: everything that needs a positive is nan.
        (
            [0, 0, 0],
            [0.1, 0.7, 0.3],
            ["auc", "average_precision", "sensitivity", "mean_pos", "separation"],
            {"specificity": 2 / 3, "ppv": 0.0, "npv": 1.0, "f1": 0.0, "mean_neg": 1.1 / 3},
        ),
        # Only positives.
        (
            [1, 1],
            [0.9, 0.2],
            ["auc", "average_precision", "specificity", "mean_neg", "separation"],
            {"sensitivity": 0.5, "ppv": 1.0, "npv": 0.0},
        ),
        # Two classes, but no positive call at this threshold: PPV undefined, F1 is 0.
        ([1, 0], [0.3, 0.1], ["ppv"], {"f1": 0.0, "npv": 0.5, "auc": 1.0}),
        # Only negatives and no positive call: F1 is 0/0.
        ([0, 0], [0.3, 0.1], ["f1", "ppv", "sensitivity"], {"npv": 1.0, "specificity": 1.0}),
    ],
    ids=["only-negatives", "only-positives", "no-positive-calls", "f1-undefined"],
)
def test_undefined_metrics_are_nan(labels, probs, undefined, defined):
    metrics = patient_metrics(np.array(labels), np.array(probs), 0.5)
    for name in undefined:
        assert math.isnan(metrics[name]), name
    for name, value in defined.items():
        assert metrics[name] == pytest.approx(value), name


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 2], [0.1, 0.2], "labels must be 0 or 1"),
        ([0, 1, 1], [0.1, 0.2], "differ in length"),
        ([0, 1], [0.1, 1.2], r"\[0, 1\]"),
        ([0, 1], [0.1, float("nan")], "non-finite"),
        ([], [], "no patients"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_invalid_inputs_raise_clear_errors(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        patient_metrics(np.array(labels), np.array(probs), 0.5)


# --- threshold sweep ------------------------------------------------------------------------


def test_threshold_grid_is_the_specification_sweep():
    assert THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95
    assert len(THRESHOLDS) == 91
    assert np.allclose(np.diff(THRESHOLDS), 0.01)


@pytest.mark.parametrize(
    ("labels", "probs", "thresholds", "expected"),
    [
        # F1 = 1 for every threshold in (0.1, 0.9]: the tie goes to 0.5.
        ([1, 0], [0.9, 0.1], THRESHOLDS, (0.5, 1.0)),
        # Plateau entirely above 0.5: the threshold nearest 0.5 on it is 0.61.
        ([1, 1, 0, 0], [0.9, 0.8, 0.6, 0.2], THRESHOLDS, (0.61, 1.0)),
        # Plateau entirely below 0.5: 0.3 < t <= 0.35 -> nearest 0.5 is 0.35.
        ([1, 1, 0, 0], [0.4, 0.35, 0.3, 0.1], THRESHOLDS, (0.35, 1.0)),
        # 0.45 and 0.55 equally near 0.5: the lower (more sensitive) one wins.
        ([1, 0], [0.9, 0.1], [0.3, 0.45, 0.55, 0.8], (0.45, 1.0)),
        # A unique optimum far from 0.5 is kept: F1 = 1 only for 0.10 < t <= 0.11.
        ([1, 0], [0.11, 0.10], THRESHOLDS, (0.11, 1.0)),
        # Single class: 0.5, F1 computed there.
        ([0, 0, 0], [0.9, 0.2, 0.1], THRESHOLDS, (0.5, 0.0)),
        ([1, 1], [0.9, 0.2], THRESHOLDS, (0.5, 2 / 3)),
    ],
    ids=["tie-to-half", "plateau-above", "plateau-below", "equidistant", "unique", "neg", "pos"],
)
def test_best_f1_threshold(labels, probs, thresholds, expected):
    threshold, f1 = best_f1_threshold(np.array(labels), np.array(probs), thresholds)
    assert threshold == pytest.approx(expected[0])
    assert f1 == pytest.approx(expected[1])


def test_best_f1_threshold_is_the_sweep_maximum():
    labels, probs = scored_cohort(500, seed=3)
    threshold, f1 = best_f1_threshold(labels, probs)
    sweep = [f1_score(labels, probs >= t) for t in THRESHOLDS]
    assert f1 == pytest.approx(max(sweep))
    assert threshold in THRESHOLDS
    assert f1_score(labels, probs >= threshold) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(1.0, 0.3), (0.75, 0.7), (0.74, 0.7), (0.5, 0.8), (0.25, 0.9), (0.9, 0.3)],
)
def test_threshold_for_sensitivity_hand_computed(target, expected):
    labels = np.array([1, 1, 1, 1, 0])
    probs = np.array([0.9, 0.8, 0.7, 0.3, 0.5])
    assert threshold_for_sensitivity(labels, probs, target) == expected


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_for_sensitivity_is_the_highest_that_meets_target(target):
    labels, probs = scored_cohort(400, seed=11)
    threshold = threshold_for_sensitivity(labels, probs, target)
    assert patient_metrics(labels, probs, threshold)["sensitivity"] >= target
    higher = np.nextafter(threshold, 1.0)
    assert patient_metrics(labels, probs, higher)["sensitivity"] < target


def test_threshold_for_sensitivity_edge_cases():
    assert math.isnan(threshold_for_sensitivity(np.array([0, 0]), np.array([0.2, 0.4]), 0.9))
    # 0.9 * 10 is 9.000000000000002 in floating point: nine positives must suffice.
    labels = np.ones(10, dtype=int)
    probs = np.linspace(0.1, 1.0, 10)
    assert threshold_for_sensitivity(labels, probs, 0.9) == pytest.approx(0.2)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="target sensitivity"):
            threshold_for_sensitivity(labels, probs, bad)


@pytest.mark.parametrize(
    ("sep", "band"),
    [
        (-0.2, "poor"),
        (0.0, "poor"),
        (0.0999, "poor"),
        (0.10, "moderate"),
        (0.1999, "moderate"),
        (0.20, "good"),
        (0.30, "good"),
        (0.7 - 0.4, "good"),  # 0.29999999999999993 in binary floating point
        (0.3001, "excellent"),
        (0.9, "excellent"),
        (float("nan"), "undefined"),
    ],
)
def test_separation_band(sep, band):
    assert separation_band(sep) == band


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_estimate():
    labels, probs = scored_cohort(300, seed=5)
    point = patient_metrics(labels, probs, 0.45)
    ci = bootstrap_ci(labels, probs, 0.45, n_boot=500, seed=0)
    assert set(ci) == set(METRIC_NAMES)
    for name, (lo, hi) in ci.items():
        if name == "n":  # constant under resampling
            assert lo == hi == 300
            continue
        assert lo < point[name] < hi, name


def test_bootstrap_ci_narrows_with_more_patients():
    def width(n: int) -> float:
        labels, probs = scored_cohort(n, seed=2)
        lo, hi = bootstrap_ci(labels, probs, 0.45, n_boot=400, seed=0)["auc"]
        return hi - lo

    small, large = width(100), width(1600)
    # Width shrinks like 1/sqrt(n): 16x the patients, about a quarter of the width.
    assert large < 0.5 * small


def test_bootstrap_ci_is_seeded():
    labels, probs = scored_cohort(200, seed=4)
    first = bootstrap_ci(labels, probs, 0.5, n_boot=300, seed=42)
    assert bootstrap_ci(labels, probs, 0.5, n_boot=300, seed=42) == first
    assert bootstrap_ci(labels, probs, 0.5, n_boot=300, seed=43) != first


def test_bootstrap_ci_skips_one_class_resamples():
    # One positive in twelve patients: about a third of resamples have no positive.
    labels = np.array([1] + [0] * 11)
    probs = np.linspace(0.95, 0.05, 12)
    ci = bootstrap_ci(labels, probs, 0.5, n_boot=300, seed=0)
    assert ci["auc"] == (1.0, 1.0)  # the positive, when drawn, always outranks everyone
    assert ci["sensitivity"] == (1.0, 1.0)
    assert ci["n_pos"][0] == 0.0
    lo, hi = ci["specificity"]
    assert 0.0 <= lo <= hi <= 1.0


def test_bootstrap_ci_all_undefined_gives_nan_pair():
    lo, hi = bootstrap_ci(np.zeros(5, dtype=int), np.full(5, 0.3), 0.5, n_boot=50)["auc"]
    assert math.isnan(lo) and math.isnan(hi)


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval written out (Wilson 1927; Newcombe 1998, method 3)."""
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


def test_proportions_get_wilson_intervals_that_do_not_collapse():
    """Every positive found: the bootstrap says sensitivity 1.000-1.000, which claims a
    certainty twenty patients cannot give; the reported interval is Wilson's 0.839-1.000."""
    labels = np.r_[np.ones(20), np.zeros(30)].astype(int)
    probs = np.r_[np.full(20, 0.9), np.linspace(0.05, 0.7, 30)]
    assert bootstrap_ci(labels, probs, 0.5, n_boot=200)["sensitivity"] == (1.0, 1.0)

    ci = confidence_intervals(labels, probs, 0.5, n_boot=200)
    point = patient_metrics(labels, probs, 0.5)
    tn = int(np.sum(probs[20:] < 0.5))
    expected = {
        "sensitivity": _wilson(20, 20),
        "specificity": _wilson(tn, 30),
        "ppv": _wilson(20, 20 + 30 - tn),
        "npv": _wilson(tn, tn),
        "accuracy": _wilson(20 + tn, 50),
    }
    for name, (lo, hi) in expected.items():
        assert ci[name] == pytest.approx((lo, min(hi, 1.0)), abs=1e-6), name
        assert ci[name][0] <= point[name] <= ci[name][1], name
    assert ci["sensitivity"][0] == pytest.approx(0.8389, abs=1e-4)
    # The threshold-free metrics keep their bootstrap intervals, from the same resamples.
    assert ci["auc"] == bootstrap_ci(labels, probs, 0.5, n_boot=200)["auc"]


def test_proportion_without_trials_and_bootstrap_switched_off_are_nan():
    labels, probs = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    ci = confidence_intervals(labels, probs, 0.9, n_boot=0)  # nobody called positive
    assert all(math.isnan(v) for v in ci["ppv"])
    assert all(math.isnan(v) for v in ci["auc"])  # n_boot=0: no bootstrap
    assert ci["npv"] == pytest.approx(_wilson(2, 4), abs=1e-6)
    assert not {"n", "n_pos", "n_neg"} & set(ci)  # observed counts, not estimates
    switched_off = evaluate_predictions(labels, probs, 0.9, n_boot=0)
    assert switched_off["ci_methods"]["bootstrap"] == []
    assert switched_off["ci"]["auc"] == [None, None]


# --- evaluate_predictions -------------------------------------------------------------------


def test_evaluate_predictions_is_json_ready_and_complete():
    labels, probs = scored_cohort(300, seed=8)
    val_labels, val_probs = scored_cohort(200, seed=9)
    result = evaluate_predictions(
        labels,
        probs,
        0.45,
        n_boot=200,
        seed=1,
        sensitivity_targets=(0.9, 0.95),
        val_labels=val_labels,
        val_probs=val_probs,
    )
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN tokens
    assert result["threshold"] == 0.45
    assert result["ci_level"] == pytest.approx(0.95)
    assert "sensitivity" in result["ci_methods"]["wilson"]
    assert "auc" in result["ci_methods"]["bootstrap"]
    assert result["ci"]["sensitivity"] == pytest.approx(
        list(confidence_intervals(labels, probs, 0.45, n_boot=200, seed=1)["sensitivity"])
    )
    assert result["metrics"]["n"] == 300
    assert result["separation_band"] == separation_band(result["metrics"]["separation"])
    assert [op["target_sensitivity"] for op in result["operating_points"]] == [0.9, 0.95]
    for op in result["operating_points"]:
        assert op["chosen_on"] == "validation"
        expected = threshold_for_sensitivity(val_labels, val_probs, op["target_sensitivity"])
        assert op["threshold"] == expected
        assert op["selection_sensitivity"] >= op["target_sensitivity"]
        assert op["metrics"] == pytest.approx(patient_metrics(labels, probs, expected), nan_ok=True)
    # A stricter sensitivity target cannot raise the threshold.
    assert result["operating_points"][1]["threshold"] <= result["operating_points"][0]["threshold"]


def test_evaluate_predictions_without_validation_and_with_undefined_values():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    result = evaluate_predictions(labels, probs, 0.5, n_boot=50, sensitivity_targets=(0.9,))
    json.dumps(result, allow_nan=False)
    assert result["metrics"]["ppv"] is None  # no positive call at 0.5
    (op,) = result["operating_points"]
    assert op["chosen_on"] == "evaluated"
    assert op["threshold"] == 0.4 and op["metrics"]["sensitivity"] == 1.0

    one_class = evaluate_predictions(
        labels,
        probs,
        0.5,
        n_boot=50,
        sensitivity_targets=(0.9,),
        val_labels=np.zeros(3, dtype=int),
        val_probs=np.array([0.1, 0.5, 0.9]),
    )
    assert one_class["operating_points"][0]["threshold"] is None


def test_evaluate_predictions_needs_both_validation_arrays():
    with pytest.raises(ValueError, match="together"):
        evaluate_predictions([0, 1], [0.2, 0.8], 0.5, n_boot=10, val_labels=[0, 1])


@pytest.mark.parametrize(
    ("value", "shown"), [(-0.0004, "0.000"), (-0.0006, "-0.001"), (0.9996, "1.000"), (0.5, "0.500")]
)
def test_summary_numbers_never_show_a_negative_zero(value, shown):
    """A separation CI of "-0.000 to 0.001" reads as a sign that is not there."""
    from brainmets.evaluate.evaluation import _three_places

    assert _three_places(value) == shown


def test_every_probability_is_on_the_reported_scale_under_a_calibration():
    """One scale for the user: under a calibration the class means, the separation, its band
    and the Brier score are those of the reported probabilities (no second, plain-sigmoid
    figure under the same name), while AUC and the calls are those of the plain sigmoid."""
    from scipy.special import expit, logit

    rng = np.random.default_rng(4)
    labels = np.repeat([1, 0], 40)
    plain = expit(-3.0 + 0.4 * labels + rng.normal(0.0, 0.15, labels.size))  # all near 0.05
    steep = lambda p: expit(12.0 * logit(p) + 34.0)  # noqa: E731
    result = evaluate_predictions(labels, plain, 0.06, n_boot=0, reported=steep)
    metrics = result["metrics"]

    calibrated = steep(plain)
    expected = calibrated[labels == 1].mean() - calibrated[labels == 0].mean()
    assert metrics["mean_pos"] == pytest.approx(calibrated[labels == 1].mean())
    assert metrics["mean_neg"] == pytest.approx(calibrated[labels == 0].mean())
    assert metrics["separation"] == pytest.approx(expected)
    assert result["separation_band"] == separation_band(expected)
    assert not any(key.startswith("calibrated_") for key in metrics)
    assert metrics["auc"] == pytest.approx(patient_metrics(labels, plain, 0.06)["auc"])
    assert metrics["brier"] == pytest.approx(np.mean((calibrated - labels) ** 2))
