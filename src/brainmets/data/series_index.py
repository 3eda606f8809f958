"""DICOM root -> series table; one series chosen per patient.

``index_dicom_root`` walks a folder of any layout (files with or without extension), reads
headers only, and groups image files by SeriesInstanceUID into a :class:`SeriesIndex`:

- ``series``: one row per series (:data:`SERIES_COLUMNS`), with ``chosen`` and ``reason``;
- ``files``: one row per image file (series_uid, path, instance_number);
- ``errors``: files that are not DICOM or cannot be parsed (path, reason). DICOMDIRs and
  Philips DIRFILEs are directories, not images: they are skipped without an error. A file that
  is not DICOM counts as a failure when its name says DICOM (``.dcm``, ``.dicom``, ``.ima``:
  :data:`DICOM_SUFFIXES`), like a damaged DICOM file; any other (a README, notes) is listed
  only.

Choice rule (:func:`choose_series`), per patient:

1. Eligible: Modality CT; SOP class CT Image Storage or (Legacy Converted) Enhanced CT Image
   Storage, whose frames count as slices (not secondary capture, structured report or any
   other class); ImageType without LOCALIZER; axial orientation (slice normal within
   30 degrees of the patient's head-foot axis, so gantry tilt is allowed); at least
   ``min_slices`` slices.
2. Among eligible series, in order: soft-tissue/brain reconstruction kernel before unknown
   kernels before bone/lung (sharp) kernels; SliceThickness nearest ``target_mm``; more slices;
   then SeriesInstanceUID so that the choice is deterministic.
3. A pin (patient_id -> SeriesInstanceUID, from the labels' ``series_uid`` column) overrides
   the ranking of rule 2, not rule 1: a pinned localizer or a pinned 1-slice series is an
   error row with the reason, never a volume (``predict`` would refuse that series too).

Only PatientID leaves the headers: no names or birth dates appear in any table.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from brainmets.config import PreprocessConfig
from brainmets.data.dicom import (
    NOT_DICOM,
    SeriesError,
    damaged_file_identity,
    frame_value,
    is_multiframe,
    number_of_frames,
    read_header_or_reason,
    slice_normal,
)
from brainmets.io import atomic_write_csv
from brainmets.lifetime import end_with_parent

SERIES_COLUMNS = [
    "patient_id",
    "study_uid",
    "series_uid",
    "modality",
    "sop_class",
    "description",
    "image_type",
    "orientation",
    "num_slices",
    "slice_thickness_mm",
    "kernel",
    "manufacturer",
    "transfer_syntax",
    "directory",
    "chosen",
    "reason",
]
FILE_COLUMNS = ["series_uid", "path", "instance_number"]
ERROR_COLUMNS = ["path", "reason", "series_uid", "sop_class"]
"""The last two: what is left of a damaged file's header says (else empty)."""

CT_IMAGE_STORAGE = "CT Image Storage"
CT_STORAGE_CLASSES = (
    CT_IMAGE_STORAGE,
    "Enhanced CT Image Storage",  # multi-frame: one file may hold the series
    "Legacy Converted Enhanced CT Image Storage",
)
MAX_TILT_DEG = 30.0

_SHARP_KERNEL = re.compile(r"BONE|LUNG|EDGE|SHARP|DETAIL|HIGH|CHEST|CHST|ULTRA", re.IGNORECASE)
_SOFT_KERNEL = re.compile(r"BRAIN|SOFT|STANDARD|STD|SMOOTH|HEAD|NEURO|^U[ABC]$", re.IGNORECASE)
# Siemens kernels: letter(s) + sharpness number (H31s, Hr40, J30f, Br64); >= 60 is sharp.
_SIEMENS_KERNEL = re.compile(r"^[A-Z][a-z]?(\d{2})[a-z]?\b")

_INDEX_FILES = {"series": "series.csv", "files": "files.csv", "errors": "index_errors.csv"}


@dataclass
class SeriesIndex:
    """The three tables written by ``brainmets index``."""

    series: pd.DataFrame
    files: pd.DataFrame
    errors: pd.DataFrame

    @cached_property
    def _damaged_files(self) -> pd.DataFrame:
        """Index errors that are damaged DICOM (not "not DICOM"), with their folder and
        whether their SOP class is known not to be an image; built once per index."""
        errors = self.errors
        damaged = errors[errors["reason"] != NOT_DICOM].copy()
        damaged["folder"] = damaged["path"].astype(str).map(os.path.dirname)
        sop = damaged["sop_class"].fillna("").astype(str)
        damaged["non_image"] = (sop != "") & ~sop.str.contains("Image Storage")
        damaged["series_uid"] = damaged["series_uid"].fillna("").astype(str)
        return damaged

    @cached_property
    def _paths_by_series(self) -> dict[str, list[str]]:
        # Built once: filtering the file table per series made planning a cohort quadratic.
        grouped = self.files.groupby("series_uid", sort=False)["path"]
        return {str(uid): paths.astype(str).tolist() for uid, paths in grouped}


# --------------------------------------------------------------------------------------------
# Headers -> rows
# --------------------------------------------------------------------------------------------


def classify_orientation(orientation: Iterable[float] | None) -> str:
    """'axial' / 'coronal' / 'sagittal' by the slice normal's main axis; 'oblique' past 30 deg."""
    if orientation is None:
        return ""
    try:
        normal = slice_normal(list(orientation))
    except ValueError:
        return ""
    axis = int(np.argmax(np.abs(normal)))
    if np.degrees(np.arccos(min(1.0, abs(normal[axis])))) > MAX_TILT_DEG:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _float_or_nan(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
"""Names that claim DICOM: such a file that is not DICOM is a failure (a cut or mangled
transfer of a slice, a report saved under a slice's name), where a README or a notes file
beside the images is not."""

NAMED_DICOM_NOT_DICOM = "not a DICOM file, although named as one"


def header_record(path: str) -> dict[str, object]:
    """Everything the index needs from one file's headers, as plain picklable values."""
    ds, reason = read_header_or_reason(path)
    if reason == NOT_DICOM and path.lower().endswith(DICOM_SUFFIXES):
        reason = f"{NAMED_DICOM_NOT_DICOM} ({os.path.splitext(path)[1]})"
    if ds is None:
        # reason None: a directory record (DICOMDIR, DIRFILE), skipped without an error.
        record = {"path": path, "error": reason, "skip": True, "series_uid": "", "sop_class": ""}
        if reason and reason != NOT_DICOM:  # damaged: whose slice might it have been?
            record["series_uid"], record["sop_class"] = damaged_file_identity(path)
        return record
    if "SeriesInstanceUID" not in ds:
        sop = str(getattr(ds.SOPClassUID, "name", ds.SOPClassUID))
        return {"path": path, "error": "missing SeriesInstanceUID", "skip": True,
                "series_uid": "", "sop_class": sop}  # fmt: skip
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    study_uid = str(ds.get("StudyInstanceUID", ""))
    first = 0 if is_multiframe(ds) else None
    return {
        "path": path,
        "error": None,
        "skip": False,
        # Without a PatientID the study stands in, so that unrelated studies never merge.
        "patient_id": str(ds.get("PatientID", "") or "") or f"study-{study_uid}",
        "study_uid": study_uid,
        "series_uid": str(ds.SeriesInstanceUID),
        "modality": str(ds.get("Modality", "")),
        "sop_class": ds.SOPClassUID.name,
        "description": str(ds.get("SeriesDescription", "") or ""),
        "image_type": _text(ds.get("ImageType")),
        # A multi-frame (Enhanced CT) file keeps these in its first frame's functional groups.
        "orientation": classify_orientation(
            frame_value(ds, first, "PlaneOrientationSequence", "ImageOrientationPatient")
        ),
        "slice_thickness_mm": _float_or_nan(
            frame_value(ds, first, "PixelMeasuresSequence", "SliceThickness")
        ),
        "kernel": _text(frame_value(ds, first, "CTReconstructionSequence", "ConvolutionKernel")),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "transfer_syntax": str(transfer_syntax or ""),
        "instance_number": int(ds.get("InstanceNumber") or 0),
        "is_image": "Rows" in ds,
        "frames": number_of_frames(ds) if "Rows" in ds else 0,
    }


def _walk(root: Path) -> list[str]:
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        paths.extend(os.path.join(folder, n) for n in sorted(names) if not n.startswith("."))
    return paths


def _most_common(values: pd.Series) -> object:
    return values.mode(dropna=True).iloc[0] if values.notna().any() else values.iloc[0]


def _series_table(records: list[dict[str, object]]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame(columns=SERIES_COLUMNS)
    table = pd.DataFrame(records)
    rows = []
    for series_uid, group in table.groupby("series_uid", sort=True):
        first = group.iloc[0]
        rows.append(
            {
                "patient_id": first["patient_id"],
                "study_uid": first["study_uid"],
                "series_uid": series_uid,
                "modality": first["modality"],
                "sop_class": _most_common(group["sop_class"]),
                "description": first["description"],
                "image_type": _most_common(group["image_type"]),
                "orientation": _most_common(group["orientation"]),
                "num_slices": int(group["frames"].sum()),
                "slice_thickness_mm": float(group["slice_thickness_mm"].median()),
                "kernel": _most_common(group["kernel"]),
                "manufacturer": first["manufacturer"],
                "transfer_syntax": "\\".join(sorted(set(group["transfer_syntax"]))),
                "directory": os.path.commonpath([os.path.dirname(p) for p in group["path"]]),
                "chosen": False,
                "reason": "",
            }
        )
    return pd.DataFrame(rows, columns=SERIES_COLUMNS)


FILES_PER_WORKER = 64
"""Headers per worker below which a process pool costs more than it saves (~0.03 s each)."""


def index_dicom_root(
    root: str | os.PathLike[str], *, workers: int = 1, progress: bool = True
) -> SeriesIndex:
    """Read the headers of every file under ``root`` and build the series index.

    ``workers > 1`` reads headers in a process pool, when there are enough files to repay
    starting it (:data:`FILES_PER_WORKER` each). The series table comes back with the
    default choice of :func:`choose_series` already applied.
    """
    # Absolute: the index's paths must not depend on the folder it is read from later.
    root = Path(root).absolute()
    if not root.exists():
        raise FileNotFoundError(f"{root}: does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    paths = _walk(root)
    bar = dict(total=len(paths), desc="index", unit="file", disable=not progress)
    workers = min(workers, len(paths) // FILES_PER_WORKER)
    if workers > 1:
        # spawn, not fork: predict calls this with torch (and maybe CUDA) running.
        context = get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=end_with_parent
        ) as pool:
            chunk = max(1, min(256, len(paths) // (4 * workers)))
            records = list(tqdm(pool.map(header_record, paths, chunksize=chunk), **bar))
    else:
        records = [header_record(p) for p in tqdm(paths, **bar)]

    good = [r for r in records if not r["skip"]]
    errors = pd.DataFrame(
        [{**{c: r[c] for c in ERROR_COLUMNS if c != "reason"}, "reason": r["error"]}
         for r in records if r["error"]],
        columns=ERROR_COLUMNS,
    )  # fmt: skip
    image_records = [r for r in good if r["is_image"]]
    files = pd.DataFrame(
        [{c: r[c] for c in FILE_COLUMNS} for r in image_records], columns=FILE_COLUMNS
    )
    series = choose_series(_series_table(good))
    return SeriesIndex(series=series, files=files, errors=errors)


# --------------------------------------------------------------------------------------------
# Choosing one series per patient
# --------------------------------------------------------------------------------------------


def kernel_class(kernel: str) -> int:
    """0 soft-tissue/brain, 1 unknown, 2 bone/lung (sharp): the order of preference."""
    kernel = (kernel or "").strip()
    if not kernel:
        return 1
    if _SHARP_KERNEL.search(kernel):
        return 2
    if _SOFT_KERNEL.search(kernel):
        return 0
    match = _SIEMENS_KERNEL.match(kernel)
    if match:
        return 2 if int(match.group(1)) >= 60 else 0
    return 1


def ineligibility(row: Mapping[str, object], min_slices: int) -> str | None:
    """Why a series cannot be the patient's CT volume, or None when it can."""
    if row["modality"] != "CT":
        return f"not CT (modality {row['modality'] or 'missing'})"
    if row["sop_class"] not in CT_STORAGE_CLASSES:
        return f"not CT Image Storage ({row['sop_class']})"
    if "LOCALIZER" in str(row["image_type"]).upper().split("\\"):
        return "localizer"
    if row["orientation"] != "axial":
        return f"not axial ({row['orientation'] or 'no orientation'})"
    if int(row["num_slices"]) < min_slices:
        return f"too few slices ({row['num_slices']} < {min_slices})"
    return None


def choose_series(
    series: pd.DataFrame,
    *,
    target_mm: float = 5.0,
    min_slices: int = 8,
    pins: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Set ``chosen`` and ``reason`` on a copy of the series table (rule: module docstring)."""
    table = series.copy()
    table["chosen"] = False
    table["reason"] = ""
    pins = dict(pins or {})
    for patient_id, group in table.groupby("patient_id", sort=False):
        pinned = pins.get(str(patient_id))
        if pinned:
            hit = group.index[group["series_uid"] == pinned]
            table.loc[group.index, "reason"] = (
                f"not chosen: patient pinned to {pinned}"
                if len(hit)
                else f"not chosen: pinned series {pinned} not found for this patient"
            )
            for idx in hit:
                why_not = ineligibility(table.loc[idx], min_slices)
                table.loc[idx, ["chosen", "reason"]] = (
                    [False, f"pinned in the manifest but not eligible: {why_not}"]
                    if why_not
                    else [True, "chosen: pinned in the manifest"]
                )
            continue

        candidates = []
        for idx, row in group.iterrows():
            why_not = ineligibility(row, min_slices)
            if why_not:
                table.at[idx, "reason"] = f"not eligible: {why_not}"
                continue
            thickness = float(row["slice_thickness_mm"])
            distance = abs(thickness - target_mm) if math.isfinite(thickness) else math.inf
            rank = (kernel_class(str(row["kernel"])), distance, -int(row["num_slices"]))
            candidates.append((rank, str(row["series_uid"]), idx))
        if not candidates:
            continue
        candidates.sort()
        best_rank, best_uid, best_idx = candidates[0]
        kernel_name = ("soft-tissue", "unknown", "bone/lung")[best_rank[0]]
        table.at[best_idx, "chosen"] = True
        table.at[best_idx, "reason"] = (
            f"chosen: axial CT, {kernel_name} kernel, thickness "
            f"{table.at[best_idx, 'slice_thickness_mm']} mm (target {target_mm}), "
            f"{-best_rank[2]} slices"
        )
        for _, _, idx in candidates[1:]:
            table.at[idx, "reason"] = f"eligible, not chosen: {best_uid} ranks higher"
    return table


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def write_index(index: SeriesIndex, out_dir: str | os.PathLike[str]) -> None:
    """Write series.csv, files.csv and index_errors.csv (each atomically) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for attr, name in _INDEX_FILES.items():
        atomic_write_csv(out / name, getattr(index, attr))


_TEXT_COLUMNS = {
    c: str for c in SERIES_COLUMNS + FILE_COLUMNS + ERROR_COLUMNS if c not in {"chosen"}
}
_TEXT_COLUMNS.update(num_slices=int, slice_thickness_mm=float, instance_number=int)


def read_index(out_dir: str | os.PathLike[str]) -> SeriesIndex:
    """Read back what :func:`write_index` wrote (identifiers stay strings)."""
    out = Path(out_dir)
    frames = {}
    for attr, name in _INDEX_FILES.items():
        path = out / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: index table missing (run `brainmets index` first)")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in frame.columns:
            kind = _TEXT_COLUMNS.get(column, str)
            if column == "chosen":
                frame[column] = frame[column].str.lower().eq("true")
            elif kind is int:
                frame[column] = frame[column].astype(int)
            elif kind is float:
                # An empty cell (no SliceThickness, as on a localizer) is a missing number.
                frame[column] = pd.to_numeric(frame[column], errors="coerce")
        frames[attr] = frame
    for column in ERROR_COLUMNS:  # an index written before a column existed
        if column not in frames["errors"]:
            frames["errors"][column] = ""
    return SeriesIndex(**frames)


def rejection_reasons(series: pd.DataFrame) -> str:
    """Why each series of a table was or was not chosen, on one line (for error rows)."""
    return "; ".join(f"{row.series_uid}: {row.reason}" for row in series.itertuples())


def patient_choice(rows: pd.DataFrame) -> tuple[str | None, str]:
    """The chosen SeriesInstanceUID among one patient's rows of a :func:`choose_series` table,
    or ``None`` and why no series was chosen."""
    picked = rows[rows["chosen"]]
    if len(picked):
        return str(picked.iloc[0]["series_uid"]), ""
    return None, rejection_reasons(rows) or "no DICOM images"


def series_files(index: SeriesIndex, series_uid: str) -> list[str]:
    """Paths of the image files of one series (unsorted: load_series sorts by position)."""
    return list(index._paths_by_series.get(series_uid, []))


def damaged_beside(index: SeriesIndex, series_uid: str) -> pd.DataFrame:
    """The damaged DICOM files that may be slices of a series: those whose header still names
    the series, and those that name no series, are not known to be other than images and lie
    in a folder of the series' files (an empty file, a header cut early).

    The series would otherwise be scored without them, and a lost slice can hold the only
    lesion. A damaged file of another series (another patient's slice in a flat export, the
    patient's localizer) or a non-image object is no reason to fail this one.
    """
    damaged = index._damaged_files
    if damaged.empty:
        return damaged
    folders = {os.path.dirname(p) for p in series_files(index, series_uid)}
    unknown = (damaged["series_uid"] == "") & ~damaged["non_image"]
    mine = (damaged["series_uid"] == series_uid) | (unknown & damaged["folder"].isin(folders))
    return damaged[mine]


def damaged_reason(damaged: pd.DataFrame, *, reindex: bool, shown: int = 3) -> str:
    """The error reason of a patient whose series may lack the ``damaged`` files' slices.
    ``reindex``: the files came from a stored index, which must be built again once they are
    repaired or removed."""
    listed = [f"{row.path} ({row.reason})" for row in damaged.head(shown).itertuples()]
    more = f" and {len(damaged) - shown} more" if len(damaged) > shown else ""
    then = ", then run `brainmets index` again" if reindex else ""
    return (
        f"damaged DICOM file(s) that may be slices of the chosen series: "
        f"{', '.join(listed)}{more}; repair or remove them{then}"
    )


def choose_for(
    series: pd.DataFrame, preprocess: PreprocessConfig, pins: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """:func:`choose_series` for these preprocessing parameters: the slab thickness is the
    target (5 mm when slices stay native) and ``min_slices`` the floor. ``index``, ``prepare``
    and ``predict`` all choose through here, so one config gives one choice."""
    return choose_series(
        series, target_mm=preprocess.slab_mm or 5.0, min_slices=preprocess.min_slices, pins=pins
    )


def resolve_series(
    index: SeriesIndex,
    rows: pd.DataFrame | None,
    *,
    source: str = "",
    pin: str = "",
    reindex: bool = False,
) -> tuple[str, list[str]]:
    """One patient's series: its chosen SeriesInstanceUID in ``rows`` (its rows of a
    :func:`choose_for` table) and the series' files.

    Raises :class:`SeriesError` naming ``source`` when no series is usable (with the unreadable
    files of the patient's folders, which often explain it), or naming the series' folder when
    damaged files may be its slices. ``pin``: the series the manifest pinned, whose own reason
    is then the one given. ``reindex``: the index was read from disk, so the message
    says to build it again once the files are repaired.
    """
    if rows is None or rows.empty:
        raise SeriesError(source, "no usable series: patient not in the index")
    uid, why = patient_choice(rows)
    if uid is None and pin:
        pinned = rows[rows["series_uid"] == pin]
        why = (
            f"{pin}: {pinned['reason'].iloc[0]}"
            if len(pinned)
            else f"pinned series {pin} not found (series: {', '.join(rows['series_uid'])})"
        )
    if uid is None:
        # Only unreadable files in this patient's series folders can explain it (a truncated
        # slice); a README at the root is nobody's reason.
        hint = ""
        if not index.errors.empty and "directory" in rows:
            folders = tuple(str(d) + os.sep for d in rows["directory"])
            hint = unreadable_files(
                index.errors[index.errors["path"].astype(str).str.startswith(folders)]
            )
        raise SeriesError(source, f"no usable series: {why}{hint}")
    files = series_files(index, uid)
    damaged = damaged_beside(index, uid)
    if len(damaged):
        folder = os.path.commonpath([os.path.dirname(f) for f in files]) if files else source
        raise SeriesError(folder, damaged_reason(damaged, reindex=reindex))
    return uid, files


def unreadable_files(index_errors: pd.DataFrame, shown: int = 3) -> str:
    """``"; unreadable: FILE (why), ..."`` for the files of a folder that were not DICOM or did
    not parse (a truncated file often explains a series that is too short), else ``""``."""
    if index_errors.empty:
        return ""
    listed = [f"{row.path} ({row.reason})" for row in index_errors.head(shown).itertuples()]
    more = len(index_errors) - shown
    return "; unreadable: " + ", ".join(listed) + (f" and {more} more" if more > 0 else "")
