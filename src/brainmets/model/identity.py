"""Which model decided: an id bound to the weights and to everything around them that decides.

A patient's decision depends on the weights and on what the sidecar says around them: the
architecture (its pooling), the preprocessing, the input normalisation, the operating threshold
and the probability calibration. The model id is the first 12 hex digits of a SHA-256 over all
of these, so a sidecar given another threshold is another model, never the old id with new
decisions. It is recorded when a sidecar is written, and every loader recomputes it: a sidecar
whose content no longer gives its recorded id was edited after it was written, and is refused.

An ensemble's id is a digest of its members' ids, the average that combines them, its
threshold and its calibration (:func:`ensemble_id`), recorded in ``ensemble.json`` and checked
in the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from brainmets.model.probability import Calibration

#: The sidecar keys that change what a patient is called (besides the weights).
DECISIVE = ("architecture", "preprocess", "normalization", "threshold", "calibration")


def decisive_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """What decides, in one canonical form for a run's ``model.json`` and an export's
    ``brainmets.json`` alike (the two spell absent values differently)."""
    threshold = meta.get("threshold")
    return {
        "weights": str(meta.get("weights", {}).get("sha256", "")),
        "architecture": meta.get("architecture"),
        "preprocess": meta.get("preprocess"),
        "normalization": meta.get("normalization", "zscore"),
        "threshold": None if threshold is None else float(threshold),
        "calibration": Calibration.from_sidecar(meta).to_json(),
    }


def digest(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def model_id(meta: dict[str, Any]) -> str:
    """The model id of a sidecar's content."""
    return digest(decisive_fields(meta))[:12]


def checked_model_id(meta: dict[str, Any], path: str | Path) -> str:
    """The id ``meta``'s content gives; a recorded id that differs is refused, naming ``path``
    (sidecars written before ids were recorded carry none and are taken as they are)."""
    computed = model_id(meta)
    recorded = meta.get("model_id")
    if recorded is not None and recorded != computed:
        raise ValueError(
            f"{path}: edited after it was written: it records model {recorded}, but its weights "
            f"checksum, threshold, calibration, preprocessing and architecture give model "
            f"{computed}; restore the file, or train (or export) again"
        )
    return computed


def ensemble_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """What decides an ensemble's calls: its members (their ids bind their weights,
    preprocessing and pooling), the average that combines them, the threshold on it and the
    calibration of it."""
    threshold = meta.get("threshold")
    return {
        "members": [str(m["model_id"]) for m in meta.get("members", [])],
        "combine": meta.get("combine"),
        "preprocess": meta.get("preprocess"),
        "normalization": meta.get("normalization", "zscore"),
        "threshold": None if threshold is None else float(threshold),
        "calibration": Calibration.from_sidecar(meta).to_json(),
    }


def ensemble_id(meta: dict[str, Any]) -> str:
    """The model id of an ensemble's ``ensemble.json`` content (its own namespace: the digest
    is over other fields than a run's, so it never equals a member's)."""
    return digest({"ensemble": ensemble_fields(meta)})[:12]


def checked_ensemble_id(meta: dict[str, Any], path: str | Path) -> str:
    """As :func:`checked_model_id`, for an ensemble."""
    computed = ensemble_id(meta)
    recorded = meta.get("model_id")
    if recorded != computed:
        raise ValueError(
            f"{path}: edited after it was written: it records model {recorded}, but its members, "
            f"combination, threshold, calibration and preprocessing give model {computed}; "
            "restore the file, or combine the folds again (brainmets ensemble)"
        )
    return computed
