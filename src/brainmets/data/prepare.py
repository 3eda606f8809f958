"""``prepare``: one job per patient, each patient's volume through steps 1, 2 and 4 of the
preprocessing, into the cache.

A job says where a patient's image is: the files of a series chosen in a series index, a
patient's DICOM folder (its series chosen there), or a NIfTI file. Series are resolved by one
function, :func:`brainmets.data.series_index.resolve_series`, wherever they are chosen
(``prepare`` from an index or from folders, ``predict`` from folders or a DICOM root).
Failures are rows of the errors table, never exceptions: the batch goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from brainmets.config import PreprocessConfig
from brainmets.data.cache import ERROR_COLUMNS, finalize_index, is_nifti, write_meta, write_patient
from brainmets.data.dicom import NOT_DICOM, HUVolume, SeriesError, load_series
from brainmets.data.nifti import load_nifti
from brainmets.data.series_index import (
    SeriesIndex,
    choose_for,
    index_dicom_root,
    resolve_series,
    unreadable_files,
)
from brainmets.data.volume import preprocess_volume
from brainmets.data.workers import map_jobs
from brainmets.io import atomic_write_csv, atomic_write_text, os_error_line

log = logging.getLogger(__name__)

JobKind = Literal["dicom", "dicom_dir", "nifti"]
"""``dicom``: the files of one series from an index; ``dicom_dir``: a patient's folder, its
series chosen there; ``nifti``: one NIfTI volume."""


@dataclass
class PatientJob:
    """Where one patient's image comes from."""

    patient_id: str
    label: int
    split: str = ""
    kind: JobKind = "dicom"
    files: list[str] = field(default_factory=list)
    path: str = ""
    series_uid: str = ""


@dataclass
class PrepareResult:
    prepared: int
    skipped: int
    errors: pd.DataFrame
    index: pd.DataFrame

    @property
    def failed(self) -> int:
        return len(self.errors)


def _text(value) -> str:
    """A labels cell as text: an empty cell read by pandas (NaN) is no value, not "nan"."""
    return value if isinstance(value, str) else ""


def plan_jobs(
    labels: pd.DataFrame,
    series_index: SeriesIndex | None = None,
    preprocess: PreprocessConfig | None = None,
) -> tuple[list[PatientJob], list[dict]]:
    """One job per manifest patient; patients with no usable series become error rows.

    A ``path`` column (NIfTI file or a patient's DICOM folder) wins over the series index;
    a ``series_uid`` column pins the series instead of the automatic choice, in the index or
    in the patient's folder (a NIfTI file holds one volume: there is nothing to pin).
    """
    jobs: list[PatientJob] = []
    errors: list[dict] = []
    by_patient = None
    pins: dict[str, str] = {}
    if series_index is not None:
        if "series_uid" in labels:
            pins = {r.patient_id: r.series_uid for r in labels.itertuples() if _text(r.series_uid)}
        chosen = choose_for(series_index.series, preprocess or PreprocessConfig(), pins)
        by_patient = {str(pid): rows for pid, rows in chosen.groupby("patient_id", sort=False)}
    for r in labels.itertuples():
        # Optional cells through _text: a DataFrame from the Python API may hold NaN there,
        # where read_labels gives "".
        base = dict(
            patient_id=r.patient_id, label=int(r.label), split=_text(getattr(r, "split", ""))
        )
        path = _text(getattr(r, "path", ""))
        if path:
            if is_nifti(path):
                jobs.append(PatientJob(**base, kind="nifti", path=path))
            else:
                pin = _text(getattr(r, "series_uid", ""))
                jobs.append(PatientJob(**base, kind="dicom_dir", path=path, series_uid=pin))
            continue
        if by_patient is None:
            errors.append(
                {
                    "patient_id": r.patient_id,
                    "file": "",
                    "reason": "no path in the manifest and no series index given",
                }
            )
            continue
        try:
            uid, files = resolve_series(
                series_index,
                by_patient.get(str(r.patient_id)),
                pin=pins.get(r.patient_id, ""),
                reindex=True,
            )
        except SeriesError as err:
            errors.append({"patient_id": r.patient_id, "file": err.path, "reason": err.reason})
            continue
        jobs.append(PatientJob(**base, kind="dicom", series_uid=uid, files=files))
    return jobs, errors


def load_patient_volume(job: PatientJob, preprocess: PreprocessConfig) -> tuple[HUVolume, str]:
    """The HU volume of a job, whatever its source kind, and its SeriesInstanceUID."""
    if job.path and not os.path.exists(job.path):
        raise SeriesError(job.path, "does not exist")
    if job.kind == "nifti":
        volume = load_nifti(job.path)
        # The floor DICOM series meet in the index: fewer slices is not a head CT volume.
        slices = volume.hu.shape[0]
        if slices < preprocess.min_slices:
            raise SeriesError(
                job.path, f"not eligible: too few slices ({slices} < {preprocess.min_slices})"
            )
        return volume, ""
    if job.kind == "dicom_dir":
        index = index_dicom_root(job.path, workers=1, progress=False)
        # The folder is the manifest patient's whatever PatientID its headers carry, so a pin
        # applies to every patient id found in it (a pin in an index goes by patient).
        pins = dict.fromkeys(index.series["patient_id"].astype(str), job.series_uid)
        chosen = choose_for(index.series, preprocess, pins if job.series_uid else None)
        uid, files = resolve_series(index, chosen, source=job.path, pin=job.series_uid)
        return load_series(files), uid
    return load_series(job.files), job.series_uid


@dataclass
class PreprocessedPatient:
    """One patient's cached-form array, before it is written anywhere."""

    job: PatientJob
    array: np.ndarray  # uint8 [N, size, size]
    positions: np.ndarray  # slab centres, mm along the slice normal
    series_uid: str
    warnings: list[str]


def preprocess_patient(job: PatientJob, preprocess: PreprocessConfig) -> PreprocessedPatient:
    """Load one patient's volume and apply steps 1, 2 and 4 of the preprocessing."""
    volume, series_uid = load_patient_volume(job, preprocess)
    array, positions = preprocess_volume(
        volume,
        slice_mm=preprocess.slab_mm,
        center=preprocess.window_center,
        width=preprocess.window_width,
        size=preprocess.size,
    )
    if array.shape[0] < 1:
        raise ValueError("no slices left after preprocessing")
    return PreprocessedPatient(job, array, positions, series_uid, list(volume.warnings))


def job_source(job: PatientJob) -> str:
    """Where a job's image is: the file or folder given, or the folder of its series' files
    (their common folder, absolute, as the index's ``directory``)."""
    if job.path:
        return job.path
    if job.files:
        return os.path.commonpath([os.path.dirname(f) for f in job.files]) or job.files[0]
    return job.series_uid


def failure_row(job: PatientJob, err: BaseException | str) -> dict:
    """The errors-table row of a failed patient: the file that failed and why (an exception,
    or the reason as text)."""
    if isinstance(err, SeriesError):
        return {"patient_id": job.patient_id, "file": err.path, "reason": err.reason}
    reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    file = job.path or (job.files[0] if job.files else "")
    return {"patient_id": job.patient_id, "file": file, "reason": reason}


def try_preprocess_patient(
    job: PatientJob, preprocess: PreprocessConfig
) -> PreprocessedPatient | dict:
    """Worker entry point: the preprocessed patient, or its failure row (never raises)."""
    try:
        return preprocess_patient(job, preprocess)
    except Exception as err:  # noqa: BLE001 - a batch job records every failure and goes on
        return failure_row(job, err)


def _prepare_one(job: PatientJob, root: str, preprocess: PreprocessConfig) -> dict:
    """Worker: preprocess and store one patient. Returns an index row or an error row."""
    result = try_preprocess_patient(job, preprocess)
    if isinstance(result, dict):
        return {"error": True, **result}
    row = {
        "patient_id": job.patient_id,
        "label": job.label,
        "split": job.split,
        "slice_mm": preprocess.slice_mm,
        "source_kind": job.kind,
        "series_uid": result.series_uid,
        "source": job_source(job),
        "warnings": " | ".join(result.warnings),
        "config_hash": preprocess.config_hash(),
    }
    try:
        return write_patient(Path(root), row, result.array, result.positions)
    except OSError as err:  # a full disk is every patient's error row, not the end of the batch
        return {"error": True, **failure_row(job, os_error_line(err))}


def _done_patients(root: Path, digest: str) -> dict[str, dict]:
    done = {}
    for sidecar in (root / "patients").glob("*.json"):
        row = json.loads(sidecar.read_text())
        if row.get("config_hash") == digest:
            done[row["patient_id"]] = row
    return done


def _errors_path(root: Path, num_shards: int, shard_id: int) -> Path:
    if num_shards == 1:
        return root / "errors.csv"
    return root / f"errors-shard{shard_id}-of{num_shards}.csv"


def _crash_row(job: PatientJob, reason: str) -> dict:
    return {"error": True, **failure_row(job, reason)}


SPACE_CHECK_AFTER = 1
"""Patients prepared before the free space is compared with what the others will need."""


def _warn_if_short_of_space(
    root: Path, preprocess: PreprocessConfig, row: dict, remaining: int
) -> None:
    """Warn early when the rest of the cache will not fit: a full disk otherwise shows only
    as an error row for every patient after it, hours into a run. The estimate is this
    patient's array size for each patient still to do (one head is much like another)."""
    need = int(row["num_slices"]) * preprocess.size**2 * remaining
    free = shutil.disk_usage(root).free
    if need > free:
        log.warning(
            "%s: about %.1f GB more are needed for %d more patients (like %s), %.1f GB are "
            "free; patients that do not fit become error rows (free space and run again: those "
            "done are kept)",
            root, need / 1e9, remaining, row["patient_id"], free / 1e9,
        )  # fmt: skip


def prepare_cache(
    labels: pd.DataFrame,
    out: str | Path,
    preprocess: PreprocessConfig,
    *,
    series_index=None,
    workers: int = 1,
    num_shards: int = 1,
    shard_id: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Preprocess every manifest patient into ``out``; failures are recorded, not raised."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    root = Path(out)
    write_meta(root, preprocess, overwrite=overwrite)
    digest = preprocess.config_hash()

    # Shard by manifest row so that every shard of an array job sees a fixed, disjoint share.
    jobs, errors = plan_jobs(labels.iloc[shard_id::num_shards], series_index, preprocess)
    done = _done_patients(root, digest)
    todo, skipped, changed = [], 0, 0
    for job in jobs:
        old = done.get(job.patient_id)
        if old is not None and job.series_uid and old.get("series_uid") != job.series_uid:
            # Another series than the one cached (a new pin, or the index now chooses
            # another): the array is the series', so it is made again.
            old, changed = None, changed + 1
        if old is None:
            todo.append(job)
            continue
        skipped += 1
        if (old["label"], old["split"]) != (job.label, job.split):
            # The manifest changed a label or split only: no need to recompute the array.
            old.update(label=job.label, split=job.split)
            atomic_write_text(root / "patients" / f"{Path(old['file']).stem}.json", json.dumps(old))
    if skipped or changed:
        log.info(
            "%d patients already prepared, %d to do (%d of them for another series)",
            skipped, len(todo), changed,
        )  # fmt: skip

    prepared = 0
    for result in map_jobs(
        _prepare_one,
        todo,
        str(root),
        preprocess,
        workers=workers,
        progress=progress,
        on_crash=_crash_row,
    ):
        if result.pop("error", False):
            errors.append(result)
            log.warning(
                "patient %s failed: %s: %s", result["patient_id"], result["file"], result["reason"]
            )
        else:
            prepared += 1
            if prepared == SPACE_CHECK_AFTER:
                _warn_if_short_of_space(root, preprocess, result, len(todo) - prepared)
    for error in errors:
        old = done.get(error["patient_id"])
        if old is not None:
            # Its array is of the series cached before; the sidecar is set aside so that no
            # shard's index lists it (each shard knows only its own failures).
            sidecar = root / "patients" / f"{Path(old['file']).stem}.json"
            if sidecar.is_file():
                os.replace(sidecar, sidecar.with_name(sidecar.name + ".superseded"))
    error_frame = pd.DataFrame(errors, columns=ERROR_COLUMNS)
    atomic_write_csv(_errors_path(root, num_shards, shard_id), error_frame)
    index = finalize_index(root, manifest=labels["patient_id"])
    return PrepareResult(prepared=prepared, skipped=skipped, errors=error_frame, index=index)


# --------------------------------------------------------------------------- predict's inputs


def jobs_for_inputs(
    inputs: Sequence[str | Path],
    preprocess: PreprocessConfig,
    workers: int = 1,
    progress: bool = False,
) -> tuple[list[PatientJob], list[Path], list]:
    """Sort the command line into DICOM/NIfTI jobs, caches, and failure rows; series in DICOM
    folders are chosen for the run's preprocessing, as ``prepare`` chose them. Headers are
    read by ``workers`` processes (a DICOM root of many patients is many thousand files)."""
    jobs: list[PatientJob] = []
    caches: list[Path] = []
    errors: list[dict] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file() and is_nifti(path):
            stem = path.name[: -len(".nii.gz")] if path.name.endswith(".gz") else path.stem
            jobs.append(PatientJob(patient_id=stem, label=-1, kind="nifti", path=str(path)))
        elif (path / "preprocess.json").is_file():
            caches.append(path)
        elif path.is_dir():
            index = index_dicom_root(path, workers=workers, progress=progress)
            series = choose_for(index.series, preprocess)
            for patient_id, rows in series.groupby("patient_id", sort=True):
                try:
                    uid, files = resolve_series(index, rows, source=str(path))
                except SeriesError as err:
                    errors.append(error_row(str(patient_id), err.path, err.reason))
                    continue
                jobs.append(
                    PatientJob(
                        patient_id=str(patient_id),
                        label=-1,
                        kind="dicom",
                        series_uid=uid,
                        files=files,
                    )
                )
            if series.empty:
                reason = f"no DICOM images found{unreadable_files(index.errors)}"
                errors.append(error_row(path.name, str(path), reason))
            errors += unreadable_patients(index, path.absolute())
            errors += imageless_patients(index, path.absolute())
        else:
            reason = "not a DICOM folder, NIfTI or cache" if path.exists() else "does not exist"
            errors.append(error_row(path.name, str(path), reason))
    return _unique_patients(jobs, errors), caches, errors


def _patient_depth(index: SeriesIndex, root: Path) -> int:
    """How deep under ``root`` patient folders lie: as deep as the shallowest readable patient's
    folder (the common folder of its series); 0 when a patient's own files lie at the root."""
    patient_folders = [
        os.path.commonpath(rows["directory"].astype(str).tolist())
        for _, rows in index.series.groupby("patient_id", sort=False)
    ]
    return min(len(Path(os.path.relpath(folder, root)).parts) for folder in patient_folders)


def imageless_patients(index: SeriesIndex, root: Path) -> list[dict]:
    """Error rows for the folders directly under a DICOM root of many patients that hold no
    file at all, or only files that are not DICOM (a failed export, a folder for images still
    to come): such a patient would otherwise have no row. One holding damaged DICOM files is
    :func:`unreadable_patients`'s. Only the root's own folders: deeper down, a folder without
    images beside a patient's series (reports, a viewer) is not a patient."""
    if index.series.empty or _patient_depth(index, root) == 0:
        return []

    def top(path: str) -> str:
        return Path(os.path.relpath(path, root)).parts[0]

    readable = {top(folder) for folder in index.series["directory"].astype(str)}
    damaged = {top(f) for f in index.errors.loc[index.errors["reason"] != NOT_DICOM, "path"]}
    rows = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith(".") or folder.name in readable | damaged:
            continue
        files = sorted(os.path.relpath(f, folder) for f in folder.rglob("*") if f.is_file())
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        what = f"{len(files)} files, none DICOM: {', '.join(files[:3])}{more}"
        reason = f"no DICOM images ({what if files else 'empty folder'})"
        rows.append(error_row(folder.name, str(folder), reason))
    return rows


def unreadable_patients(index: SeriesIndex, root: Path) -> list[dict]:
    """Error rows for the patient folders under a DICOM root whose files are all damaged.

    No header of theirs could be read, so no patient id and no series: the index has them
    among its errors only, and the patient would have no row at all. Patient folders are taken
    to lie as deep under the root as the shallowest readable patient's folder (the common
    folder of its series); a damaged file's folder at that depth that holds no readable series
    is a lost patient, named by its path under the root. (A root of one patient whose series lie
    in sibling folders makes an all-damaged series folder such a row too: reported, not lost.)
    """
    damaged = index.errors[index.errors["reason"] != NOT_DICOM]
    if damaged.empty or index.series.empty:
        return []

    def under_root(folder: str) -> tuple[str, ...]:
        return Path(os.path.relpath(folder, root)).parts

    depth = _patient_depth(index, root)
    if depth == 0:  # a patient's own files at the root: a damaged one is its series' concern
        return []
    readable = {under_root(folder)[:depth] for folder in index.series["directory"].astype(str)}
    lost: dict[tuple[str, ...], list[int]] = {}
    for i, path in damaged["path"].astype(str).items():
        key = under_root(os.path.dirname(path))[:depth]
        if len(key) == depth and key not in readable:
            lost.setdefault(key, []).append(i)
    return [
        error_row(
            "/".join(key),
            str(root.joinpath(*key)),
            f"no usable series: no DICOM file in this folder could be read"
            f"{unreadable_files(damaged.loc[rows])}",
        )
        for key, rows in sorted(lost.items())
    ]


def _unique_patients(jobs: list[PatientJob], errors: list[dict]) -> list[PatientJob]:
    """One job per patient id: a folder named twice (or inside a root also named) is read once;
    the same id from a different series is an error row, since the output is keyed by id."""
    seen: dict[str, PatientJob] = {}
    for job in jobs:
        first = seen.setdefault(job.patient_id, job)
        if first is job:
            continue
        if (first.series_uid, first.path) == (job.series_uid, job.path):
            log.info("patient %s was given more than once; predicted once", job.patient_id)
        else:
            errors.append(
                error_row(
                    job.patient_id,
                    job_source(job),
                    f"patient id already predicted from {job_source(first)} (one row per patient "
                    "id: predict this input on its own to score it)",
                )
            )
    return list(seen.values())


def error_row(patient_id: str, source: str, reason: str) -> dict:
    return {"patient_id": patient_id, "source": source, "error": reason}
