"""The chunked inference path (``SliceScorer``) against the plain forward of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmets.data.normalize import normalize_slices, uint8_to_unit
from brainmets.model.resnet import BrainMetsNet
from brainmets.model.scoring import SliceScorer, concatenate_patients


def _model(pooling: str) -> BrainMetsNet:
    torch.manual_seed(0)
    model = BrainMetsNet("resnet18", pooling=pooling)
    # Non-trivial running statistics: were BatchNorm to normalise over the batch (train mode),
    # the padded blank slices would change every other slice's logit and the test would fail.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def _patients(counts: list[int], size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    arrays = []
    for n in counts:
        volume = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
        volume[:, 10:20, 12:22] = rng.integers(150, 256, (n, 10, 10), dtype=np.uint8)
        arrays.append(volume)
    return arrays


def _plain(model: BrainMetsNet, arrays: list[np.ndarray], normalization: str):
    flat = torch.from_numpy(np.concatenate(arrays))
    x = normalize_slices(uint8_to_unit(flat).unsqueeze(1), normalization)
    counts = torch.tensor([a.shape[0] for a in arrays])
    index = torch.repeat_interleave(torch.arange(len(arrays)), counts)
    with torch.no_grad():
        return model(x, index, len(arrays))


@pytest.mark.parametrize("pooling", ["max", "lse", "attention"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_scoring_equals_the_plain_forward(pooling, chunk):
    model = _model(pooling)
    arrays = _patients([3, 7, 1, 12])  # 23 slices: several chunks and a padded last one
    normalization = "zscore"
    plain = _plain(model, arrays, normalization)
    fast = SliceScorer(model, torch.device("cpu"), normalization, chunk=chunk)(arrays)

    torch.testing.assert_close(fast.slice_logits, plain.slice_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.patient_logits, plain.patient_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.top_slice, plain.top_slice)
    assert plain.patient_logits.std() > 0  # the patients really differ


def test_chunked_scoring_honours_the_normalisation():
    model = _model("max")
    arrays = _patients([4, 6])
    scorer = SliceScorer(model, torch.device("cpu"), "minus_one_to_one", chunk=4)
    plain = _plain(model, arrays, "minus_one_to_one")
    torch.testing.assert_close(scorer(arrays).patient_logits, plain.patient_logits)
    other = _plain(model, arrays, "zscore")
    assert not torch.allclose(other.patient_logits, plain.patient_logits, atol=1e-3)


def test_scorer_rejects_empty_patients_and_bad_chunks():
    model = _model("max")
    with pytest.raises(ValueError, match="chunk"):
        SliceScorer(model, torch.device("cpu"), "zscore", chunk=0)
    scorer = SliceScorer(model, torch.device("cpu"), "zscore", chunk=4)
    with pytest.raises(ValueError, match="at least one slice"):
        scorer([np.zeros((0, 48, 48), dtype=np.uint8), np.zeros((2, 48, 48), dtype=np.uint8)])


def test_batches_in_flight_give_each_batch_its_own_scores():
    """``score_batches`` keeps one batch queued while it reads the previous one back: every
    batch must still come out with its own key and the plain forward's per-patient scores."""
    model = _model("max")
    arrays = _patients([3, 7, 1, 12, 5])
    groups = [[0, 1], [2], [3, 4]]
    scorer = SliceScorer(model, torch.device("cpu"), "zscore", chunk=4)
    batches = (
        (f"batch{k}", *concatenate_patients([arrays[i] for i in group]))
        for k, group in enumerate(groups)
    )
    plain = _plain(model, arrays, "zscore")
    starts = np.cumsum([0, *(a.shape[0] for a in arrays)])

    scored = list(scorer.score_batches(batches))

    assert [key for key, _ in scored] == ["batch0", "batch1", "batch2"]
    flat_scores = [score for _, scores in scored for score in scores]
    assert len(flat_scores) == len(arrays)
    for i, score in enumerate(flat_scores):
        assert score.logit == pytest.approx(float(plain.patient_logits[i]), abs=1e-5)
        expected_slices = plain.slice_logits[starts[i] : starts[i + 1]].numpy()
        np.testing.assert_allclose(score.slice_logits, expected_slices, atol=1e-5)
        assert score.top_slice == int(plain.top_slice[i]) - starts[i]
    assert list(scorer.score_batches([])) == []
