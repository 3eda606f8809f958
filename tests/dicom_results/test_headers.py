"""Real headers: every attribute the result objects copy from the source may be absent, empty or
invalid there (de-identified data, exports), and in another character set. Type 2 attributes
are then written empty; a type 1 that cannot be derived is an error naming it; every object
still passes dciodvfy."""

from __future__ import annotations

import logging

import pydicom
import pytest

from brainmets.dicom_results import DicomResultError, read_result, write_dicom_results
from brainmets.dicom_results.header import TYPE2


def _write(trained, scored, item, out, **kwargs):
    return write_dicom_results(trained, item, scored.score, out, top_k=1, **kwargs)


def _check_all(result, dciodvfy) -> list[pydicom.Dataset]:
    for path in result.files:
        dciodvfy(path)
    return [pydicom.dcmread(path) for path in result.files]


@pytest.mark.parametrize("keyword", TYPE2)
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_a_type2_attribute_absent_or_empty_is_written_empty(
    keyword, how, trained, scored, edited, dciodvfy, tmp_path
):
    def edit(ds, _):
        if how == "absent":
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, "")

    item = edited(edit)
    assert keyword not in pydicom.dcmread(item.job.files[0]) or how == "empty"
    for ds in _check_all(_write(trained, scored, item, tmp_path / "out"), dciodvfy):
        assert keyword in ds and ds[keyword].is_empty, f"{keyword} in {ds.Modality}"


def test_the_de_identified_study_of_the_field_report(trained, scored, edited, dciodvfy, tmp_path):
    # Every type 2 attribute the node met missing at once: the SR used to raise
    # AttributeError ('FileDataset' object has no attribute 'PatientSex').
    def edit(ds, _):
        for keyword in TYPE2:
            if keyword not in ("PatientID", "PatientName"):
                delattr(ds, keyword)

    result = _write(trained, scored, edited(edit), tmp_path / "out")
    sr, capture = _check_all(result, dciodvfy)
    source = pydicom.dcmread(scored.item.job.files[0])
    for ds in (sr, capture):
        assert (ds.PatientID, ds.PatientName) == (source.PatientID, source.PatientName)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientSex == ds.StudyDate == ds.AccessionNumber == ""
    assert read_result(result.sr).probability == pytest.approx(
        float(trained.probability(scored.score.logit)), abs=1e-6
    )


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientSex", "male"),
        ("StudyDate", "2020-01-01"),
        ("StudyTime", "08:00:00"),
        ("PatientBirthDate", "19700132"),
        ("AccessionNumber", "A" * 20),  # SH holds 16 characters
        ("PatientID", "PAT\\X9Z"),  # one value only
    ],
)
def test_a_type2_value_invalid_for_its_vr_is_written_empty_and_not_logged(
    keyword, value, trained, scored, edited, dciodvfy, tmp_path, caplog
):
    item = edited(lambda ds, _: setattr(ds, keyword, value))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = _write(trained, scored, item, tmp_path / "out")
    for ds in _check_all(result, dciodvfy):
        assert ds[keyword].is_empty
    # The file is named, the attribute too, the value never.
    said = " ".join(r.getMessage().replace(str(tmp_path), "") for r in caplog.records)
    assert keyword in said and value.split("\\")[0] not in said


def test_a_name_without_caret_reaches_the_objects_but_no_log_or_warning(
    trained, scored, edited, dciodvfy, tmp_path, caplog, recwarn
):
    # De-identified data often has one-component names; highdicom warns with the value.
    item = edited(lambda ds, _: setattr(ds, "PatientName", "ANONYMIZED7"))
    with caplog.at_level(logging.DEBUG):
        result = _write(trained, scored, item, tmp_path / "out")
    for ds in _check_all(result, dciodvfy):
        assert ds.PatientName == "ANONYMIZED7"
    assert not [r for r in caplog.records if "ANONYMIZED7" in r.getMessage()]
    assert not [w for w in recwarn if "ANONYMIZED7" in str(w.message)]


def test_non_ascii_names_in_utf8_come_back_unchanged(trained, scored, edited, dciodvfy, tmp_path):
    names = {
        "PatientName": "Müller^Jürgen",
        "ReferringPhysicianName": "Łukasiewicz^Żaneta",
        "StudyDescription": "Schädel nativ – Kopf",
        "PatientID": "ÖZ-0003",
    }

    def edit(ds, _):
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword, value in names.items():
            setattr(ds, keyword, value)

    result = _write(trained, scored, edited(edit), tmp_path / "out")
    for path, ds in zip(result.files, _check_all(result, dciodvfy), strict=True):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        for keyword, value in names.items():
            assert str(ds[keyword].value) == value, (path.name, keyword)
        assert "Müller^Jürgen".encode() in path.read_bytes()


def test_a_limitation_beyond_latin1_switches_a_latin1_study_to_utf8(
    trained, scored, edited, dciodvfy, tmp_path
):
    def edit(ds, _):
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Gómez^José"

    limitation = "AUC ≥ 0.5 not shown"
    result = _write(trained, scored, edited(edit), tmp_path / "out", limitations=[limitation])
    sr, capture = _check_all(result, dciodvfy)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and sr.PatientName == "Gómez^José"
    assert capture.PatientName == "Gómez^José"
    assert f"Limitation: {limitation}" in read_result(result.sr).notes


@pytest.mark.parametrize("charset", [None, "UTF-8"], ids=["absent", "not-a-defined-term"])
def test_a_source_without_a_valid_character_set_is_written_as_utf8(
    charset, trained, scored, edited, dciodvfy, tmp_path
):
    # Invalid but met: non-ASCII text with no SpecificCharacterSet, or with a name DICOM does
    # not define. pydicom decodes it as it can; the results say which character set they use.
    def edit(ds, _):
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
        ds.PatientName = "Gómez^José"

    result = _write(trained, scored, edited(edit), tmp_path / "out")
    for ds in _check_all(result, dciodvfy):
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.PatientName == "Gómez^José"


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda ds, _: delattr(ds, "StudyInstanceUID"), "StudyInstanceUID is missing"),
        (lambda ds, _: setattr(ds, "StudyInstanceUID", ""), "StudyInstanceUID is missing"),
        (lambda ds, _: setattr(ds, "StudyInstanceUID", "1.2." + "3" * 70), "not a valid UID"),
        (lambda ds, i: setattr(ds, "SOPInstanceUID", "1.2.x") if i == 2 else None, "SOPInst"),
    ],
    ids=["study-absent", "study-empty", "study-too-long", "instance-invalid"],
)
def test_a_type1_uid_that_cannot_be_written_names_the_file_and_attribute(
    edit, says, trained, scored, edited, tmp_path
):
    item = edited(edit)
    with pytest.raises(DicomResultError, match=says) as caught:
        _write(trained, scored, item, tmp_path / "out")
    assert any(path in str(caught.value) for path in item.job.files)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sop_uids_missing_from_the_dataset_are_taken_from_the_file_meta(
    trained, scored, edited, dciodvfy, tmp_path
):
    def edit(ds, _):
        del ds.SOPInstanceUID, ds.SOPClassUID

    item = edited(edit)
    result = _write(trained, scored, item, tmp_path / "out")
    _check_all(result, dciodvfy)
    metas = {pydicom.dcmread(f).file_meta.MediaStorageSOPInstanceUID for f in item.job.files}
    [(referenced, _)] = read_result(result.sr).source_images
    assert referenced in metas
