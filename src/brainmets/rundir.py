"""The names of a run folder's files, and the environment a run records.

A run folder is self-contained for inference and review::

    RUN/config.yaml            the resolved config
    RUN/environment.json       versions and devices (no host name)
    RUN/splits.csv             patient_id, split
    RUN/train.log              the log of every run and resume
    RUN/metrics.csv            one row per epoch
    RUN/tensorboard/           the same scalars for TensorBoard
    RUN/model.safetensors      the selected weights (+ model.json: threshold, calibration,
                               preprocessing, normalisation, architecture)
    RUN/val_predictions.csv    validation patients scored by the selected weights
    RUN/checkpoints/           last.safetensors + last.json, last_state.pt (resume)
    RUN/evaluation/            metrics.json, predictions.csv, plots (``brainmets evaluate``)
    RUN/heatmaps/              Grad-CAM PNGs + heatmaps.csv (``predict --heatmaps``)
    RUN/report.html            the self-contained report
    RUN/export/                model.onnx + brainmets.json (``brainmets export``)
    RUN/folds.csv              patient_id, label, fold: a fold run's cross-validation folds

A cross-validation folder holds its fold runs and, once combined, their ensemble::

    CV/fold-0/ ... fold-K-1/   ordinary run folders (``train --folds K [--fold k]``)
    CV/ensemble.json           members, combination, OOF threshold, calibration, verdict
    CV/oof_predictions.csv     every fold's validation patients, scored by their fold's model
    CV/folds.csv, evaluation/, export/, report.html   as in a run folder

Every module names these files through here, so a file renamed is renamed once.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
SPLITS = "splits.csv"
LOG = "train.log"
METRICS = "metrics.csv"
TENSORBOARD = "tensorboard"
MODEL = "model.safetensors"
MODEL_SIDECAR = "model.json"
VAL_PREDICTIONS = "val_predictions.csv"
CHECKPOINTS = "checkpoints"
LAST_WEIGHTS = "last.safetensors"
RESUME_STATE = "last_state.pt"
EVALUATION = "evaluation"
EVALUATION_METRICS = "metrics.json"
EVALUATION_PREDICTIONS = "predictions.csv"
EXPORT = "export"
EXPORT_ONNX = "model.onnx"
EXPORT_SIDECAR = "brainmets.json"
HEATMAPS = "heatmaps"
HEATMAP_INDEX = "heatmaps.csv"
REPORT = "report.html"
PREDICTIONS = "predictions.csv"
LOCK = ".lock"
FOLDS = "folds.csv"
ENSEMBLE = "ensemble.json"
OOF_PREDICTIONS = "oof_predictions.csv"

RUN_FILES = (LOG, CONFIG, METRICS, MODEL_SIDECAR, EVALUATION, ENSEMBLE)
"""Any one of these makes a folder a run or an ensemble (a run that could not start still has
its log)."""


def resume_state(run: Path) -> Path:
    return Path(run) / CHECKPOINTS / RESUME_STATE


def versions(*packages: str) -> dict[str, str]:
    """The versions of brainmets, torch, torchvision and ``packages``: the one record that
    checkpoints, exports and ``environment.json`` carry."""
    import importlib

    import brainmets

    found = {"brainmets": brainmets.__version__}
    for name in ("torch", "torchvision", *packages):
        found[name] = str(importlib.import_module(name).__version__)
    return found


def environment_info(device: Any, world_size: int) -> dict[str, Any]:
    """Versions and devices of this run (deliberately without the host name)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        **versions("numpy"),
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        # The CPU kernels' instruction set (AVX2, AVX512, ...): runs on CPUs of another one
        # round differently, and a long run at a high learning rate may end elsewhere.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
