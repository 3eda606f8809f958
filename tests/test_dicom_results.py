"""``predict --dicom-out``: the DICOM results serve sends to PACS, written for a batch run by
the same writer, checked against predictions.csv and the source study."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest

from brainmets.cli import main
from brainmets.data.dicom import slice_normal


def _content(sr) -> dict:
    return {item.ConceptNameCodeSequence[0].CodeValue: item for item in sr.ContentSequence}


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
        sr = pydicom.dcmread(out / "dicom" / pid / f"{pid}_sr.dcm")
        content = _content(sr)
        value = content["BM001"].MeasuredValueSequence[0].NumericValue
        assert float(value) == pytest.approx(row["probability"], abs=1e-6)
        assert float(content["BM002"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            row["threshold"], abs=1e-6
        )
        present = content["94225005"].ConceptCodeSequence[0].CodeValue == "373066001"
        assert present == bool(row["decision"])
        assert row["model"] in content["111001"].TextValue
        assert row["series_uid"] == content["112002"].UID
        assert sr.ContentQualification == "RESEARCH"
        assert "NOT FOR CLINICAL USE" in sr.SeriesDescription


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
        first, *_ = [i for i in sr.ContentSequence if i.ValueType == "IMAGE"]
        top = sources[first.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
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


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk's dsrdump not installed")
def test_dcmtk_parses_the_sr(dicom_out):
    out, _, studies = dicom_out
    pid = studies[0].name
    dump = subprocess.run(
        ["dsrdump", str(out / "dicom" / pid / f"{pid}_sr.dcm")], capture_output=True, text=True
    )
    assert dump.returncode == 0, dump.stderr
    assert "Probability of brain metastases" in dump.stdout
    assert "RESEARCH USE ONLY" in dump.stdout
