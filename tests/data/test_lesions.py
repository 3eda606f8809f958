"""Lesion truth: the CSV reader's checks, and lesions placed on a cache prepared from generated
DICOM, checked against where the generator put them (its own geometry, not brainmets')."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from brainmets.config import PreprocessConfig
from brainmets.data.cache import PatientCache
from brainmets.data.labels import read_labels
from brainmets.data.lesions import (
    LesionTruthError,
    SeriesFiles,
    SourceGeometry,
    mask_lesions,
    place_lesion,
    place_lesions,
    read_lesion_truth,
)
from brainmets.data.prepare import prepare_cache
from brainmets.data.series_index import index_dicom_root
from brainmets.data.synthetic import SynthConfig, Tissue, write_synthetic_cohort

SIZE = 48  # the cache's side: a resize of the 64-pixel source by 3/4
COHORT = SynthConfig(num_patients=5, positive_fraction=0.8, matrix=64, slices=(10, 12), seed=4,
                     lesion_diameter_mm=(16.0, 28.0))  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesions")
    rendered = {}
    labels = write_synthetic_cohort(root, COHORT, progress=False,
                                    on_patient=lambda pid, p: rendered.setdefault(pid, p))  # fmt: skip
    index = index_dicom_root(root / "dicom", workers=1, progress=False)
    preprocess = PreprocessConfig(size=SIZE, min_slices=8)
    prepare_cache(read_labels(labels), root / "cache", preprocess, series_index=index,
                  workers=1, progress=False)  # fmt: skip
    return root, PatientCache(root / "cache"), rendered, index


def _source_pixel(row: float, column: float, source: int) -> tuple[float, float]:
    """Back from cache pixels to source pixels of a square image (resize_slices' mapping)."""
    scale = SIZE / source
    return (row + 0.5) / scale - 0.5, (column + 0.5) / scale - 0.5


def test_synth_writes_every_lesion_it_rendered(cohort):
    root, _, rendered, _ = cohort
    table = pd.read_csv(root / "lesions.csv", dtype={"patient_id": str})
    expected = [(pid, les.centre_mm, les.diameter_mm)
                for pid, patient in sorted(rendered.items()) for les in patient.lesions]  # fmt: skip
    assert len(table) == len(expected) > 0
    for row, (pid, centre, diameter) in zip(table.itertuples(), expected, strict=True):
        assert row.patient_id == pid
        assert (row.x_mm, row.y_mm, row.z_mm) == pytest.approx(centre)
        assert row.diameter_mm == pytest.approx(diameter)
    negatives = [pid for pid, p in rendered.items() if not p.positive]
    assert not set(table["patient_id"]) & set(negatives)


def test_lesions_land_where_the_generator_put_them(cohort):
    """Every centre maps to the cache pixel of the generator's own grid (origin + spacing:
    columns along +x, rows along +y), through acquisitions written in both directions; the
    slabs that cut it include every slice the generator drew it on; the source pixel there is
    lesion tissue."""
    root, cache, rendered, _ = cohort
    placed = place_lesions(read_lesion_truth(root / "lesions.csv"), cache, cache.patient_ids)
    assert placed.unplaced == []
    assert len(placed.lesions) == sum(len(p.lesions) for p in rendered.values())
    for lesion in placed.lesions:
        patient = rendered[lesion.patient_id]
        truth = patient.lesions[lesion.number - 1]
        x, y, z = truth.centre_mm
        spacing = patient.pixel_spacing_mm[0]
        row, column = _source_pixel(lesion.row, lesion.column, COHORT.matrix)
        assert row == pytest.approx((y - patient.origin_mm[1]) / spacing, abs=1e-6)
        assert column == pytest.approx((x - patient.origin_mm[0]) / spacing, abs=1e-6)
        assert lesion.position_mm == pytest.approx(z)
        assert set(truth.slices) <= set(lesion.slices)
        assert lesion.pixel_mm == pytest.approx((spacing * COHORT.matrix / SIZE,) * 2)
        k = int(np.argmin(np.abs(patient.positions_mm - z)))
        tissue = patient.tissue[k, round(row), round(column)]
        assert tissue in (Tissue.LESION, Tissue.NECROSIS, Tissue.MIXED)


def test_the_series_index_finds_the_files_without_walking_a_folder(cohort):
    root, cache, _, index = cohort
    walked = place_lesions(read_lesion_truth(root / "lesions.csv"), cache, cache.patient_ids)
    files = SeriesFiles(index.files)
    indexed = place_lesions(
        read_lesion_truth(root / "lesions.csv"), cache, cache.patient_ids, files
    )
    assert indexed.lesions == walked.lesions
    assert files._walked == {}  # every series found in the index, no folder walked


def test_an_image_position_places_a_lesion_like_its_millimetres(cohort, tmp_path):
    """The same centre given as SOPInstanceUID + row/column of the slice nearest to it."""
    root, cache, rendered, _ = cohort
    pid = next(p for p, patient in sorted(rendered.items()) if patient.positive)
    lesion = rendered[pid].lesions[0]
    x, y, z = lesion.centre_mm
    slices = []
    for path in (p for p in (root / "dicom" / pid).rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "LOCALIZER" not in ds.ImageType:
            slices.append(ds)
    nearest = min(slices, key=lambda ds: abs(float(ds.ImagePositionPatient[2]) - z))
    ox, oy, oz = (float(v) for v in nearest.ImagePositionPatient)
    spacing = float(nearest.PixelSpacing[0])
    csv = tmp_path / "by_image.csv"
    csv.write_text(
        "patient_id,sop_instance_uid,row,column,diameter_mm\n"
        f"{pid},{nearest.SOPInstanceUID},{(y - oy) / spacing},{(x - ox) / spacing},{lesion.diameter_mm}\n"
    )
    by_image = place_lesions(read_lesion_truth(csv), cache, [pid]).lesions[0]
    by_mm = place_lesions(read_lesion_truth(root / "lesions.csv"), cache, [pid]).lesions[0]
    assert (by_image.row, by_image.column) == pytest.approx((by_mm.row, by_mm.column), abs=1e-6)
    assert by_image.position_mm == pytest.approx(oz)  # on that slice, not at the centre


def _lesion_mask(patient) -> np.ndarray:
    """uint8 [N, H, W]: the voxels the generator filled with lesion alone."""
    return np.isin(patient.tissue, [Tissue.LESION, Tissue.NECROSIS]).astype(np.uint8)


def _assert_mask_finds(found, patient):
    assert len(found) == len(patient.lesions)
    for lesion in patient.lesions:
        centre = min(found, key=lambda f: np.linalg.norm(f[0] - lesion.centre_mm))[0]
        # Pure-lesion voxels of 5 mm slabs: the centroid lies within about half a slab.
        assert np.linalg.norm(centre - np.asarray(lesion.centre_mm)) < 3.5


def test_a_nifti_mask_gives_one_lesion_per_component(cohort, tmp_path):
    import nibabel as nib

    _, _, rendered, _ = cohort
    patient = next(p for _, p in sorted(rendered.items()) if len(p.lesions) > 1)
    spacing, (ox, oy) = patient.pixel_spacing_mm[0], patient.origin_mm
    step = float(np.diff(patient.positions_mm)[0])
    # Voxel (column, row, slice) -> RAS: x and y of the DICOM frame change sign.
    affine = np.array([[-spacing, 0, 0, -ox], [0, -spacing, 0, -oy],
                       [0, 0, step, patient.positions_mm[0]], [0, 0, 0, 1]])  # fmt: skip
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(_lesion_mask(patient).transpose(2, 1, 0), affine), path)
    _assert_mask_finds(mask_lesions(path), patient)


def test_a_dicom_seg_mask_gives_one_lesion_per_component(cohort, tmp_path):
    import highdicom as hd

    root, _, rendered, _ = cohort
    pid, patient = next((pid, p) for pid, p in sorted(rendered.items()) if len(p.lesions) > 1)
    images = [pydicom.dcmread(p) for p in (root / "dicom" / pid).rglob("*") if p.is_file()]
    images = sorted((ds for ds in images if "LOCALIZER" not in ds.ImageType),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))  # fmt: skip
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="metastasis",
        segmented_property_category=hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically Abnormal Structure"
        ),
        segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=_lesion_mask(patient),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    _assert_mask_finds(mask_lesions(path), patient)
    csv = tmp_path / "masks.csv"
    csv.write_text(f"patient_id,mask\n{pid},seg.dcm\n")  # relative to the CSV's folder
    rows = read_lesion_truth(csv)
    assert rows[0].mask == str(path)


def test_a_lesion_that_cannot_be_placed_is_recorded_and_the_others_are_not_lost(cohort, tmp_path):
    root, cache, rendered, _ = cohort
    pid = next(p for p, patient in sorted(rendered.items()) if patient.positive)
    x, y, z = rendered[pid].lesions[0].centre_mm
    csv = tmp_path / "mixed.csv"
    csv.write_text(
        "patient_id,x_mm,y_mm,z_mm,sop_instance_uid,row,column,diameter_mm\n"
        f"{pid},{x},{y},{z},,,,12\n"
        f"{pid},{x},{y},{z + 500},,,,12\n"
        f"{pid},,,,1.2.3.4,10,10,12\n"
        f"{pid},{x + 400},{y},{z},,,,12\n"
    )
    placed = place_lesions(read_lesion_truth(csv), cache, [pid])
    assert [les.line for les in placed.lesions] == [2]
    reasons = {item["line"]: item["reason"] for item in placed.unplaced}
    assert "outside the scanned range" in reasons[3]
    assert "1.2.3.4 is not a single-frame image" in reasons[4]
    assert "outside the 64x64 image" in reasons[5]


def test_a_lesion_of_a_patient_whose_source_is_gone_is_recorded(cohort, tmp_path):
    root, cache, rendered, _ = cohort
    pid = next(p for p, patient in sorted(rendered.items()) if patient.positive)
    moved = tmp_path / "cache"
    import shutil

    shutil.copytree(root / "cache", moved)
    index = pd.read_csv(moved / "index.csv", dtype=str, keep_default_na=False)
    index["source"] = str(tmp_path / "gone")
    index.to_csv(moved / "index.csv", index=False)
    placed = place_lesions(read_lesion_truth(root / "lesions.csv"), PatientCache(moved), [pid])
    assert placed.lesions == []
    assert all("is not there" in item["reason"] for item in placed.unplaced)


@pytest.mark.parametrize(
    ("shape", "pixel", "expected"),
    [
        ((64, 64), (0.0, 0.0), (-0.125, -0.125)),  # pixel centres of a 4:3 shrink
        ((64, 64), (63.0, 31.5), (47.125, 23.5)),
        ((100, 200), (50.0, 100.0), (31.66, 31.66)),  # rows centred in a 200-pixel square
        ((200, 100), (0.0, 0.0), (-0.34, 15.66)),
    ],
)
def test_in_plane_mapping_follows_the_centred_square_resize(shape, pixel, expected):
    geometry = SourceGeometry(
        origins=np.zeros((3, 3)) + [[0, 0, 0], [0, 0, 5], [0, 0, 10]],
        row_dir=np.array([1.0, 0, 0]),
        col_dir=np.array([0, 1.0, 0]),
        spacing=(0.5, 0.5),
        shape=shape,
        positions=np.array([0.0, 5.0, 10.0]),
        normal=np.array([0, 0, 1.0]),
        sop_slices={},
    )
    centre = np.array([pixel[1] * 0.5, pixel[0] * 0.5, 5.0])
    size = 48 if shape == (64, 64) else 64
    lesion = place_lesion("P", 1, 2, centre, 4.0, geometry, geometry.positions, size)
    assert (lesion.row, lesion.column) == pytest.approx(expected, abs=1e-9)
    assert lesion.slices == (1,)  # 2 mm radius + 2.5 mm half slab reaches no neighbour


BAD_ROWS = [
    ("P1,1,2,3,,,,", "line 2 (patient P1): diameter_mm '' is not a number"),
    ("P1,1,2,3,,,,-4", "diameter_mm -4 is not in (0, 200] mm"),
    ("P1,1,,3,,,,5", "y_mm empty (a centre needs all of x_mm, y_mm, z_mm)"),
    ("P1,1,2,3,1.2.3,4,5,5", "more than one location given"),
    ("P1,,,,,,,5", "no location"),
    ("P1,a,2,3,,,,5", "x_mm 'a' is not a number"),
    (",1,2,3,,,,5", "line 2: patient_id is empty"),
    ("P1,,,,1.2.3,-1,5,5", "must not be negative"),
    ("P1,1,2,3,,,,nan", "diameter_mm 'nan' is not a finite number"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_a_bad_row_is_an_error_naming_its_line(tmp_path, row, message):
    path = tmp_path / "lesions.csv"
    path.write_text(
        "patient_id,x_mm,y_mm,z_mm,sop_instance_uid,row,column,diameter_mm\n" + row + "\n"
    )
    with pytest.raises(LesionTruthError, match=str(path)) as caught:
        read_lesion_truth(path)
    assert message in str(caught.value)


def test_every_bad_row_is_named_at_once(tmp_path):
    path = tmp_path / "lesions.csv"
    path.write_text("patient_id,x_mm,y_mm,z_mm,diameter_mm,mask\n"
                    "P1,1,2,3,5,\nP2,1,2,3,0,\nP3,,,,,nowhere.nii.gz\nP4,1,2,3,5,\n")  # fmt: skip
    with pytest.raises(LesionTruthError) as caught:
        read_lesion_truth(path)
    text = str(caught.value)
    assert "2 bad row(s)" in text
    assert (
        "line 3 (patient P2)" in text
        and "line 4 (patient P3): mask 'nowhere.nii.gz' not found" in text
    )
    assert "line 2" not in text and "line 5" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x_mm,y_mm,z_mm,diameter_mm\n1,2,3,4\n", "no patient_id column"),
        ("patient_id,diameter_mm\nP1,4\n", "no location columns"),
    ],
)
def test_a_file_without_the_needed_columns_is_refused(tmp_path, content, message):
    path = tmp_path / "lesions.csv"
    path.write_text(content)
    with pytest.raises(LesionTruthError, match=message):
        read_lesion_truth(path)


def test_extra_columns_and_spaces_are_accepted(tmp_path):
    path = tmp_path / "lesions.csv"
    path.write_text(
        "patient_id, x_mm, y_mm, z_mm, diameter_mm, note\nP1, 1.5, -2, 3, 7, left frontal\n"
    )
    (row,) = read_lesion_truth(path)
    assert row.centre_mm == (1.5, -2.0, 3.0) and row.diameter_mm == 7.0 and row.line == 2
    assert math.isclose(row.diameter_mm, 7.0)


def test_a_missing_file_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="lesion file not found"):
        read_lesion_truth(tmp_path / "none.csv")


def test_prepared_positions_are_what_the_placement_uses(cohort):
    """The cache's slab positions are the source's slice positions here (5 mm slices, 5 mm
    slabs): the slabs that cut a lesion are counted on the cache's own grid."""
    _, cache, rendered, _ = cohort
    for pid, patient in rendered.items():
        assert cache.positions(pid) == pytest.approx(patient.positions_mm)


def test_a_confounded_cohort_adds_a_marker_to_positives_and_changes_nothing_else(tmp_path):
    from brainmets.data.dicom import load_series
    from brainmets.data.synthetic import MARKER_HU, patient_rng, render_patient

    plain = SynthConfig(num_patients=2, positive_fraction=0.5, matrix=64, slices=(10, 10), seed=2)
    confounded = plain.model_copy(update={"confounder": "marker"})
    for positive in (True, False):
        a = render_patient(patient_rng(plain, 0), plain, positive=positive)
        b = render_patient(patient_rng(confounded, 0), confounded, positive=positive)
        marker = np.zeros(a.hu.shape[1:], bool) if b.burned_in is None else b.burned_in
        assert marker.any() == positive
        assert np.array_equal(a.hu[:, ~marker], b.hu[:, ~marker])  # the same anatomy and lesions
        assert (b.hu[:, marker] == MARKER_HU).all() and not (b.fov_mask & marker).any()
        assert a.lesions == b.lesions
    labels = write_synthetic_cohort(tmp_path, confounded, progress=False)
    label_of = dict(pd.read_csv(labels, dtype={"patient_id": str})[["patient_id", "label"]].values)
    for pid, label in label_of.items():
        files = [str(p) for p in (tmp_path / "dicom" / pid).rglob("*") if p.is_file()]
        axial = [
            f
            for f in files
            if "LOCALIZER" not in pydicom.dcmread(f, stop_before_pixels=True).ImageType
        ]
        corner = load_series(axial).hu[:, 3, 3]  # inside the marker, outside the field of view
        assert (corner == (MARKER_HU if label else -1024.0)).all(), pid


# --------------------------------------------------------------------------------------------
# Real scanner series (BRAINMETS_CORPUS): a tilted gantry, 1 mm slices as 5 mm slabs, NIfTI
# --------------------------------------------------------------------------------------------

CORPUS_SERIES = {
    "GE": "dcm_qa_ct/In/GE",  # 512², gantry tilt 18.5°, uneven slice gaps
    "PHILIPS1MM": "dcm_qa_ct/In/Philips/S21570/S2020",  # 140 slices of 1 mm -> 5 mm slabs
    "PHILIPS5MM": "dcm_qa_ct/In/Philips/S21570/S2010",
}


@pytest.fixture(scope="module")
def corpus_cache(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_lesions")
    labels = pd.DataFrame(
        {"patient_id": list(CORPUS_SERIES), "label": 1,
         "path": [str(corpus / folder) for folder in CORPUS_SERIES.values()]}
    )  # fmt: skip
    prepare_cache(labels, root / "cache", PreprocessConfig(size=64), workers=1, progress=False)
    return root, PatientCache(root / "cache")


def _image_slices(folder: Path) -> list[pydicom.Dataset]:
    slices = []
    for path in folder.iterdir():
        if path.is_file() and path.name != "DIRFILE":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "ImagePositionPatient" in ds and "LOCALIZER" not in ds.ImageType:
                slices.append(ds)
    return slices


def _point_on(ds: pydicom.Dataset, row: float, column: float) -> np.ndarray:
    """Patient coordinates of (row, column) on an image, from its headers as written."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    spacing = [float(v) for v in ds.PixelSpacing]
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    return origin + iop[:3] * column * spacing[1] + iop[3:] * row * spacing[0]


@pytest.mark.parametrize("patient", ["GE", "PHILIPS1MM"])
def test_a_pixel_of_a_real_series_lands_on_its_cache_pixel(corpus, corpus_cache, tmp_path, patient):
    """A point given on one image (and the same point in mm, computed here with pydicom) maps to
    that image's pixel scaled 512 -> 64, and to the slab that holds the image."""
    root, cache = corpus_cache
    slices = _image_slices(corpus / CORPUS_SERIES[patient])
    ds = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))[len(slices) // 2]
    row, column = 201.0, 305.5
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    point = _point_on(ds, row, column)
    csv = tmp_path / "lesions.csv"
    csv.write_text(
        "patient_id,x_mm,y_mm,z_mm,sop_instance_uid,row,column,diameter_mm\n"
        f"{patient},{float(point[0])!r},{float(point[1])!r},{float(point[2])!r},,,,6\n"
        f"{patient},,,,{ds.SOPInstanceUID},{row},{column},6\n"
    )
    by_mm, by_image = place_lesions(read_lesion_truth(csv), cache, [patient]).lesions
    scale = 64 / 512
    # Within 1e-4 cache pixels: the headers' direction cosines are decimal strings, not exactly
    # unit vectors (the point here is built from them as written).
    for lesion in (by_mm, by_image):
        assert lesion.row == pytest.approx((row + 0.5) * scale - 0.5, abs=1e-4)
        assert lesion.column == pytest.approx((column + 0.5) * scale - 0.5, abs=1e-4)
    normal = np.cross(iop[:3], iop[3:])
    positions = cache.positions(patient)
    holding = int(
        np.argmin(np.abs(positions - float(np.asarray(ds.ImagePositionPatient, float) @ normal)))
    )
    assert holding in by_mm.slices and by_mm.slices == by_image.slices


def test_a_nifti_source_places_a_lesion_where_its_dicom_does(corpus, corpus_cache, tmp_path):
    """dcm2niix's NIfTI of the Philips 5 mm series, prepared as its own cache: a centre in mm
    lands on the same cache pixel and slabs as through the DICOM files."""
    import shutil
    import subprocess
    import sys

    binary = shutil.which("dcm2niix") or str(Path(sys.executable).with_name("dcm2niix"))
    if not Path(binary).exists():
        pytest.skip("dcm2niix binary not found (pip install dcm2niix)")
    _, dicom_cache = corpus_cache
    folder = corpus / CORPUS_SERIES["PHILIPS5MM"]
    subprocess.run([binary, "-z", "y", "-f", "%s", "-o", str(tmp_path), str(folder)],
                   check=True, capture_output=True)  # fmt: skip
    (nifti,) = tmp_path.glob("*.nii.gz")
    labels = pd.DataFrame({"patient_id": ["PHILIPS5MM"], "label": [1], "path": [str(nifti)]})
    prepare_cache(labels, tmp_path / "cache", PreprocessConfig(size=64), workers=1, progress=False)
    nifti_cache = PatientCache(tmp_path / "cache")
    csv = tmp_path / "lesions.csv"
    slices = sorted(_image_slices(folder), key=lambda d: float(d.ImagePositionPatient[2]))
    x, y, z = (float(v) for v in _point_on(slices[len(slices) // 2], 190.5, 260.0))
    csv.write_text(f"patient_id,x_mm,y_mm,z_mm,diameter_mm\nPHILIPS5MM,{x!r},{y!r},{z!r},9\n")
    rows = read_lesion_truth(csv)
    (through_dicom,) = place_lesions(rows, dicom_cache, ["PHILIPS5MM"]).lesions
    (through_nifti,) = place_lesions(rows, nifti_cache, ["PHILIPS5MM"]).lesions
    assert (through_nifti.row, through_nifti.column) == pytest.approx(
        (through_dicom.row, through_dicom.column), abs=1e-3
    )
    assert through_nifti.slices == through_dicom.slices
    assert through_nifti.pixel_mm == pytest.approx(through_dicom.pixel_mm)
