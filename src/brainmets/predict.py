"""``brainmets predict``: score new studies with a trained run (DICOM folders, NIfTI files
or a prepared cache) into ``predictions.csv``, with Grad-CAM heatmaps and DICOM results (an SR
and secondary captures, as ``serve`` sends them) on request.

Decoding runs in a process pool; scoring batches whole patients on the device. A patient that
cannot be read gets a row with its error and the others go on.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainmets import rundir
from brainmets.data.cache import CacheError, PatientCache, patient_stem
from brainmets.data.prepare import (
    PatientJob,
    PreprocessedPatient,
    error_row,
    failure_row,
    job_source,
    jobs_for_inputs,
    try_preprocess_patient,
)
from brainmets.data.workers import map_jobs
from brainmets.dicom_results import write_dicom_results
from brainmets.export import load_backend
from brainmets.heatmaps import update_heatmap_index, write_heatmaps
from brainmets.inference import TrainedModel, batch_by_slices
from brainmets.io import atomic_write_csv, exclusive_lock
from brainmets.model.scoring import PatientScore
from brainmets.ranking import RankingVerdict

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
) -> Iterator[PreprocessedPatient | dict]:
    """The cache's patients, and an error row for each whose files are damaged."""
    cache = PatientCache(cache_root)
    trained.check_cache(cache)
    skip = set(skip)
    for pid in cache.patient_ids:
        if pid in skip:
            continue
        row = cache.row(pid)
        try:
            positions = cache.positions(pid)
            array = np.asarray(cache.load(pid))
        except CacheError as err:
            yield error_row(pid, str(cache_root), str(err))
            continue
        yield PreprocessedPatient(
            PatientJob(patient_id=pid, label=int(row["label"]), path=str(cache_root)),
            array,
            positions if positions is not None else np.array([]),
            str(row["series_uid"]),
            [],
        )


@dataclass
class Prediction:
    """One scored patient: what predict writes as a row, with the arrays results are made of."""

    item: PreprocessedPatient
    score: PatientScore
    row: dict


def score_items(
    trained: TrainedModel, items: Iterable[PreprocessedPatient], batch_slices: int = 512
) -> Iterator[Prediction]:
    """Score preprocessed patients, batched by slices; the one scoring path of predict and
    serve (series choice and preprocessing come before it, in ``brainmets.data.prepare``)."""
    # One stream from the first patient to the last, so one batch stays in flight throughout.
    batches = batch_by_slices(items, batch_slices, size=lambda item: item.array.shape[0])
    flats = ((batch, *trained.scorer.concatenate([p.array for p in batch])) for batch in batches)
    for batch, scores in trained.scorer.score_batches(flats):
        for item, score in zip(batch, scores, strict=True):
            yield Prediction(item, score, _row(trained, item, score))


def predict_study(trained: TrainedModel, folder: str | Path) -> tuple[list[Prediction], list[dict]]:
    """Score the patients of one DICOM folder (serve's copy of a received study) in this
    process: series chosen and preprocessed as ``predict`` does for a folder. Returns the
    predictions and the rows of what failed (patient_id, source, error)."""
    jobs, _, errors = jobs_for_inputs([folder], trained.preprocess, workers=1)
    items = []
    for job in jobs:
        result = try_preprocess_patient(job, trained.preprocess)
        if isinstance(result, dict):
            errors.append(error_row(result["patient_id"], result["file"], result["reason"]))
        else:
            items.append(result)
    return list(score_items(trained, items)), errors


def _one_writer(predict_fn: Callable[..., PredictResult]) -> Callable[..., PredictResult]:
    """``predict`` owning its table: one process at a time writes it, a second is refused at
    once (two runs would each write their rows over the other's). The lock file beside the
    table is the first thing written, so an unwritable folder is reported before any work, as
    is an unwritable heatmaps folder."""

    @functools.wraps(predict_fn)
    def owning(run, inputs, *, out_csv=rundir.PREDICTIONS, heatmaps_dir=None, **options):
        out_csv = Path(out_csv)
        lock = out_csv.with_name(f".{out_csv.name}.lock")
        with exclusive_lock(lock, f"predictions table {out_csv}"):
            if heatmaps_dir:
                _check_writable(Path(heatmaps_dir))
            return predict_fn(run, inputs, out_csv=out_csv, heatmaps_dir=heatmaps_dir, **options)

    return owning


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(folder)) from err


@_one_writer
def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    out_csv: str | Path = rundir.PREDICTIONS,
    heatmaps_dir: str | Path | None = None,
    dicom_out: str | Path | None = None,
    top_k: int = 3,
    device: str = "auto",
    batch_slices: int = 512,
    workers: int | None = None,
    progress: bool = True,
    compile: bool = False,
    resume: bool = False,
    save_every_s: float = 60.0,
    backend: str = "torch",
    onnx: str | Path | None = None,
    url: str | None = None,
    triton_model: str = "brainmets",
) -> PredictResult:
    """Predict every patient found in ``inputs``; write ``out_csv`` (atomically) and heatmaps.

    Patients are scored together once ``batch_slices`` slices are waiting (a patient is
    never split); ``compile`` compiles the chunked forward (pays off for many patients on a
    GPU). The rows done so far are written every ``save_every_s`` seconds and when the run
    stops early (Ctrl-C, an error); ``resume`` keeps the patients ``out_csv`` already holds
    without an error and predicts the others. A second process writing the same ``out_csv``
    is refused (:func:`_one_writer`). ``backend`` ``onnxruntime`` scores with the run's ONNX
    export (``RUN/export``, or ``onnx``; see ``brainmets.export``), ``triton`` with the Triton
    server at ``url`` serving it as ``triton_model``."""
    trained = load_backend(
        run,
        backend,
        device=device,
        compile=compile,
        onnx=onnx,
        url=url,
        triton_model=triton_model,
        grad_cam=heatmaps_dir is not None,
    )
    verdict = RankingVerdict.from_sidecar(trained.sidecar)
    if verdict is not None and not verdict.ranks:
        log.warning("%s: %s", run, verdict.warning())
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
    for cache_root in caches:  # a cache the model cannot read fails now, before any work
        trained.check_cache(PatientCache(cache_root))
    rows = kept + rows
    workers = workers if workers is not None else max(min(len(jobs), cores), 1)
    heat_dir = Path(heatmaps_dir) if heatmaps_dir else None
    if heat_dir:
        heat_dir.mkdir(parents=True, exist_ok=True)

    # The bar counts patients finished (scored, heatmaps written, or failed), not patients
    # preprocessed: the workers run a batch or more ahead of the scoring.
    from_caches = sum(len(set(PatientCache(c).patient_ids) - set(done)) for c in caches)
    bar = tqdm(total=len(jobs) + from_caches, desc="predict", unit="patient", disable=not progress)
    # Until the first batch is scored (tens of seconds: worker start, a batch of decoding) the
    # bar shows the patients read so far.
    read = 0

    def count_read() -> None:
        nonlocal read
        read += 1
        bar.set_postfix_str(f"{read} read", refresh=True)

    def items() -> Iterator[PreprocessedPatient]:
        for result in map_jobs(
            try_preprocess_patient,
            jobs,
            trained.preprocess,
            workers=workers,
            progress=False,
            on_crash=failure_row,
        ):
            count_read()
            if isinstance(result, dict):
                rows.append(error_row(result["patient_id"], result["file"], result["reason"]))
                bar.update()
            else:
                yield result
        seen = {job.patient_id for job in jobs}
        for cache_root in caches:
            for item in _cache_items(cache_root, trained, skip=done):
                if isinstance(item, dict):
                    rows.append(item)
                    bar.update()
                    continue
                if item.job.patient_id in seen:
                    bar.total -= 1  # counted in the total, never finished
                    log.warning(
                        "patient %s of %s was already predicted; skipped",
                        item.job.patient_id,
                        cache_root,
                    )
                    continue
                seen.add(item.job.patient_id)
                count_read()
                yield item

    dicom_dir = Path(dicom_out) if dicom_out else None
    heat_rows: list[dict] = []

    def save(path: Path) -> pd.DataFrame:
        table = _prediction_table(rows)
        atomic_write_csv(path, table)
        if heat_dir and heat_rows:
            update_heatmap_index(heat_dir, heat_rows)
        return table

    last_save = time.monotonic()
    finished = False
    try:
        for prediction in score_items(trained, items(), batch_slices):
            item, score, row = prediction.item, prediction.score, prediction.row
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
            if dicom_dir:
                try:
                    _write_dicom(trained, item, score, dicom_dir, top_k)
                except Exception as err:  # noqa: BLE001 - a batch job records it and goes on
                    # The patient lacks an output asked for: failed, so --resume tries again.
                    row = {**row, "error": f"DICOM results: {type(err).__name__}: {err}"}
                    log.warning("patient %s: %s", item.job.patient_id, row["error"])
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
        # Stopped before any patient was done: nothing to keep, so no side file to resume from.
        table = save(out_csv if finished else partial) if finished or rows else None
        if finished:
            partial.unlink(missing_ok=True)
        elif table is not None:
            log.warning(
                "predict stopped early: the %d patients done are in %s; run the same command "
                "with --resume to predict the rest",
                len(table),
                partial,
            )
    return PredictResult(table, kept=len(kept))


def _write_dicom(
    trained: TrainedModel, item: PreprocessedPatient, score: PatientScore, out: Path, top_k: int
) -> None:
    """``--dicom-out``: the patient's SR and Grad-CAM captures in ``out/<patient>/``. A NIfTI
    file or a cache has no source study to put them in: said once per patient."""
    if not item.job.files:
        log.warning(
            "patient %s: no DICOM results (its input is %s, not DICOM)",
            item.job.patient_id,
            item.job.kind if item.job.kind == "nifti" else "a cache",
        )
        return
    write_dicom_results(trained, item, score, out / patient_stem(item.job.patient_id), top_k=top_k)


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
