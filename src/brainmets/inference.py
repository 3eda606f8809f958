"""A trained run on PyTorch, ready to score: load it, batch patients, score a cache.

Shared (through ``brainmets.backends``) by ``evaluate``, ``predict`` and ``serve``, so that every command scores with the same
model, preprocessing check, threshold and calibration. A run folder is self-contained:
``model.safetensors`` and its JSON sidecar carry the architecture, the preprocessing, the input
normalisation, the operating threshold and the probability calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from tqdm.auto import tqdm

from brainmets import rundir
from brainmets.config import PreprocessConfig
from brainmets.data.cache import PatientCache
from brainmets.device import resolve_device
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.identity import model_id
from brainmets.model.probability import Calibration
from brainmets.model.resnet import BrainMetsNet
from brainmets.model.scoring import SliceScorer

T = TypeVar("T")


@dataclass
class TrainedModel:
    """A run's model with everything inference needs from its sidecar."""

    model: BrainMetsNet
    sidecar: dict
    device: torch.device
    scorer: SliceScorer

    @property
    def model_id(self) -> str:
        """Which model scored a row: a digest of the weights and of everything in the sidecar
        that decides (``brainmets.model.identity``)."""
        return str(self.sidecar.get("model_id") or model_id(self.sidecar))

    @property
    def plain_threshold(self) -> float:
        """The operating threshold as chosen in training, on the plain sigmoid."""
        threshold = self.sidecar.get("threshold")
        return 0.5 if threshold is None else float(threshold)

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_sidecar(self.sidecar)

    @property
    def threshold(self) -> float:
        """The operating threshold on the reported (calibrated) probability scale."""
        return self.calibration.threshold(self.plain_threshold)

    def probability(self, logits) -> np.ndarray:
        """Reported probability of patient (or slice) logits: calibrated when the run is."""
        return self.calibration.probability(logits)

    def decision(self, logits) -> np.ndarray:
        """1 where the patient is called positive: decided on the plain sigmoid against the
        threshold chosen there, so calibration cannot move a decision by rounding."""
        return (expit(np.asarray(logits, dtype=np.float64)) >= self.plain_threshold).astype(int)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.model_validate(self.sidecar["preprocess"])

    def check_cache(self, cache: PatientCache) -> None:
        """A cache prepared with other parameters than the model was trained on is refused."""
        if cache.config_hash != self.preprocess.config_hash():
            ours, theirs = self.preprocess.model_dump(), cache.preprocess.model_dump()
            fix = " ".join(
                f"--set preprocess.{k}={v}" for k, v in ours.items() if theirs.get(k) != v
            )
            raise ValueError(
                f"{cache.root} was prepared with preprocessing {theirs}, but the model expects "
                f"{ours}; prepare the data into a new cache with the model's settings "
                f"(brainmets prepare ... {fix}), or give predict the DICOM folders"
            )


def model_path(run: str | Path) -> Path:
    """``RUN/model.safetensors``, or the path itself when it names a weights file."""
    run = Path(run)
    path = run if run.suffix == ".safetensors" else run / rundir.MODEL
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


def score_cache(
    trained,
    cache: PatientCache,
    patient_ids: list[str],
    batch_slices: int = 2048,
    progress: bool = True,
) -> pd.DataFrame:
    """patient_id, label, probability, logit, top_slice for every patient of the cache.

    Whole patients are grouped into batches of about ``batch_slices`` slices; a reader thread
    gathers the next batch out of the memory-mapped cache into one array while the device
    scores the current one.
    """
    trained.check_cache(cache)
    rows_of = cache.index.set_index("patient_id").loc[patient_ids]  # one lookup, not one per use
    label_of = dict(zip(patient_ids, rows_of["label"].astype(int).tolist(), strict=True))
    size_of = dict(zip(patient_ids, rows_of["num_slices"].astype(int).tolist(), strict=True))
    batches = list(batch_by_slices(patient_ids, batch_slices, size=size_of.__getitem__))

    def loaded() -> Iterator[tuple[int, np.ndarray, list[int]]]:
        """Batches out of the memory maps, the next one read by a thread meanwhile."""
        with ThreadPoolExecutor(max_workers=1) as reader:

            def load(batch: list[str]) -> tuple[np.ndarray, list[int]]:
                return trained.scorer.concatenate([cache.load(pid) for pid in batch])

            pending = reader.submit(load, batches[0]) if batches else None
            for i in range(len(batches)):
                flat, counts = pending.result()
                pending = reader.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
                yield i, flat, counts

    rows = []
    bar = tqdm(total=len(patient_ids), desc="evaluate", unit="patient", disable=not progress)
    for i, scores in trained.scorer.score_batches(loaded()):
        for pid, score in zip(batches[i], scores, strict=True):
            rows.append(
                {
                    "patient_id": pid,
                    "label": label_of[pid],
                    "probability": float(trained.probability(score.logit)),
                    "logit": score.logit,
                    "top_slice_index": score.top_slice,
                }
            )
        bar.update(len(batches[i]))
    bar.close()
    return pd.DataFrame(rows)
