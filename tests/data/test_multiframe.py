"""Enhanced (multi-frame) CT: one file holds the series, geometry in functional groups.

The enhanced files here are built from a generated single-frame series by moving each slice's
position, orientation, rescale, spacing and kernel into the functional groups where Enhanced
CT keeps them, frames in shuffled order, a different rescale per frame. Read back, the volume
must equal the single-frame series' volume, and the index, the series choice and ``prepare``
must treat it as the same series.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from brainmets.config import PreprocessConfig
from brainmets.data.cache import PatientCache
from brainmets.data.dicom import SeriesError, load_series
from brainmets.data.labels import read_labels
from brainmets.data.prepare import prepare_cache
from brainmets.data.series_index import index_dicom_root, series_files
from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
PER_SLICE = ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
             "InstanceNumber", "SOPInstanceUID", "RescaleSlope", "RescaleIntercept",
             "PixelSpacing", "SliceThickness", "ConvolutionKernel", "PixelData")  # fmt: skip


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_enhanced(single_frame: list[str], path, seed: int = 0) -> None:
    """One Enhanced CT file holding every slice of ``single_frame``, frames shuffled, each
    frame re-encoded with its own slope and intercept."""
    rng = np.random.default_rng(seed)
    slices = [pydicom.dcmread(f) for f in single_frame]
    slices = [slices[i] for i in rng.permutation(len(slices))]
    first = slices[0]
    ds = Dataset()
    for element in first:
        if element.keyword not in PER_SLICE:
            ds.add(element)
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PlaneOrientationSequence=Sequence([_item(
            ImageOrientationPatient=first.ImageOrientationPatient)]),
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]),
        CTReconstructionSequence=Sequence([_item(ConvolutionKernel=first.ConvolutionKernel)]),
    )])  # fmt: skip
    frames, pixels = [], []
    for k, s in enumerate(slices):
        hu = s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept)
        slope, intercept = (1.0, -1024.0) if k % 2 else (0.5, -2048.0)
        stored = np.rint((hu - intercept) / slope)
        if "PixelPaddingValue" in s:  # keep padding recognisable after re-encoding
            stored[s.pixel_array == s.PixelPaddingValue] = s.PixelPaddingValue
        pixels.append(stored.astype(s.pixel_array.dtype))
        frames.append(_item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=s.ImagePositionPatient)]),
            PixelValueTransformationSequence=Sequence([_item(
                RescaleSlope=f"{slope:g}", RescaleIntercept=f"{intercept:g}")]),
        ))  # fmt: skip
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One generated patient as single-frame files, and the same series as one enhanced file."""
    root = tmp_path_factory.mktemp("multiframe")
    config = SynthConfig(num_patients=1, matrix=64, slices=(20, 20), slice_thickness_mm=2.5)
    write_synthetic_cohort(root / "single", config, progress=False)
    index = index_dicom_root(root / "single" / "dicom", progress=False)
    uid = index.series.loc[index.series["chosen"], "series_uid"].item()
    files = series_files(index, uid)
    patient = index.series.loc[index.series["chosen"], "patient_id"].item()
    (root / "enhanced" / patient).mkdir(parents=True)
    write_enhanced(files, root / "enhanced" / patient / "enhanced.dcm")
    return root, files, root / "enhanced" / patient / "enhanced.dcm"


def test_enhanced_file_reads_as_the_single_frame_series(cohort):
    _, files, enhanced = cohort
    expected = load_series(files)
    volume = load_series([enhanced])
    np.testing.assert_allclose(volume.positions_mm, expected.positions_mm)
    # Half the frames were stored at slope 0.5: HU rounds to the nearest 0.5 there.
    np.testing.assert_allclose(volume.hu, expected.hu, atol=0.5)
    assert volume.hu.shape == (20, 64, 64) and volume.pixel_spacing_mm == expected.pixel_spacing_mm
    assert volume.files == [str(enhanced)] * 20


def test_enhanced_series_is_indexed_chosen_and_prepared_like_the_single_frame_one(cohort):
    root, _, enhanced = cohort
    single = index_dicom_root(root / "single" / "dicom", progress=False).series
    index = index_dicom_root(enhanced.parent.parent, progress=False)
    row = index.series.iloc[0]
    assert len(index.series) == 1 and row["chosen"], row["reason"]
    assert row["sop_class"] == "Enhanced CT Image Storage" and row["num_slices"] == 20
    chosen = single[single["chosen"]].iloc[0]
    for column in ("orientation", "slice_thickness_mm", "kernel", "patient_id"):
        assert row[column] == chosen[column], column

    labels = read_labels(root / "single" / "labels.csv")
    pre = PreprocessConfig(size=32)
    prepare_cache(labels, root / "cache-single", pre,
                  series_index=index_dicom_root(root / "single" / "dicom", progress=False),
                  progress=False)  # fmt: skip
    prepare_cache(labels, root / "cache-enhanced", pre, series_index=index, progress=False)
    pid = labels["patient_id"].item()
    a, b = (
        PatientCache(root / "cache-single").load(pid),
        PatientCache(root / "cache-enhanced").load(pid),
    )
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # 0.5 HU rounding, x 255/80


def test_frame_without_a_position_names_the_frame(cohort, tmp_path):
    _, _, enhanced = cohort
    ds = pydicom.dcmread(enhanced)
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    with pytest.raises(SeriesError, match=r"frame 4\): missing ImageOrientationPatient"):
        load_series([broken])
