"""The end-of-run verdict: does the model rank its validation patients better than chance?"""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainmets.ranking import DOES_NOT_RANK, RANKS, UNDETERMINED, RankingVerdict, judge_ranking


def _cohort(n: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n patients, 40% positive; positives' probabilities shifted up by ``shift``."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 5 < 2).astype(int)
    probs = np.clip(rng.uniform(0.1, 0.5, n) + shift * labels, 0.0, 1.0)
    return labels, probs


@pytest.mark.parametrize(
    ("n", "shift", "verdict", "reason"),
    [
        (60, 0.40, RANKS, None),  # clearly separated classes
        (60, 0.00, DOES_NOT_RANK, "includes 0.5"),  # the same distribution: chance
        (10, 0.10, DOES_NOT_RANK, "includes 0.5"),  # too few patients to tell
        (400, 0.06, DOES_NOT_RANK, "poor band"),  # ranks, but the classes barely differ
    ],
)
def test_verdicts(n, shift, verdict, reason):
    labels, probs = _cohort(n, shift)
    result = judge_ranking(labels, probs)
    assert result.verdict == verdict
    assert result.ranks == (verdict == RANKS)
    if reason:
        assert any(reason in r for r in result.reasons)
    else:
        assert result.reasons == [] and result.auc_ci[0] > 0.5


def test_one_class_is_undetermined_and_says_why():
    result = judge_ranking(np.zeros(6, dtype=int), np.linspace(0.1, 0.6, 6))
    assert result.verdict == UNDETERMINED and not result.ranks
    assert "all negative" in result.warning()


def test_seeded_and_round_trips_through_model_json():
    labels, probs = _cohort(30, 0.2)
    first = judge_ranking(labels, probs, seed=3)
    assert first == judge_ranking(labels, probs, seed=3)
    stored = json.loads(json.dumps({"ranking": first.to_json()}))
    assert RankingVerdict.from_sidecar(stored) == first
    assert RankingVerdict.from_sidecar({}) is None  # a run from before the verdict


def test_the_warning_names_the_numbers_and_what_to_do():
    labels, probs = _cohort(20, 0.0)
    text = judge_ranking(labels, probs).warning()
    assert text.startswith("the model is not shown to rank its 20 validation patients (8 positive)")
    assert "95% CI" in text and "model.pretrained" in text
