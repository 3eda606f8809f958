"""Whether a received series looks complete, from its headers: gaps along the slice normal
(against the local spacing, so that real scans that change spacing are not flagged) and a
count short of ImagesInAcquisition."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from brainmets.serve.completeness import gaps, missing_slices

from .conftest import ct_series_files


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([5.0] * 20, []),  # a regular series
        ([4.0] * 13 + [1.08] + [7.0] * 13, []),  # GE sequential head: 4 mm, then 7 mm
        ([2.5] * 8 + [5.0] + [2.5] * 8, [(20.0, 25.0)]),  # overlapping recon, one missing
        ([5.0] * 6 + [15.0] + [5.0] * 6, [(30.0, 45.0)]),  # two missing
        ([4.0] * 6 + [11.0] + [7.0] * 6, [(24.0, 35.0)]),  # missing where the spacing changes
        ([5.0] * 10, []),  # missing at either end: no header says where a head ends
    ],
)
def test_gaps_are_steps_larger_than_the_local_spacing(steps, expected):
    positions = np.concatenate([[0.0], np.cumsum(steps)])
    assert gaps(positions) == expected


def test_a_generated_series_without_one_middle_slice_looks_incomplete(head_ct_studies):
    files = sorted(
        ct_series_files(head_ct_studies / "SYN0013"),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    assert missing_slices(files) == ""
    why = missing_slices(files[:4] + files[5:])
    assert why.startswith("slices missing between") and "along the slice normal" in why
    assert missing_slices(files[1:-1]) == ""  # the ends leave no sign


def test_a_count_short_of_images_in_acquisition_looks_incomplete(head_ct_studies, tmp_path):
    files = ct_series_files(head_ct_studies / "SYN0014")
    announced = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition, ds.AcquisitionNumber = len(files), 1
        ds.save_as(tmp_path / f"{i}.dcm")
        announced.append(str(tmp_path / f"{i}.dcm"))
    assert missing_slices(announced) == ""
    assert missing_slices(announced[:-1]).startswith(
        f"{len(files) - 1} of the {len(files)} images its headers announce"
    )


def test_the_real_ge_head_ct_with_changing_spacing_looks_complete(corpus):
    files = sorted(str(p) for p in (corpus / "dcm_qa_ct" / "In" / "GE").iterdir())
    assert len(files) == 28 and missing_slices(files) == ""
    by_position = sorted(
        files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation)
    )
    assert "slices missing" in missing_slices(by_position[:5] + by_position[6:])


def test_a_frame_missing_from_an_enhanced_ct_looks_incomplete(tmp_path):
    def enhanced(z_positions) -> str:
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.SOPInstanceUID = generate_uid()
        ds.NumberOfFrames = len(z_positions)
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared = Dataset()
        shared.PlaneOrientationSequence = Sequence([orientation])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for z in z_positions:
            position, frame = Dataset(), Dataset()
            position.ImagePositionPatient = [0, 0, z]
            frame.PlanePositionSequence = Sequence([position])
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return str(path)

    assert missing_slices([enhanced([0, 5, 10, 15, 20, 25])]) == ""
    assert "10.0 to 20.0 mm" in missing_slices([enhanced([0, 5, 10, 20, 25, 30])])
