"""One patient's result written as DICOM objects in the source study: the SR and the captures.

UIDs are derived from the study, series, model and revision, so writing the same result
again makes the same objects (a resend after a crash stores no duplicate in PACS).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from brainmets import __version__
from brainmets.data.cache import patient_stem
from brainmets.data.prepare import PreprocessedPatient
from brainmets.dicom_results.captures import capture, overlay_rgb
from brainmets.dicom_results.header import (
    DicomResultError,
    InstanceRef,
    for_highdicom,
    restore_identity,
    study_header,
)
from brainmets.dicom_results.report import Finding, Observer, measurement_report
from brainmets.dicom_results.source import SourceSlice, nearest, read_series
from brainmets.heatmaps import grad_cam
from brainmets.inference import TrainedModel
from brainmets.io import atomic_write
from brainmets.model.scoring import PatientScore

log = logging.getLogger(__name__)

RESEARCH_NOTE = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
MANUFACTURER = "brainmets"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def _description(what: str) -> str:
    """A SeriesDescription (LO: at most 64 characters) that keeps the research-use marking."""
    text = f"{what} ({RESEARCH_NOTE})"
    assert len(text) <= 64, text
    return text


def _uid(*parts: object) -> str:
    """Result UIDs derived from the study, model and revision: scoring the same study again
    (a restart after a crash) makes the same objects, so PACS stores no duplicates."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _short_text(text: str, limit: int = 64) -> str:
    """``text`` as one LO value: no backslash (the value separator) or control characters."""
    clean = " ".join(text.replace("\\", "/").split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _save(ds: Dataset, path: Path) -> Path:
    return atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


@dataclass(frozen=True)
class DicomResult:
    """The files written for one patient: the SR first, then the secondary captures."""

    sr: Path
    captures: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.sr, *self.captures]


def _predecessor(replaces: str | Path, study_uid: str, sop_uid: str) -> Dataset:
    """The earlier revision's SR, as the new SR's Predecessor Documents Sequence references
    it: its study, series, SOP class and SOP instance UIDs, read from its header."""
    path = Path(replaces)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as err:
        raise DicomResultError(
            f"{path}: the SR this result replaces cannot be read: {err}"
        ) from err
    ref = InstanceRef.of(ds, path)
    if ds.get("Modality") != "SR":
        raise DicomResultError(
            f"{path}: the result it replaces must be an SR, not {ds.get('Modality')}"
        )
    if ref.study_uid != study_uid:
        raise DicomResultError(f"{path}: the SR it replaces belongs to another study")
    if ref.sop_instance_uid == sop_uid:
        raise DicomResultError(
            f"{path}: the SR it replaces is this very result (the same revision); a "
            "replacement is a later revision"
        )
    return ref.dataset()


def _observer(trained: TrainedModel) -> Observer:
    arch = (trained.sidecar.get("architecture") or {}).get("arch", "")
    calibration = (trained.sidecar.get("calibration") or {}).get("method", "none")
    return Observer(
        uid=_uid(MANUFACTURER, "device", trained.model_id),
        model_id=trained.model_id,
        model_name=f"{MANUFACTURER} {arch}".strip(),
        manufacturer=MANUFACTURER,
        software_version=__version__,
        parameters=(f"model {trained.model_id}", f"calibration {calibration}"),
    )


def _notes(partial_reason: str | None, limitations: Sequence[str]) -> list[str]:
    notes = [RESEARCH_NOTE]
    if partial_reason is not None:
        notes.append(f"PARTIAL: made from a series that does not look complete: {partial_reason}")
    notes += [f"Limitation: {text}" for text in limitations]
    return notes


def _top_slices(
    item: PreprocessedPatient, score: PatientScore, slices: list[SourceSlice], top_k: int
) -> list[tuple[int, SourceSlice]]:
    """The top-k slabs by slice logit, each with the source slice nearest its centre."""
    order = np.argsort(score.slice_logits)[::-1][: max(top_k, 0)]
    return [(int(i), nearest(slices, float(item.positions[i]))) for i in order]


def _write_sr(
    header: Dataset,
    slices: list[SourceSlice],
    content: Dataset,
    observer: Observer,
    *,
    key: tuple,
    predecessor: Dataset | None,
    partial_reason: str | None,
    path: Path,
) -> Path:
    # The evidence is every instance of the scored series: the SR was computed from all of
    # them, and the top slices are among them. The first is the one ``header`` describes.
    first = slices[0].ref
    others = [ref for ref in dict.fromkeys(s.ref for s in slices) if ref != first]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[for_highdicom(header), *(ref.dataset() for ref in others)],
        content=content,
        series_instance_uid=_uid(*key, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(*key, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=observer.model_name,
        device_serial_number=observer.model_id or None,
        is_complete=partial_reason is None,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description=_description(
            "brainmets finding" if partial_reason is None else "PARTIAL finding"
        ),
        content_qualification="RESEARCH",
        software_versions=__version__,
    )
    restore_identity(sr, header)
    if partial_reason is not None:
        sr.CompletionFlagDescription = _short_text(partial_reason)
    return _save(sr, path)


def _write_captures(
    trained: TrainedModel,
    item: PreprocessedPatient,
    score: PatientScore,
    header: Dataset,
    top: list[tuple[int, SourceSlice]],
    observer: Observer,
    *,
    key: tuple,
    partial_reason: str | None,
    out_dir: Path,
) -> list[Path]:
    """One Grad-CAM capture per top slab, rank 1 first."""
    if not top:
        return []
    if trained.model is None:
        log.warning(
            "patient %s: no Grad-CAM captures (the model's PyTorch weights are not loaded)",
            item.job.patient_id,
        )
        return []
    order = [slab for slab, _ in top]
    images = torch.from_numpy(np.ascontiguousarray(item.array[order])).to(trained.device)
    cams = grad_cam(trained.model, trained.scorer.network_inputs(images))
    stem = patient_stem(item.job.patient_id)
    captures = []
    for rank, ((slab, origin), cam) in enumerate(zip(top, cams, strict=True), start=1):
        comments = (
            f"{RESEARCH_NOTE}. "
            + (f"PARTIAL: {partial_reason}. " if partial_reason is not None else "")
            + f"Rank {rank} slice, slice logit {float(score.slice_logits[slab]):.3f}; "
            + f"source {origin.ref.sop_instance_uid}"
            + (f" frame {origin.frame}" if origin.frame else "")
        )
        sc = capture(
            for_highdicom(header),
            origin,
            overlay_rgb(item.array[slab], cam),
            series_uid=_uid(*key, "sc-series"),
            series_number=SC_SERIES_NUMBER,
            sop_uid=_uid(*key, "sc", rank),
            rank=rank,
            description=_description(
                "brainmets Grad-CAM" if partial_reason is None else "PARTIAL Grad-CAM"
            ),
            comments=comments,
            observer=observer,
        )
        restore_identity(sc, header)
        captures.append(_save(sc, out_dir / f"{stem}_gradcam_rank{rank}.dcm"))
    return captures


def write_dicom_results(
    trained: TrainedModel,
    item: PreprocessedPatient,
    score: PatientScore,
    out_dir: str | Path,
    *,
    top_k: int = 3,
    revision: int = 0,
    partial_reason: str | None = None,
    replaces: str | Path | None = None,
    limitations: Sequence[str] = (),
) -> DicomResult:
    """Write the SR and the Grad-CAM secondary captures of one DICOM patient into ``out_dir``.

    ``revision`` numbers results of the same study made again with more instances (serve);
    their objects get new UIDs. ``partial_reason``: the series did not look complete, so the
    SR is marked PARTIAL with this reason (None: COMPLETE). ``replaces``: the SR file of the
    earlier revision this result replaces, referenced as its predecessor. ``limitations``:
    stated limitations written into the SR. A source header no valid object can be made from
    raises :class:`DicomResultError` naming the file and attribute; nothing is written then."""
    if not item.job.files:
        raise ValueError(f"{item.job.patient_id}: DICOM results need DICOM input")
    slices = read_series(item.job.files)
    if not slices:
        raise DicomResultError(f"{item.job.files[0]}: no slice of the series has a position")
    first = slices[0]
    study_uid = first.ref.study_uid
    key = (study_uid, item.series_uid, trained.model_id, revision)
    predecessor = (
        _predecessor(replaces, study_uid, _uid(*key, "sr")) if replaces is not None else None
    )
    top = _top_slices(item, score, slices, top_k)
    observer = _observer(trained)
    notes = _notes(partial_reason, limitations)
    header = study_header(first.header, first.path, first.ref, own_text=notes)
    finding = Finding(
        probability=round(float(trained.probability(score.logit)), 6),
        threshold=round(float(trained.threshold), 6),
        present=bool(trained.decision(score.logit)),
    )
    content = measurement_report(
        finding,
        observer,
        # The same finding tracked across revisions: a revision is not a second finding.
        tracking_uid=_uid(study_uid, trained.model_id, "tracking"),
        top=[origin for _, origin in top],
        notes=notes,
    )[0]
    out_dir = Path(out_dir)
    sr_path = _write_sr(
        header,
        slices,
        content,
        observer,
        key=key,
        predecessor=predecessor,
        partial_reason=partial_reason,
        path=out_dir / f"{patient_stem(item.job.patient_id)}_sr.dcm",
    )
    captures = _write_captures(
        trained,
        item,
        score,
        header,
        top,
        observer,
        key=key,
        partial_reason=partial_reason,
        out_dir=out_dir,
    )
    return DicomResult(sr_path, captures)
