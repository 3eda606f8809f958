"""DICOM CT series -> Hounsfield-unit volume.

Step 1 of the data flow (preprocessing step 1 of the specification): headers are read with pydicom, pixels are
decoded through pydicom's pixel plugins (pylibjpeg, gdcm: JPEG, JPEG-LS, JPEG 2000, RLE, deflated,
big endian), and each slice is rescaled to HU with its *own* RescaleSlope / RescaleIntercept.

Decisions where the standard leaves room:

- **Padding -> air.** Stored values equal to PixelPaddingValue (or inside the range it spans with
  PixelPaddingRangeLimit) become :data:`PADDING_HU` = -1024 HU, the value of air on a 12-bit CT with
  intercept -1024. Padding marks pixels outside the reconstruction circle; left alone they read
  as -1500..-3024 HU, which the brain window clips to the same black as air anyway, but averaging
  (slabs, anti-aliased resize) next to them would otherwise drag real tissue values down.
- **Missing rescale tags.** RescaleSlope and RescaleIntercept are Type 1 in the CT Image module;
  a CT file without them is a :class:`SeriesError`. Guessing an intercept of 0 would shift every
  value of an unsigned scanner by 1024 HU and silently produce a blank brain window.
- **Multi-frame (Enhanced CT).** Each frame is a slice, with the position, orientation and
  rescale of its functional groups (per frame, else shared); one file may hold the series.
- **Geometry.** Slices are ordered by ImagePositionPatient projected on the slice normal (cross
  product of the two ImageOrientationPatient direction cosines), never by file name or
  InstanceNumber. Two slices at the same position -> ``"not a volume"``; differing matrix sizes
  or orientations -> error. Gaps and uneven spacing are recorded in :attr:`HUVolume.warnings`.
  Gantry tilt is allowed and not corrected: each 2-D slice is used as acquired.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

PADDING_HU = -1024.0
"""HU written where the scanner stored PixelPaddingValue (outside the field of view)."""

DUPLICATE_TOLERANCE_MM = 0.01
"""Two slices closer than this along the normal are the same position."""

UNEVEN_SPACING_TOLERANCE = 0.1
"""Relative spread of the slice spacing above which a warning is recorded."""

GAP_FACTOR = 1.5
"""A step larger than this many median spacings is reported as a gap (missing slices)."""


class SeriesError(Exception):
    """A series (or one file of it) that cannot become a volume; names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class HUVolume:
    """A CT volume in Hounsfield units, slices in ascending position along the slice normal."""

    hu: np.ndarray
    """float32 [N, H, W]."""
    positions_mm: np.ndarray
    """float64 [N], ImagePositionPatient projected on the slice normal, ascending."""
    pixel_spacing_mm: tuple[float, float]
    """(row spacing, column spacing) in mm."""
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    """SeriesInstanceUID for DICOM, the file path for NIfTI."""
    files: list[str] = field(default_factory=list)
    """The DICOM file of each slice in position order (a multi-frame file once per frame; []
    for NIfTI)."""


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------


def _is_directory_record(ds: Dataset) -> bool:
    """DICOMDIR and Philips DIRFILE: media directories, not images."""
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


_UNCOMPRESSED = set(pydicom.uid.UncompressedTransferSyntaxes)

NOT_DICOM = "not a DICOM file"
"""The reason for a file that is not DICOM at all, as opposed to a damaged DICOM file."""


def read_header_or_reason(path: str | os.PathLike[str]) -> tuple[Dataset | None, str | None]:
    """Headers of one file (no pixel data) and, when it is unusable, why.

    Returns ``(ds, None)`` for a DICOM instance, ``(None, None)`` for a DICOM file that is not
    an instance (DICOMDIR, DIRFILE), and ``(None, reason)`` for anything that is not DICOM or
    cannot be parsed (empty, truncated, text).
    """
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file (0 bytes)"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # Files without the 128-byte preamble still occur (old archives): accept them only
        # when a forced read finds an instance, so that text files are not taken for DICOM.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every guess it makes
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
                return None, NOT_DICOM
        except Exception:
            return None, NOT_DICOM
    except (OSError, EOFError) as err:
        return None, f"unreadable: {err}"
    except Exception as err:  # pydicom raises many types on corrupt data
        return None, f"corrupt DICOM header: {type(err).__name__}: {err}"
    if _is_directory_record(ds):
        return None, None
    if "SOPClassUID" not in ds:
        return None, "truncated or incomplete DICOM header (no SOPClassUID)"
    if "Image Storage" in getattr(ds.SOPClassUID, "name", "") and "Rows" not in ds:
        # An image whose header stops before its image description: a cut transfer, which
        # would otherwise pass for a non-image object and leave its series one slice short.
        return None, "truncated or incomplete DICOM header (an image without Rows)"
    short = _short_pixel_data(path, ds)
    if short:
        return None, short
    return ds, None


def _short_pixel_data(path: str | os.PathLike[str], ds: Dataset) -> str | None:
    """Why an uncompressed file cannot hold the pixel data its header describes, if so.

    Headers are read without the pixels, so a transfer stopped in the pixel data would only
    show when ``prepare`` decodes the series. For uncompressed transfer syntaxes the pixel
    data alone is Rows x Columns x bytes per sample x samples x frames: a file shorter than
    that is truncated (one truncated by less than its header's length still passes here)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _UNCOMPRESSED or syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return None
    try:
        samples = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * number_of_frames(ds)
        )
        expected = (samples * int(ds.BitsAllocated) + 7) // 8  # 1-bit images pack 8 per byte
    except (AttributeError, TypeError, ValueError):
        return None  # no image description: another check names what is missing
    size = os.path.getsize(path)
    if size < expected:
        return f"truncated: {size} bytes, less than its pixel data alone ({expected} bytes)"
    return None


def damaged_file_identity(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOP class name)`` of a damaged file, as far as what is left of
    its header says ("" where it does not): which series it would have belonged to, and
    whether it is an image at all (the file meta's SOP class when the dataset lost its own)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        series = str(ds.get("SeriesInstanceUID", "") or "")
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        return series, str(getattr(sop, "name", sop or ""))
    except Exception:  # whatever the damage, the answer is then "unknown"
        return "", ""


def read_header(path: str | os.PathLike[str]) -> Dataset | None:
    """Headers of one DICOM instance, or ``None`` for non-DICOM files, DICOMDIRs and DIRFILEs."""
    ds, _ = read_header_or_reason(path)
    return ds


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a slice: cross product of the row and column direction cosines."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:6])
    norm = np.linalg.norm(normal)
    if iop.shape != (6,) or norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {list(orientation)}")
    return normal / norm


def _geometry(frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """(ImageOrientationPatient, ImagePositionPatient) of one slice, both required."""
    orientation = frame.value("PlaneOrientationSequence", "ImageOrientationPatient")
    position = frame.value("PlanePositionSequence", "ImagePositionPatient")
    if orientation is None or position is None:
        raise SeriesError(frame.name, "missing ImageOrientationPatient/ImagePositionPatient")
    return np.asarray(orientation, dtype=np.float64), np.asarray(position, dtype=np.float64)


def _spacing_warnings(positions: np.ndarray) -> list[str]:
    """Gaps (missing slices) and uneven spacing; both are warnings, not errors."""
    if positions.size < 3:
        return []
    steps = np.diff(positions)
    median = float(np.median(steps))
    found = []
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        where = ", ".join(f"{positions[i]:.2f}->{positions[i + 1]:.2f} mm" for i in gaps[:5])
        found.append(
            f"gap in slice positions (missing slices?): {gaps.size} step(s) larger than "
            f"{GAP_FACTOR} x median spacing {median:.2f} mm at {where}"
        )
    if (steps.max() - steps.min()) > UNEVEN_SPACING_TOLERANCE * median:
        found.append(
            f"uneven slice spacing: {steps.min():.2f}-{steps.max():.2f} mm (median {median:.2f} mm)"
        )
    return found


def _pixel_spacing_warnings(frames: Sequence[_Frame], first: _Frame) -> list[str]:
    """Slices of one series with another PixelSpacing than the first's: the volume is resized
    with the first slice's spacing, so those slices are scaled wrongly (a warning: the
    series is still the scanner's, and a tiny difference is a rounding in the header)."""
    reference = first.value("PixelMeasuresSequence", "PixelSpacing")
    if reference is None:
        return []
    reference = np.asarray([float(v) for v in reference])
    odd = []
    for frame in frames:
        spacing = frame.value("PixelMeasuresSequence", "PixelSpacing")
        if spacing is None:
            continue
        spacing = np.asarray([float(v) for v in spacing])
        if spacing.shape != reference.shape or not np.allclose(spacing, reference, rtol=1e-3):
            odd.append((frame, spacing))
    if not odd:
        return []
    frame, spacing = odd[0]
    return [
        f"mixed pixel spacing: {len(odd)} slice(s) differ from {reference.tolist()} mm of "
        f"{first.name}, e.g. {spacing.tolist()} mm in {frame.name}; resized as "
        f"{reference.tolist()} mm"
    ]


# --------------------------------------------------------------------------------------------
# Pixels -> HU
# --------------------------------------------------------------------------------------------


def _as_stored(value: int, stored: np.ndarray) -> int:
    """PixelPaddingValue in the value domain of the decoded pixels.

    Its VR is US or SS depending on PixelRepresentation; headers read without that context
    (implicit VR) or written wrongly give e.g. 63536 for -2000 on signed pixels.
    """
    value = int(value)
    info = np.iinfo(stored.dtype) if stored.dtype.kind in "iu" else None
    if info is not None and stored.dtype.kind == "i" and value > info.max:
        value -= 1 << (8 * stored.dtype.itemsize)
    elif info is not None and stored.dtype.kind == "u" and value < 0:
        value += 1 << (8 * stored.dtype.itemsize)
    return value


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels that the scanner marked as padding (outside the field of view), or None."""
    if "PixelPaddingValue" not in ds or ds.PixelPaddingValue is None:
        return None
    low = high = _as_stored(ds.PixelPaddingValue, stored)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None:
        limit = _as_stored(limit, stored)
        low, high = min(low, limit), max(low, limit)
    mask = stored == low if low == high else (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _read_instance(path: str) -> Dataset:
    """Whole file (pixels decoded later, on first access) as one DICOM image instance."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise SeriesError(path, "not a DICOM file") from err
    except Exception as err:
        raise SeriesError(path, f"cannot read: {type(err).__name__}: {err}") from err
    if _is_directory_record(ds):
        raise SeriesError(path, "a DICOM directory (DICOMDIR/DIRFILE), not an image")
    if "PixelData" not in ds:
        raise SeriesError(path, "no pixel data")
    return ds


# --------------------------------------------------------------------------------------------
# Multi-frame (Enhanced CT) images
# --------------------------------------------------------------------------------------------


def is_multiframe(ds: Dataset) -> bool:
    """An enhanced image: frames described by functional groups (also with a single frame)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def frame_value(ds: Dataset, frame: int | None, sequence: str, keyword: str):
    """``keyword`` for one frame: from the frame's functional group (Per-Frame), else the
    shared one, else the top-level dataset, where single-frame images keep it.

    Enhanced CT moves ImagePositionPatient into PlanePositionSequence, ImageOrientationPatient
    into PlaneOrientationSequence, RescaleSlope/Intercept into PixelValueTransformationSequence
    and SliceThickness/PixelSpacing into PixelMeasuresSequence, each either per frame or
    shared by all frames.
    """
    groups = []
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            groups.append(per_frame[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and items[0].get(keyword) is not None:
            return items[0].get(keyword)
    return ds.get(keyword)


@dataclass
class _Frame:
    """One slice of a series: a single-frame file, or one frame of a multi-frame file."""

    path: str
    ds: Dataset
    index: int | None  # frame number (0-based) in a multi-frame file, None for single-frame

    @property
    def name(self) -> str:
        """How errors name it: the file, and the frame (1-based, as DICOM counts) if any."""
        return self.path if self.index is None else f"{self.path} (frame {self.index + 1})"

    def value(self, sequence: str, keyword: str):
        return frame_value(self.ds, self.index, sequence, keyword)


def _frames(path: str, ds: Dataset) -> list[_Frame]:
    if not is_multiframe(ds):
        return [_Frame(path, ds, None)]
    return [_Frame(path, ds, i) for i in range(number_of_frames(ds))]


def _decode(path: str, ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as err:
        ts = ds.file_meta.get("TransferSyntaxUID")
        name = f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"
        raise SeriesError(
            path, f"cannot decode pixel data with transfer syntax {name}: {err}"
        ) from err


def slice_hounsfield(
    path: str, ds: Dataset, stored: np.ndarray, frame: int | None = None
) -> np.ndarray:
    """HU of one slice: stored x RescaleSlope + RescaleIntercept of *this* file (of this frame,
    in a multi-frame file); padding -> air."""
    slope = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None or intercept is None:
        raise SeriesError(path, "missing RescaleSlope/RescaleIntercept: HU cannot be derived")
    if stored.ndim != 2:
        raise SeriesError(path, f"expected one grey-scale slice, got pixel array {stored.shape}")
    # The CT Image module rescales linearly (no Modality LUT Sequence). In float32 directly:
    # pydicom's apply_modality_lut goes through float64, which took a tenth of the decode
    # time; stored integers stay exact (below 2^24).
    hu = stored.astype(np.float32)
    slope, intercept = (
        _rescale_value(path, "RescaleSlope", slope),
        _rescale_value(path, "RescaleIntercept", intercept),
    )
    if slope == 0.0 or not math.isfinite(slope) or not math.isfinite(intercept):
        # NaN or 0 made all-zero (all-air) slices and inf saturated them: a volume that scores
        # as a patient, silently. No repair is safe: the slope is the scanner's calibration.
        raise SeriesError(
            path,
            f"invalid rescale: RescaleSlope {slope}, RescaleIntercept {intercept} (the slope "
            "must be finite and non-zero, the intercept finite): HU cannot be derived",
        )
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    mask = padding_mask(ds, stored)
    if mask is not None:
        hu[mask] = PADDING_HU
    return hu


def _rescale_value(path: str, keyword: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise SeriesError(
            path, f"{keyword} {value!r} is not a number: HU cannot be derived"
        ) from err


# --------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------


def load_series(files: Sequence[str | os.PathLike[str]]) -> HUVolume:
    """Decode one series into an :class:`HUVolume` sorted along the slice normal.

    Raises :class:`SeriesError` naming the offending file for undecodable pixels, missing
    rescale or geometry tags, mixed matrix sizes or orientations, and duplicate positions.
    """
    paths = [str(Path(f)) for f in files]
    if not paths:
        raise SeriesError("<empty series>", "no files")

    headers = [_read_instance(path) for path in paths]
    frames = [frame for path, ds in zip(paths, headers, strict=True) for frame in _frames(path, ds)]

    first = frames[0]
    iop, _ = _geometry(first)
    try:
        normal = slice_normal(iop)
    except ValueError as err:
        raise SeriesError(first.name, str(err)) from err
    rows, columns = first.ds.get("Rows"), first.ds.get("Columns")
    positions = np.empty(len(frames), dtype=np.float64)
    for i, frame in enumerate(frames):
        orientation, position = _geometry(frame)
        if not np.allclose(orientation, iop, atol=1e-3):
            raise SeriesError(frame.name, "ImageOrientationPatient differs within the series")
        if (frame.ds.get("Rows"), frame.ds.get("Columns")) != (rows, columns):
            raise SeriesError(
                frame.path,
                f"mixed matrix sizes: {frame.ds.get('Rows')}x{frame.ds.get('Columns')} "
                f"vs {rows}x{columns} in {first.path}",
            )
        positions[i] = float(np.dot(position, normal))

    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    steps = np.diff(positions)
    if steps.size and steps.min() < DUPLICATE_TOLERANCE_MM:
        i = int(np.argmin(steps))
        raise SeriesError(
            frames[order[i + 1]].name,
            f"not a volume: {int((steps < DUPLICATE_TOLERANCE_MM).sum()) + 1} slices share "
            f"positions along the normal (e.g. {positions[i]:.2f} mm, also "
            f"{frames[order[i]].name})",
        )

    hu = np.empty((len(frames), int(rows), int(columns)), dtype=np.float32)
    decoded: dict[str, np.ndarray] = {}  # a multi-frame file is decoded once, for all frames
    for k, i in enumerate(order):
        frame = frames[i]
        if frame.path not in decoded:
            decoded[frame.path] = _decode(frame.path, frame.ds)
        pixels = decoded[frame.path]
        if frame.index is not None and pixels.ndim == 3:
            pixels = pixels[frame.index]
        if pixels.shape != hu.shape[1:]:
            raise SeriesError(
                frame.name, f"pixel array {pixels.shape} does not match {hu.shape[1:]}"
            )
        hu[k] = slice_hounsfield(frame.name, frame.ds, pixels, frame.index)

    spacing = first.value("PixelMeasuresSequence", "PixelSpacing") or [1.0, 1.0]
    return HUVolume(
        hu=hu,
        positions_mm=positions,
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
        warnings=_spacing_warnings(positions) + _pixel_spacing_warnings(frames, first),
        source=str(first.ds.get("SeriesInstanceUID", paths[0])),
        files=[frames[i].path for i in order],
    )
