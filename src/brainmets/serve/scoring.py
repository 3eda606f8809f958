"""One received study, scored as ``predict`` scores a folder, in steps the node can stop between.

The series is chosen and checked for completeness on headers first (cheap), so that a study
still missing slices waits without being scored; then preprocessing and ``score_items``, the
one scoring path of predict and serve. The score is kept as JSON (the patient logit and its
slice logits), so that results that could not be written are written later from the recorded
score, without scoring the study again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmets.data.cache import patient_stem
from brainmets.data.prepare import (
    PatientJob,
    PreprocessedPatient,
    error_row,
    jobs_for_inputs,
    try_preprocess_patient,
)
from brainmets.inference import TrainedModel
from brainmets.model.scoring import PatientScore
from brainmets.predict import score_items
from brainmets.serve.completeness import missing_slices


class NoResult(Exception):
    """A study with nothing to score (no usable series): a failed row, no result objects."""


@dataclass
class Scored:
    """One patient of a study with its score, ready for its result objects."""

    item: PreprocessedPatient
    score: PatientScore
    row: dict


def _reasons(errors: Sequence[dict]) -> str:
    return "; ".join(e["error"] for e in errors) or "no patient found"


def choose_series(trained: TrainedModel, folder: Path) -> list[PatientJob]:
    """The series ``predict`` would score in ``folder``, one per patient (headers only)."""
    jobs, _, errors = jobs_for_inputs([folder], trained.preprocess, workers=1)
    if not jobs:
        raise NoResult(_reasons(errors))
    return jobs


def incompleteness(jobs: Sequence[PatientJob]) -> str:
    """Why the chosen series look incomplete ('' when they look complete)."""
    found = [(job, missing_slices(job.files)) for job in jobs if job.files]
    return "; ".join(why for _, why in found if why)


def _preprocess(trained: TrainedModel, jobs: Sequence[PatientJob]) -> list[PreprocessedPatient]:
    items, errors = [], []
    for job in jobs:
        result = try_preprocess_patient(job, trained.preprocess)
        if isinstance(result, dict):
            errors.append(error_row(result["patient_id"], result["file"], result["reason"]))
        else:
            items.append(result)
    if not items:
        raise NoResult(_reasons(errors))
    return items


def score(trained: TrainedModel, jobs: Sequence[PatientJob]) -> list[Scored]:
    return [
        Scored(p.item, p.score, p.row) for p in score_items(trained, _preprocess(trained, jobs))
    ]


def scores_json(scored: Sequence[Scored]) -> str:
    return json.dumps(
        [
            {
                "patient_id": s.item.job.patient_id,
                "series_uid": s.item.series_uid,
                "logit": float(s.score.logit),
                "slice_logits": [float(v) for v in s.score.slice_logits],
                "top_slice": int(s.score.top_slice),
            }
            for s in scored
        ]
    )


def recorded(trained: TrainedModel, folder: Path, scores: str) -> list[Scored]:
    """The patients of a scored study with their recorded scores, preprocessed again for
    their result objects (Grad-CAM needs the slices); the series must be the one scored."""
    by_patient = {s["patient_id"]: s for s in json.loads(scores)}
    out = []
    for item in _preprocess(trained, choose_series(trained, folder)):
        saved = by_patient.get(item.job.patient_id)
        if saved is None:
            continue
        logits = np.asarray(saved["slice_logits"], dtype=np.float32)
        if saved["series_uid"] != item.series_uid or len(logits) != item.array.shape[0]:
            raise NoResult(f"{item.job.patient_id}: the spool no longer holds the series scored")
        out.append(Scored(item, PatientScore(saved["logit"], logits, saved["top_slice"]), {}))
    if not out:
        raise NoResult("the spool no longer holds the patients scored")
    return out


def write_results(
    trained: TrainedModel,
    scored: Sequence[Scored],
    out: Path,
    *,
    top_k: int,
    revision: int,
    partial: str = "",
    previous: Sequence[str] = (),
    limitations: Sequence[str] = (),
) -> list[str]:
    """Write each patient's SR and captures; a result made from an incomplete series is
    marked partial, and a later revision names the SR it replaces. Returns the files, each
    SR before its captures."""
    from brainmets.dicom_results import write_dicom_results

    earlier = {Path(p).name: Path(p) for p in previous if p.endswith("_sr.dcm")}
    files: list[str] = []
    for s in scored:
        extra = {}
        if partial:
            extra["partial_reason"] = partial
        replaces = earlier.get(f"{patient_stem(s.item.job.patient_id)}_sr.dcm")
        if replaces is not None and replaces.is_file():
            extra["replaces"] = replaces
        if limitations:
            extra["limitations"] = list(limitations)
        written = write_dicom_results(
            trained, s.item, s.score, out, top_k=top_k, revision=revision, **extra
        )
        files += [str(p) for p in written.files]
    return files
