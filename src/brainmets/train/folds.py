"""K-fold cross-validation: which fold each patient validates in.

The folds cover the patients that are not ``test`` in the manifest's split column: test
patients never train, validate or choose anything, while the manifest's ``train`` and ``val``
patients are pooled, since every one of them validates exactly once in cross-validation.
Folds are stratified by label and seeded (``split_patients``' k-fold), so every process that
computes them from the same cache and seed gets the same folds: fold runs can start as
independent jobs. Each fold run records the whole assignment (``RUN/folds.csv``), and the
ensemble refuses members whose records differ (``brainmets.train.ensemble``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainmets import rundir
from brainmets.data.dataset import split_patients
from brainmets.io import atomic_write_csv
from brainmets.model.identity import digest

FOLD_COLUMNS = ["patient_id", "label", "fold"]


def fold_assignment(index: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """patient_id, label, fold of every patient of a cache index that is not ``test``, in the
    index's order.

    Raises:
        ValueError: fewer than ``folds`` patients of a class outside the test split (a fold
            would validate on one class only, and its threshold would be a guess).
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    given = index["split"].fillna("").astype(str) if "split" in index else None
    test = (given == "test").to_numpy() if given is not None else np.zeros(len(index), bool)
    pool = index.loc[~test, ["patient_id", "label"]].astype({"patient_id": str, "label": int})
    counts = pool["label"].value_counts()
    n_pos, n_neg = int(counts.get(1, 0)), int(counts.get(0, 0))
    if min(n_pos, n_neg) < folds:
        raise ValueError(
            f"data.folds={folds}: each fold needs patients of both classes, but outside the "
            f"test split there are {n_pos} positive and {n_neg} negative patients; use at most "
            f"{max(min(n_pos, n_neg), 1)} folds"
        )
    ids, labels = pool["patient_id"].tolist(), pool["label"].to_numpy()
    fold_of = {}
    for k in range(folds):
        # The manifest's train/val are pooled: split_patients deals every patient to a fold.
        val = split_patients(ids, labels, val_fraction=0.5, seed=seed, folds=folds, fold=k)["val"]
        fold_of.update(dict.fromkeys(val, k))
    return pool.assign(fold=[fold_of[p] for p in ids]).reset_index(drop=True)[FOLD_COLUMNS]


def fold_splits(index: pd.DataFrame, assignment: pd.DataFrame, fold: int) -> dict[str, list[str]]:
    """train / val (/ test) patient lists of ``fold``, each in the index's order."""
    fold_of = dict(zip(assignment["patient_id"], assignment["fold"], strict=True))
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for pid in index["patient_id"].astype(str):
        if pid not in fold_of:
            splits["test"].append(pid)
        else:
            splits["val" if fold_of[pid] == fold else "train"].append(pid)
    if not splits["test"]:
        del splits["test"]
    return splits


def assignment_digest(assignment: pd.DataFrame) -> str:
    """One id for an assignment, whatever the row order: two runs agree when theirs match."""
    rows = sorted(
        (str(p), int(y), int(f))
        for p, y, f in assignment[FOLD_COLUMNS].itertuples(index=False, name=None)
    )
    return digest(rows)[:12]


def write_assignment(path: Path, assignment: pd.DataFrame) -> Path:
    return atomic_write_csv(path, assignment[FOLD_COLUMNS])


def read_assignment(path: Path) -> pd.DataFrame:
    """A recorded ``folds.csv``; one that is not one is named."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no fold assignment here (is it a fold run?)")
    table = pd.read_csv(path, dtype={"patient_id": str})
    if list(table.columns) != FOLD_COLUMNS:
        raise ValueError(f"{path}: not a fold assignment (columns {list(table.columns)})")
    return table


def fold_dir(cv_dir: Path, fold: int) -> Path:
    """Where fold ``fold`` of the cross-validation in ``cv_dir`` trains."""
    return Path(cv_dir) / f"fold-{fold}"


def fold_runs(cv_dir: Path) -> list[Path]:
    """The fold runs in ``cv_dir``, by fold number."""
    found = [p for p in Path(cv_dir).glob("fold-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def is_cross_validation(path: Path) -> bool:
    """A folder of fold runs (or their ensemble), rather than one run."""
    path = Path(path)
    if rundir.resume_state(path).is_file():
        return False
    return (path / rundir.ENSEMBLE).is_file() or bool(fold_runs(path))
