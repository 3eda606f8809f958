"""A patient's result as DICOM, in the source study: a TID 1500 Measurement Report (Comprehensive
3D SR) stating the finding, and Secondary Capture images of the Grad-CAM overlay on the top
slices.

One writer for ``predict --dicom-out`` and ``serve``. The objects are built by ``highdicom``;
what is ours is their content: the probability, decision and operating threshold exactly as
``predict`` reports them, the model that made them, and which source instances (and frames)
the top slices came from. Both series are marked for research use, since the model is not a
medical device. Patient and study identity are copied from the source (DICOM requires it in
the study), type by type (``header``); they are never logged. ``docs/dicom-results.md``
describes the SR.

Modules, in the order the writer uses them: ``header`` (the source identity made writable),
``source`` (the series' slices), ``codes``, ``report`` (the SR content, and reading it back),
``captures``, ``writer``.
"""

from __future__ import annotations

import logging

from brainmets.dicom_results.header import DicomResultError
from brainmets.dicom_results.report import ReportedResult, read_result
from brainmets.dicom_results.writer import (
    MANUFACTURER,
    RESEARCH_NOTE,
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    DicomResult,
    write_dicom_results,
)

__all__ = [
    "MANUFACTURER",
    "RESEARCH_NOTE",
    "SC_SERIES_NUMBER",
    "SR_SERIES_NUMBER",
    "DicomResult",
    "DicomResultError",
    "ReportedResult",
    "read_result",
    "write_dicom_results",
]


# highdicom narrates every attribute it copies, at INFO; only its warnings are news.
logging.getLogger("highdicom").setLevel(logging.WARNING)
