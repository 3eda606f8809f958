"""Sources other than single-frame CT: Enhanced CT and Legacy Converted Enhanced CT (one file
holds the series; the top slices are frames), and real scanner headers from the corpus."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from brainmets.data.dicom import slice_normal
from brainmets.dicom_results import read_result, write_dicom_results
from brainmets.predict import predict_study

LEGACY_CT = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _position(ipp, iop) -> float:
    return float(np.dot(np.asarray(ipp, float), slice_normal(iop)))


@pytest.fixture(scope="module")
def multiframe(scored, tmp_path_factory):
    """The scored series converted by highdicom into one Legacy Converted Enhanced CT file,
    and the same file labelled Enhanced CT (the functional groups are read alike)."""
    import highdicom as hd

    frames = [pydicom.dcmread(path) for path in scored.item.job.files]
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        frames, generate_uid(), 31, generate_uid(), 1
    )
    root = tmp_path_factory.mktemp("multiframe")
    folders = {}
    for name, sop_class in (("legacy", LEGACY_CT), ("enhanced", ENHANCED_CT)):
        converted.SOPClassUID = converted.file_meta.MediaStorageSOPClassUID = sop_class
        converted.SOPInstanceUID = converted.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        (root / name).mkdir()
        converted.save_as(root / name / "series.dcm", enforce_file_format=True)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("kind", ["legacy", "enhanced"])
def test_a_multiframe_source_is_referenced_frame_by_frame(
    kind, multiframe, scored, trained, dciodvfy, tmp_path
):
    predictions, errors = predict_study(trained, multiframe[kind])
    assert not errors
    [prediction] = predictions
    # The same pixels as the single-frame series: the same finding.
    assert prediction.row["probability"] == pytest.approx(scored.row["probability"], abs=1e-6)
    result = write_dicom_results(
        trained, prediction.item, prediction.score, tmp_path / kind, top_k=2
    )
    for path in result.files:
        dciodvfy(path)
    source = pydicom.dcmread(multiframe[kind] / "series.dcm", stop_before_pixels=True)
    reported = read_result(result.sr)
    single = read_result(
        write_dicom_results(trained, scored.item, scored.score, tmp_path / "single", top_k=2).sr
    )
    # Each referenced frame lies where the single-frame writer's referenced slice lies.
    by_uid = {
        ds.SOPInstanceUID: ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in scored.item.job.files)
    }
    iop = source.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    for (uid, frame), (single_uid, _) in zip(
        reported.source_images, single.source_images, strict=True
    ):
        assert uid == source.SOPInstanceUID and frame is not None
        group = source.PerFrameFunctionalGroupsSequence[frame - 1]
        ipp = group.PlanePositionSequence[0].ImagePositionPatient
        expected = by_uid[single_uid]
        assert _position(ipp, iop.ImageOrientationPatient) == pytest.approx(
            _position(expected.ImagePositionPatient, expected.ImageOrientationPatient)
        )
    for path in result.captures:
        reference = pydicom.dcmread(path).SourceImageSequence[0]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert 1 <= reference.ReferencedFrameNumber <= source.NumberOfFrames


@pytest.mark.parametrize(
    "folder",
    ["dcm_qa_ct/In/GE", "dcm_qa_ct/In/Philips/S21570"],
    ids=["ge-de-identified", "philips-phantom"],
)
def test_real_scanner_headers_give_valid_results(folder, corpus, trained, dciodvfy, tmp_path):
    # The GE head has been de-identified: no PatientSex, birth date, study date or time,
    # "PatientIdentityRemoved YES" without the method the standard then requires.
    predictions, errors = predict_study(trained, corpus / folder)
    assert predictions, errors
    for i, prediction in enumerate(predictions):
        result = write_dicom_results(
            trained, prediction.item, prediction.score, tmp_path / str(i), top_k=2
        )
        for path in result.files:
            dciodvfy(path)
        reported = read_result(result.sr)
        assert reported.probability == pytest.approx(prediction.row["probability"], abs=1e-6)
        source = pydicom.dcmread(prediction.item.job.files[0], stop_before_pixels=True)
        sr = pydicom.dcmread(result.sr)
        assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
