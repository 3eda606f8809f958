"""Whether a trained model ranks its validation patients: the verdict a run ends with.

A model at chance still has a best epoch, a threshold and a decision for every patient;
nothing in those says that it ranks nothing. Two checks on the selected epoch's validation
patients, both on the plain sigmoid of the patient logit (the scale the threshold is chosen
on, before any calibration):

- the AUC's 95% percentile-bootstrap interval lies above 0.5 (an interval that contains 0.5
  is what a model at chance gives, and so is a validation set too small to tell);
- the separation (mean p+ - mean p-) is not in the specification's "poor" band (< 0.10).

The verdict is stored in ``model.json`` (key ``ranking``) when the weights are saved, so
that ``evaluate``, the report and ``predict`` can say so; ``train`` on the command line exits
non-zero for a run that fails it unless the user accepts the run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from numpy.typing import ArrayLike

from brainmets.metrics import bootstrap_ci, check_patient_arrays, patient_metrics, separation_band

__all__ = ["RANKS", "DOES_NOT_RANK", "UNDETERMINED", "RankingVerdict", "judge_ranking"]

RANKS = "ranks"
DOES_NOT_RANK = "does_not_rank"
UNDETERMINED = "undetermined"
#: Resamples of the AUC interval: enough for a stable 2.5th percentile, milliseconds to draw.
N_BOOT = 1000
_WHAT_TO_DO = (
    "check the labels and the split, give it more validation patients, train longer or "
    "from pretrained weights (model.pretrained)"
)


@dataclass(frozen=True)
class RankingVerdict:
    """The ranking check of one set of patient predictions (see the module docstring)."""

    verdict: str
    auc: float | None = None
    auc_ci: tuple[float | None, float | None] = (None, None)
    separation: float | None = None
    separation_band: str = "undefined"
    n_pos: int = 0
    n_neg: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> bool:
        return self.verdict == RANKS

    def describe(self) -> str:
        """One sentence: what the verdict is and why."""
        who = f"its {self.n_pos + self.n_neg} validation patients ({self.n_pos} positive)"
        if self.ranks:
            return (
                f"the model ranks {who}: AUC {self.auc:.3f} (95% CI {self.auc_ci[0]:.3f} to "
                f"{self.auc_ci[1]:.3f}), separation of the sigmoid {self.separation:.3f} "
                f"({self.separation_band})"
            )
        if self.verdict == UNDETERMINED:
            return f"whether the model ranks patients is unknown: {'; '.join(self.reasons)}"
        return f"the model is not shown to rank {who} better than chance: {'; '.join(self.reasons)}"

    def warning(self) -> str:
        """What a user must read before trusting this model's decisions."""
        return f"{self.describe()}. Its decisions are not evidence; {_WHAT_TO_DO}."

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["auc_ci"] = list(self.auc_ci)
        out["scale"] = "plain sigmoid"
        out["n_boot"] = N_BOOT
        return out

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> RankingVerdict | None:
        """The verdict recorded in a model.json; None for runs written before it was recorded."""
        data = sidecar.get("ranking")
        if not isinstance(data, dict) or "verdict" not in data:
            return None
        ci = data.get("auc_ci") or [None, None]
        return cls(
            verdict=str(data["verdict"]),
            auc=data.get("auc"),
            auc_ci=(ci[0], ci[1]),
            separation=data.get("separation"),
            separation_band=str(data.get("separation_band", "undefined")),
            n_pos=int(data.get("n_pos") or 0),
            n_neg=int(data.get("n_neg") or 0),
            reasons=[str(r) for r in data.get("reasons") or []],
        )


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def judge_ranking(labels: ArrayLike, plain_probs: ArrayLike, *, seed: int = 0) -> RankingVerdict:
    """The verdict on patients' labels and plain-sigmoid probabilities (the validation
    predictions of the selected epoch)."""
    y, p = check_patient_arrays(labels, plain_probs)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        only = "positive" if n_neg == 0 else "negative"
        return RankingVerdict(
            UNDETERMINED,
            n_pos=n_pos,
            n_neg=n_neg,
            reasons=[
                f"the {y.size} validation patients are all {only}, so no AUC or separation can "
                "be measured (give validation patients of both classes in the split column)"
            ],
        )
    point = patient_metrics(y, p, 0.5)
    lo, hi = bootstrap_ci(y, p, 0.5, n_boot=N_BOOT, seed=seed)["auc"]
    auc, sep = point["auc"], point["separation"]
    band = separation_band(sep)
    reasons = []
    if not lo > 0.5:
        reasons.append(f"AUC {auc:.3f} with a 95% CI of {lo:.3f} to {hi:.3f}, which includes 0.5")
    if band == "poor":
        reasons.append(
            f"separation (mean p+ - mean p-) {sep:.3f} on the plain sigmoid is in the poor "
            "band (< 0.10)"
        )
    return RankingVerdict(
        DOES_NOT_RANK if reasons else RANKS,
        auc=_finite(auc),
        auc_ci=(_finite(lo), _finite(hi)),
        separation=_finite(sep),
        separation_band=band,
        n_pos=n_pos,
        n_neg=n_neg,
        reasons=reasons,
    )
