"""A patient's result as DICOM, in the source study: a Comprehensive SR stating the finding and
Secondary Capture images of the Grad-CAM overlay on the top slices.

One writer for ``predict --dicom-out`` and ``serve``. The objects are built by ``highdicom``;
what is ours is their content: the probability, decision and operating threshold exactly as
``predict`` reports them, the model that made them, and which source instances the top slices
came from. Both series are marked for research use, since the model is not a medical device.
Patient and study identity are copied from the source (DICOM requires it in the study); they
are never logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from brainmets import __version__
from brainmets.data.cache import patient_stem
from brainmets.data.dicom import frame_value, is_multiframe, number_of_frames, slice_normal
from brainmets.data.prepare import PreprocessedPatient
from brainmets.heatmaps import grad_cam
from brainmets.inference import TrainedModel
from brainmets.io import atomic_write
from brainmets.model.scoring import PatientScore

log = logging.getLogger(__name__)
# highdicom narrates every attribute it copies, at INFO; only its warnings are news.
logging.getLogger("highdicom").setLevel(logging.WARNING)

RESEARCH_NOTE = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
MANUFACTURER = "brainmets"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902

# Concepts without a standard code (the model's own outputs) use a private coding scheme, as
# DICOM PS3.16 allows ("99" prefix).
_SCHEME = "99BRAINMETS"
REPORT_TITLE = Code("BM000", _SCHEME, "Brain metastases detection (research)")
PROBABILITY = Code("BM001", _SCHEME, "Probability of brain metastases")
THRESHOLD = Code("BM002", _SCHEME, "Operating threshold")
FINDING = Code("94225005", "SCT", "Metastatic malignant neoplasm to brain")
PRESENT = Code("373066001", "SCT", "Yes")
ABSENT = Code("373067005", "SCT", "No")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SOURCE_SERIES = Code("112002", "DCM", "Series Instance UID")
SOURCE_IMAGE = Code("121112", "DCM", "Source of Measurement")
COMMENT = Code("121106", "DCM", "Comment")
NO_UNITS = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class SourceSlice:
    """The source instance (and frame of a multi-frame one) nearest to a slab centre."""

    header: Dataset
    frame: int | None  # 1-based frame number in a multi-frame instance
    position_mm: float


def _frame_positions(files: list[str]) -> list[SourceSlice]:
    """Every frame of the source series with its position along the slice normal, computed as
    ``brainmets.data.dicom`` orders slices (ImagePositionPatient on the orientation normal)."""
    slices = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = range(number_of_frames(ds)) if is_multiframe(ds) else [None]
        for frame in frames:
            orientation = frame_value(
                ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            position = frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            if orientation is None or position is None:
                continue
            mm = float(np.dot(np.asarray(position, dtype=float), slice_normal(orientation)))
            slices.append(SourceSlice(ds, None if frame is None else frame + 1, mm))
    return slices


def _nearest(slices: list[SourceSlice], position_mm: float) -> SourceSlice:
    return min(slices, key=lambda s: abs(s.position_mm - position_mm))


def overlay_rgb(slice_u8: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The windowed slice in grey with the Grad-CAM map blended over it (jet), uint8 RGB."""
    from matplotlib import colormaps

    grey = np.repeat(slice_u8[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.round(255.0 * ((1 - alpha) * grey + alpha * heat)).astype(np.uint8)


def _orientation_letters(orientation) -> tuple[str, str]:
    """PatientOrientation of a slice from its ImageOrientationPatient: the main direction of
    its rows and of its columns (the captures keep the slice's in-plane orientation)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    cosines = np.asarray(orientation, dtype=float)
    out = []
    for direction in (cosines[:3], cosines[3:6]):
        axis = int(np.argmax(np.abs(direction)))
        out.append(letters[axis][0 if direction[axis] > 0 else 1])
    return out[0], out[1]


def _uid(*parts: object) -> str:
    """Result UIDs derived from the study, model and revision: scoring the same study again
    (a restart after a crash) makes the same objects, so PACS stores no duplicates."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _save(ds: Dataset, path: Path) -> Path:
    return atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


def _report(
    trained: TrainedModel,
    score: PatientScore,
    series_uid: str,
    top: list[tuple[int, SourceSlice]],
):
    import highdicom as hd

    decision = int(trained.decision(score.logit))
    items = [
        hd.sr.NumContentItem(
            PROBABILITY,
            round(float(trained.probability(score.logit)), 6),
            NO_UNITS,
            relationship_type="CONTAINS",
        ),
        hd.sr.CodeContentItem(
            FINDING, PRESENT if decision else ABSENT, relationship_type="CONTAINS"
        ),
        hd.sr.NumContentItem(
            THRESHOLD, round(trained.threshold, 6), NO_UNITS, relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(
            ALGORITHM_NAME, f"brainmets model {trained.model_id}", relationship_type="CONTAINS"
        ),
        hd.sr.TextContentItem(ALGORITHM_VERSION, __version__, relationship_type="CONTAINS"),
        hd.sr.UIDRefContentItem(SOURCE_SERIES, series_uid, relationship_type="CONTAINS"),
    ]
    for _, source in top:
        items.append(
            hd.sr.ImageContentItem(
                SOURCE_IMAGE,
                source.header.SOPClassUID,
                source.header.SOPInstanceUID,
                referenced_frame_numbers=source.frame,
                relationship_type="CONTAINS",
            )
        )
    items.append(hd.sr.TextContentItem(COMMENT, RESEARCH_NOTE, relationship_type="CONTAINS"))
    root = hd.sr.ContainerContentItem(REPORT_TITLE)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


@dataclass(frozen=True)
class DicomResult:
    """The files written for one patient: the SR first, then the secondary captures."""

    sr: Path
    captures: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.sr, *self.captures]


def write_dicom_results(
    trained: TrainedModel,
    item: PreprocessedPatient,
    score: PatientScore,
    out_dir: str | Path,
    *,
    top_k: int = 3,
    revision: int = 0,
) -> DicomResult:
    """Write the SR and the Grad-CAM secondary captures of one DICOM patient into ``out_dir``.

    ``revision`` numbers results of the same study made again with more instances (serve);
    their objects get new UIDs."""
    import highdicom as hd

    if not item.job.files:
        raise ValueError(f"{item.job.patient_id}: DICOM results need DICOM input")
    slices = _frame_positions(item.job.files)
    if not slices:
        raise ValueError(f"{item.job.files[0]}: no slice of the series has a position")
    source = slices[0].header
    study_uid = source.StudyInstanceUID
    key = (study_uid, item.series_uid, trained.model_id, revision)
    order = np.argsort(score.slice_logits)[::-1][:top_k]
    top = [(int(i), _nearest(slices, float(item.positions[i]))) for i in order]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = patient_stem(item.job.patient_id)

    # The evidence is every instance of the scored series: the SR names the whole series it
    # was computed from, and the top slices among them.
    unique = {s.header.SOPInstanceUID: s.header for s in slices}
    sr = hd.sr.ComprehensiveSR(
        evidence=list(unique.values()),
        content=_report(trained, score, item.series_uid, top),
        series_instance_uid=_uid(*key, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(*key, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"brainmets finding ({RESEARCH_NOTE})",
        content_qualification="RESEARCH",
        software_versions=__version__,
    )
    sr_path = _save(sr, out_dir / f"{stem}_sr.dcm")

    images = torch.from_numpy(np.ascontiguousarray(item.array[order])).to(trained.device)
    cams = grad_cam(trained.model, trained.scorer.network_inputs(images))
    captures = []
    for rank, ((slice_index, origin), cam) in enumerate(zip(top, cams, strict=True), start=1):
        logit = float(score.slice_logits[slice_index])
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=overlay_rgb(item.array[slice_index], cam),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=_orientation_letters(
                frame_value(
                    origin.header,
                    None if origin.frame is None else origin.frame - 1,
                    "PlaneOrientationSequence",
                    "ImageOrientationPatient",
                )
            ),
            series_instance_uid=_uid(*key, "sc-series"),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=_uid(*key, "sc", rank),
            instance_number=rank,
            manufacturer=MANUFACTURER,
            series_description=f"brainmets Grad-CAM ({RESEARCH_NOTE})",
            content_qualification="RESEARCH",
            software_versions=__version__,
        )
        sc.ImageComments = (
            f"{RESEARCH_NOTE}. Rank {rank} slice, slice logit {logit:.3f}; "
            f"source {origin.header.SOPInstanceUID}"
            + (f" frame {origin.frame}" if origin.frame else "")
        )
        sc.BurnedInAnnotation = "NO"
        reference = Dataset()
        reference.ReferencedSOPClassUID = origin.header.SOPClassUID
        reference.ReferencedSOPInstanceUID = origin.header.SOPInstanceUID
        if origin.frame:
            reference.ReferencedFrameNumber = origin.frame
        sc.SourceImageSequence = [reference]
        captures.append(_save(sc, out_dir / f"{stem}_gradcam_rank{rank}.dcm"))
    return DicomResult(sr_path, captures)
