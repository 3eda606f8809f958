"""Patient-level loss: BCE on patient logits plus an optional confidence-separation term.

The confidence term ``lambda * max(0, T - (mean p+ - mean p-))^2`` pushes the mean predicted
probability of the positives in a batch at least ``T`` above that of the negatives. It is only
defined when the batch holds both classes; otherwise it is zero (never NaN), so a batch that
happens to hold one class trains on BCE alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from brainmets.config import ConfidenceLoss


def confidence_term(
    patient_logits: torch.Tensor, labels: torch.Tensor, target: float = 0.30
) -> torch.Tensor:
    """``max(0, target - (mean p+ - mean p-))^2`` over one batch; 0 when a class is missing."""
    probs = torch.sigmoid(patient_logits.float())
    positive = labels > 0.5
    negative = ~positive
    n_pos = positive.sum()
    n_neg = negative.sum()
    # Means computed as masked sums so that no host sync (``if n_pos == 0``) is needed and an
    # empty class yields 0/1 instead of 0/0.
    mean_pos = (probs * positive).sum() / n_pos.clamp(min=1)
    mean_neg = (probs * negative).sum() / n_neg.clamp(min=1)
    shortfall = torch.clamp(target - (mean_pos - mean_neg), min=0.0)
    both_classes = (n_pos > 0) & (n_neg > 0)
    return torch.where(both_classes, shortfall.square(), torch.zeros_like(shortfall))


def patient_loss(
    patient_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_weight: float | None = None,
    confidence: ConfidenceLoss | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCEWithLogits (mean over patients) + ``confidence.weight`` x confidence term.

    ``gather`` (DDP) concatenates a tensor over all ranks, with gradients: the confidence term
    compares the class means of the whole batch, not of one rank's share (where a class is
    often missing, and the term then vanishes). The BCE mean needs no gather: every rank holds
    as many patients, and DDP averages the ranks' gradients.

    Returns the loss and its parts as detached tensors (no ``.item()``: the caller decides
    when to synchronise with the device).
    """
    logits = patient_logits.float()
    targets = labels.to(logits.dtype)
    # new_full fills on the device; new_tensor would copy a host scalar and wait on CUDA.
    weight = None if pos_weight is None else logits.new_full((), float(pos_weight))
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    parts = {"bce": bce.detach()}
    loss = bce
    if confidence is not None and confidence.enabled and confidence.weight > 0:
        if gather is not None:  # one collective for both: [n, 2] per rank -> [N, 2]
            both = gather(torch.stack([logits, targets], dim=1))
            term = confidence_term(both[:, 0], both[:, 1], confidence.target)
        else:
            term = confidence_term(logits, targets, confidence.target)
        loss = loss + confidence.weight * term
        parts["confidence"] = term.detach()
    return loss, parts
