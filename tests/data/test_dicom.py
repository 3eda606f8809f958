"""DICOM -> HU: generated geometry cases and the real corpus (dcm2niix reference, codecs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from brainmets.data.dicom import (
    PADDING_HU,
    SeriesError,
    load_series,
    read_header,
    slice_normal,
)
from brainmets.data.nifti import load_nifti

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

# --------------------------------------------------------------------------------------------
# Generated series
# --------------------------------------------------------------------------------------------


def write_ct_slice(
    path: Path,
    stored: np.ndarray,
    *,
    z: float,
    series_uid: str,
    instance: int = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    orientation: list[float] = AXIAL,
    padding: int | None = None,
    padding_limit: int | None = None,
) -> Path:
    """One CT Image Storage file; position = z along the normal of ``orientation``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "GEN001"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = list(z * slice_normal(orientation))
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = stored.shape
    signed = stored.dtype == np.int16
    ds.PixelRepresentation = int(signed)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if padding is not None:
        ds.add_new(0x00280120, "SS" if signed else "US", padding)  # PixelPaddingValue
    if padding_limit is not None:
        ds.add_new(0x00280121, "SS" if signed else "US", padding_limit)  # ...RangeLimit
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def constant_series(tmp_path: Path, zs: list[float], **kwargs) -> list[Path]:
    """Slice k stores 1024 + 10*k (HU 10*k); written under shuffled names and numbers."""
    uid = generate_uid()
    rng = np.random.default_rng(0)
    names = rng.permutation(len(zs))
    numbers = rng.permutation(len(zs)) + 1
    return [
        write_ct_slice(
            tmp_path / f"img{names[k]:03d}",
            np.full((8, 8), 1024 + 10 * k, np.uint16),
            z=z,
            series_uid=uid,
            instance=int(numbers[k]),
            **kwargs,
        )
        for k, z in enumerate(zs)
    ]


@pytest.mark.parametrize("orientation", [AXIAL, [1, 0, 0, 0, 0.9483237, -0.3173047]])
def test_slices_sorted_by_position_along_normal(tmp_path, orientation):
    zs = [30.0, -10.0, 5.0, 12.5, 0.0]
    files = constant_series(tmp_path, zs, orientation=orientation)
    vol = load_series(files)
    order = np.argsort(zs)
    np.testing.assert_allclose(vol.positions_mm, np.sort(zs), atol=1e-6)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], 10.0 * order)
    assert vol.files == [str(files[i]) for i in order]
    assert vol.hu.dtype == np.float32


def test_rescale_applied_per_slice(tmp_path):
    uid = generate_uid()
    hu_target = np.array([[-1000, 0], [40, 1000]], np.float32)
    files = []
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -4048.0), (0.5, -1024.0)]):
        stored = np.rint((hu_target - intercept) / slope).astype(np.uint16)
        files.append(
            write_ct_slice(
                tmp_path / f"s{k}", stored, z=k, series_uid=uid, slope=slope, intercept=intercept
            )
        )
    vol = load_series(files)
    for k in range(3):
        np.testing.assert_array_equal(vol.hu[k], hu_target)


@pytest.mark.parametrize(
    ("dtype", "padding", "limit", "padded_stored"),
    [
        (np.int16, -2000, None, [-2000]),
        (np.int16, -32768, None, [-32768]),
        (np.uint16, 0, None, [0]),
        (np.uint16, 0, 10, [0, 5, 10]),  # range limit: every stored value in [0, 10]
        (np.int16, -2000, -1990, [-2000, -1995, -1990]),
    ],
)
def test_padding_becomes_air(tmp_path, dtype, padding, limit, padded_stored):
    intercept = 0.0 if dtype == np.int16 else -1024.0
    tissue = 40 - intercept
    stored = np.full((4, 4), tissue, dtype)
    stored.flat[: len(padded_stored)] = padded_stored
    path = write_ct_slice(
        tmp_path / "p",
        stored,
        z=0,
        series_uid=generate_uid(),
        intercept=intercept,
        padding=padding,
        padding_limit=limit,
    )
    hu = load_series([path]).hu[0]
    assert (hu.flat[: len(padded_stored)] == PADDING_HU).all()
    assert (hu.flat[len(padded_stored) :] == 40).all()


def test_mixed_matrix_sizes_is_an_error(tmp_path):
    uid = generate_uid()
    a = write_ct_slice(tmp_path / "a", np.zeros((8, 8), np.uint16), z=0, series_uid=uid)
    b = write_ct_slice(tmp_path / "b", np.zeros((8, 6), np.uint16), z=1, series_uid=uid)
    with pytest.raises(SeriesError, match="mixed matrix sizes") as err:
        load_series([a, b])
    assert err.value.path == str(b)


def test_duplicate_positions_is_not_a_volume(tmp_path):
    files = constant_series(tmp_path, [0.0, 1.0, 1.0, 2.0])
    with pytest.raises(SeriesError, match="not a volume"):
        load_series(files)


def test_missing_rescale_is_an_error(tmp_path):
    path = write_ct_slice(
        tmp_path / "x",
        np.zeros((4, 4), np.uint16),
        z=0,
        series_uid=generate_uid(),
        slope=None,
        intercept=None,
    )
    with pytest.raises(SeriesError, match="RescaleSlope/RescaleIntercept") as err:
        load_series([path])
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize(
    ("zs", "expected"),
    [
        ([0, 5, 10, 15, 20], []),
        ([0, 5, 10, 20, 25], ["gap", "uneven"]),
        ([0, 1, 2.5, 3.5, 5], ["uneven"]),
    ],
)
def test_spacing_warnings(tmp_path, zs, expected):
    vol = load_series(constant_series(tmp_path, [float(z) for z in zs]))
    assert [w.split(" ")[0] for w in vol.warnings] == expected


def test_read_header_skips_non_dicom(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("not a dicom file\n" * 20)
    assert read_header(tmp_path / "empty.dcm") is None
    assert read_header(tmp_path / "notes.dcm") is None
    with pytest.raises(SeriesError, match="not a DICOM file"):
        load_series([tmp_path / "notes.dcm"])


# --------------------------------------------------------------------------------------------
# Corpus: dcm2niix reference
# --------------------------------------------------------------------------------------------


def dcm2niix_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("dcm2niix")
    return shutil.which("dcm2niix") or (str(beside_python) if beside_python.exists() else None)


def dcm2niix_volume(folder: Path, out: Path) -> np.ndarray:
    """dcm2niix's conversion (no tilt correction) as [slices, rows, cols] int values."""
    binary = dcm2niix_binary()
    if binary is None:
        pytest.skip("dcm2niix binary not found (pip install dcm2niix)")
    out.mkdir()
    cmd = [binary, "-z", "n", "-b", "y", "-f", "%s", "-o", str(out), str(folder)]
    subprocess.run(cmd, check=True, capture_output=True)
    (nii,) = [p for p in out.glob("*.nii") if "Tilt" not in p.name]
    return np.transpose(np.asarray(nib.load(nii).dataobj, dtype=np.float32), (2, 1, 0))


@pytest.fixture(scope="module")
def philips_5mm(corpus) -> Path:
    return corpus / "dcm_qa_ct/In/Philips/S21570/S2010"


@pytest.mark.parametrize("folder", ["dcm_qa_ct/In/GE", "dcm_qa_ct/In/Philips/S21570/S2010"])
def test_hu_equals_dcm2niix(corpus, tmp_path, folder):
    files = [p for p in (corpus / folder).iterdir() if p.name != "DIRFILE"]
    vol = load_series(files)
    reference = dcm2niix_volume(corpus / folder, tmp_path / "nii")
    # dcm2niix stores rows bottom-up (NIfTI's +y is anterior); slices are in the same order.
    reference = reference[:, ::-1, :]
    assert reference.shape == vol.hu.shape
    padded = np.stack([padding_of(f) for f in vol.files])
    np.testing.assert_array_equal(vol.hu[~padded], reference[~padded])
    # dcm2niix keeps the padding value; we document padding -> air.
    assert (vol.hu[padded] == PADDING_HU).all()
    if "GE" in folder:
        assert padded.sum() > 1_000_000  # GE: the circle outside the field of view
        assert any("uneven" in w for w in vol.warnings)


def padding_of(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    if "PixelPaddingValue" not in ds:
        return np.zeros(ds.pixel_array.shape, bool)
    return ds.pixel_array == ds.PixelPaddingValue


def test_nifti_from_dcm2niix_equals_dicom(corpus, tmp_path, philips_5mm):
    binary = dcm2niix_binary()
    if binary is None:
        pytest.skip("dcm2niix binary not found")
    for gz, flag in [(".nii", "n"), (".nii.gz", "y")]:
        out = tmp_path / flag
        out.mkdir()
        cmd = [binary, "-z", flag, "-f", "%s", "-o", str(out), str(philips_5mm)]
        subprocess.run(cmd, check=True, capture_output=True)
        nifti = load_nifti(next(out.glob(f"*{gz}")))
        dicom = load_series([p for p in philips_5mm.iterdir() if p.name != "DIRFILE"])
        np.testing.assert_array_equal(nifti.hu, dicom.hu)
        np.testing.assert_allclose(nifti.positions_mm, dicom.positions_mm, atol=1e-3)
        assert nifti.pixel_spacing_mm == pytest.approx(dicom.pixel_spacing_mm)
        assert nifti.files == []


# --------------------------------------------------------------------------------------------
# Corpus: transfer syntaxes
# --------------------------------------------------------------------------------------------

LOSSLESS = [
    "LittleEndianImplicit",
    "LittleEndianExplicit",
    "BigEndianExplicit",
    "DeflatedExplicitVRLittleEndian",
    "RLELossless",
    "JPEGProcess14",
    "JPEGProcess14SV1",
    "JPEGLSLossless",
    "JPEG2000LosslessOnly",
]
# Measured against the uncompressed slice inside the field of view (mean, max |HU error|):
# J2K 0.57/5, JPEG-LS near-lossless 0.69/1, baseline 8-bit (slope 32.12) 19.8/64.2,
# extended 12-bit (slope 2.0002) 3.8/35.6. Bounds leave a little headroom over those.
LOSSY = [
    ("JPEG2000", 1.0, 8.0),
    ("JPEGLSLossy", 1.0, 1.0),
    ("JPEGProcess1", 25.0, 2.5 * 32.1216),
    ("JPEGProcess2_4", 5.0, 40.0),
]
UNDECODABLE = [
    ("JPEGProcess6_8", "1.2.840.10008.1.2.4.53"),
    ("JPEGProcess10_12", "1.2.840.10008.1.2.4.55"),
]


def cornerstone_file(corpus: Path, syntax: str) -> Path:
    (path,) = (corpus / "cornerstone_ts").glob(f"CTImage.dcm_{syntax}TransferSyntax_*")
    return path


@pytest.fixture(scope="module")
def uncompressed(corpus) -> np.ndarray:
    return load_series([corpus / "cornerstone_ts/CTImage.dcm"]).hu[0]


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_decode_exactly(corpus, uncompressed, syntax):
    np.testing.assert_array_equal(
        load_series([cornerstone_file(corpus, syntax)]).hu[0], uncompressed
    )


@pytest.mark.parametrize(("syntax", "max_mean", "max_abs"), LOSSY)
def test_lossy_syntaxes_within_tolerance(corpus, uncompressed, syntax, max_mean, max_abs):
    hu = load_series([cornerstone_file(corpus, syntax)]).hu[0]
    # Lossy files were re-encoded without PixelPaddingValue: compare inside the field of view.
    inside = uncompressed != PADDING_HU
    error = np.abs(hu - uncompressed)[inside]
    assert error.mean() <= max_mean
    assert error.max() <= max_abs
    assert np.corrcoef(hu[inside], uncompressed[inside])[0, 1] > 0.999


@pytest.mark.parametrize(("syntax", "uid"), UNDECODABLE)
def test_undecodable_syntax_names_file_and_syntax(corpus, syntax, uid):
    path = cornerstone_file(corpus, syntax)
    with pytest.raises(SeriesError, match="cannot decode") as err:
        load_series([path])
    assert err.value.path == str(path)
    assert uid in err.value.reason


def test_series_holding_an_undecodable_file_reports_it(corpus, tmp_path):
    """Two decodable slices and one JPEG process 6/8 slice, rewritten as one series."""
    uid = generate_uid()
    sources = [
        cornerstone_file(corpus, s)
        for s in ("LittleEndianExplicit", "JPEGProcess6_8", "RLELossless")
    ]
    files = []
    for k, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = uid
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        files.append(tmp_path / f"slice{k}.dcm")
        ds.save_as(files[-1])
    with pytest.raises(SeriesError, match="Process 6 and 8") as err:
        load_series(files)
    assert err.value.path == str(files[1])


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000Lossless/693_J2KR.dcm",
        "JPEG2000Lossless/J2K_pixelrep_mismatch.dcm",
        "JPEG2000Lossless/TOSHIBA_J2K_OpenJPEGv2Regression.dcm",
        "JPEG2000Lossless/TOSHIBA_J2K_SIZ0_PixRep1.dcm",
        "JPEG2000Lossless/TOSHIBA_J2K_SIZ1_PixRep0.dcm",
        "JPEG2000Lossless/explicit_VR-UN.dcm",
        "JPEG2000/693_J2KI.dcm",
        "JPEG2000/ELSCINT1_JP2vsJ2K.dcm",
        "JPEG2000/MAROTECH_CT_JP2Lossy.dcm",
        "JPEGLS/CT1_JLSN.dcm",
        "JPEGLossless/JPEGLossless_1s_1f_i_16_16_bad.dcm",
        "LittleEndianExplicit/CT_small.dcm",
    ],
)
def test_pylibjpeg_ct_decodes_or_fails_clearly(corpus, name):
    path = corpus / "pylibjpeg_ct" / name
    try:
        vol = load_series([path])
    except SeriesError as err:
        assert err.path == str(path) and err.reason
        return
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.hu.shape == (1, ds.Rows, ds.Columns)
    assert np.isfinite(vol.hu).all() and vol.hu.std() > 0


# --------------------------------------------------------------------------------------------
# Corpus: dicom2nifti's failing geometries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "error", "warning"),
    [
        ("notavolume/001", "not a volume", None),
        ("sliceincrement/001", None, "gap"),
        ("sliceincrement/002", None, "gap"),
        ("gantrytilting/001", None, None),
    ],
)
def test_dicom2nifti_failing_outcomes(corpus, case, error, warning):
    files = sorted((corpus / "dicom2nifti_failing/tests/data/failing" / case).glob("*.dcm"))
    if error:
        with pytest.raises(SeriesError, match=error):
            load_series(files)
        return
    vol = load_series(files)
    assert vol.hu.shape == (len(files), 512, 512)
    assert np.all(np.diff(vol.positions_mm) > 0)
    if warning:
        assert any(w.startswith(warning) for w in vol.warnings)
    else:
        assert vol.warnings == []


def test_tilt_only_in_orientation_spacing_along_normal(corpus):
    """Tilted IOP: positions along the normal step by the table increment x cos(tilt)."""
    folder = corpus / "dicom2nifti_failing/tests/data/failing/gantrytilting/001"
    files = sorted(folder.glob("*.dcm"))
    vol = load_series(files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    normal = slice_normal(ds.ImageOrientationPatient)
    tilt = np.degrees(np.arccos(abs(normal[2])))
    assert 10 < tilt < 20
    z = sorted(
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files
    )
    np.testing.assert_allclose(np.diff(vol.positions_mm), np.diff(z) * abs(normal[2]), rtol=1e-4)
