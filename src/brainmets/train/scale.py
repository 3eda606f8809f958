"""Each epoch's validation numbers on the probability scale its weights would be reported on.

A run reports one probability: Platt-calibrated where :func:`brainmets.model.probability.
calibrate` fits a map, else the plain sigmoid of the patient logit. ``metrics.csv`` and
``train.log`` give every epoch's threshold, class means and separation on the scale that epoch's
weights would carry if they were saved, which is the calibration fitted by the same rule on the
same validation patients, so the best epoch's row shows the threshold ``predict``, ``evaluate``
and the SR then show. The plain-sigmoid threshold and separation, on which the threshold is
chosen and ``separation`` selection ranks (the specification's scale), stay as labelled
columns (``sigmoid_threshold``, ``sigmoid_separation``), and ``probability_scale`` names each
row's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from brainmets.metrics import patient_metrics
from brainmets.model.probability import Calibration, calibrate
from brainmets.ranking import RankingVerdict, judge_ranking

__all__ = ["EpochScale", "epoch_scale"]


@dataclass(frozen=True)
class EpochScale:
    """One epoch's ranking verdict and the calibration its weights would be saved with."""

    ranking: RankingVerdict
    calibration: Calibration

    def reported(self, predictions: pd.DataFrame) -> pd.DataFrame:
        """``predictions`` (label, plain ``probability``, ``logit``) with ``probability`` on this
        scale: the table ``val_predictions.csv`` holds."""
        out = predictions.copy()
        out["probability"] = self.calibration.probability(out["logit"].to_numpy())
        return out

    def row_values(self, predictions: pd.DataFrame, plain_threshold: float) -> dict[str, Any]:
        """The metrics.csv values that depend on the scale."""
        y = predictions["label"].to_numpy()
        shown = self.calibration.threshold(plain_threshold)
        on_scale = patient_metrics(y, self.calibration.probability(predictions["logit"]), shown)
        plain = patient_metrics(y, predictions["probability"].to_numpy(), plain_threshold)
        return {
            "threshold": shown,
            "mean_pos": on_scale["mean_pos"],
            "mean_neg": on_scale["mean_neg"],
            "separation": on_scale["separation"],
            "probability_scale": self.calibration.scale,
            "sigmoid_threshold": float(plain_threshold),
            "sigmoid_separation": plain["separation"],
        }


def epoch_scale(predictions: pd.DataFrame, *, method: str, seed: int) -> EpochScale:
    """The verdict and calibration of one epoch's validation ``predictions`` (label, plain
    ``probability``, ``logit``); ``method`` is ``train.calibration``."""
    labels = predictions["label"].to_numpy()
    ranking = judge_ranking(labels, predictions["probability"].to_numpy(), seed=seed)
    why_not = "; ".join(ranking.reasons) if ranking.reasons else ranking.verdict
    calibration = calibrate(
        labels,
        np.asarray(predictions["logit"], dtype=np.float64),
        method=method,
        ranks=ranking.ranks,
        why_not=f"the model is not shown to rank its validation patients ({why_not})",
    )
    return EpochScale(ranking, calibration)
