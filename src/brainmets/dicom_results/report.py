"""The result SR's content: a TID 1500 Measurement Report (PS3.16), the template viewers that
follow IHE AI Results display, built with highdicom's templates.

One measurement group (TID 1501) holds the patient-level finding: the probability and the
operating threshold as measurements, the decision as a qualitative evaluation of
"Metastatic malignant neoplasm to brain" (present or absent), the top slices as its source
images, and the model as its algorithm (TID 4019). The model is also the observer (a device,
TID 1004). The image library (TID 1600) describes the top slices, frames of multi-frame
instances included, which highdicom's own library cannot express. Statements about the whole
report (research use only, a partial input, stated limitations) are text qualitative
evaluations (TID 1500 row 12). ``docs/dicom-results.md`` shows the tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from brainmets.dicom_results import codes
from brainmets.dicom_results.header import valid_uid
from brainmets.dicom_results.source import SourceSlice

TRACKING_IDENTIFIER = "brain metastases, patient level"
_ACQ = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_DIRECTION = Code("{-1:1}", "UCUM", "{-1:1}")


@dataclass(frozen=True)
class Finding:
    """What the model concluded for the patient, exactly as ``predict`` reports it."""

    probability: float
    threshold: float
    present: bool


@dataclass(frozen=True)
class Observer:
    """The model as the observer device and as the algorithm of the measurement group."""

    uid: str  # Device Observer UID: the same for every result of this model
    model_id: str  # the weights' digest, written as the device serial number
    model_name: str
    manufacturer: str
    software_version: str
    parameters: tuple[str, ...] = ()


def _unique(slices: list[SourceSlice]) -> list[SourceSlice]:
    """Each referenced (instance, frame) once: two top slabs may share their nearest slice."""
    seen, kept = set(), []
    for s in slices:
        key = (s.ref.sop_instance_uid, s.frame)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def _numbers(values, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    ok = len(numbers) == count and all(math.isfinite(v) for v in numbers)
    return numbers if ok else None


def _descriptors(s: SourceSlice) -> list[hd.sr.ContentItem]:
    """TID 1602/1604 descriptors of one slice, each written only when the source holds a
    usable value (a de-identified or converted header may lack slice thickness)."""
    items: list[hd.sr.ContentItem] = [
        # Every series brainmets scores is of a CT image storage class.
        hd.sr.CodeContentItem(
            dicom_codes.DCM.Modality, dicom_codes.DCM.ComputedTomography, relationship_type=_ACQ
        )
    ]
    frame_of_reference = s.header.get("FrameOfReferenceUID")
    if valid_uid(frame_of_reference):
        items.append(
            hd.sr.UIDRefContentItem(
                dicom_codes.DCM.FrameOfReferenceUID, frame_of_reference, relationship_type=_ACQ
            )
        )
    numeric: list[tuple[Code, float, Code]] = []
    if size := _numbers([s.header.get("Rows"), s.header.get("Columns")], 2):
        numeric += [
            (dicom_codes.DCM.PixelDataRows, size[0], _PIXELS),
            (dicom_codes.DCM.PixelDataColumns, size[1], _PIXELS),
        ]
    spacing = _numbers(s.value("PixelMeasuresSequence", "PixelSpacing") or [], 2)
    if spacing:
        numeric += [
            (dicom_codes.DCM.HorizontalPixelSpacing, spacing[1], dicom_codes.UCUM.Millimeter),
            (dicom_codes.DCM.VerticalPixelSpacing, spacing[0], dicom_codes.UCUM.Millimeter),
        ]
    thickness = _numbers([s.value("PixelMeasuresSequence", "SliceThickness")], 1)
    if thickness:
        numeric.append((dicom_codes.DCM.SliceThickness, thickness[0], dicom_codes.UCUM.Millimeter))
    position = _numbers(s.value("PlanePositionSequence", "ImagePositionPatient") or [], 3)
    if position:
        names = ("ImagePositionPatientX", "ImagePositionPatientY", "ImagePositionPatientZ")
        numeric += [
            (getattr(dicom_codes.DCM, n), v, dicom_codes.UCUM.Millimeter)
            for n, v in zip(names, position, strict=True)
        ]
    orientation = _numbers(s.value("PlaneOrientationSequence", "ImageOrientationPatient") or [], 6)
    if orientation:
        names = tuple(f"ImageOrientationPatient{a}{b}" for a in ("Row", "Column") for b in "XYZ")
        numeric += [
            (getattr(dicom_codes.DCM, n), v, _DIRECTION)
            for n, v in zip(names, orientation, strict=True)
        ]
    items += [hd.sr.NumContentItem(n, v, u, relationship_type=_ACQ) for n, v, u in numeric]
    return items


def image_library(top: list[SourceSlice]) -> hd.sr.ContainerContentItem:
    """TID 1600: the top slices, each with its frame number when it is one frame of a
    multi-frame instance. An empty library (no top slices asked for) is valid."""
    library = hd.sr.ContainerContentItem(codes.IMAGE_LIBRARY, relationship_type=_CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    entries = []
    for s in _unique(top):
        entry = hd.sr.ImageContentItem(
            codes.SOURCE,
            s.ref.sop_class_uid,
            s.ref.sop_instance_uid,
            referenced_frame_numbers=s.frame,
            relationship_type=_CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_descriptors(s))
        entries.append(entry)
    if entries:
        group = hd.sr.ContainerContentItem(codes.IMAGE_LIBRARY_GROUP, relationship_type=_CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence(entries)
        library.ContentSequence.append(group)
    return library


def _observation_context(observer: Observer) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=observer.uid,
        name=f"{observer.manufacturer} {observer.model_id}",
        manufacturer_name=observer.manufacturer,
        model_name=observer.model_name,
        serial_number=observer.model_id,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE, observer_identifying_attributes=device
        )
    )


def _finding_group(
    finding: Finding, observer: Observer, tracking_uid: str, top: list[SourceSlice]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sources = [
        hd.sr.SourceImageForMeasurementGroup(
            s.ref.sop_class_uid,
            s.ref.sop_instance_uid,
            referenced_frame_numbers=None if s.frame is None else [s.frame],
        )
        for s in _unique(top)
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=TRACKING_IDENTIFIER
        ),
        finding_type=codes.FINDING,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=observer.model_name,
            version=observer.software_version,
            parameters=list(observer.parameters) or None,
            manufacturer=observer.manufacturer,
        ),
        finding_sites=[hd.sr.FindingSite(codes.FINDING_SITE)],
        measurements=[
            hd.sr.Measurement(codes.PROBABILITY, finding.probability, codes.PROBABILITY_UNIT),
            hd.sr.Measurement(codes.THRESHOLD, finding.threshold, codes.PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                codes.FINDING, codes.PRESENT if finding.present else codes.ABSENT
            )
        ],
        source_images=sources or None,
    )


def measurement_report(
    finding: Finding,
    observer: Observer,
    *,
    tracking_uid: str,
    top: list[SourceSlice],
    notes: list[str],
) -> hd.sr.MeasurementReport:
    """The whole content tree; ``notes`` become the text qualitative evaluations."""
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=[_finding_group(finding, observer, tracking_uid, top)],
    )
    root = report[0]
    # TID 1500 orders the image library (row 5) before the imaging measurements (row 6).
    measurements_at = next(
        i
        for i, item in enumerate(root.ContentSequence)
        if item.name == dicom_codes.DCM.ImagingMeasurements
    )
    root.ContentSequence.insert(measurements_at, image_library(top))
    evaluations = hd.sr.ContainerContentItem(
        codes.QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(codes.COMMENT, note, relationship_type=_CONTAINS) for note in notes]
    )
    root.ContentSequence.append(evaluations)
    return report


# ------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ReportedResult:
    """A result SR read back with highdicom's SR parsing: what a PACS or viewer gets."""

    probability: float
    threshold: float
    present: bool
    model_id: str
    complete: bool
    notes: list[str]
    source_images: list[tuple[str, int | None]]  # (SOP instance UID, frame number)
    predecessors: list[str] = field(default_factory=list)  # SOP instance UIDs it replaces


def _read_sr(sr: Dataset | str | Path):
    if isinstance(sr, Dataset):
        return hd.sr.Comprehensive3DSR.from_dataset(sr)
    return hd.sr.srread(sr)


def read_result(sr: Dataset | str | Path) -> ReportedResult:
    """Parse a result SR (a file or a dataset) the way a TID 1500 reader does; raises
    ValueError when it is not a brainmets measurement report."""
    document = _read_sr(sr)
    report = hd.sr.MeasurementReport.from_sequence([document], copy=True)
    groups = report.get_image_measurement_groups(finding_type=codes.FINDING)
    if len(groups) != 1:
        raise ValueError(f"expected one brain metastases finding group, found {len(groups)}")
    group = groups[0]
    [probability] = group.get_measurements(name=codes.PROBABILITY)
    [threshold] = group.get_measurements(name=codes.THRESHOLD)
    [evaluation] = group.get_qualitative_evaluations(name=codes.FINDING)
    [device] = report.get_observer_contexts(observer_type=codes.DEVICE)
    evaluations = hd.sr.utils.find_content_items(
        report[0], name=codes.QUALITATIVE_EVALUATIONS, value_type=hd.sr.ValueTypeValues.CONTAINER
    )
    notes = [
        item.value
        for container in evaluations
        for item in container.ContentSequence
        if item.value_type == hd.sr.ValueTypeValues.TEXT
    ]
    images = [
        (item.referenced_sop_instance_uid, (item.referenced_frame_numbers or [None])[0])
        for item in group.source_images
    ]
    predecessors = [
        instance.ReferencedSOPInstanceUID
        for study in document.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    return ReportedResult(
        probability=float(probability.value),
        threshold=float(threshold.value),
        present=evaluation.value == codes.PRESENT,
        model_id=str(device.observer_identifying_attributes.serial_number),
        complete=document.CompletionFlag == "COMPLETE",
        notes=notes,
        source_images=images,
        predecessors=predecessors,
    )
