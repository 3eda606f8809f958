"""``brainmets predict``: score new studies with a trained run (DICOM folders, NIfTI files
or a prepared cache) into ``predictions.csv``, with Grad-CAM heatmaps and DICOM results (an SR
and secondary captures, as ``serve`` sends them) on request.

Decoding runs in a process pool; scoring batches whole patients on the device. A patient that
cannot be read gets a row with its error and the others go on.

A large archive is scored by many workers at once: ``--num-shards N --shard-id K`` scores the
patients whose id hashes to shard K (the same share whatever the order or the set of inputs
each worker lists) into its own table ``OUT-shardK-ofN.csv`` (resumable on its own), and the
worker that completes the set merges the N tables into ``OUT``. Shard tables rather than one
shared table: N writers of one file on a cluster's shared file system would need a lock that
waits, and a stopped worker would hold up all the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainmets import rundir
from brainmets.backends import BackendSpec, load_backend
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
from brainmets.dicomweb import post_results
from brainmets.heatmaps import update_heatmap_index, write_heatmaps
from brainmets.inference import TrainedModel, batch_by_slices
from brainmets.io import InUseError, atomic_write_csv, exclusive_lock
from brainmets.model.scoring import PatientScore
from brainmets.ranking import RankingVerdict

log = logging.getLogger(__name__)

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
    merged: Path | None = None  # the table the shards were merged into, by this call

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


class PredictionsTable:
    """``predictions.csv`` while predict fills it: one writer at a time, the rows of a stopped
    run kept in ``OUT.partial`` (saved every ``save_every_s`` seconds and when the run stops),
    ``--resume`` from them, and the heatmap index beside the rows it belongs to."""

    def __init__(
        self,
        out_csv: str | Path,
        heatmaps_dir: str | Path | None = None,
        save_every_s: float = 60.0,
        heatmap_index: str = rundir.HEATMAP_INDEX,
    ) -> None:
        self.path = Path(out_csv)
        self.heatmap_index = heatmap_index
        # Saves before the end go to a side file: a stopped rerun must not replace a complete
        # table written earlier to the same --out.
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.heat_dir = Path(heatmaps_dir) if heatmaps_dir else None
        self.save_every_s = save_every_s
        self.rows: list[dict] = []
        self.heat_rows: list[dict] = []
        self.kept = 0
        self._last_save = time.monotonic()

    @contextlib.contextmanager
    def owned(self) -> Iterator[PredictionsTable]:
        """One process at a time writes the table; a second is refused at once (two runs would
        each write their rows over the other's). The lock file is the first thing written, so
        an unwritable folder is reported before any work, as is an unwritable heatmaps
        folder; it is removed when the table is done."""
        lock = self.path.with_name(f".{self.path.name}.lock")
        with exclusive_lock(lock, f"predictions table {self.path}", remove=True):
            if self.heat_dir:
                _check_writable(self.heat_dir)
            yield self

    def open(self, resume: bool, model_id: str) -> set[str]:
        """Start the table; with ``resume``, keep the rows of the earlier run (its side file of
        a stopped run, else its finished table) and return their patients."""
        _check_out(self.path, self.partial, resume)
        source = self.partial if self.partial.is_file() else self.path
        kept = _rows_to_keep(source, model_id) if resume else []
        self.rows = list(kept)
        self.kept = len(kept)
        done = {str(row["patient_id"]) for row in kept}
        if done:
            log.info("%d patients already in %s; predicting the others", len(done), source)
        return done

    def add(self, row: dict, heat_rows: Sequence[dict] = ()) -> None:
        """One patient done; a long run saves what it has every ``save_every_s`` seconds, so
        a crash or a kill keeps it."""
        self.rows.append(row)
        self.heat_rows += heat_rows
        if time.monotonic() - self._last_save >= self.save_every_s:
            self._save(self.partial)
            self._last_save = time.monotonic()

    def close(self, finished: bool) -> pd.DataFrame:
        """The final table, or, for a run stopped early, the side file to resume from (none
        when no patient was done)."""
        if finished:
            table = self._save(self.path)
            self.partial.unlink(missing_ok=True)
            return table
        table = _prediction_table(self.rows)
        if self.rows:
            self._save(self.partial)
            log.warning(
                "predict stopped early: the %d patients done are in %s; run the same command "
                "with --resume to predict the rest",
                len(table),
                self.partial,
            )
        return table

    def _save(self, path: Path) -> pd.DataFrame:
        table = _prediction_table(self.rows)
        atomic_write_csv(path, table)
        if self.heat_dir and self.heat_rows:
            update_heatmap_index(self.heat_dir, self.heat_rows, self.heatmap_index)
        return table


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(folder)) from err


class _PatientStream:
    """The patients to score, in order: decoded by the worker pool from DICOM or NIfTI, then
    read from caches; what cannot be read becomes an error row of ``table``. ``bar`` counts
    patients finished, and until the first batch is scored (tens of seconds: worker start, a
    batch of decoding) shows the patients read so far."""

    def __init__(self, trained, jobs, caches, done, table, workers: int, progress: bool):
        self.trained, self.jobs, self.caches, self.done = trained, jobs, caches, done
        self.table = table
        self.workers = workers
        from_caches = sum(len(set(PatientCache(c).patient_ids) - set(done)) for c in caches)
        self.bar = tqdm(
            total=len(jobs) + from_caches, desc="predict", unit="patient", disable=not progress
        )
        self.read = 0

    def _count_read(self) -> None:
        self.read += 1
        self.bar.set_postfix_str(f"{self.read} read", refresh=True)

    def _failed(self, row: dict) -> None:
        self.table.rows.append(row)
        self.bar.update()

    def __iter__(self) -> Iterator[PreprocessedPatient]:
        for result in map_jobs(
            try_preprocess_patient,
            self.jobs,
            self.trained.preprocess,
            workers=self.workers,
            progress=False,
            on_crash=failure_row,
        ):
            self._count_read()
            if isinstance(result, dict):
                self._failed(error_row(result["patient_id"], result["file"], result["reason"]))
            else:
                yield result
        seen = {job.patient_id for job in self.jobs}
        for cache_root in self.caches:
            for item in _cache_items(cache_root, self.trained, skip=self.done):
                if isinstance(item, dict):
                    self._failed(item)
                    continue
                if item.job.patient_id in seen:
                    self.bar.total -= 1  # counted in the total, never finished
                    log.warning(
                        "patient %s of %s was already predicted; skipped",
                        item.job.patient_id,
                        cache_root,
                    )
                    continue
                seen.add(item.job.patient_id)
                self._count_read()
                yield item


def predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    backend: BackendSpec | None = None,
    out_csv: str | Path = rundir.PREDICTIONS,
    heatmaps_dir: str | Path | None = None,
    dicom_out: str | Path | None = None,
    stow_url: str | None = None,
    top_k: int = 3,
    batch_slices: int = 512,
    workers: int | None = None,
    progress: bool = True,
    resume: bool = False,
    save_every_s: float = 60.0,
    num_shards: int = 1,
    shard_id: int = 0,
) -> PredictResult:
    """Predict every patient found in ``inputs``; write ``out_csv`` (atomically) and heatmaps.
    With ``num_shards`` > 1, only shard ``shard_id``'s patients, into its shard table; the
    call that finds every shard table finished merges them into ``out_csv``.

    ``backend`` says how to score (default PyTorch on the best device; see
    ``brainmets.backends``). Patients are scored together once ``batch_slices`` slices are
    waiting (a patient is never split). The rows done so far are written every
    ``save_every_s`` seconds and when the run stops early (Ctrl-C, an error); ``resume`` keeps
    the patients ``out_csv`` already holds without an error and predicts the others. A second
    process writing the same ``out_csv`` is refused (:class:`PredictionsTable`). DICOM results
    go to ``dicom_out``, and are posted to ``stow_url`` (STOW-RS) when given."""
    shard = Shard(num_shards, shard_id)
    table = PredictionsTable(
        shard.table(out_csv), heatmaps_dir, save_every_s, shard.table(rundir.HEATMAP_INDEX)
    )
    with table.owned():
        # Grad-CAM comes from the run's PyTorch weights: heatmaps and DICOM captures need them.
        wants_maps = heatmaps_dir is not None or dicom_out is not None or stow_url is not None
        trained = load_backend(run, backend, grad_cam=wants_maps)
        verdict = RankingVerdict.from_sidecar(trained.sidecar)
        if verdict is not None and not verdict.ranks:
            log.warning("%s: %s", run, verdict.warning())
        done = table.open(resume, trained.model_id)
        cores = os.cpu_count() or 1
        # An index bar for one DICOM root; for many patient folders, one bar each would scroll.
        jobs, caches, failed = jobs_for_inputs(
            inputs, trained.preprocess, workers=workers or cores,
            progress=progress and len(inputs) == 1,
        )  # fmt: skip
        # Rows of inputs that failed before any scoring are made afresh and all kept: one may
        # be a second study of a patient done earlier, reported as such.
        jobs = [job for job in jobs if job.patient_id not in done and shard.has(job.patient_id)]
        for cache_root in caches:  # a cache the model cannot read fails now, before any work
            cache = PatientCache(cache_root)
            trained.check_cache(cache)
            done = done | {p for p in cache.patient_ids if not shard.has(p)}  # not scored here
        table.rows += [row for row in failed if shard.has(row["patient_id"])]
        workers = workers if workers is not None else max(min(len(jobs), cores), 1)
        stream = _PatientStream(trained, jobs, caches, done, table, workers, progress)
        finished = False
        try:
            for prediction in score_items(trained, stream, batch_slices):
                row, heat_rows = _outputs(
                    trained, prediction, table.heat_dir, dicom_out, top_k, stow_url
                )
                # Only now is the patient done: a stop during its heatmaps (seconds each) must
                # leave it for --resume, not saved without them.
                table.add(row, heat_rows)
                stream.bar.update()
            finished = True
        finally:
            stream.bar.close()
            frame = table.close(finished)
    merged = shard.merge(out_csv, heatmaps_dir) if finished and shard.count > 1 else None
    return PredictResult(frame, kept=table.kept, merged=merged)


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the patients whose id hashes to it, and its tables."""

    count: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(
                f"--shard-id {self.index} must be in [0, --num-shards {self.count}), and "
                "--num-shards at least 1"
            )

    def has(self, patient_id: str) -> bool:
        """By a hash of the id, so that every worker takes the same share of an archive."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(str(patient_id).encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def table(self, path: str | Path, index: int | None = None) -> Path:
        """``OUT-shardK-ofN.csv`` beside ``OUT`` (``OUT`` itself without sharding)."""
        path = Path(path)
        if self.count == 1:
            return path
        k = self.index if index is None else index
        return path.with_name(f"{path.stem}-shard{k}-of{self.count}{path.suffix}")

    def merge(self, out_csv: str | Path, heatmaps_dir: str | Path | None) -> Path | None:
        """Every shard's table into ``out_csv`` once all are finished (None until then, or
        while another worker merges)."""
        out_csv = Path(out_csv)
        tables = [self.table(out_csv, k) for k in range(self.count)]
        waiting = [k for k, t in enumerate(tables) if not t.is_file()]
        waiting += [k for k, t in enumerate(tables) if t.with_name(t.name + ".partial").is_file()]
        if waiting:
            log.info("shards %s of %d not finished yet: the last one to finish merges them into "
                     "%s", sorted(set(waiting)), self.count, out_csv)  # fmt: skip
            return None
        try:
            with exclusive_lock(out_csv.with_name(f".{out_csv.name}.lock"), f"{out_csv}"):
                _check_out(out_csv, out_csv.with_name(out_csv.name + ".partial"), False)
                rows = [_read_table(t) for t in tables]
                merged = pd.concat(rows, ignore_index=True)
                twice = merged["patient_id"][merged["patient_id"].duplicated()]
                models = sorted(set(merged.loc[merged["error"] == "", "model"]))
                if len(twice) or len(models) > 1:
                    raise ValueError(
                        f"the shard tables of {out_csv} do not make one table ("
                        + (f"patients in two shards: {sorted(set(twice))[:5]}" if len(twice)
                           else f"models {models}")
                        + "): give every shard the same run and inputs"
                    )  # fmt: skip
                atomic_write_csv(out_csv, _prediction_table(merged.to_dict("records")))
                if heatmaps_dir is not None:
                    _merge_heatmap_indexes(Path(heatmaps_dir), self)
        except InUseError:
            return None  # another worker finished at the same time and merges
        return out_csv


def _read_table(path: Path) -> pd.DataFrame:
    text = ("patient_id", "series_uid", "source", "model", "error")
    table = pd.read_csv(path, dtype=dict.fromkeys(text, str))
    table[list(text)] = table[list(text)].fillna("")
    return table


def _merge_heatmap_indexes(heat_dir: Path, shard: Shard) -> None:
    parts = [shard.table(heat_dir / rundir.HEATMAP_INDEX, k) for k in range(shard.count)]
    rows = [pd.read_csv(p, dtype={"patient_id": str, "file": str}) for p in parts if p.is_file()]
    if rows:
        update_heatmap_index(heat_dir, pd.concat(rows).to_dict("records"))


def _outputs(
    trained: TrainedModel,
    prediction: Prediction,
    heat_dir: Path | None,
    dicom_out: str | Path | None,
    top_k: int,
    stow_url: str | None = None,
) -> tuple[dict, list[dict]]:
    """A scored patient's heatmaps and DICOM results, as asked; its row, with the error when
    the DICOM results could not be written (the patient is then failed, so --resume tries it
    again), and its heatmap index rows."""
    item, score, row = prediction.item, prediction.score, prediction.row
    heat_rows: list[dict] = []
    if heat_dir:
        maps = write_heatmaps(
            trained, item.job.patient_id, item.array, score.slice_logits, heat_dir, top_k
        )
        heat_rows = [{**m, "probability": row["probability"]} for m in maps]
    if dicom_out or stow_url:
        try:
            _write_dicom(trained, item, score, dicom_out and Path(dicom_out), top_k, stow_url)
        except Exception as err:  # noqa: BLE001 - a batch job records it and goes on
            row = {**row, "error": f"DICOM results: {type(err).__name__}: {err}"}
            log.warning("patient %s: %s", item.job.patient_id, row["error"])
    return row, heat_rows


def _write_dicom(
    trained: TrainedModel,
    item: PreprocessedPatient,
    score: PatientScore,
    out: Path | None,
    top_k: int,
    stow_url: str | None = None,
) -> None:
    """``--dicom-out``: the patient's SR and Grad-CAM captures in ``out/<patient>/``, and
    posted to ``stow_url`` in one STOW-RS request (from a temporary folder when there is no
    ``out``). A NIfTI file or a cache has no source study to put them in: said once per
    patient."""
    if not item.job.files:
        log.warning(
            "patient %s: no DICOM results (its input is %s, not DICOM)",
            item.job.patient_id,
            item.job.kind if item.job.kind == "nifti" else "a cache",
        )
        return
    with contextlib.ExitStack() as stack:
        if out is None:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="brainmets-dicom-")))
        folder = out / patient_stem(item.job.patient_id)
        written = write_dicom_results(trained, item, score, folder, top_k=top_k)
        if stow_url:
            post_results(stow_url, written.files)


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


def _rows_to_keep(out_csv: Path, model_id: str) -> list[dict]:
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
    if models and models != [model_id]:
        raise ValueError(
            f"{out_csv}: its rows were predicted by model {', '.join(models)}, this run's is "
            f"{model_id}: write to a new --out instead"
        )
    return ok.to_dict("records")
