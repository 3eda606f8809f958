"""The preprocessing cache: its format, its writer's primitives and its reader.

``prepare`` (``brainmets.data.prepare``) fills it; training, evaluation and prediction read it.

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

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from brainmets.config import PreprocessConfig
from brainmets.io import atomic_save_npy, atomic_write_csv, atomic_write_text, safe_reason

log = logging.getLogger(__name__)

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


MAX_STEM = 100
"""Longest file stem taken from a patient id as it is: file systems allow 255 bytes per name,
and the stem gets suffixes (``.pos.npy``, ``_rank3_slice120.png``, a temporary file's)."""


def patient_stem(patient_id: str) -> str:
    """A file name for a patient id; ids with unsafe characters, or too long to be a file
    name, get a digest to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id).strip(".") or "patient"
    if safe != patient_id or len(safe) > MAX_STEM:
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
        """uint8 [N, size, size], memory-mapped read-only.

        Raises :class:`CacheError` naming the file when it is not the array the index
        describes: a wrong shape would be scored as if it were the patient (a batch of one
        patient is never checked against the others)."""
        row = self.row(patient_id)
        path = self.root / "patients" / row["file"]
        array = _read_npy(path, mmap_mode="r")
        size = self.preprocess.size
        expected = (int(row["num_slices"]), size, size)
        if array.dtype != np.uint8 or array.shape != expected:
            raise CacheError(
                f"{path}: damaged cache array: {array.dtype} {list(array.shape)}, expected "
                f"uint8 {list(expected)} (index.csv, preprocess.json); {_PREPARE_AGAIN}"
            )
        return array

    def positions(self, patient_id: str) -> np.ndarray | None:
        """Slab positions (mm along the slice normal) when prepare recorded them."""
        row = self.row(patient_id)
        path = self.root / "patients" / (Path(row["file"]).stem + ".pos.npy")
        if not path.is_file():
            return None
        positions = _read_npy(path)
        if positions.shape != (int(row["num_slices"]),) or positions.dtype.kind != "f":
            raise CacheError(
                f"{path}: damaged slice positions: {positions.dtype} {list(positions.shape)}, "
                f"expected {int(row['num_slices'])} numbers; {_PREPARE_AGAIN}"
            )
        return positions


_PREPARE_AGAIN = "delete it and its .json, then run `brainmets prepare` again on this cache"


def _read_npy(path: Path, **kwargs) -> np.ndarray:
    """``np.load`` of a cache file, its failures as a :class:`CacheError` naming the file."""
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except FileNotFoundError as err:
        raise CacheError(f"{path}: cache array missing; {_PREPARE_AGAIN}") from err
    except (ValueError, OSError, EOFError) as err:
        # numpy's own message for bytes it does not recognise advises unpickling them.
        raise CacheError(
            f"{path}: damaged cache array (not a .npy array: {safe_reason(err)}); {_PREPARE_AGAIN}"
        ) from err


# --------------------------------------------------------------------------- writing


def write_meta(root: Path, preprocess: PreprocessConfig, *, overwrite: bool) -> None:
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


def write_patient(
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
    write_meta(root, preprocess, overwrite=True)
    digest = preprocess.config_hash()
    for patient_id, label, array in patients:
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(
                f"patient {patient_id}: expected uint8 [N,H,W], got {array.dtype} {array.shape}"
            )
        write_patient(
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
