"""labels.csv: the manifest of a cohort (patient_id, label[, split][, series_uid][, path]).

Kept apart from the series index so that training, which needs only :data:`SPLITS`, does not
import the DICOM reader.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
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
