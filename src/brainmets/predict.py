"""Score new studies with a trained run: DICOM folders, NIfTI files or a prepared cache.

A run folder is self-contained: ``model.safetensors`` and its JSON sidecar carry the
architecture, the preprocessing, the input normalisation, the operating threshold and the
probability calibration, so nothing else is needed. Decoding runs in a process pool; scoring
batches whole patients on the device. A patient that cannot be read gets a row with its error
and the others go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from tqdm.auto import tqdm

from brainmets.config import PreprocessConfig
from brainmets.data.cache import (
    PatientCache,
    PatientJob,
    PreprocessedPatient,
    choose_for,
    failure_row,
    is_nifti,
    job_source,
    map_jobs,
    patient_stem,
    try_preprocess_patient,
)
from brainmets.device import resolve_device
from brainmets.io import atomic_write_csv
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.probability import Calibration
from brainmets.model.resnet import BrainMetsNet
from brainmets.model.scoring import PatientScore, SliceScorer

log = logging.getLogger(__name__)

T = TypeVar("T")

PREDICTION_COLUMNS = [
    "patient_id",
    "probability",
    "decision",
    "threshold",
    "num_slices",
    "top_slice_index",
    "top_slice_position_mm",
    "series_uid",
    "source",
    "model",
    "error",
]


@dataclass
class TrainedModel:
    """A run's model with everything inference needs from its sidecar."""

    model: BrainMetsNet
    sidecar: dict
    device: torch.device
    scorer: SliceScorer

    @property
    def model_id(self) -> str:
        """The first 12 hex digits of the weights' SHA-256: which model scored a row."""
        return str(self.sidecar.get("weights", {}).get("sha256", ""))[:12]

    @property
    def raw_threshold(self) -> float:
        """The operating threshold as chosen in training, on the plain sigmoid."""
        threshold = self.sidecar.get("threshold")
        return 0.5 if threshold is None else float(threshold)

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_sidecar(self.sidecar)

    @property
    def threshold(self) -> float:
        """The operating threshold on the reported (calibrated) probability scale."""
        return self.calibration.threshold(self.raw_threshold)

    def probability(self, logits) -> np.ndarray:
        """Reported probability of patient (or slice) logits: calibrated when the run is."""
        return self.calibration.probability(logits)

    def decision(self, logits) -> np.ndarray:
        """1 where the patient is called positive: decided on the plain sigmoid against the
        threshold chosen there, so calibration cannot move a decision by rounding."""
        return (expit(np.asarray(logits, dtype=np.float64)) >= self.raw_threshold).astype(int)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.model_validate(self.sidecar["preprocess"])

    def check_cache(self, cache: PatientCache) -> None:
        """A cache prepared with other parameters than the model was trained on is refused."""
        if cache.config_hash != self.preprocess.config_hash():
            raise ValueError(
                f"{cache.root} was prepared with preprocessing {cache.preprocess.model_dump()}, "
                f"but the model expects {self.preprocess.model_dump()}; prepare the data again"
            )


def model_path(run: str | Path) -> Path:
    """``RUN/model.safetensors``, or the path itself when it names a weights file."""
    run = Path(run)
    path = run if run.suffix == ".safetensors" else run / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model here (is {run} a finished run?)")
    return path


def load_trained(
    run: str | Path, device: str = "auto", *, compile: bool = False, chunk: int | None = None
) -> TrainedModel:
    """The run's model on ``device``, scoring in chunks of ``chunk`` slices (default 256 on
    CUDA, 32 on the CPU, where activations of big chunks only cost memory; see
    ``brainmets.model.scoring``), compiled when ``compile``."""
    dev = resolve_device(device)
    chunk = chunk or (256 if dev.type == "cuda" else 32)
    model, sidecar = load_checkpoint(model_path(run), map_location="cpu")
    model.to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # one chunk shape: autotuned once
    normalization = sidecar.get("normalization", "zscore")
    scorer = SliceScorer(model, dev, normalization, chunk=chunk, compile=compile)
    return TrainedModel(model, sidecar, dev, scorer)


def batch_by_slices(items: Iterable[T], budget: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """Group whole patients into batches of at most ``budget`` slices (a patient never splits;
    one larger than the budget is a batch of its own). Lazy: items may come from a stream."""
    batch: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += n
    if batch:
        yield batch


# --------------------------------------------------------------------------- inputs


def jobs_for_inputs(
    inputs: Sequence[str | Path],
    preprocess: PreprocessConfig,
    workers: int = 1,
    progress: bool = False,
) -> tuple[list[PatientJob], list[Path], list]:
    """Sort the command line into DICOM/NIfTI jobs, caches, and failure rows; series in DICOM
    folders are chosen for the run's preprocessing, as ``prepare`` chose them. Headers are
    read by ``workers`` processes (a DICOM root of many patients is many thousand files)."""
    from brainmets.data.manifest import (
        damaged_beside,
        damaged_reason,
        index_dicom_root,
        patient_choice,
        series_files,
    )

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
                uid, why = patient_choice(rows)
                if uid is None:
                    # Only the unreadable files in this patient's series folders can explain
                    # it (a truncated slice); a README at the root is nobody's reason.
                    folders = tuple(str(d) + os.sep for d in rows["directory"])
                    beside = index.errors[index.errors["path"].astype(str).str.startswith(folders)]
                    reason = f"no usable series: {why}{_unreadable_files(beside)}"
                    errors.append(_error_row(str(patient_id), str(path), reason))
                    continue
                damaged = damaged_beside(index, uid)
                if len(damaged):
                    reason = damaged_reason(damaged, reindex=False)
                    errors.append(_error_row(str(patient_id), str(path), reason))
                    continue
                jobs.append(
                    PatientJob(
                        patient_id=str(patient_id),
                        label=-1,
                        kind="dicom",
                        series_uid=uid,
                        files=series_files(index, uid),
                    )
                )
            if series.empty:
                reason = f"no DICOM images found{_unreadable_files(index.errors)}"
                errors.append(_error_row(path.name, str(path), reason))
        else:
            reason = "not a DICOM folder, NIfTI or cache" if path.exists() else "does not exist"
            errors.append(_error_row(path.name, str(path), reason))
    return _unique_patients(jobs, errors), caches, errors


def _unreadable_files(index_errors: pd.DataFrame, shown: int = 3) -> str:
    """``"; unreadable: FILE (why), ..."`` for the files of a folder that were not DICOM or did
    not parse (a truncated file often explains a series that is too short), else ``""``."""
    if index_errors.empty:
        return ""
    listed = [f"{row.path} ({row.reason})" for row in index_errors.head(shown).itertuples()]
    more = len(index_errors) - shown
    return "; unreadable: " + ", ".join(listed) + (f" and {more} more" if more > 0 else "")


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
                _error_row(
                    job.patient_id,
                    job_source(job),
                    f"patient id already predicted from {job_source(first)} (one row per patient "
                    "id: predict this input on its own to score it)",
                )
            )
    return list(seen.values())


def _error_row(patient_id: str, source: str, reason: str) -> dict:
    return {"patient_id": patient_id, "source": source, "error": reason}


# --------------------------------------------------------------------------- heatmaps


def write_heatmaps(
    trained: TrainedModel,
    patient_id: str,
    array: np.ndarray,
    slice_logits: np.ndarray,
    out_dir: Path,
    top_k: int,
) -> list[dict]:
    """Grad-CAM of the ``top_k`` highest-scoring slices, over the windowed slice, as PNGs.

    Returns one row per image for ``heatmaps.csv`` (file name, patient, rank, slice, logit).
    """
    from brainmets.evaluate.heatmaps import grad_cam, save_overlay

    order = np.argsort(slice_logits)[::-1][:top_k]
    images = torch.from_numpy(np.ascontiguousarray(array[order])).to(trained.device)
    cams = grad_cam(trained.model, trained.scorer.network_inputs(images))
    paths = []
    for rank, (slice_index, cam) in enumerate(zip(order, cams, strict=True), start=1):
        path = out_dir / f"{patient_stem(patient_id)}_rank{rank}_slice{int(slice_index)}.png"
        logit = float(slice_logits[slice_index])
        title = f"{patient_id}  slice {int(slice_index)}  logit {logit:.2f}"
        if rank == 1:  # the max slice logit is the patient's score; p is calibrated for that only
            title += f" = patient score, p={float(trained.probability(logit)):.2f}"
        if not np.any(cam > 0):  # an all-zero map is a finding, not a rendering fault
            title += "  (Grad-CAM flat: no positive evidence)"
        save_overlay(array[slice_index], cam, path, title)
        paths.append(
            {
                "file": path.name,
                "patient_id": patient_id,
                "rank": rank,
                "slice_index": int(slice_index),
                "slice_logit": logit,
            }
        )
    return paths


HEATMAP_INDEX = "heatmaps.csv"
"""Beside the PNGs: which patient, rank and slice each shows, and the patient's probability,
so that the report can show the highest-scoring patients first."""


def _update_heatmap_index(heat_dir: Path, rows: list[dict]) -> None:
    """Add this call's heatmaps to the folder's index (a folder may collect several calls).

    A patient predicted again replaces its earlier heatmaps: their rows go, and so do their
    PNGs that this call did not write over, so the report shows one study per patient.
    """
    path = heat_dir / HEATMAP_INDEX
    table = pd.DataFrame(rows, columns=HEATMAP_COLUMNS)
    if path.is_file():
        old = pd.read_csv(path, dtype={"patient_id": str, "file": str})
        replaced = old["patient_id"].isin(table["patient_id"]) | old["file"].isin(table["file"])
        for name in set(old.loc[replaced, "file"]) - set(table["file"]):
            (heat_dir / name).unlink(missing_ok=True)
        table = pd.concat([old[~replaced], table], ignore_index=True)
    atomic_write_csv(path, table.sort_values(["patient_id", "rank"], kind="stable"))


HEATMAP_COLUMNS = ["file", "patient_id", "rank", "slice_index", "slice_logit", "probability"]


# --------------------------------------------------------------------------- predict


@dataclass
class PredictResult:
    table: pd.DataFrame
    kept: int = 0  # rows of an earlier run kept by --resume (counted in ``predicted``)

    @property
    def failed(self) -> int:
        return int((self.table["error"] != "").sum())

    @property
    def predicted(self) -> int:
        return len(self.table) - self.failed


def _row(trained: TrainedModel, item: PreprocessedPatient, score: PatientScore) -> dict:
    top = score.top_slice
    return {
        "patient_id": item.job.patient_id,
        "probability": float(trained.probability(score.logit)),
        "decision": int(trained.decision(score.logit)),
        "threshold": trained.threshold,
        "num_slices": int(item.array.shape[0]),
        "top_slice_index": top,
        # Positions are float32 in the headers' mm: two decimals are all they hold.
        "top_slice_position_mm": round(float(item.positions[top]), 2)
        if len(item.positions)
        else np.nan,
        "series_uid": item.series_uid,
        "source": job_source(item.job),
        "model": trained.model_id,
        "error": "",
    }


def _cache_items(
    cache_root: Path, trained: TrainedModel, skip: Iterable[str] = ()
) -> Iterator[PreprocessedPatient]:
    cache = PatientCache(cache_root)
    trained.check_cache(cache)
    skip = set(skip)
    for pid in cache.patient_ids:
        if pid in skip:
            continue
        row = cache.row(pid)
        positions = cache.positions(pid)
        array = np.asarray(cache.load(pid))
        yield PreprocessedPatient(
            PatientJob(patient_id=pid, label=int(row["label"]), path=str(cache_root)),
            array,
            positions if positions is not None else np.array([]),
            str(row["series_uid"]),
            [],
        )


def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    out_csv: str | Path = "predictions.csv",
    heatmaps_dir: str | Path | None = None,
    top_k: int = 3,
    device: str = "auto",
    batch_slices: int = 512,
    workers: int | None = None,
    progress: bool = True,
    compile: bool = False,
    resume: bool = False,
    save_every_s: float = 60.0,
) -> PredictResult:
    """Predict every patient found in ``inputs``; write ``out_csv`` (atomically) and heatmaps.

    Patients are scored together once ``batch_slices`` slices are waiting (a patient is
    never split); ``compile`` compiles the chunked forward (pays off for many patients on a
    GPU). The rows done so far are written every ``save_every_s`` seconds and when the run
    stops early (Ctrl-C, an error); ``resume`` keeps the patients ``out_csv`` already holds
    without an error and predicts the others."""
    trained = load_trained(run, device, compile=compile)
    out_csv = Path(out_csv)
    # Saves before the end go to a side file: a stopped rerun must not replace a complete
    # table written earlier to the same --out.
    partial = out_csv.with_name(out_csv.name + ".partial")
    _check_out(out_csv, partial, resume)
    source = partial if partial.is_file() else out_csv
    kept = _rows_to_keep(source, trained) if resume else []
    done = {str(row["patient_id"]) for row in kept}
    cores = os.cpu_count() or 1
    # An index bar for one DICOM root; for many patient folders, one bar each would scroll by.
    jobs, caches, rows = jobs_for_inputs(
        inputs, trained.preprocess, workers=workers or cores, progress=progress and len(inputs) == 1
    )
    if done:
        log.info("%d patients already in %s; predicting the others", len(done), source)
        jobs = [job for job in jobs if job.patient_id not in done]
        # Rows of inputs that failed before any scoring are made afresh and all kept: one may
        # be a second study of a patient done earlier, reported as such.
    rows = kept + rows
    workers = workers if workers is not None else max(min(len(jobs), cores), 1)
    heat_dir = Path(heatmaps_dir) if heatmaps_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)

    # The bar counts patients finished (scored, heatmaps written, or failed), not patients
    # preprocessed: the workers run a batch or more ahead of the scoring.
    from_caches = sum(len(set(PatientCache(c).patient_ids) - set(done)) for c in caches)
    bar = tqdm(total=len(jobs) + from_caches, desc="predict", unit="patient", disable=not progress)

    def items() -> Iterator[PreprocessedPatient]:
        for result in map_jobs(
            try_preprocess_patient,
            jobs,
            trained.preprocess,
            workers=workers,
            progress=False,
            on_crash=failure_row,
        ):
            if isinstance(result, dict):
                rows.append(_error_row(result["patient_id"], result["file"], result["reason"]))
                bar.update()
            else:
                yield result
        seen = {job.patient_id for job in jobs}
        for cache_root in caches:
            for item in _cache_items(cache_root, trained, skip=done):
                if item.job.patient_id in seen:
                    bar.total -= 1  # counted in the total, never finished
                    log.warning(
                        "patient %s of %s was already predicted; skipped",
                        item.job.patient_id,
                        cache_root,
                    )
                    continue
                seen.add(item.job.patient_id)
                yield item

    # One stream from the first patient to the last, so one batch stays in flight throughout.
    batches = batch_by_slices(items(), batch_slices, size=lambda item: item.array.shape[0])
    flats = ((batch, *trained.scorer.concatenate([p.array for p in batch])) for batch in batches)
    heat_rows: list[dict] = []

    def save(path: Path) -> pd.DataFrame:
        table = _prediction_table(rows)
        atomic_write_csv(path, table)
        if heat_dir and heat_rows:
            _update_heatmap_index(heat_dir, heat_rows)
        return table

    last_save = time.monotonic()
    finished = False
    try:
        for batch, scores in trained.scorer.score_batches(flats):
            for item, score in zip(batch, scores, strict=True):
                row = _row(trained, item, score)
                if heat_dir:
                    maps = write_heatmaps(
                        trained,
                        item.job.patient_id,
                        item.array,
                        score.slice_logits,
                        heat_dir,
                        top_k,
                    )
                    heat_rows += [{**m, "probability": row["probability"]} for m in maps]
                # Only now is the patient done: a stop during its heatmaps (seconds each) must
                # leave it for --resume, not saved without them.
                rows.append(row)
                bar.update()
            if time.monotonic() - last_save >= save_every_s:
                save(partial)  # a long run stopped by a crash or a kill keeps what it did
                last_save = time.monotonic()
        finished = True
    finally:
        bar.close()
        table = save(out_csv if finished else partial)
        if finished:
            partial.unlink(missing_ok=True)
        else:
            log.warning(
                "predict stopped early: the %d patients done are in %s; run the same command "
                "with --resume to predict the rest",
                len(table),
                partial,
            )
    return PredictResult(table, kept=len(kept))


def _prediction_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    table["error"] = table["error"].fillna("")
    # Whole numbers stay whole beside a failed row's empty cells (not 0.0, 14.0).
    for column in ("decision", "num_slices", "top_slice_index"):
        table[column] = table[column].astype("Int64")
    return table.sort_values("patient_id", kind="stable").reset_index(drop=True)


def _check_out(out_csv: Path, partial: Path, resume: bool) -> None:
    """Nothing done is lost: a stopped run's rows are kept unless the user says otherwise, and
    --out never replaces a file that is not a predictions table (a labels CSV given by
    mistake)."""
    if partial.is_file() and not resume:
        raise FileExistsError(
            f"{partial} holds the patients of a stopped predict run: add --resume to keep them "
            "and predict the rest, or delete it to start over"
        )
    if out_csv.is_file():
        try:
            columns = list(pd.read_csv(out_csv, nrows=0).columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            columns = []
        if columns != PREDICTION_COLUMNS:
            raise FileExistsError(
                f"{out_csv} exists and is not a predictions table of this brainmets version; "
                "choose another --out (it is not overwritten)"
            )


def _rows_to_keep(out_csv: Path, trained: TrainedModel) -> list[dict]:
    """``--resume``: the rows of an earlier run (its side file of a stopped run, else its
    finished table) that were predicted without an error (failed patients are tried again).
    They must come from the same model."""
    if not out_csv.is_file():
        return []
    text = ("patient_id", "series_uid", "source", "model", "error")
    old = pd.read_csv(out_csv, dtype=dict.fromkeys(text, str))
    old[list(text)] = old[list(text)].fillna("")
    ok = old[old["error"] == ""]
    models = sorted(set(ok["model"]))
    if models and models != [trained.model_id]:
        raise ValueError(
            f"{out_csv}: its rows were predicted by model {', '.join(models)}, this run's is "
            f"{trained.model_id} (the weights' checksum): write to a new --out instead"
        )
    return ok.to_dict("records")
