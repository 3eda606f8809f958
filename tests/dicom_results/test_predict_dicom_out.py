"""``predict --dicom-out``: the DICOM results serve sends to PACS, written for a batch run by
the same writer, checked against predictions.csv and the source study: a TID 1500 Measurement
Report a TID 1500 reader parses, and Secondary Captures, all valid DICOM."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest

from brainmets.backends import BackendSpec
from brainmets.cli import main
from brainmets.data.dicom import slice_normal
from brainmets.dicom_results import read_result
from brainmets.dicom_results.header import TYPE2

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _position(ds) -> float:
    return float(
        np.dot(np.asarray(ds.ImagePositionPatient, float), slice_normal(ds.ImageOrientationPatient))
    )


@pytest.fixture(scope="module")
def dicom_out(tiny_run, head_ct_studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom-out")
    studies = [head_ct_studies / "SYN0001", head_ct_studies / "SYN0002"]
    rc = main(["-q", "predict", str(tiny_run), *map(str, studies), "--out",
               str(out / "predictions.csv"), "--dicom-out", str(out / "dicom"), "--top-k", "2",
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    table = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    return out, table.set_index("patient_id"), studies


def test_the_sr_states_what_predict_reports(dicom_out):
    out, table, studies = dicom_out
    for study in studies:
        pid = study.name
        row = table.loc[pid]
        path = out / "dicom" / pid / f"{pid}_sr.dcm"
        reported = read_result(path)  # highdicom's TID 1500 parsing
        assert reported.probability == pytest.approx(row["probability"], abs=1e-6)
        assert reported.threshold == pytest.approx(row["threshold"], abs=1e-6)
        assert reported.present == bool(row["decision"])
        assert reported.model_id == row["model"]
        assert reported.complete and "RESEARCH USE ONLY - NOT FOR CLINICAL USE" in reported.notes
        sr = pydicom.dcmread(path)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert [s.SeriesInstanceUID for s in evidence] == [row["series_uid"]]
        assert sr.ContentQualification == "RESEARCH"
        assert "NOT FOR CLINICAL USE" in sr.SeriesDescription


def test_the_sr_is_a_tid_1500_measurement_report_in_standard_codes(dicom_out):
    out, _, studies = dicom_out
    sr = pydicom.dcmread(out / "dicom" / studies[0].name / f"{studies[0].name}_sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    [template] = sr.ContentTemplateSequence
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    schemes = set()

    def walk(ds):
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    if "CodingSchemeDesignator" in item:
                        schemes.add(item.CodingSchemeDesignator)
                    walk(item)

    walk(sr)
    assert schemes <= {"DCM", "SCT", "UCUM", "UMLS", "RFC5646"}, schemes
    observer = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in sr.ContentSequence
        if item.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert observer["Device Observer Manufacturer"].TextValue == "brainmets"


def test_references_name_the_top_slices_of_the_source_series(dicom_out):
    out, table, studies = dicom_out
    for study in studies:
        pid = study.name
        sources = {}
        for path in study.rglob("*"):
            if path.is_file():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                sources[ds.SOPInstanceUID] = ds
        sr = pydicom.dcmread(out / "dicom" / pid / f"{pid}_sr.dcm")
        images = read_result(sr).source_images
        assert len(images) == 2 and all(frame is None for _, frame in images)
        top = sources[images[0][0]]
        assert top.SeriesInstanceUID == table.loc[pid, "series_uid"]
        # The slab that decided the patient lies around the referenced slice.
        thickness = float(top.SliceThickness)
        assert abs(_position(top) - table.loc[pid, "top_slice_position_mm"]) <= thickness
        # Identity from the source study (DICOM requires it), in new series.
        assert (sr.PatientID, sr.PatientName, sr.StudyInstanceUID) == (
            top.PatientID,
            top.PatientName,
            top.StudyInstanceUID,
        )
        assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources.values()}


def test_the_captures_are_grad_cam_overlays_that_decode(dicom_out):
    out, _, studies = dicom_out
    for study in studies:
        pid = study.name
        captures = sorted((out / "dicom" / pid).glob("*_gradcam_rank*.dcm"))
        assert len(captures) == 2
        for path in captures:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
            assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
            assert ds.PhotometricInterpretation == "RGB" and ds.Modality == "OT"
            assert "NOT FOR CLINICAL USE" in ds.ImageComments
            # Colour from the heatmap over a grey slice: the channels differ somewhere.
            assert np.abs(pixels[..., 0].astype(int) - pixels[..., 2]).max() > 10


def test_every_object_passes_dciodvfy_without_a_warning(dicom_out, dciodvfy):
    out, _, _ = dicom_out
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(files) == 6
    for path in files:
        assert dciodvfy(path) == [], path


def test_scoring_again_makes_the_same_objects(dicom_out, tiny_run, tmp_path):
    out, _, studies = dicom_out
    rc = main(["-q", "predict", str(tiny_run), str(studies[0]), "--out", str(tmp_path / "p.csv"),
               "--dicom-out", str(tmp_path), "--top-k", "2", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    pid = studies[0].name
    for name in (f"{pid}_sr.dcm", f"{pid}_gradcam_rank1.dcm"):
        first = pydicom.dcmread(out / "dicom" / pid / name)
        again = pydicom.dcmread(tmp_path / pid / name)
        assert first.SOPInstanceUID == again.SOPInstanceUID  # PACS keeps one copy


def test_dcmtk_parses_the_sr(dicom_out, dsrdump):
    out, _, studies = dicom_out
    pid = studies[0].name
    dump = subprocess.run(
        [dsrdump, str(out / "dicom" / pid / f"{pid}_sr.dcm")], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert '"Probability")="0.' in dump.stdout
    assert "Metastatic malignant neoplasm to brain" in dump.stdout
    assert "RESEARCH USE ONLY" in dump.stdout


def test_predict_writes_results_for_a_study_without_the_type2_attributes(
    tiny_run, head_ct_studies, dciodvfy, tmp_path
):
    # The field report: de-identified sources without PatientSex, AccessionNumber, StudyDate,
    # StudyTime, StudyID, ReferringPhysicianName made every --dicom-out fail (12 of 12).
    from brainmets.predict import predict

    study = tmp_path / "SYN0004"
    shutil.copytree(head_ct_studies / "SYN0004", study)
    for path in study.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in TYPE2:
            if keyword not in ("PatientID", "PatientName"):
                delattr(ds, keyword)
        ds.save_as(path)
    result = predict(tiny_run, [study], out_csv=tmp_path / "p.csv",
                     dicom_out=tmp_path / "dicom", top_k=2, progress=False, workers=1,
                     backend=BackendSpec(device="cpu"))  # fmt: skip
    [row] = result.table.to_dict("records")
    assert row["error"] == "", row["error"]
    files = sorted((tmp_path / "dicom" / "SYN0004").glob("*.dcm"))
    assert len(files) == 3
    for path in files:
        dciodvfy(path)
    reported = read_result(tmp_path / "dicom" / "SYN0004" / "SYN0004_sr.dcm")
    assert reported.probability == pytest.approx(row["probability"], abs=1e-6)
