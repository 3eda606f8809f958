"""The members of an ensemble as one network: each scores every slice, each pools its own patient
logit, and the patient's score is their average.

Every member pools as it was trained (the maximum of its own slice logits, for the specified
pooling), so the ensemble's score of a patient is exactly the average of what the members
would say alone; averaging slice logits first and pooling afterwards would give another number
(the maximum of a mean is at most the mean of the maxima) than the members' out-of-fold
predictions the threshold was chosen on.

Two averages (``COMBINE``):

- ``mean_logit``: the mean of the members' patient logits; the patient logit of the ensemble.
- ``mean_probability``: the mean of the members' plain-sigmoid probabilities; the ensemble's
  patient logit is then the logit of that mean, so that the plain sigmoid, the threshold and
  the calibration read it as they read one run's.

The slice logits an ensemble reports (the slices Grad-CAM shows, the top slice) are the
members' mean slice logit: the slices the members together score highest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn

from brainmets.model.pooling import pool_patients
from brainmets.model.resnet import PatientOutput
from brainmets.model.scoring import SliceScorer

COMBINE = ("mean_logit", "mean_probability")

#: A mean probability of exactly 0 or 1 (float32 rounding of a confident member) is kept a
#: finite logit.
_EPS = 1e-7


def combine_logits(member_logits: Tensor, combine: str) -> Tensor:
    """Patient logits [P] of the ensemble from the members' patient logits [P, M]."""
    if combine == "mean_logit":
        return member_logits.float().mean(dim=1)
    if combine == "mean_probability":
        mean = torch.sigmoid(member_logits.double()).mean(dim=1).clamp(_EPS, 1 - _EPS)
        return torch.logit(mean).float()
    raise ValueError(f"combine={combine!r} is not supported; choose one of {COMBINE}")


def combine_numpy(member_logits: ArrayLike, combine: str) -> np.ndarray:
    """:func:`combine_logits` of an array [P, M] (offline: the benchmark, tests)."""
    logits = torch.as_tensor(np.asarray(member_logits, dtype=np.float64))
    return combine_logits(logits, combine).double().numpy()


class MemberPooling:
    """Per-member pooling of stacked slice logits [S, M] and the average over members: the
    ``pool`` of every ensemble network, whatever computes its slice logits."""

    def __init__(self, poolings: Sequence[tuple[str, float]], combine: str) -> None:
        if combine not in COMBINE:
            raise ValueError(f"combine={combine!r} is not supported; choose one of {COMBINE}")
        self.poolings = list(poolings)
        self.combine = combine

    def pool(
        self,
        slice_logits: Tensor,
        patient_index: Tensor,
        num_patients: int,
        scores: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Patient logits [P] of the ensemble and each patient's top slice, the slice of the
        highest mean slice logit."""
        if slice_logits.dim() != 2 or slice_logits.shape[1] != len(self.poolings):
            raise ValueError(
                f"expected slice logits [slices, {len(self.poolings)} members], got "
                f"{tuple(slice_logits.shape)}"
            )
        members = []
        for m, (method, temperature) in enumerate(self.poolings):
            member_scores = None if scores is None else scores[:, m]
            logits, _ = pool_patients(
                slice_logits[:, m],
                patient_index,
                num_patients,
                method,
                temperature=temperature,
                attention_scores=member_scores,
            )
            members.append(logits)
        patient_logits = combine_logits(torch.stack(members, dim=1), self.combine)
        _, top = pool_patients(slice_logits.float().mean(dim=1), patient_index, num_patients)
        return patient_logits, top


class EnsembleNetwork(nn.Module):
    """PyTorch members behind the scorer's network seam (``slice_outputs``, ``pool``):
    slice logits [S, M], pooled per member and averaged."""

    def __init__(self, members: Sequence[nn.Module], combine: str) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.pooling = MemberPooling(
            [(m.pooling, float(m.lse_temperature)) for m in members], combine
        )

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        outputs = [member.slice_outputs(x) for member in self.members]
        logits = torch.stack([logit.float() for logit, _ in outputs], dim=1)
        scores = [s for _, s in outputs]
        if all(s is None for s in scores):
            return logits, None
        # Members without attention pooling take no scores; zeros keep the stack rectangular.
        filled = [torch.zeros_like(logits[:, 0]) if s is None else s.float() for s in scores]
        return logits, torch.stack(filled, dim=1)

    def pool(
        self,
        slice_logits: Tensor,
        patient_index: Tensor,
        num_patients: int,
        scores: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return self.pooling.pool(slice_logits, patient_index, num_patients, scores)


class EnsembleScorer(SliceScorer):
    """The scorer of an ensemble network (PyTorch, ONNX or Triton members): what it reports
    per slice is the members' mean slice logit, one number per slice as for a run."""

    @torch.inference_mode()
    def score_flat(self, images: Tensor, counts: Sequence[int]) -> PatientOutput:
        out = super().score_flat(images, counts)
        return PatientOutput(out.patient_logits, out.slice_logits.mean(dim=1), out.top_slice)
