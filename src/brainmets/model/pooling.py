"""Patient pooling: slice logits of a flat batch -> one logit per patient (multiple-instance).

A batch holds the slices of several patients of different lengths, concatenated along dim 0,
with ``patient_index[s]`` naming the patient of slice ``s``. Every method here is vectorised with
segment reductions (``scatter_reduce`` / ``index_add``): there is no Python loop over patients, so
the cost does not grow with the number of patients in the batch.

Each method also returns ``top_slice``: the flat index of the slice that drove each patient's
score (the argmax slice for ``max``, ``mean`` and ``lse``; the highest attention weight for
``attention``). The trainer and ``predict`` use it for the slice a clinician should look at first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLING_METHODS = ("max", "mean", "lse", "attention")


class GatedAttentionPooling(nn.Module):
    """Gated attention scores (Ilse, Tomczak & Welling, ICML 2018, eq. 9), one per slice.

    ``score_s = w^T (tanh(V h_s) * sigmoid(U h_s))``; the softmax over a patient's slices is taken
    by :func:`pool_patients`, which then weights the slice *logits* (not the features): the same
    slice head then serves every pooling method, and each slice keeps a logit of its own that the
    heatmaps and ``top_slice`` can show. Pooling logits rather than embeddings is the choice of
    the "instance-level" MIL variant; it is linear in the slice logits, so a patient is positive
    exactly when its attended slices are.
    """

    def __init__(self, feat_dim: int, hidden: int = 128) -> None:
        super().__init__()
        if feat_dim < 1 or hidden < 1:
            raise ValueError(f"feat_dim and hidden must be >= 1, got {feat_dim}, {hidden}")
        self.attention_v = nn.Linear(feat_dim, hidden)
        self.attention_u = nn.Linear(feat_dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        """Per-slice attention scores (pre-softmax) [S] from slice features [S, feat_dim]."""
        gated = torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))
        return self.attention_w(gated).squeeze(-1)


def pool_patients(
    slice_logits: Tensor,
    patient_index: Tensor,
    num_patients: int,
    method: str = "max",
    *,
    temperature: float = 1.0,
    attention_scores: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pool slice logits [S] into patient logits [P]; return ``(patient_logits, top_slice)``.

    Methods:
      - ``max`` (the specification): the patient logit is its highest slice logit; the gradient
        flows to that one slice only (ties go to the first slice in batch order).
      - ``mean``: the mean slice logit.
      - ``lse``: ``T * log(mean_s exp(x_s / T))``, a smooth maximum: it tends to ``max`` as
        ``temperature`` T -> 0 and to ``mean`` as T -> infinity, and spreads the gradient over the
        slices near the top.
      - ``attention``: ``sum_s a_s x_s`` with ``a = softmax(attention_scores)`` within each
        patient (see :class:`GatedAttentionPooling`).

    Pooling runs in float32 whatever the autocast dtype of the slice logits, so the patient
    logits fed to the loss keep full precision.

    Raises:
        ValueError: an unknown method, mismatched shapes, a patient index outside
            ``[0, num_patients)``, a patient without slices, or missing attention scores.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {POOLING_METHODS}")
    counts = _check_segments(slice_logits, patient_index, num_patients)
    logits = slice_logits.float()

    if method == "max":
        _, top_slice = _segment_argmax(logits, patient_index, num_patients)
        # Gathering the winning slice (rather than scatter_reduce "amax", which shares the
        # gradient among ties) sends the whole gradient to exactly one slice per patient.
        return logits.index_select(0, top_slice), top_slice

    if method == "mean":
        sums = logits.new_zeros(num_patients).index_add(0, patient_index, logits)
        _, top_slice = _segment_argmax(logits, patient_index, num_patients)
        return sums / counts.to(logits.dtype), top_slice

    if method == "lse":
        if not temperature > 0:
            raise ValueError(f"lse temperature must be > 0, got {temperature}")
        scaled = logits / temperature
        log_sum, top_slice = _segment_logsumexp(scaled, patient_index, num_patients)
        return temperature * (log_sum - counts.to(logits.dtype).log()), top_slice

    if attention_scores is None:
        raise ValueError("pooling 'attention' needs attention_scores (one per slice)")
    if attention_scores.shape != slice_logits.shape:
        raise ValueError(
            f"attention_scores shape {tuple(attention_scores.shape)} does not match "
            f"slice_logits shape {tuple(slice_logits.shape)}"
        )
    weights, top_slice = segment_softmax(attention_scores.float(), patient_index, num_patients)
    pooled = logits.new_zeros(num_patients).index_add(0, patient_index, weights * logits)
    return pooled, top_slice


def segment_softmax(
    scores: Tensor, patient_index: Tensor, num_patients: int
) -> tuple[Tensor, Tensor]:
    """Softmax of ``scores`` [S] within each patient; also the flat index of each patient's
    largest weight (softmax is monotone, so it is the argmax score)."""
    seg_max, top_slice = _segment_argmax(scores, patient_index, num_patients)
    # Subtracting the (detached) per-patient maximum keeps exp() finite; it cancels exactly.
    exp = (scores - seg_max.index_select(0, patient_index)).exp()
    denom = exp.new_zeros(num_patients).index_add(0, patient_index, exp)
    return exp / denom.index_select(0, patient_index), top_slice


def _segment_logsumexp(
    values: Tensor, patient_index: Tensor, num_patients: int
) -> tuple[Tensor, Tensor]:
    seg_max, top_slice = _segment_argmax(values, patient_index, num_patients)
    exp = (values - seg_max.index_select(0, patient_index)).exp()
    sums = exp.new_zeros(num_patients).index_add(0, patient_index, exp)
    return seg_max + sums.log(), top_slice


def _segment_argmax(
    values: Tensor, patient_index: Tensor, num_patients: int
) -> tuple[Tensor, Tensor]:
    """Per-patient maximum (detached) and the flat index of its first occurrence."""
    detached = values.detach()
    num_slices = values.shape[0]
    seg_max = detached.new_full((num_patients,), float("-inf")).scatter_reduce(
        0, patient_index, detached, reduce="amax", include_self=True
    )
    positions = torch.arange(num_slices, device=values.device)
    # A NaN logit also counts as a candidate, so every patient always gets a valid index and a
    # NaN shows up in its patient logit instead of an out-of-range gather.
    is_top = (detached == seg_max.index_select(0, patient_index)) | detached.isnan()
    candidates = torch.where(is_top, positions, num_slices)
    top_slice = torch.full_like(seg_max, num_slices, dtype=torch.long).scatter_reduce(
        0, patient_index, candidates, reduce="amin", include_self=True
    )
    return seg_max, top_slice


def _check_segments(slice_logits: Tensor, patient_index: Tensor, num_patients: int) -> Tensor:
    """Validate the flat-batch layout; return the number of slices per patient [P]."""
    if slice_logits.ndim != 1:
        raise ValueError(f"slice_logits must be 1-D [S], got shape {tuple(slice_logits.shape)}")
    if patient_index.shape != slice_logits.shape:
        raise ValueError(
            f"patient_index shape {tuple(patient_index.shape)} does not match "
            f"slice_logits shape {tuple(slice_logits.shape)}"
        )
    if patient_index.dtype != torch.long:
        raise ValueError(f"patient_index must be torch.long, got {patient_index.dtype}")
    if num_patients < 1:
        raise ValueError(f"num_patients must be >= 1, got {num_patients}")
    if patient_index.device.type != "cpu":
        # No data-dependent checks on an accelerator: each would make the host wait for the
        # device in the middle of every step. Batches reach the device from collate_patients,
        # DeviceSliceStore or SliceScorer, which build patient_index from counts of at least 1.
        ones = torch.ones_like(patient_index, dtype=torch.long)
        return torch.zeros(num_patients, dtype=torch.long, device=patient_index.device).index_add_(
            0, patient_index, ones
        )
    counts = torch.bincount(patient_index, minlength=num_patients)
    if counts.numel() != num_patients:
        raise ValueError(
            f"patient_index reaches {counts.numel() - 1} but num_patients is {num_patients}"
        )
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"patients {empty} have no slices in this batch")
    return counts
