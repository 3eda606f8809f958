"""Paired comparison: the fast DeLong against the pairwise structural components written out
here, McNemar's test against the binomial and chi-square by hand, and ``brainmets compare``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from brainmets.cli import main
from brainmets.metrics import delong_covariance, delong_test, mcnemar_test


def pairwise_delong(labels, scores):
    """DeLong et al. (1988) as written: psi(X, Y) = 1 if X > Y, 1/2 if equal, over every
    (positive, negative) pair; V10 and V01 are psi's means per positive and per negative."""
    y = np.asarray(labels).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    aucs, covariance = [], np.zeros((len(s), len(s)))
    v10, v01 = [], []
    for row in s:
        pos, neg = row[y], row[~y]
        psi = np.array([[1.0 if p > q else 0.5 if p == q else 0.0 for q in neg] for p in pos])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = int(y.sum()), int((~y).sum())
    for i in range(len(s)):
        for j in range(len(s)):
            s10 = np.sum((v10[i] - aucs[i]) * (v10[j] - aucs[j])) / (m - 1)
            s01 = np.sum((v01[i] - aucs[i]) * (v01[j] - aucs[j])) / (n - 1)
            covariance[i, j] = s10 / m + s01 / n
    return np.array(aucs), covariance


def _cases():
    rng = np.random.default_rng(7)
    y = rng.random(80) < 0.4
    continuous = np.vstack([rng.normal(size=80) + 1.2 * y, rng.normal(size=80) + 0.6 * y])
    tied = np.round(continuous, 0)  # many ties within and across the classes
    small_y = np.array([1, 1, 0, 0, 1, 0, 0])
    small = np.array([[0.9, 0.4, 0.4, 0.1, 0.7, 0.7, 0.3], [0.2, 0.8, 0.5, 0.5, 0.5, 0.1, 0.3]])
    perfect = np.vstack([y + rng.random(80) * 0.5, rng.random(80)])
    return {
        "continuous": (y, continuous),
        "ties": (y, tied),
        "small": (small_y, small),
        "one perfect": (y, perfect),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_fast_delong_equals_the_pairwise_formula(case):
    labels, scores = _cases()[case]
    aucs, covariance = delong_covariance(labels, scores)
    ref_aucs, ref_covariance = pairwise_delong(labels, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(covariance, ref_covariance, atol=1e-6, rtol=0)
    for row, auc in zip(scores, aucs, strict=True):
        assert auc == pytest.approx(roc_auc_score(labels, row), abs=1e-12)


@pytest.mark.parametrize("case", list(_cases()))
def test_delong_test_of_the_difference_follows_the_reference_variance(case):
    labels, scores = _cases()[case]
    result = delong_test(labels, scores[0], scores[1])
    aucs, cov = pairwise_delong(labels, scores)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    difference = aucs[1] - aucs[0]
    assert result["difference"] == pytest.approx(difference, abs=1e-6)
    assert result["se_difference"] == pytest.approx(se, abs=1e-6)
    assert result["z"] == pytest.approx(difference / se, abs=1e-6)
    assert result["p_value"] == pytest.approx(2 * norm.sf(abs(difference / se)), abs=1e-6)
    lo, hi = result["ci_difference"]
    assert (lo, hi) == pytest.approx(
        (difference - 1.959964 * se, difference + 1.959964 * se), abs=1e-5
    )


def test_the_same_ranking_twice_differs_by_nothing():
    labels, scores = _cases()["ties"]
    result = delong_test(labels, scores[0], scores[0] * 3 + 1)  # same order, other scale
    assert result["difference"] == 0 and result["p_value"] == 1.0


def test_delong_needs_two_patients_of_each_class():
    with pytest.raises(ValueError, match="two patients of each class"):
        delong_covariance([1, 0, 0], [[0.3, 0.2, 0.1]])


@pytest.mark.parametrize(
    ("a_only", "b_only", "method", "p_value"),
    [
        (1, 6, "exact binomial", 2 * (1 + 7) / 2**7),  # 2 P(X <= 1), X ~ Bin(7, 1/2)
        (0, 0, "no discordant pairs", 1.0),
        (3, 3, "exact binomial", 1.0),
        (10, 20, "chi-square, continuity corrected", math.erfc(math.sqrt(81 / 30 / 2))),
    ],
)
def test_mcnemar(a_only, b_only, method, p_value):
    both, neither = 7, 4
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    result = mcnemar_test(a, b)
    assert (result["a_only"], result["b_only"], result["both"], result["neither"]) == (
        a_only, b_only, both, neither
    )  # fmt: skip
    assert result["method"] == method
    assert result["p_value"] == pytest.approx(p_value, abs=1e-12)


def test_compare_two_runs_on_the_same_patients(known_lesions, tmp_path, capsys, one_thread):
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(known_lesions.run), str(known_lesions.other_run),
                 "--data", str(known_lesions.cache), "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "AUC B - A" in text and "DeLong" in text and "McNemar" in text
    result = json.loads((out / "compare.json").read_text())
    assert (result["n"], result["n_pos"]) == (10, 5)
    paired = np.genfromtxt(out / "compare_predictions.csv", delimiter=",", names=True, dtype=None,
                           encoding="utf-8")  # fmt: skip
    reference = delong_test(paired["label"], paired["logit_a"], paired["logit_b"])
    assert result["delong"]["difference"] == pytest.approx(reference["difference"])
    assert result["runs"]["a"]["sensitivity"] == 1.0  # run A calls everyone positive
    assert result["mcnemar"]["all patients"]["n"] == 10
    assert (out / "roc_compare.png").stat().st_size > 5_000


def test_a_run_compared_with_itself_differs_by_nothing(known_lesions, tmp_path):
    out = tmp_path / "same"
    assert main(["-q", "compare", str(known_lesions.run), str(known_lesions.run),
                 "--data", str(known_lesions.cache), "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "compare.json").read_text())
    assert result["delong"]["difference"] == 0 and result["delong"]["p_value"] == 1.0
    assert all(t["method"] == "no discordant pairs" for t in result["mcnemar"].values())


def test_compare_refuses_a_split_without_two_of_each_class(known_lesions, tmp_path, capsys):
    rc = main(["-q", "compare", str(known_lesions.run), str(known_lesions.other_run),
               "--data", str(known_lesions.cache), "--split", "test",
               "--out", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2
    assert "DeLong's test needs two of each class" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
