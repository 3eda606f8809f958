"""The scored series as the result objects reference it: every slice (a single-frame instance,
or one frame of an Enhanced or Legacy Converted Enhanced CT instance) with its position along
the slice normal, so that a slab the model scored can be traced to the source slice nearest
its centre."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from brainmets.data.dicom import frame_value, is_multiframe, number_of_frames, slice_normal
from brainmets.dicom_results.header import InstanceRef


@dataclass(frozen=True)
class SourceSlice:
    """One slice of the source series and the instance (and frame) that holds it."""

    header: Dataset
    path: Path
    ref: InstanceRef
    frame: int | None  # 1-based frame number in a multi-frame instance, as DICOM counts
    position_mm: float

    def value(self, sequence: str, keyword: str):
        """``keyword`` of this slice, from its frame's functional groups where it has them."""
        return frame_value(
            self.header, None if self.frame is None else self.frame - 1, sequence, keyword
        )


def read_series(files: list[str]) -> list[SourceSlice]:
    """Every slice of the series with its position, computed as ``brainmets.data.dicom`` orders
    slices (ImagePositionPatient on the orientation normal). Raises
    :class:`~brainmets.dicom_results.header.DicomResultError` for an instance whose UIDs
    cannot be written."""
    slices = []
    for name in files:
        path = Path(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        with pydicom.config.disable_value_validation():  # InstanceRef says what is wrong
            ref = InstanceRef.of(ds, path)
        frames = range(number_of_frames(ds)) if is_multiframe(ds) else [None]
        for frame in frames:
            orientation = frame_value(
                ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            position = frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            if orientation is None or position is None:
                continue
            mm = float(np.dot(np.asarray(position, dtype=float), slice_normal(orientation)))
            slices.append(SourceSlice(ds, path, ref, None if frame is None else frame + 1, mm))
    return slices


def nearest(slices: list[SourceSlice], position_mm: float) -> SourceSlice:
    return min(slices, key=lambda s: abs(s.position_mm - position_mm))
