"""A trained run on PyTorch: the cache check, the decision rule, and score_cache against the
plain forward of the network, on a small cache of random volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from brainmets.config import PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.inference import load_trained, model_path, score_cache


@pytest.fixture
def cache(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    patients = [
        (f"P{i}", i % 2, rng.integers(0, 256, size=(n, 48, 48), dtype=np.uint8))
        for i, n in enumerate([3, 9, 5, 12, 1])
    ]
    preprocess = load_trained(tiny_run, "cpu").preprocess
    return build_cache_from_arrays(tmp_path / "cache", patients, preprocess), patients


def test_score_cache_equals_the_plain_forward_of_each_patient(tiny_run, cache):
    """Batches of whole patients, read by a thread while the model scores, give the scores
    of one patient at a time through BrainMetsNet.forward."""
    patient_cache, patients = cache
    trained = load_trained(tiny_run, "cpu")
    ids = [pid for pid, _, _ in patients]
    table = score_cache(trained, patient_cache, ids, batch_slices=10, progress=False)
    assert table["patient_id"].tolist() == ids
    assert table["label"].tolist() == [label for _, label, _ in patients]
    for (_, _, array), row in zip(patients, table.itertuples(), strict=True):
        x = trained.scorer.network_inputs(torch.from_numpy(array))
        with torch.inference_mode():
            slice_logits = trained.model.forward_head(trained.model.forward_features(x))
        assert row.logit == pytest.approx(float(slice_logits.max()), abs=1e-4)
        assert row.top_slice_index == int(slice_logits.argmax())
        assert row.probability == pytest.approx(float(trained.probability(row.logit)))


def test_decisions_are_taken_on_the_plain_sigmoid_at_the_trained_threshold(tiny_run):
    trained = load_trained(tiny_run, "cpu")  # Platt slope 0.8, intercept -0.1; threshold 0.5
    logits = np.array([-0.01, 0.0, 0.01])
    assert trained.decision(logits).tolist() == (expit(logits) >= 0.5).astype(int).tolist()
    # The threshold as reported sits where the calibrated probability of that logit does.
    assert trained.threshold == pytest.approx(float(trained.probability(0.0)))


def test_a_cache_of_other_preprocessing_is_refused_with_the_fix(tiny_run, tmp_path):
    trained = load_trained(tiny_run, "cpu")
    other = PreprocessConfig(**{**trained.preprocess.model_dump(), "size": 32})
    array = np.zeros((2, 32, 32), dtype=np.uint8)
    patient_cache = build_cache_from_arrays(tmp_path / "c", [("P", 0, array)], other)
    with pytest.raises(ValueError, match=r"--set preprocess.size=48"):
        trained.check_cache(patient_cache)


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained model here"):
        model_path(tmp_path)
