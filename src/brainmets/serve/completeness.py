"""Does a received series look complete? Checked on headers before a study is scored.

A sender that stops part way, a crash while a study arrives, a slow sender, one damaged slice
refused at receipt: each leaves a series with slices missing, and a result made from it may
miss the lesion on the slices that never came. Two signs, both from the series' own headers:

- a **gap** along the slice normal: a step between neighbouring slices larger than
  ``GAP_FACTOR`` times the steps around it. Local, not the series' median, because real head CT
  changes its spacing within one series (a sequential GE scan steps 4 mm through the posterior
  fossa, then 7 mm above it: each step is its neighbours' size, a missing slice is twice);
- a **count** short of what the headers announce: ImagesInAcquisition, when every instance of
  the series states the same value and belongs to one acquisition.

Slices missing at either end leave neither sign; nothing in a header says where a head CT
should stop. Such a study is scored once it is quiet for ``--stable-seconds``, and the rest,
when it comes, makes a later revision that names the one it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom

from brainmets.data.dicom import frame_value, is_multiframe, number_of_frames, slice_normal

GAP_FACTOR = 1.5
"""A step this many times the local spacing is a missing slice (one missing slice is 2x)."""
NEIGHBOURS = 3
"""Steps on each side that set the local spacing around a step."""


def _positions(headers: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Every slice's position along the normal of the series' first orientation, sorted."""
    found = []
    normal = None
    for ds in headers:
        frames = range(number_of_frames(ds)) if is_multiframe(ds) else [None]
        for frame in frames:
            orientation = frame_value(
                ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            position = frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            if orientation is None or position is None:
                continue  # the loader names such a slice when the study is scored
            if normal is None:
                normal = slice_normal([float(v) for v in orientation])
            found.append(float(np.dot(normal, np.asarray(position, dtype=float))))
    return np.unique(np.round(np.asarray(found), 3))


def gaps(positions: np.ndarray) -> list[tuple[float, float]]:
    """(from, to) of each step, along the normal, that misses at least one slice."""
    steps = np.diff(np.sort(positions))
    found = []
    for i, step in enumerate(steps):
        around = np.concatenate(
            [steps[max(0, i - NEIGHBOURS) : i], steps[i + 1 : i + 1 + NEIGHBOURS]]
        )
        if around.size and step > GAP_FACTOR * float(np.median(around)):
            found.append((float(positions[i]), float(positions[i + 1])))
    return found


def _announced(headers: Sequence[pydicom.Dataset]) -> int | None:
    """ImagesInAcquisition, when every instance of one acquisition states the same value."""
    values = {ds.get("ImagesInAcquisition") for ds in headers}
    acquisitions = {ds.get("AcquisitionNumber") for ds in headers}
    if len(values) != 1 or len(acquisitions) != 1 or any(is_multiframe(ds) for ds in headers):
        return None
    try:
        count = int(values.pop())
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None


def missing_slices(files: Sequence[str]) -> str:
    """Why the series of ``files`` looks incomplete, or '' when it looks complete."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    reasons = []
    announced = _announced(headers)
    if announced is not None and len(headers) < announced:
        reasons.append(f"{len(headers)} of the {announced} images its headers announce")
    found = gaps(_positions(headers))
    if found:
        where = ", ".join(f"{a:.1f} to {b:.1f} mm" for a, b in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        reasons.append(f"slices missing between {where}{more} along the slice normal")
    return "; ".join(reasons)
