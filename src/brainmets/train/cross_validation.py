"""K-fold cross-validation: the fold runs in one folder, one at a time or all and their ensemble.

``train --folds K`` trains ``CV/fold-0`` ... ``CV/fold-{K-1}`` one after another and combines
them (``brainmets.train.ensemble``); ``train --folds K --fold k`` trains fold k alone, so
that the folds can run as independent jobs (one per GPU, or an array job of a cluster) and be
combined afterwards with ``brainmets ensemble CV``. Each fold is an ordinary run folder:
lock, log, resume, report and ranking verdict as for any run. ``train --resume CV`` goes on
where the cross-validation stopped: finished folds are left as they are, a stopped fold
resumes, a fold never started starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainmets import rundir
from brainmets.config import Config, save_config
from brainmets.train.ensemble import (
    DEFAULT_COMBINE,
    DEFAULT_MEMBERS,
    EnsembleSummary,
    build_ensemble,
)
from brainmets.train.folds import fold_dir
from brainmets.train.trainer import train

log = logging.getLogger(__name__)


@dataclass
class CrossValidationResult:
    folder: Path
    folds: dict[int, dict[str, Any]] = field(default_factory=dict)  # fold -> train() summary
    ensemble: EnsembleSummary | None = None


def fold_config(cfg: Config, fold: int) -> Config:
    """``cfg`` for fold ``fold`` (data.fold set, the rest as given)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"fold": fold})}, deep=True)


def train_folds(
    cfg: Config,
    cv_dir: str | Path,
    *,
    fold: int | None = None,
    resume: bool = False,
    combine: str = DEFAULT_COMBINE,
    members: str = DEFAULT_MEMBERS,
    progress: bool = True,
) -> CrossValidationResult:
    """Train fold ``fold`` of ``cfg.data.folds`` into ``cv_dir/fold-{fold}``, or, without
    ``fold``, every fold and then their ensemble into ``cv_dir``. ``resume``: go on with the
    folds already in ``cv_dir`` (each resumed from its saved state, or started)."""
    folds = cfg.data.folds
    if folds < 2:
        raise ValueError(f"cross-validation needs data.folds >= 2 (--folds K), got {folds}")
    if fold is not None and not 0 <= fold < folds:
        raise ValueError(f"--fold {fold} must be in [0, {folds})")
    cv_dir = Path(cv_dir)
    cv_dir.mkdir(parents=True, exist_ok=True)
    if _is_main_process():  # each job of an array writes the same file; --resume CV reads it
        save_config(cfg, cv_dir / rundir.CONFIG)
    result = CrossValidationResult(cv_dir)
    for k in [fold] if fold is not None else range(folds):
        run = fold_dir(cv_dir, k)
        again = resume and rundir.resume_state(run).is_file()
        log.info("fold %d of %d: %s %s", k, folds, "resuming" if again else "training", run)
        result.folds[k] = train(fold_config(cfg, k), run, resume=again, progress=progress)
    if fold is None and _is_main_process():
        result.ensemble = build_ensemble([cv_dir], cv_dir, combine=combine, members=members)
        log.info("%s", result.ensemble.text)
    return result


def _is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the one that writes what all share."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    return int(os.environ.get("RANK", "0") or 0) == 0
