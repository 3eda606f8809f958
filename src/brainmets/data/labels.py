"""labels.csv: the manifest of a cohort (patient_id, label[, split][, series_uid][, path]).

Kept apart from the series index so that training, which needs only :data:`SPLITS`, does not
import the DICOM reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

LABEL_COLUMNS = ["patient_id", "label"]
OPTIONAL_LABEL_COLUMNS = ["split", "series_uid", "path"]
SPLITS = ("train", "val", "test")


def read_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate labels.csv: patient_id, label (0/1)[, split][, series_uid][, path].

    A relative ``path`` is read from the labels file's folder, so that a manifest kept beside
    its images works from any working directory.

    Raises ValueError naming the file, the line and the reason for a missing column, a label
    other than 0/1, an unknown split, an empty or duplicate patient id.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: the file is empty; expected a header line (patient_id,label) and one "
            "line per patient"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as CSV in "
            "UTF-8 (a UTF-16 export from a spreadsheet does not work)"
        ) from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{path}: 0 patients (a header line and no patient lines)")
    for column in frame.columns:
        frame[column] = frame[column].str.strip()

    def fail(i: int, reason: str) -> ValueError:
        # Line numbers as an editor shows them: the header is line 1.
        return ValueError(f"{path}: line {i + 2}: {reason}")

    seen: dict[str, int] = {}
    for i, row in frame.iterrows():
        patient = row["patient_id"]
        if not patient:
            raise fail(i, "empty patient_id")
        if patient in seen:
            raise fail(i, f"duplicate patient_id {patient!r} (first on line {seen[patient] + 2})")
        seen[patient] = i
        if row["label"] not in ("0", "1"):
            raise fail(i, f"label must be 0 or 1, got {row['label']!r}")
        if "split" in frame.columns and row["split"] not in (*SPLITS, ""):
            raise fail(i, f"split must be one of {SPLITS} or empty, got {row['split']!r}")
    frame["label"] = frame["label"].astype(int)
    if "path" in frame.columns:
        here = path.parent
        frame["path"] = [
            str(here / p)
            if p and not os.path.isabs(os.path.expanduser(p))
            else os.path.expanduser(p)
            for p in frame["path"]
        ]
    columns = LABEL_COLUMNS + [c for c in OPTIONAL_LABEL_COLUMNS if c in frame.columns]
    return frame[columns].reset_index(drop=True)


def rows_without_path(labels: pd.DataFrame) -> list[str]:
    """Patients of a manifest with no ``path`` of their own: they are found through a series
    index (``brainmets index``) or not at all."""
    if "path" not in labels:
        return labels["patient_id"].tolist()
    return labels.loc[labels["path"] == "", "patient_id"].tolist()


def assign_splits(
    labels: pd.DataFrame, seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> pd.DataFrame:
    """Stratified train / val / test split of the manifest (the test patients are held out):
    within each label, a seeded random order cut at the fractions."""
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=labels.index, dtype=object)
    for _, rows in labels.groupby("label"):
        order = rng.permutation(rows.index.to_numpy())
        n_train = round(len(order) * fractions[0])
        n_val = round(len(order) * fractions[1])
        split[order[:n_train]] = "train"
        split[order[n_train : n_train + n_val]] = "val"
        split[order[n_train + n_val :]] = "test"
    return labels.assign(split=split)
