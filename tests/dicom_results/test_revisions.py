"""What the node tells PACS beyond the finding: a result made from a series that did not look
complete (PARTIAL), a later revision that replaces an earlier one (Predecessor Documents),
stated limitations; and the same result written again is the same objects."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import generate_uid

from brainmets.dicom_results import DicomResultError, read_result, write_dicom_results


def _write(trained, scored, out, **kwargs):
    return write_dicom_results(trained, scored.item, scored.score, out, top_k=2, **kwargs)


def _uids(result) -> list[str]:
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in result.files]


def test_a_result_from_an_incomplete_series_says_partial_and_why(
    trained, scored, dciodvfy, tmp_path
):
    reason = "slice gap of 15 mm at z=-20 mm, where the series spacing is 5 mm"
    result = _write(trained, scored, tmp_path, partial_reason=reason)
    for path in result.files:
        dciodvfy(path)
    sr = pydicom.dcmread(result.sr)
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.CompletionFlagDescription.startswith("slice gap of 15 mm")
    assert "PARTIAL" in sr.SeriesDescription and "RESEARCH USE ONLY" in sr.SeriesDescription
    reported = read_result(result.sr)
    assert not reported.complete
    assert any(reason in note and "PARTIAL" in note for note in reported.notes)
    for path in result.captures:
        capture = pydicom.dcmread(path)
        assert "PARTIAL" in capture.SeriesDescription and reason in capture.ImageComments

    complete = read_result(_write(trained, scored, tmp_path / "complete").sr)
    assert complete.complete and not any("PARTIAL" in note for note in complete.notes)


def test_a_revision_references_the_sr_it_replaces(trained, scored, dciodvfy, tmp_path):
    first = _write(trained, scored, tmp_path / "r0", revision=0, partial_reason="10 of 32 slices")
    second = _write(trained, scored, tmp_path / "r1", revision=1, replaces=first.sr)
    for path in second.files:
        dciodvfy(path)
    old = pydicom.dcmread(first.sr)
    new = pydicom.dcmread(second.sr)
    [study] = new.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (
        old.StudyInstanceUID,
        old.SeriesInstanceUID,
    )
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        old.SOPClassUID,
        old.SOPInstanceUID,
    )
    assert read_result(second.sr).predecessors == [old.SOPInstanceUID]
    assert read_result(second.sr).complete
    assert "PredecessorDocumentsSequence" not in old
    # A revision is new objects, and the same finding tracked: its tracking UID is kept.
    assert not set(_uids(first)) & set(_uids(second))
    assert _tracking_uid(old) == _tracking_uid(new)


def _tracking_uid(sr) -> str:
    found = []

    def walk(items):
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == "112040":
                found.append(item.UID)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    [uid] = found
    return uid


def test_what_the_sr_replaces_must_be_an_earlier_sr_of_the_study(
    trained, scored, head_ct_studies, tmp_path
):
    first = _write(trained, scored, tmp_path / "r0")
    with pytest.raises(DicomResultError, match="cannot be read"):
        _write(trained, scored, tmp_path / "x", revision=1, replaces=tmp_path / "missing.dcm")
    with pytest.raises(DicomResultError, match="this very result"):
        _write(trained, scored, tmp_path / "x", revision=0, replaces=first.sr)
    image = next(p for p in sorted((head_ct_studies / "SYN0003").iterdir()))
    with pytest.raises(DicomResultError, match="must be an SR"):
        _write(trained, scored, tmp_path / "x", revision=1, replaces=image)
    other = pydicom.dcmread(first.sr)
    other.StudyInstanceUID = generate_uid()
    other.save_as(tmp_path / "other.dcm")
    with pytest.raises(DicomResultError, match="another study"):
        _write(trained, scored, tmp_path / "x", revision=1, replaces=tmp_path / "other.dcm")


def test_stated_limitations_are_text_items_of_the_sr(trained, scored, dciodvfy, tmp_path):
    limitations = [
        "model not shown to rank better than chance; served with --allow-chance",
        "series scored without 1 damaged instance",
    ]
    result = _write(trained, scored, tmp_path, limitations=limitations)
    dciodvfy(result.sr)
    notes = read_result(result.sr).notes
    assert notes[0] == "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
    assert [n for n in notes if n.startswith("Limitation: ")] == [
        f"Limitation: {text}" for text in limitations
    ]


def test_the_same_study_revision_and_model_make_the_same_objects(trained, scored, tmp_path):
    # A resend after a crash must not give PACS a second copy, whatever the node adds.
    first = _write(trained, scored, tmp_path / "a", revision=2, limitations=["x"])
    again = _write(trained, scored, tmp_path / "b", revision=2, partial_reason="y")
    assert _uids(first) == _uids(again)
    sr_a, sr_b = (pydicom.dcmread(r.sr) for r in (first, again))
    assert sr_a.SeriesInstanceUID == sr_b.SeriesInstanceUID
