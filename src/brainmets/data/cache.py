"""The preprocessing cache: ``prepare`` writes it, training and evaluation read it.

Layout of a cache directory::

    preprocess.json        the preprocessing parameters and their hash
    patients/<stem>.npy    uint8 [N, size, size], the brain window [0, 80] HU as 0..255
    patients/<stem>.json   the patient's index row (written after its array: the marker of done)
    index.csv              one row per prepared patient, rebuilt from the sidecars
    errors.csv             every patient that failed, with the file and the reason
                           (``errors-shard<K>-of<N>.csv`` for a sharded run)

Resuming is per patient: a patient whose sidecar carries the current preprocessing hash is
skipped, so a killed ``prepare`` continues where it stopped, and shards of an array job can
share one directory. A cache prepared with other parameters is never reused silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainmets.config import PreprocessConfig
from brainmets.io import atomic_save_npy, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)
T = TypeVar("T")

INDEX_COLUMNS = [
    "patient_id",
    "label",
    "split",
    "num_slices",
    "slice_mm",
    "file",
    "source_kind",
    "series_uid",
    "source",
    "warnings",
    "config_hash",
]
ERROR_COLUMNS = ["patient_id", "file", "reason"]
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class CacheError(RuntimeError):
    """A cache that is missing, incomplete or prepared with other parameters."""


def patient_stem(patient_id: str) -> str:
    """A file name for a patient id; ids with unsafe characters get a digest to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id).strip(".") or "patient"
    if safe != patient_id:
        safe = f"{safe[:64]}-{hashlib.sha1(patient_id.encode()).hexdigest()[:8]}"
    return safe


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


# --------------------------------------------------------------------------- reading


class PatientCache:
    """Read access to a prepared cache; arrays are memory-mapped, not loaded."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "preprocess.json"
        index_path = self.root / "index.csv"
        if not meta_path.is_file():
            raise CacheError(
                f"{self.root}: not a brainmets cache (no preprocess.json); "
                "create one with `brainmets prepare`"
            )
        if not index_path.is_file():
            raise CacheError(
                f"{self.root}: cache has no index.csv; run `brainmets prepare` "
                "again on it to finish (patients already done are kept)"
            )
        meta = json.loads(meta_path.read_text())
        self.preprocess = PreprocessConfig.model_validate(meta["preprocess"])
        self.config_hash: str = meta["config_hash"]
        index = pd.read_csv(
            index_path, dtype={"patient_id": str, "split": str}, keep_default_na=False
        )
        stale = index[index["config_hash"] != self.config_hash]
        if len(stale):
            raise CacheError(
                f"{index_path}: {len(stale)} rows were prepared with other "
                "preprocessing parameters; run `brainmets prepare` again"
            )
        self.index = index.reset_index(drop=True)
        self._rows = {pid: i for i, pid in enumerate(self.index["patient_id"])}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, patient_id: object) -> bool:
        return patient_id in self._rows

    @property
    def patient_ids(self) -> list[str]:
        return list(self.index["patient_id"])

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].to_numpy(dtype=np.int64)

    def row(self, patient_id: str) -> pd.Series:
        try:
            return self.index.iloc[self._rows[patient_id]]
        except KeyError:
            raise KeyError(f"patient {patient_id!r} is not in the cache {self.root}") from None

    def load(self, patient_id: str) -> np.ndarray:
        """uint8 [N, size, size], memory-mapped read-only."""
        return np.load(self.root / "patients" / self.row(patient_id)["file"], mmap_mode="r")

    def positions(self, patient_id: str) -> np.ndarray | None:
        """Slab positions (mm along the slice normal) when prepare recorded them."""
        path = self.root / "patients" / (Path(self.row(patient_id)["file"]).stem + ".pos.npy")
        return np.load(path) if path.is_file() else None


# --------------------------------------------------------------------------- writing


def _write_meta(root: Path, preprocess: PreprocessConfig, *, overwrite: bool) -> None:
    """Create the cache or check that an existing one used the same parameters."""
    meta_path = root / "preprocess.json"
    digest = preprocess.config_hash()
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("config_hash") == digest:
            return
        if not overwrite:
            changed = {
                k: (old.get("preprocess", {}).get(k), v)
                for k, v in preprocess.model_dump(mode="json").items()
                if old.get("preprocess", {}).get(k) != v
            }
            raise CacheError(
                f"{root} was prepared with other preprocessing parameters "
                f"(old -> new: {changed}); use another --out directory or --overwrite"
            )
        log.warning("%s: preprocessing changed, discarding the old cache", root)
        for stale in (root / "patients").glob("*"):
            stale.unlink()
        (root / "index.csv").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "patients").mkdir(exist_ok=True)
    atomic_write_text(
        meta_path,
        json.dumps(
            {"preprocess": preprocess.model_dump(mode="json"), "config_hash": digest}, indent=2
        ),
    )


def _write_patient(
    root: Path, row: dict, array: np.ndarray, positions: np.ndarray | None = None
) -> dict:
    stem = patient_stem(row["patient_id"])
    row = {**row, "file": f"{stem}.npy", "num_slices": int(array.shape[0])}
    atomic_save_npy(root / "patients" / f"{stem}.npy", np.ascontiguousarray(array, np.uint8))
    if positions is not None:
        atomic_save_npy(root / "patients" / f"{stem}.pos.npy", np.asarray(positions, np.float64))
    # The sidecar goes last: its presence means the patient is complete.
    atomic_write_text(root / "patients" / f"{stem}.json", json.dumps(row))
    return row


def finalize_index(root: str | Path, manifest: Iterable[str] | None = None) -> pd.DataFrame:
    """Rebuild index.csv from the per-patient sidecars that match the cache's parameters.

    With ``manifest`` (the patient ids of the labels file, all shards'), a patient cached by
    an earlier run but no longer in the manifest is left out of the index, so that it is not
    trained on with its old label; its files stay, to be reused if it comes back. (A patient
    that failed in ``prepare`` has its earlier sidecar set aside there, so it is not listed.)
    """
    root = Path(root)
    digest = json.loads((root / "preprocess.json").read_text())["config_hash"]
    wanted = None if manifest is None else {str(p) for p in manifest}
    rows, dropped = [], []
    for sidecar in sorted((root / "patients").glob("*.json")):
        row = json.loads(sidecar.read_text())
        if row.get("config_hash") != digest:
            continue
        patient = str(row["patient_id"])
        if wanted is not None and patient not in wanted:
            dropped.append(patient)
        else:
            rows.append(row)
    if dropped:
        log.info(
            "%d cached patients left out of the index (not in the manifest; their files are "
            "kept): %s",
            len(dropped),
            ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10 else ""),
        )
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    index = index.sort_values("patient_id", kind="stable").reset_index(drop=True)
    atomic_write_csv(root / "index.csv", index)
    return index


def build_cache_from_arrays(
    root: str | Path,
    patients: Iterable[tuple[str, int, np.ndarray]],
    preprocess: PreprocessConfig,
    splits: Mapping[str, str] | None = None,
) -> PatientCache:
    """Write already-windowed uint8 volumes as a cache (tests, synthetic benchmarks)."""
    root = Path(root)
    _write_meta(root, preprocess, overwrite=True)
    digest = preprocess.config_hash()
    for patient_id, label, array in patients:
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(
                f"patient {patient_id}: expected uint8 [N,H,W], got {array.dtype} {array.shape}"
            )
        _write_patient(
            root,
            {
                "patient_id": patient_id,
                "label": int(label),
                "split": (splits or {}).get(patient_id, ""),
                "slice_mm": preprocess.slice_mm,
                "source_kind": "array",
                "series_uid": "",
                "source": "",
                "warnings": "",
                "config_hash": digest,
            },
            array,
        )
    finalize_index(root)
    return PatientCache(root)


# --------------------------------------------------------------------------- prepare


@dataclass
class PatientJob:
    """Where one patient's image comes from."""

    patient_id: str
    label: int
    split: str = ""
    kind: str = "dicom"  # dicom (files of one series) | dicom_dir | nifti
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
    labels: pd.DataFrame, series_index=None, preprocess: PreprocessConfig | None = None
) -> tuple[list[PatientJob], list[dict]]:
    """One job per manifest patient; patients with no usable series become error rows.

    A ``path`` column (NIfTI file or a patient's DICOM folder) wins over the series index;
    a ``series_uid`` column pins the series instead of the automatic choice, in the index or
    in the patient's folder (a NIfTI file holds one volume: there is nothing to pin).
    """
    from brainmets.data.manifest import (
        damaged_beside,
        damaged_reason,
        patient_choice,
        series_files,
    )

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
        rows = by_patient.get(str(r.patient_id))
        uid, why = patient_choice(rows) if rows is not None else (None, "patient not in the index")
        pin = pins.get(r.patient_id)
        if uid is None and pin and rows is not None:  # the pin's own reason, said once
            pinned = rows[rows["series_uid"] == pin]
            why = (
                f"{pin}: {pinned['reason'].iloc[0]}"
                if len(pinned)
                else f"pinned series {pin} not in the index for this patient "
                f"(its series: {', '.join(rows['series_uid'])})"
            )
        if uid is None:
            errors.append(
                {"patient_id": r.patient_id, "file": "", "reason": f"no usable series ({why})"}
            )
            continue
        job = PatientJob(
            **base, kind="dicom", series_uid=uid, files=series_files(series_index, uid)
        )
        damaged = damaged_beside(series_index, uid)
        if len(damaged):
            reason = damaged_reason(damaged, reindex=True)
            errors.append({"patient_id": r.patient_id, "file": job_source(job), "reason": reason})
            continue
        jobs.append(job)
    return jobs, errors


def choose_for(
    series: pd.DataFrame, preprocess: PreprocessConfig, pins: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """``choose_series`` for these preprocessing parameters: the slab thickness is the target
    (5 mm when slices stay native) and ``min_slices`` the floor, wherever series are chosen
    (``prepare`` from an index or from patient folders, ``predict`` from folders)."""
    from brainmets.data.manifest import choose_series

    return choose_series(
        series, target_mm=preprocess.slab_mm or 5.0, min_slices=preprocess.min_slices, pins=pins
    )


def load_patient_volume(job: PatientJob, preprocess: PreprocessConfig):
    """The HU volume of a job, whatever its source kind, and its SeriesInstanceUID."""
    from brainmets.data.dicom import SeriesError, load_series
    from brainmets.data.manifest import (
        damaged_beside,
        damaged_reason,
        index_dicom_root,
        ineligibility,
        patient_choice,
        series_files,
    )
    from brainmets.data.nifti import load_nifti

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
        if job.series_uid:
            # The folder is the manifest patient's whatever PatientID its headers carry, so
            # the pin is looked up by UID alone (a pin in an index goes by patient).
            pinned = index.series[index.series["series_uid"] == job.series_uid]
            if pinned.empty:
                found = ", ".join(index.series["series_uid"]) or "none"
                raise SeriesError(
                    job.path,
                    f"pinned series {job.series_uid} not in this folder (series found: {found})",
                )
            why_not = ineligibility(pinned.iloc[0], preprocess.min_slices)
            if why_not:
                raise SeriesError(job.path, f"pinned series {job.series_uid} is {why_not}")
            uid = job.series_uid
        else:
            uid, why = patient_choice(choose_for(index.series, preprocess))
            if uid is None:
                raise SeriesError(job.path, f"no usable CT series ({why})")
        damaged = damaged_beside(index, uid)
        if len(damaged):
            raise SeriesError(job.path, damaged_reason(damaged, reindex=False))
        return load_series(series_files(index, uid)), uid
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
    from brainmets.data.volume import preprocess_volume

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
    from brainmets.data.dicom import SeriesError

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
    return _write_patient(Path(root), row, result.array, result.positions)


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


# glibc's mallopt parameters (malloc.h) and the size below which freed memory is kept.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW_BYTES, _FALLBACK_BELOW_BYTES = 1 << 30, 32 << 20


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of returning it to the system.

    glibc serves every allocation above 32 MB (a volume of 40 slices of 512² in float32
    is 42 MB) with fresh pages from the kernel and gives them back when freed, so each
    patient's HU volume, slabs and windowed copy page-faulted and zeroed again: measured
    with ``benchmarks/preprocess_throughput.py``, half of the decode time and two thirds of
    the window's. Raising the mmap and trim thresholds to 1 GiB keeps those pages in the
    heap for the next patient; the process keeps its peak memory instead. Used by prepare's
    and predict's workers and in-process by their CLI commands. True when both thresholds
    took; False on other systems than Linux, without glibc's ``mallopt`` (musl), or where
    glibc caps the mmap threshold at 32 MiB (then that much is set).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES)
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES):
        return bool(trimmed)
    # Older glibc (2.26 and earlier at least) refuses an mmap threshold above 32 MiB:
    # take that, which still keeps every per-slice array and the smaller volumes.
    mallopt(_M_MMAP_THRESHOLD, _FALLBACK_BELOW_BYTES)
    log.debug("glibc refused a 1 GiB mmap threshold; arrays above 32 MiB still come and go")
    return False


def init_worker() -> bool:
    """Pool initializer for prepare's and predict's decoding workers; returns whether freed
    memory is kept (:func:`keep_freed_memory`).

    The parallelism is the processes', so each worker uses one thread. The CLI's workers
    never import torch unless the resize needs it (uncommon sizes): the environment variable
    makes its thread pool start at one then. A worker whose parent's main script imported
    torch (spawn runs that script again first) has it already: set it. Each worker also
    keeps the memory it frees (:func:`keep_freed_memory`): it decodes one patient after
    another, with arrays of the same few sizes.
    """
    # Ctrl-C reaches the whole process group: the parent stops the run and records it; a
    # worker that raised KeyboardInterrupt too would only print its traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    return keep_freed_memory()


WORKER_DIED = (
    "the worker process died while preparing this patient (a crash in a decoder library, or "
    "killed for lack of memory); the other patients went on"
)


def map_jobs(
    fn: Callable[..., T],
    jobs: Sequence[PatientJob],
    *args,
    workers: int = 1,
    progress: bool = True,
    desc: str = "prepare",
    on_crash: Callable[[PatientJob, str], T] | None = None,
) -> Iterator[T]:
    """``fn(job, *args)`` for every job, in worker processes when ``workers`` > 1.

    Results come in completion order; a progress bar counts patients. Each worker is a
    one-process pool that gets one job at a time, so a worker that dies (a decoder's
    segfault, the OOM killer) is known to have died on that job: ``on_crash(job, reason)``
    gives its result and a new worker takes the slot. One shared pool would fail every job
    in flight and stop the batch. Without ``on_crash`` the crash is raised.
    """
    bar = tqdm(total=len(jobs), desc=desc, unit="patient", disable=not progress)
    slots: list[ProcessPoolExecutor] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job, *args)
                bar.update()
            return
        # spawn, not fork: the parent may hold torch threads and open file handles.
        context = get_context("spawn")

        def new_worker() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(1, mp_context=context, initializer=init_worker)

        pending = list(reversed(jobs))  # pop() from the end takes them in manifest order
        running: dict[Future, tuple[int, PatientJob]] = {}

        def start(slot: int) -> None:
            job = pending.pop()
            running[slots[slot].submit(fn, job, *args)] = (slot, job)

        def start_new(slot: int) -> None:
            # A worker's process starts at its first job. Started with SIGINT ignored, it
            # ignores Ctrl-C from its first instruction: init_worker comes only after its
            # imports, and a Ctrl-C meanwhile printed each worker's traceback.
            with _sigint_ignored():
                start(slot)

        for slot in range(min(workers, len(jobs))):
            slots.append(new_worker())
            start_new(slot)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                slot, job = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    if on_crash is None:
                        raise
                    slots[slot].shutdown(wait=False)
                    slots[slot] = new_worker()
                    result = on_crash(job, WORKER_DIED)
                    if pending:
                        start_new(slot)
                else:
                    if pending:  # before yielding: the worker goes on while the caller writes
                        start(slot)
                yield result
                bar.update()
    finally:
        for worker in slots:
            worker.shutdown(wait=True, cancel_futures=True)
        bar.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process meanwhile (processes started now inherit that); in the
    main thread only, the one thread Python lets change signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _crash_row(job: PatientJob, reason: str) -> dict:
    return {"error": True, **failure_row(job, reason)}


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
    _write_meta(root, preprocess, overwrite=overwrite)
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
