"""From the patient logit to the probability every command reports.

The patient logit is the maximum over a patient's slice logits, so its sigmoid is biased
upward: a negative patient with 40 slices gets the highest of 40 noisy scores, and the
expected maximum grows with the number of slices. Platt scaling (Platt 1999) maps the logit
through ``sigmoid(slope * logit + intercept)``, fitted on the validation patients of the best
epoch, so that among patients given p = 0.3, about 30 % have metastases.

**The rule** (:func:`calibrate`): a Platt map is fitted only where it means something, that is
when ``train.calibration`` is ``platt``, the model ranks its validation patients (the ranking
verdict of :mod:`brainmets.ranking`: the AUC's 95% CI above 0.5 and a separation that is not
poor) and there are at least :data:`MIN_PATIENTS_PER_CLASS` validation patients of each class.
Otherwise the reported probability is the plain sigmoid of the patient logit, and the run says
why (``Calibration.note``): two parameters fitted to a model at chance, or to a handful of
patients, would describe noise while the name "calibrated" promised more.

The fit uses Platt's smoothed targets ((N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for
negatives) rather than 0/1: a validation set the model separates perfectly then still has a
finite optimum instead of an infinitely steep step.

The map is increasing, so ranking, AUC and every decision stay as they were: the operating
threshold is chosen on the plain sigmoid, as specified, and reported through the same map.
Decisions are taken, and ``evaluate`` ranks and calls patients, on the plain sigmoid, so that a
calibrated probability that rounds to 1.0 ties nothing. What a user reads (the threshold, the
probabilities, the class means) is on the one reported scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from scipy.special import logit as inverse_sigmoid
from sklearn.metrics import roc_auc_score

#: Fewer validation patients of either class than this: no fit (two parameters from a
#: handful of patients would describe the handful; ten per class is the usual floor of events
#: per fitted parameter in clinical prediction models).
MIN_PATIENTS_PER_CLASS = 10


@dataclass(frozen=True)
class Calibration:
    """``probability = sigmoid(slope * logit + intercept)``; identity for ``method="none"``."""

    method: str = "none"  # "platt" | "none"
    slope: float = 1.0
    intercept: float = 0.0
    patients: int = 0  # validation patients the fit saw
    note: str = ""  # why there is no fit, when there is none

    def __post_init__(self) -> None:
        # A hand-edited model.json must not turn the map around or make it nan.
        if self.method not in ("platt", "none"):
            raise ValueError(f"calibration method must be 'platt' or 'none', got {self.method!r}")
        if not (math.isfinite(self.slope) and self.slope > 0 and math.isfinite(self.intercept)):
            raise ValueError(
                f"calibration needs a finite slope > 0 and a finite intercept, got slope "
                f"{self.slope!r}, intercept {self.intercept!r}"
            )
        if self.method == "none" and (self.slope, self.intercept) != (1.0, 0.0):
            raise ValueError("calibration method 'none' has slope 1 and intercept 0")

    def probability(self, logits: ArrayLike) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        return expit(self.slope * z + self.intercept)

    def from_plain(self, probabilities: ArrayLike) -> np.ndarray:
        """Plain-sigmoid probabilities on the reported scale."""
        return self.probability(logits_of(probabilities))

    def threshold(self, plain_threshold: float) -> float:
        """A threshold on the plain sigmoid, expressed as a calibrated probability."""
        z = inverse_sigmoid(float(plain_threshold))
        return float(self.probability(z)) if math.isfinite(z) else float(plain_threshold)

    def describe(self) -> str:
        """One phrase for summaries and the report."""
        if self.method == "platt":
            return (
                f"Platt-calibrated on {self.patients} validation patients "
                f"(sigmoid of {self.slope:.3g} x logit {self.intercept:+.3g})"
            )
        return "the sigmoid of the patient logit, not calibrated" + (
            f" ({self.note.removeprefix('not fitted: ')})" if self.note else ""
        )

    @property
    def scale(self) -> str:
        """The scale's short name, for a column or a log line: platt or sigmoid."""
        return "platt" if self.method == "platt" else "sigmoid"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> Calibration:
        """The calibration a model.json (or metrics.json) records; older runs have none."""
        stored = sidecar.get("calibration") or {}
        return cls(**{k: v for k, v in stored.items() if k in cls.__dataclass_fields__})


def logits_of(probabilities: ArrayLike) -> np.ndarray:
    """Logits back from stored probabilities (val_predictions.csv of older runs), clipped so
    that a rounded 0 or 1 stays finite."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    return inverse_sigmoid(p)


def fit_platt(labels: ArrayLike, logits: ArrayLike) -> Calibration:
    """Platt scaling of patient ``logits`` against 0/1 ``labels``, or no calibration (with the
    reason in ``note``) when there are too few patients of a class or no ranking to keep."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    if y.shape != z.shape:
        raise ValueError(f"{y.size} labels but {z.size} logits")
    keep = np.isfinite(z)
    y, z = y[keep], z[keep]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < MIN_PATIENTS_PER_CLASS:
        return Calibration(
            patients=y.size,
            note=f"not fitted: {n_pos} positive and {n_neg} negative validation patients "
            f"(at least {MIN_PATIENTS_PER_CLASS} of each needed)",
        )
    auc = roc_auc_score(y, z)
    if auc <= 0.5:
        return Calibration(
            patients=y.size,
            note=f"not fitted: validation AUC {auc:.3f} <= 0.5 (the logits do not rank the "
            "patients), so the plain sigmoid is kept",
        )
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        slope, intercept = params
        s = slope * z + intercept
        value = -np.sum(target * log_expit(s) + (1.0 - target) * log_expit(-s))
        residual = expit(s) - target  # d loss / d s
        return float(value), np.array([np.sum(residual * z), np.sum(residual)])

    result = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    slope, intercept = (float(v) for v in result.x)
    if not (result.success and math.isfinite(slope) and math.isfinite(intercept)):
        return Calibration(patients=y.size, note=f"not fitted: {result.message}")
    if slope <= 0:  # AUC above 0.5 makes this rare, but the map must stay increasing
        return Calibration(patients=y.size, note=f"not fitted: slope {slope:.3g} <= 0")
    return Calibration("platt", slope, intercept, patients=int(y.size))


def calibrate(
    labels: ArrayLike,
    logits: ArrayLike,
    *,
    method: str = "platt",
    ranks: bool = True,
    why_not: str = "",
) -> Calibration:
    """The reported probability of a set of validation predictions, by the rule of the module
    text: ``method`` is ``train.calibration``; ``ranks`` the ranking verdict on the same
    patients, and ``why_not`` its reason when it is False."""
    if method == "none":
        return Calibration(note="train.calibration is none")
    if not ranks:
        n = int(np.isfinite(np.asarray(logits, dtype=np.float64)).sum())
        return Calibration(patients=n, note=f"not fitted: {why_not or 'the model does not rank'}")
    return fit_platt(labels, logits)
