"""Lesion truth: where each patient's metastases are, read from a CSV and placed on the cache.

The lesion CSV (docs/evaluation.md) has one row per lesion, located by one of

* ``x_mm, y_mm, z_mm``: the centre in DICOM patient coordinates (LPS, mm);
* ``sop_instance_uid, row, column``: the centre on one image of the patient's series (0-based
  pixel indices, as DICOM counts from the pixel at ImagePositionPatient), with
* ``diameter_mm``: the largest diameter;

or one row per mask: ``mask``, a NIfTI or DICOM SEG file (relative to the CSV's folder) whose
connected components are the lesions, each at its centroid with the diameter of the sphere of
equal volume. Other columns are kept and ignored. A bad row is an error naming its line.

Placing a lesion on the cache needs the geometry of the series the cache was prepared from:
the cache keeps each slab's position along the slice normal (``.pos.npy``) but not the
in-plane geometry, so it is read again from the source the cache's index names (the headers
of its DICOM files, found through a series index or under that folder, or the NIfTI header)
when lesion truth is used. That is also what a
``sop_instance_uid`` row needs, and it leaves the cache format alone. In-plane, a source pixel
goes to the cache as ``resize_slices`` moved it: centred in a square of the longer side, then
scaled to ``size``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmets.data.cache import PatientCache, is_nifti
from brainmets.data.dicom import frame_value, is_multiframe, number_of_frames, read_header
from brainmets.data.dicom import slice_normal as dicom_slice_normal

log = logging.getLogger(__name__)

POINT_MM = ("x_mm", "y_mm", "z_mm")
POINT_IMAGE = ("sop_instance_uid", "row", "column")
LESION_COLUMNS = ["patient_id", *POINT_MM, *POINT_IMAGE, "diameter_mm", "mask"]
"""The columns the reader understands; a file needs ``patient_id`` and one way to locate."""

MAX_DIAMETER_MM = 200.0
_SHOWN_ERRORS = 10
# NIfTI is RAS, DICOM patient coordinates LPS: x and y change sign.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


class LesionTruthError(ValueError):
    """A lesion file or row that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class LesionRow:
    """One row of the lesion CSV, checked."""

    line: int
    """Line of the file (the header is line 1)."""
    patient_id: str
    centre_mm: tuple[float, float, float] | None = None
    sop_instance_uid: str = ""
    pixel: tuple[float, float] | None = None
    """(row, column) on the image ``sop_instance_uid``."""
    diameter_mm: float = math.nan
    mask: str = ""


# --------------------------------------------------------------------------- reading the CSV


def _number(cells: dict, name: str, problems: list[str]) -> float:
    text = cells.get(name, "").strip()
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{name} {text!r} is not a number")
        return math.nan
    if not math.isfinite(value):
        problems.append(f"{name} {text!r} is not a finite number")
    return value


def _check_row(cells: dict, line: int, folder: Path) -> tuple[LesionRow | None, list[str]]:
    """The row as a :class:`LesionRow`, or the reasons it is unusable."""
    problems: list[str] = []
    pid = cells.get("patient_id", "").strip()
    if not pid:
        problems.append("patient_id is empty")
    given = {
        what: [c for c in names if cells.get(c, "").strip()]
        for what, names in (("mm", POINT_MM), ("image", POINT_IMAGE), ("mask", ("mask",)))
    }
    kinds = [what for what, present in given.items() if present]
    if len(kinds) != 1:
        problems.append(
            "no location: give x_mm,y_mm,z_mm or sop_instance_uid,row,column or mask"
            if not kinds
            else f"more than one location given ({', '.join(sorted(sum(given.values(), [])))}): "
            "give one"
        )
        return None, problems
    kind = kinds[0]
    if kind == "mask":
        mask = cells["mask"].strip()
        path = Path(mask) if os.path.isabs(mask) else folder / mask
        if not path.is_file():
            problems.append(f"mask {mask!r} not found (looked for {path})")
        if cells.get("diameter_mm", "").strip():
            problems.append("diameter_mm must be empty on a mask row (the mask gives it)")
        return (None if problems else LesionRow(line, pid, mask=str(path))), problems
    names = POINT_MM if kind == "mm" else POINT_IMAGE
    missing = [c for c in names if not cells.get(c, "").strip()]
    if missing:
        problems.append(f"{', '.join(missing)} empty (a centre needs all of {', '.join(names)})")
    diameter = _number(cells, "diameter_mm", problems)
    if math.isfinite(diameter) and not 0.0 < diameter <= MAX_DIAMETER_MM:
        problems.append(f"diameter_mm {diameter:g} is not in (0, {MAX_DIAMETER_MM:g}] mm")
    if missing:
        return None, problems
    if kind == "mm":
        centre = tuple(_number(cells, c, problems) for c in POINT_MM)
        row = LesionRow(line, pid, centre_mm=centre, diameter_mm=diameter)  # type: ignore[arg-type]
    else:
        pixel = (_number(cells, "row", problems), _number(cells, "column", problems))
        if any(p < 0 for p in pixel if math.isfinite(p)):
            problems.append(f"row/column {pixel} must not be negative (0-based pixel indices)")
        sop = cells["sop_instance_uid"].strip()
        row = LesionRow(line, pid, sop_instance_uid=sop, pixel=pixel, diameter_mm=diameter)
    return (None if problems else row), problems


def read_lesion_truth(path: str | os.PathLike[str]) -> list[LesionRow]:
    """The rows of a lesion CSV; raises :class:`LesionTruthError` naming every bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: lesion file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LesionTruthError(f"{path}: not a readable CSV ({err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if "patient_id" not in table.columns:
        raise LesionTruthError(f"{path}: no patient_id column (columns: {list(table.columns)})")
    if not {*POINT_MM, *POINT_IMAGE, "mask"} & set(table.columns):
        raise LesionTruthError(
            f"{path}: no location columns; give x_mm,y_mm,z_mm,diameter_mm or "
            "sop_instance_uid,row,column,diameter_mm or mask (docs/evaluation.md)"
        )
    rows, errors = [], []
    for i, cells in enumerate(table.to_dict("records")):
        row, problems = _check_row(cells, i + 2, path.parent)
        if problems:
            pid = str(cells.get("patient_id", "")).strip()
            errors.append(f"line {i + 2}" + (f" (patient {pid})" if pid else "") + ": "
                          + "; ".join(problems))  # fmt: skip
        elif row is not None:
            rows.append(row)
    if errors:
        more = (
            f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        )
        raise LesionTruthError(
            f"{path}: {len(errors)} bad row(s):\n  " + "\n  ".join(errors[:_SHOWN_ERRORS]) + more
        )
    return rows


# --------------------------------------------------------------------------- source geometry


@dataclass(frozen=True)
class SourceGeometry:
    """Where the pixels of the series a cache was prepared from lie (LPS, mm), slices in
    ascending position along the normal, as ``load_series`` and ``load_nifti`` order them."""

    origins: np.ndarray
    """[N, 3]: the centre of pixel (0, 0) of each slice."""
    row_dir: np.ndarray
    """Unit vector along a row (increasing column): ImageOrientationPatient[:3]."""
    col_dir: np.ndarray
    """Unit vector down a column (increasing row): ImageOrientationPatient[3:]."""
    spacing: tuple[float, float]
    """(between rows, between columns), mm."""
    shape: tuple[int, int]
    positions: np.ndarray
    """[N] mm along the slice normal, as the cache's positions are measured."""
    normal: np.ndarray
    sop_slices: dict[str, int]
    """Single-frame SOPInstanceUID -> slice index."""

    def point(self, sop_instance_uid: str, pixel: tuple[float, float]) -> np.ndarray:
        """Patient coordinates of (row, column) on one image of the series."""
        k = self.sop_slices[sop_instance_uid]
        row, column = pixel
        return (
            self.origins[k]
            + self.row_dir * column * self.spacing[1]
            + self.col_dir * row * self.spacing[0]
        )

    def in_plane(self, point: np.ndarray) -> tuple[float, float]:
        """(row, column) in source pixels of ``point`` on the slice nearest to it (each slice's
        own origin, so that a tilted gantry's shifting origins are followed)."""
        k = int(np.argmin(np.abs(self.positions - float(point @ self.normal))))
        d = np.asarray(point, dtype=np.float64) - self.origins[k]
        return float(d @ self.col_dir) / self.spacing[0], float(d @ self.row_dir) / self.spacing[1]


class SeriesFiles:
    """Where the files of a cached patient's series are.

    From a series index's file table (``brainmets index``; no header is read) when one is
    given and its paths are there; else found under the source folder the cache names, whose
    headers are read once per folder (patients that share a folder, as in a flat archive,
    cost one walk, not one each).
    """

    def __init__(self, index_files: pd.DataFrame | None = None):
        self._indexed: dict[str, list[str]] = {}
        if index_files is not None:
            for uid, paths in index_files.groupby("series_uid", sort=False)["path"]:
                self._indexed[str(uid)] = paths.astype(str).tolist()
        self._walked: dict[str, dict[str, list[str]]] = {}

    def of(self, source: str, series_uid: str) -> list[str]:
        """The files of ``series_uid``; [] when none is found."""
        indexed = self._indexed.get(series_uid)
        if indexed and all(os.path.isfile(path) for path in indexed):
            return indexed
        if source not in self._walked:
            root = Path(source)
            paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            found: dict[str, list[str]] = {}
            for path in paths:
                ds = read_header(path)
                if ds is not None:
                    found.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(str(path))
            self._walked[source] = found
        return self._walked[source].get(series_uid, [])


def dicom_geometry(files: list[str]) -> SourceGeometry:
    """The geometry of one DICOM series from its files' headers (single- or multi-frame)."""
    slices = []  # (position, origin, sop or "")
    first = None
    for path in files:
        ds = read_header(path)
        if ds is None or "Rows" not in ds:
            continue
        frames = range(number_of_frames(ds)) if is_multiframe(ds) else [None]
        for frame in frames:
            iop = frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            spacing = frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
            if iop is None or ipp is None or spacing is None:
                raise ValueError(
                    f"{path}: no ImageOrientationPatient/ImagePositionPatient/PixelSpacing"
                )
            if first is None:
                iop = np.asarray(iop, dtype=np.float64)
                first = (iop, dicom_slice_normal(iop), tuple(float(s) for s in spacing),
                         (int(ds.Rows), int(ds.Columns)))  # fmt: skip
            origin = np.asarray(ipp, dtype=np.float64)
            sop = "" if frame is not None else str(ds.get("SOPInstanceUID", ""))
            slices.append((float(origin @ first[1]), origin, sop))
    if first is None:
        raise FileNotFoundError("no image of the series among its files")
    slices.sort(key=lambda s: s[0])
    iop, normal, spacing, shape = first
    return SourceGeometry(
        origins=np.stack([s[1] for s in slices]),
        row_dir=iop[:3] / np.linalg.norm(iop[:3]),
        col_dir=iop[3:] / np.linalg.norm(iop[3:]),
        spacing=spacing,  # type: ignore[arg-type]
        shape=shape,
        positions=np.array([s[0] for s in slices]),
        normal=normal,
        sop_slices={s[2]: k for k, s in enumerate(slices) if s[2]},
    )


def nifti_geometry(path: str | os.PathLike[str]) -> SourceGeometry:
    """The geometry of a NIfTI volume as ``load_nifti`` lays it out: canonical RAS, each slice
    with rows anterior -> posterior and columns right -> left (a DICOM axial image)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    n_r, n_a, n_s = image.shape[:3]
    affine = image.affine
    m, t = affine[:3, :3], affine[:3, 3]
    # Cache pixel (k, row, col) is voxel (n_r - 1 - col, n_a - 1 - row, k).
    corner = m[:, 0] * (n_r - 1) + m[:, 1] * (n_a - 1) + t
    origins = np.stack([(corner + m[:, 2] * k) * _RAS_TO_LPS for k in range(n_s)])
    along_row, down_column = -m[:, 0] * _RAS_TO_LPS, -m[:, 1] * _RAS_TO_LPS
    normal_ras = m[:, 2] / np.linalg.norm(m[:, 2])
    zooms = image.header.get_zooms()[:3]
    return SourceGeometry(
        origins=origins,
        row_dir=along_row / np.linalg.norm(along_row),
        col_dir=down_column / np.linalg.norm(down_column),
        spacing=(float(zooms[1]), float(zooms[0])),
        shape=(n_a, n_r),
        positions=np.array([normal_ras @ (m[:, 2] * k + t) for k in range(n_s)]),
        normal=normal_ras * _RAS_TO_LPS,  # LPS point . LPS normal == RAS point . RAS normal
        sop_slices={},
    )


# --------------------------------------------------------------------------- masks


def _components(mask: np.ndarray, index_to_lps) -> list[tuple[np.ndarray, float]]:
    """(centroid in LPS mm, equal-volume sphere diameter) of each 26-connected component;
    ``index_to_lps`` maps voxel indices [K, 3] (array axis order) to LPS points."""
    from scipy import ndimage

    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))
    found = []
    for k in range(1, count + 1):
        voxels = np.argwhere(labels == k).astype(np.float64)
        centre = index_to_lps(voxels.mean(axis=0, keepdims=True))[0]
        unit = index_to_lps(np.vstack([np.zeros(3), np.eye(3)]))
        voxel_mm3 = abs(float(np.linalg.det(unit[1:] - unit[0])))
        volume = len(voxels) * voxel_mm3
        found.append((centre, (6.0 * volume / math.pi) ** (1.0 / 3.0)))
    return found


def mask_lesions(path: str | os.PathLike[str]) -> list[tuple[np.ndarray, float]]:
    """The lesions of a NIfTI or DICOM SEG mask: (centre LPS mm, diameter mm) per component."""
    path = str(path)
    if is_nifti(path):
        import nibabel as nib

        image = nib.load(path)
        data = np.asarray(image.dataobj)
        affine = image.affine
        return _components(
            data.reshape(data.shape[:3]),
            lambda ijk: (ijk @ affine[:3, :3].T + affine[:3, 3]) * _RAS_TO_LPS,
        )
    import highdicom as hd

    seg = hd.seg.segread(path)
    volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    affine = volume.affine  # voxel index -> LPS mm
    array = np.asarray(volume.array)
    return _components(array, lambda ijk: ijk @ affine[:3, :3].T + affine[:3, 3])


# --------------------------------------------------------------------------- onto the cache


@dataclass(frozen=True)
class CachedLesion:
    """A lesion where the cache holds it."""

    patient_id: str
    number: int
    """1-based, in the order of the file (a mask's components follow its row)."""
    line: int
    diameter_mm: float
    position_mm: float
    """Centre along the slice normal."""
    row: float
    column: float
    """Centre in cache pixels (fractional)."""
    pixel_mm: tuple[float, float]
    """Size of a cache pixel (row, column) in mm."""
    slices: tuple[int, ...]
    """Cache slabs that cut the lesion: those whose extent reaches its centre within its
    radius."""

    @property
    def radius_px(self) -> float:
        return self.diameter_mm / 2 / float(np.mean(self.pixel_mm))


def slab_thickness(positions: np.ndarray) -> float:
    """Thickness of a slab: the median step between slab centres (one slab when alone)."""
    return float(np.median(np.diff(positions))) if len(positions) > 1 else 5.0


def place_lesion(
    patient_id: str,
    number: int,
    line: int,
    centre: np.ndarray,
    diameter_mm: float,
    geometry: SourceGeometry,
    positions: np.ndarray,
    size: int,
) -> CachedLesion:
    """A lesion centre (LPS mm) on the cache of ``size``; ValueError when it is not imaged."""
    centre = np.asarray(centre, dtype=np.float64)
    z = float(centre @ geometry.normal)
    half = slab_thickness(positions) / 2
    radius = diameter_mm / 2
    slices = tuple(int(k) for k in np.flatnonzero(np.abs(positions - z) < radius + half))
    if not slices:
        raise ValueError(
            f"centre {z:.1f} mm along the slice normal lies outside the scanned range "
            f"{positions[0] - half:.1f} to {positions[-1] + half:.1f} mm"
        )
    row, column = geometry.in_plane(centre)
    rows, columns = geometry.shape
    if not (-0.5 <= row <= rows - 0.5 and -0.5 <= column <= columns - 0.5):
        raise ValueError(
            f"centre at pixel ({row:.1f}, {column:.1f}) lies outside the {rows}x{columns} image"
        )
    side = max(rows, columns)
    scale = size / side
    top, left = (side - rows) // 2, (side - columns) // 2
    return CachedLesion(
        patient_id=patient_id,
        number=number,
        line=line,
        diameter_mm=float(diameter_mm),
        position_mm=z,
        row=(row + top + 0.5) * scale - 0.5,
        column=(column + left + 0.5) * scale - 0.5,
        pixel_mm=(geometry.spacing[0] / scale, geometry.spacing[1] / scale),
        slices=slices,
    )


def source_geometry(
    cache: PatientCache, patient_id: str, series_files: SeriesFiles | None = None
) -> SourceGeometry:
    """The geometry of the series ``patient_id``'s cache entry was prepared from."""
    row = cache.row(patient_id)
    source, kind = str(row.get("source", "")), str(row.get("source_kind", ""))
    if not source or kind not in ("dicom", "dicom_dir", "nifti"):
        raise ValueError(f"the cache does not name its source image ({kind or 'no source'})")
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"source {source} is not there (lesions are placed by its geometry)"
        )
    if kind == "nifti":
        return nifti_geometry(source)
    uid = str(row["series_uid"])
    files = (series_files or SeriesFiles()).of(source, uid)
    if not files:
        raise FileNotFoundError(f"no file of series {uid} under {source}")
    return dicom_geometry(files)


@dataclass
class PlacedLesions:
    """Every lesion of the truth file placed on the cache, and those that could not be."""

    lesions: list[CachedLesion]
    unplaced: list[dict]
    """patient_id, line, reason."""

    def of(self, patient_id: str) -> list[CachedLesion]:
        return [lesion for lesion in self.lesions if lesion.patient_id == patient_id]


def _row_lesions(row: LesionRow, geometry: SourceGeometry) -> list[tuple[np.ndarray, float]]:
    """(centre LPS mm, diameter mm) of the lesions one row gives."""
    if row.mask:
        return mask_lesions(row.mask)
    if row.centre_mm is not None:
        return [(np.asarray(row.centre_mm, dtype=np.float64), row.diameter_mm)]
    if row.sop_instance_uid not in geometry.sop_slices:
        raise ValueError(
            f"SOPInstanceUID {row.sop_instance_uid} is not a single-frame image of the "
            "series the cache was prepared from"
        )
    return [(geometry.point(row.sop_instance_uid, row.pixel), row.diameter_mm)]


def place_lesions(
    rows: list[LesionRow],
    cache: PatientCache,
    patient_ids: list[str],
    series_files: SeriesFiles | None = None,
) -> PlacedLesions:
    """The truth of ``patient_ids`` on the cache; a lesion that cannot be placed (its source
    gone, outside the scanned range, an unknown image) is recorded with the reason.
    ``series_files`` finds each series' files (by default under the cache's source)."""
    series_files = series_files or SeriesFiles()
    wanted = set(patient_ids)
    by_patient: dict[str, list[LesionRow]] = {}
    for row in rows:
        if row.patient_id in wanted:
            by_patient.setdefault(row.patient_id, []).append(row)
    placed: list[CachedLesion] = []
    unplaced: list[dict] = []
    size = cache.preprocess.size
    for pid, patient_rows in by_patient.items():
        try:
            positions = cache.positions(pid)
            if positions is None:
                raise ValueError("the cache has no slab positions for it (prepare it again)")
            geometry = source_geometry(cache, pid, series_files)
        except (OSError, ValueError) as err:
            unplaced += [
                {"patient_id": pid, "line": r.line, "reason": str(err)} for r in patient_rows
            ]
            continue
        number = 0
        for row in patient_rows:
            try:
                for centre, diameter in _row_lesions(row, geometry):
                    number += 1
                    placed.append(
                        place_lesion(
                            pid, number, row.line, centre, diameter, geometry, positions, size
                        )
                    )
            except (OSError, ValueError) as err:
                unplaced.append({"patient_id": pid, "line": row.line, "reason": str(err)})
    for item in unplaced:
        log.warning(
            "lesion of patient %s (line %d) not placed: %s",
            item["patient_id"], item["line"], item["reason"],
        )  # fmt: skip
    return PlacedLesions(placed, unplaced)
