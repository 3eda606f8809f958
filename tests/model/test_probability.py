"""Platt scaling of the patient logit: the fit, its refusals and what it must not change."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from brainmets.metrics import patient_metrics
from brainmets.model.probability import Calibration, fit_platt, logits_of


def max_pooled_cohort(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient logits as max pooling makes them: the highest of 30 slice scores, so that
    negatives too sit well above 0; positives have one slice that scores higher."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(int)
    slices = rng.normal(0.0, 1.0, (n, 30))
    slices[:, 0] += 2.5 * labels
    return labels, slices.max(axis=1)


def test_platt_recovers_a_known_logistic_link():
    """Labels drawn from sigmoid(0.7 z - 2): the fit finds that link (up to the small pull of
    Platt's smoothed targets), on 20,000 patients."""
    rng = np.random.default_rng(0)
    logits = rng.normal(2.0, 2.0, 20_000)
    labels = (rng.random(logits.size) < expit(0.7 * logits - 2.0)).astype(int)
    fitted = fit_platt(labels, logits)
    assert fitted.method == "platt" and fitted.patients == 20_000
    assert fitted.slope == pytest.approx(0.7, abs=0.03)
    assert fitted.intercept == pytest.approx(-2.0, abs=0.08)


def test_calibrated_probabilities_match_the_observed_rate():
    """Max pooling pushes the plain sigmoid of negatives up; after the fit, the mean predicted
    probability equals the prevalence and a held-out cohort's Brier score improves."""
    labels, logits = max_pooled_cohort(600, seed=1)
    plain = expit(logits)
    assert plain[labels == 0].mean() > 0.6  # the bias the calibration is for
    fitted = fit_platt(labels, logits)
    assert fitted.probability(logits).mean() == pytest.approx(labels.mean(), abs=0.01)

    test_labels, test_logits = max_pooled_cohort(600, seed=2)
    brier_plain = patient_metrics(test_labels, expit(test_logits), 0.5)["brier"]
    brier_fitted = patient_metrics(test_labels, fitted.probability(test_logits), 0.5)["brier"]
    assert brier_fitted < 0.7 * brier_plain


def test_decisions_ranking_and_auc_do_not_change():
    labels, logits = max_pooled_cohort(300, seed=3)
    fitted = fit_platt(labels, logits)
    for plain_threshold in (0.3, 0.8, 0.94):
        plain = patient_metrics(labels, expit(logits), plain_threshold)
        calibrated = patient_metrics(
            labels, fitted.probability(logits), fitted.threshold(plain_threshold)
        )
        for name in ("sensitivity", "specificity", "ppv", "f1", "auc", "average_precision"):
            assert calibrated[name] == pytest.approx(plain[name]), (plain_threshold, name)
    assert np.array_equal(np.argsort(fitted.probability(logits)), np.argsort(expit(logits)))


def test_separated_validation_set_gives_a_finite_fit():
    labels = np.r_[np.ones(10), np.zeros(12)].astype(int)
    logits = np.r_[np.linspace(4, 6, 10), np.linspace(0, 2, 12)]
    fitted = fit_platt(labels, logits)
    assert fitted.method == "platt"
    assert np.isfinite([fitted.slope, fitted.intercept]).all() and fitted.slope < 50
    p = fitted.probability(logits)
    assert (p[:10] > 0.5).all() and (p[10:] < 0.5).all() and p.max() < 1.0


@pytest.mark.parametrize(
    ("labels", "logits", "reason"),
    [
        ([1, 1, 0, 0, 0, 0, 0, 0], [3, 2, 1, 0, 1, 0, 1, 0], "2 positive and 6 negative"),
        # A well-ranked handful: two parameters from 9 positives would describe those 9.
        ([1] * 9 + [0] * 30, [5] * 9 + [0] * 30, "at least 10 of each"),
        (
            # Positives score lower: an increasing map cannot describe that.
            [1] * 10 + [0] * 10,
            [0, 0.5, 1, 0.2, 0.4, 0.1, 0.3, 0.6, 0.7, 0.8, 3, 4, 5, 3.5, 4.5, 6, 3, 4, 5, 6],
            "do not rank",
        ),
    ],
)
def test_no_fit_where_it_would_mislead(labels, logits, reason):
    fitted = fit_platt(labels, logits)
    assert fitted.method == "none" and reason in fitted.note
    assert fitted.probability([0.0, 2.0]) == pytest.approx(expit([0.0, 2.0]))
    assert fitted.threshold(0.42) == pytest.approx(0.42)


def test_sidecar_round_trip_and_older_runs():
    fitted = Calibration("platt", 0.5, -1.25, patients=40)
    assert Calibration.from_sidecar({"calibration": fitted.to_json()}) == fitted
    older = Calibration.from_sidecar({"threshold": 0.4})  # model.json before calibration
    assert older.method == "none" and older.probability(1.0) == pytest.approx(expit(1.0))
    assert "Platt-calibrated on 40" in fitted.describe()


def test_logits_back_from_rounded_probabilities_stay_finite():
    z = logits_of([0.0, 0.5, 1.0])
    assert np.isfinite(z).all() and z[1] == 0.0 and z[0] < -20 and z[2] > 20


def test_no_fit_without_ranking_and_no_map_that_turns_around():
    tied = fit_platt([1] * 10 + [0] * 10, [2.0] * 20)
    assert tied.method == "none" and "AUC 0.500" in tied.note
    for bad in (dict(slope=-1.0), dict(slope=float("nan")), dict(intercept=float("inf"))):
        with pytest.raises(ValueError, match="finite slope"):
            Calibration("platt", **{"slope": 1.0, "intercept": 0.0, **bad})
    with pytest.raises(ValueError, match="method"):
        Calibration.from_sidecar({"calibration": {"method": "isotonic"}})


def test_evaluation_ranks_on_the_plain_sigmoid_when_calibrated_p_saturates():
    """A steep fit (validation logits bunched in 0-0.5) sends every test logit above 2 to
    p = 1.0 exactly. evaluate must still rank and call the patients as the plain sigmoid does,
    as predict decides: AUC and sensitivity are those of the plain scale, and the Brier score
    and threshold are given on the calibrated one."""
    from brainmets.metrics import evaluate_predictions

    val_labels = np.r_[np.ones(20), np.zeros(20)].astype(int)
    val_logits = np.r_[np.linspace(0.3, 0.5, 20), np.linspace(0.0, 0.2, 20)]
    steep = fit_platt(val_labels, val_logits)
    assert steep.slope > 15

    rng = np.random.default_rng(0)
    labels = (rng.random(60) < 0.5).astype(int)
    logits = 2.2 + 1.2 * rng.random(60) + 0.6 * labels
    assert np.all(steep.probability(logits) == 1.0)  # saturated: every patient ties
    plain = expit(logits)
    plain_threshold = 0.95
    result = evaluate_predictions(labels, plain, plain_threshold, n_boot=50,
                                  reported=steep.from_plain)  # fmt: skip
    expected = patient_metrics(labels, plain, plain_threshold)
    for name in ("auc", "sensitivity", "specificity", "f1"):
        assert result["metrics"][name] == pytest.approx(expected[name]), name
    assert result["metrics"]["auc"] > 0.6
    assert result["threshold"] == pytest.approx(steep.threshold(plain_threshold))
    on_scale = patient_metrics(labels, steep.probability(logits), result["threshold"])
    assert result["metrics"]["brier"] == pytest.approx(on_scale["brier"])


def test_the_rule_fits_only_a_model_that_ranks():
    """calibrate: no fit for a run whose ranking verdict fails, or when the config says none;
    the note says why, and describe() says the probability is not calibrated."""
    from brainmets.model.probability import calibrate

    labels, logits = max_pooled_cohort(300, seed=4)
    assert calibrate(labels, logits) == fit_platt(labels, logits)
    refused = calibrate(labels, logits, ranks=False, why_not="AUC 95% CI includes 0.5")
    assert refused.method == "none" and refused.patients == 300
    assert refused.describe() == (
        "the sigmoid of the patient logit, not calibrated (AUC 95% CI includes 0.5)"
    )
    off = calibrate(labels, logits, method="none")
    assert off.method == "none" and off.note == "train.calibration is none"
    assert (fit_platt(labels, logits).scale, refused.scale) == ("platt", "sigmoid")
