"""Patient pooling against a per-patient loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from brainmets.model.pooling import POOLING_METHODS, GatedAttentionPooling, pool_patients

# Patients of very different lengths, including a single-slice patient.
LENGTHS = [[1], [3, 1, 5], [40, 2, 17, 1, 9]]


def _flat_batch(lengths: list[int], seed: int = 0, interleave: bool = True):
    """Slice logits, attention scores and patient index for patients of the given lengths.

    With ``interleave`` the slices of different patients are shuffled together, so the pooling
    cannot rely on each patient's slices being contiguous."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.full((n,), p, dtype=torch.long) for p, n in enumerate(lengths)])
    if interleave:
        index = index[torch.randperm(index.numel(), generator=generator)]
    logits = torch.randn(index.numel(), generator=generator) * 3
    scores = torch.randn(index.numel(), generator=generator)
    return logits, scores, index


def _reference(logits, scores, index, num_patients, method, temperature=1.0):
    """Loop over patients: the obviously-correct version."""
    pooled, top = [], []
    for p in range(num_patients):
        rows = torch.nonzero(index == p).flatten()
        x = logits[rows]
        if method == "max":
            pooled.append(x.max())
        elif method == "mean":
            pooled.append(x.mean())
        elif method == "lse":
            pooled.append(temperature * (torch.logsumexp(x / temperature, 0) - math.log(len(x))))
        else:
            pooled.append((torch.softmax(scores[rows], 0) * x).sum())
        driver = scores[rows] if method == "attention" else x
        top.append(rows[driver.argmax()])
    return torch.stack(pooled), torch.stack(top)


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("interleave", [False, True])
def test_pooling_matches_loop_reference(method, lengths, interleave):
    logits, scores, index = _flat_batch(lengths, interleave=interleave)
    pooled, top = pool_patients(logits, index, len(lengths), method, attention_scores=scores)
    expected, expected_top = _reference(logits, scores, index, len(lengths), method)
    torch.testing.assert_close(pooled, expected)
    assert top.dtype == torch.long
    assert top.tolist() == expected_top.tolist()
    assert (index[top] == torch.arange(len(lengths))).all()


@pytest.mark.parametrize("method", POOLING_METHODS)
def test_pooling_gradients_match_loop_reference(method):
    lengths = [6, 1, 11, 3]
    logits, scores, index = _flat_batch(lengths, seed=3)
    weights = torch.randn(len(lengths))  # distinct weight per patient exposes mixed-up rows

    def grads(fn):
        x = logits.clone().requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        (fn(x, s) * weights).sum().backward()
        return x.grad, s.grad

    ours = grads(lambda x, s: pool_patients(x, index, 4, method, attention_scores=s)[0])
    ref = grads(lambda x, s: _reference(x, s, index, 4, method)[0])
    torch.testing.assert_close(ours[0], ref[0])
    if method == "attention":
        torch.testing.assert_close(ours[1], ref[1])


def test_max_gradient_reaches_only_the_top_slice_even_with_ties():
    # Patient 0 has two equal maxima (a duplicated slice); patient 1 a single slice.
    logits = torch.tensor([1.0, 5.0, 5.0, -2.0, 0.5], requires_grad=True)
    index = torch.tensor([0, 0, 0, 0, 1])
    pooled, top = pool_patients(logits, index, 2, "max")
    pooled.sum().backward()
    assert top.tolist() == [1, 4]  # first of the tied slices
    assert logits.grad.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("temperature", "limit"), [(1e-3, "max"), (1e4, "mean")], ids=["cold", "hot"]
)
def test_lse_interpolates_between_max_and_mean(temperature, limit):
    logits, _, index = _flat_batch([7, 4, 12], seed=5)
    smooth, _ = pool_patients(logits, index, 3, "lse", temperature=temperature)
    target, _ = pool_patients(logits, index, 3, limit)
    torch.testing.assert_close(smooth, target, atol=1e-2, rtol=0)


def test_lse_with_temperature_matches_reference():
    logits, scores, index = _flat_batch([5, 8], seed=7)
    pooled, _ = pool_patients(logits, index, 2, "lse", temperature=0.3)
    expected, _ = _reference(logits, scores, index, 2, "lse", temperature=0.3)
    torch.testing.assert_close(pooled, expected)


def test_lse_is_stable_for_large_logits():
    logits = torch.tensor([1000.0, 999.0, -1000.0])
    pooled, _ = pool_patients(logits, torch.tensor([0, 0, 1]), 2, "lse")
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[0], torch.tensor(1000.0 + math.log((1 + math.exp(-1)) / 2)))


def test_pooling_runs_in_float32_for_bf16_logits():
    logits, scores, index = _flat_batch([4, 6], seed=1)
    pooled, _ = pool_patients(logits.bfloat16(), index, 2, "mean")
    assert pooled.dtype == torch.float32


def test_gated_attention_scores_one_per_slice():
    module = GatedAttentionPooling(feat_dim=16, hidden=8)
    features = torch.randn(9, 16)
    scores = module(features)
    assert scores.shape == (9,)
    # The score of a slice depends on that slice only (no mixing across the batch).
    torch.testing.assert_close(module(features[2:3]), scores[2:3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": [0, 0, 2], "num_patients": 3}, r"patients \[1\] have no slices"),
        ({"index": [0, 1, 3], "num_patients": 3}, "reaches 3 but num_patients is 3"),
        ({"index": [0, 1, 1], "num_patients": 2, "method": "median"}, "unknown pooling"),
        ({"index": [0, 1, 1], "num_patients": 2, "method": "attention"}, "attention_scores"),
        ({"index": [0, 1], "num_patients": 2}, "does not match"),
        ({"index": [0, 1, 1], "num_patients": 0}, "num_patients must be"),
        ({"index": [0, 1, 1], "num_patients": 2, "temperature": 0.0, "method": "lse"}, "> 0"),
    ],
)
def test_pooling_rejects_bad_batches(kwargs, message):
    logits = torch.randn(3)
    index = torch.tensor(kwargs.pop("index"))
    num_patients = kwargs.pop("num_patients")
    method = kwargs.pop("method", "max")
    with pytest.raises(ValueError, match=message):
        pool_patients(logits, index, num_patients, method, **kwargs)


def test_pooling_rejects_int32_patient_index():
    with pytest.raises(ValueError, match="torch.long"):
        pool_patients(torch.randn(2), torch.tensor([0, 1], dtype=torch.int32), 2)
