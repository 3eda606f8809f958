"""Loss: BCE on patient logits plus the confidence-separation term, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brainmets.config import ConfidenceLoss
from brainmets.train.losses import confidence_term, patient_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize(
    ("logits", "labels", "target"),
    [
        ([2.0, -1.0, 0.5, -2.0], [1, 0, 1, 0], 0.30),  # well separated: term is 0
        ([0.1, 0.0, -0.2, 0.3], [1, 0, 1, 0], 0.30),  # barely separated: term > 0
        ([-1.0, 1.0, 0.0], [1, 0, 0], 0.30),  # inverted ranking: large term
        ([0.0, 0.0], [1, 0], 0.50),
    ],
)
def test_confidence_term_matches_hand_computation(logits, labels, target):
    p = [_sigmoid(x) for x in logits]
    pos = [pi for pi, y in zip(p, labels, strict=True) if y == 1]
    neg = [pi for pi, y in zip(p, labels, strict=True) if y == 0]
    expected = max(0.0, target - (sum(pos) / len(pos) - sum(neg) / len(neg))) ** 2
    got = confidence_term(torch.tensor(logits), torch.tensor(labels, dtype=torch.float32), target)
    assert got.item() == pytest.approx(expected, abs=1e-7)


def test_confidence_gradient_matches_hand_derivative():
    logits = torch.tensor([0.1, 0.0, -0.2, 0.3, 0.05], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    confidence_term(logits, labels, 0.30).backward()

    p = torch.sigmoid(logits.detach())
    is_pos = labels == 1
    shortfall = 0.30 - (p[is_pos].mean() - p[~is_pos].mean())
    assert shortfall > 0
    # d/dz_i of (T - (mean p+ - mean p-))^2 = -2 s * (+-1/n_class) * p_i (1 - p_i)
    sign = torch.where(is_pos, 1.0 / is_pos.sum(), -1.0 / (~is_pos).sum())
    expected = -2.0 * shortfall * sign * p * (1 - p)
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("labels", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
def test_confidence_term_is_zero_without_both_classes(labels):
    logits = torch.tensor([0.3, -0.4, 1.0], requires_grad=True)
    term = confidence_term(logits, torch.tensor(labels))
    term.backward()
    assert term.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("pos_weight", [None, 1.5])
@pytest.mark.parametrize("enabled", [False, True])
def test_patient_loss_is_bce_plus_weighted_term(pos_weight, enabled):
    logits = torch.tensor([0.2, -0.1, 0.4, 0.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    confidence = ConfidenceLoss(enabled=enabled, target=0.3, weight=0.15)
    loss, parts = patient_loss(logits, labels, pos_weight=pos_weight, confidence=confidence)

    w = 1.0 if pos_weight is None else pos_weight
    p = torch.sigmoid(logits)
    bce = -(w * labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    expected = bce + (0.15 * confidence_term(logits, labels, 0.3) if enabled else 0.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert ("confidence" in parts) == enabled


def test_patient_loss_equals_torch_bce_when_term_disabled():
    logits = torch.randn(7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1.0, 0, 0, 1, 0, 0, 1])
    loss, _ = patient_loss(logits, labels)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, labels))
