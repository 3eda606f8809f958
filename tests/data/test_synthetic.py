"""The synthetic cohort, read back with plain pydicom (independent of brainmets.data.dicom)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from brainmets.data.synthetic import (
    OUTSIDE_FOV_HU,
    SynthConfig,
    SyntheticPatient,
    Tissue,
    assign_labels,
    patient_rng,
    render_patient,
    write_synthetic_cohort,
)

COHORT = SynthConfig(num_patients=10, positive_fraction=0.4, seed=7)
BRAIN = {Tissue.GREY, Tissue.WHITE, Tissue.CSF, Tissue.OEDEMA, Tissue.LESION, Tissue.NECROSIS}


@dataclass
class Study:
    """One patient's files as written, and the rendering they came from."""

    patient: SyntheticPatient
    axial: list[tuple[Path, pydicom.Dataset]]  # sorted along +z by ImagePositionPatient
    localizers: list[pydicom.Dataset]
    hu: np.ndarray  # stored * slope + intercept, [N, H, W] in position order


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Study]]:
    out = tmp_path_factory.mktemp("synth")
    rendered: dict[str, SyntheticPatient] = {}
    labels = write_synthetic_cohort(
        out, COHORT, progress=False, on_patient=lambda pid, p: rendered.setdefault(pid, p)
    )
    studies = {}
    for folder in sorted((out / "dicom").iterdir()):
        files = [(path, pydicom.dcmread(path)) for path in folder.rglob("*") if path.is_file()]
        axial = [f for f in files if "LOCALIZER" not in f[1].ImageType]
        axial.sort(key=lambda f: float(f[1].ImagePositionPatient[2]))
        hu = np.stack(
            [
                ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                for _, ds in axial
            ]
        )
        localizers = [ds for _, ds in files if "LOCALIZER" in ds.ImageType]
        studies[folder.name] = Study(rendered[folder.name], axial, localizers, hu)
    return labels, studies


def _eroded(mask: np.ndarray, pixels: int) -> np.ndarray:
    """In-plane erosion, slice by slice: drops pixels that the reconstruction blur mixes."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, structure=structure, iterations=pixels)


# --------------------------------------------------------------------------- cohort layout


def test_labels_csv_matches_folders_and_fraction(cohort):
    labels_path, studies = cohort
    with labels_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert (
        [r["patient_id"] for r in rows] == sorted(studies) == [f"SYN{i:04d}" for i in range(1, 11)]
    )
    assert sum(r["label"] == "1" for r in rows) == round(10 * 0.4)
    for row in rows:
        assert studies[row["patient_id"]].patient.positive == (row["label"] == "1")
        assert row["label"] in {"0", "1"}


@pytest.mark.parametrize(
    ("num_patients", "fraction", "positives"),
    [(10, 0.4, 4), (7, 0.5, 4), (5, 0.5, 2), (3, 0.0, 0), (3, 1.0, 3), (40, 0.4, 16)],
)
def test_positive_count_is_exact(num_patients, fraction, positives):
    cfg = SynthConfig(num_patients=num_patients, positive_fraction=fraction)
    assert assign_labels(cfg).sum() == positives


def test_files_are_valid_ct_studies(cohort):
    _, studies = cohort
    for pid, study in studies.items():
        datasets = [ds for _, ds in study.axial] + study.localizers
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.Modality == "CT" and ds.Manufacturer == "brainmets-synth"
            assert ds.PatientID == pid and str(ds.PatientName) == f"SYNTHETIC^{pid[3:]}"
            assert ds.PatientBirthDate == ""
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
                assert uid.is_valid
        assert len({ds.StudyInstanceUID for ds in datasets}) == 1
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
        assert len({ds.SeriesInstanceUID for _, ds in study.axial}) == 1
        first = study.axial[0][1]
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert first.SeriesDescription == "HEAD 5mm" and float(first.SliceThickness) == 5.0
        assert first.ConvolutionKernel in {"STANDARD", "SOFT", "H30s", "J30s", "UB", "FC21"}
        assert (first.Rows, first.Columns) == (256, 256)
        assert float(first.PixelSpacing[0]) == pytest.approx(230 / 256)


def test_each_study_has_one_localizer_that_is_not_axial(cohort):
    _, studies = cohort
    for study in studies.values():
        assert len(study.localizers) == 1
        scout = study.localizers[0]
        assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        assert scout.SeriesDescription == "LOCALIZER"
        assert scout.SeriesInstanceUID != study.axial[0][1].SeriesInstanceUID
        orientation = np.array(scout.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        assert abs(normal[2]) < 1e-6  # coronal or sagittal, never axial
        assert scout.pixel_array.ndim == 2


# --------------------------------------------------------------------------- encoding


def test_hu_round_trip_and_geometry(cohort):
    _, studies = cohort
    for study in studies.values():
        patient = study.patient
        fov = patient.fov_mask
        assert np.array_equal(study.hu[:, fov], patient.hu[:, fov])
        assert np.all(patient.hu[:, ~fov] == OUTSIDE_FOV_HU)
        positions = [float(ds.ImagePositionPatient[2]) for _, ds in study.axial]
        np.testing.assert_allclose(positions, patient.positions_mm, atol=1e-3)
        np.testing.assert_allclose(np.diff(positions), 5.0, atol=1e-3)
        x0, y0 = (float(v) for v in study.axial[0][1].ImagePositionPatient[:2])
        assert (x0, y0) == pytest.approx(patient.origin_mm, abs=1e-3)


def test_padding_fills_outside_the_field_of_view(cohort):
    _, studies = cohort
    for study in studies.values():
        outside = ~study.patient.fov_mask
        assert outside[0, 0] and not outside[128, 128]
        for _, ds in study.axial:
            stored = ds.pixel_array
            padding = ds.PixelPaddingValue
            assert np.all(stored[outside] == padding)
            assert not np.any(stored[~outside] == padding)


def test_encodings_and_file_names_vary_by_patient(cohort):
    _, studies = cohort
    encodings = {
        (ds.PixelRepresentation, float(ds.RescaleIntercept), ds.BitsStored)
        for study in studies.values()
        for _, ds in study.axial[:1]
    }
    assert encodings == {(1, 0.0, 16), (0, -1024.0, 12)}
    with_suffix = {path.name.endswith(".dcm") for s in studies.values() for path, _ in s.axial}
    assert with_suffix == {True, False}


def test_file_names_are_not_in_slice_order_but_instance_numbers_are(cohort):
    _, studies = cohort
    for study in studies.values():
        by_name = sorted(study.axial, key=lambda f: f[0].name)
        z_by_name = [float(ds.ImagePositionPatient[2]) for _, ds in by_name]
        assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)
        instances = [int(ds.InstanceNumber) for _, ds in study.axial]  # in position order
        assert instances in (sorted(instances), sorted(instances, reverse=True))
        assert sorted(instances) == list(range(1, len(instances) + 1))


# --------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize(
    ("tissues", "low", "high"),
    [
        ({Tissue.AIR}, -1010.0, -990.0),
        ({Tissue.BONE_CORTICAL, Tissue.BONE_DIPLOE}, 700.0, 1500.0),
        ({Tissue.GREY}, 33.0, 42.0),
        ({Tissue.WHITE}, 23.0, 32.0),
        ({Tissue.CSF}, 0.0, 15.0),
        ({Tissue.OEDEMA}, 13.0, 24.0),
    ],
)
def test_tissue_hu_in_the_stated_range(cohort, tissues, low, high):
    _, studies = cohort
    seen = 0
    for study in studies.values():
        inside = np.isin(study.patient.tissue, [int(t) for t in tissues]) & study.patient.fov_mask
        sample = study.hu[_eroded(inside, 1)]
        if sample.size < 50:
            continue  # e.g. oedema in a negative patient
        seen += 1
        assert low <= float(np.median(sample)) <= high, (tissues, study.patient.noise_sigma_hu)
    assert seen >= 3


def test_grey_matter_is_denser_than_white_matter(cohort):
    _, studies = cohort
    for study in studies.values():
        tissue = study.patient.tissue
        grey = np.median(study.hu[_eroded(tissue == Tissue.GREY, 1)])
        white = np.median(study.hu[_eroded(tissue == Tissue.WHITE, 1)])
        assert 4.0 <= grey - white <= 15.0


def test_noise_level_matches_the_patient_and_varies(cohort):
    _, studies = cohort
    sigmas = []
    for study in studies.values():
        air = _eroded((study.patient.tissue == Tissue.AIR) & study.patient.fov_mask, 4)
        measured = float(study.hu[air].std())
        assert measured == pytest.approx(study.patient.noise_sigma_hu, rel=0.15)
        sigmas.append(study.patient.noise_sigma_hu)
    assert min(sigmas) >= 3.0 and max(sigmas) <= 8.0 and max(sigmas) - min(sigmas) > 1.0


def test_head_is_covered_with_slices_beyond_the_brain(cohort):
    _, studies = cohort
    for study in studies.values():
        brain_pixels = np.isin(study.patient.tissue, [Tissue.GREY, Tissue.WHITE]).sum(axis=(1, 2))
        assert brain_pixels[0] < 0.3 * brain_pixels.max()  # skull base: little brain
        assert brain_pixels[-1] < 0.3 * brain_pixels.max()  # vertex
        assert 24 <= len(brain_pixels) <= 32


# --------------------------------------------------------------------------- lesions


def _disc(study: Study, centre_mm: tuple[float, ...], radius_mm: float) -> np.ndarray:
    spacing = study.patient.pixel_spacing_mm[0]
    x0, y0 = study.patient.origin_mm
    rows, cols = np.indices(study.patient.fov_mask.shape)
    return np.hypot(x0 + cols * spacing - centre_mm[0], y0 + rows * spacing - centre_mm[1]) <= (
        radius_mm
    )


def test_negatives_have_no_lesions(cohort):
    _, studies = cohort
    negatives = [s for s in studies.values() if not s.patient.positive]
    assert len(negatives) == 6
    for study in negatives:
        assert study.patient.lesions == []
        assert not np.isin(
            study.patient.tissue, [Tissue.LESION, Tissue.NECROSIS, Tissue.OEDEMA]
        ).any()


def test_positives_have_few_lesions_on_few_slices(cohort):
    _, studies = cohort
    positives = [s for s in studies.values() if s.patient.positive]
    assert len(positives) == 4
    for study in positives:
        lesions = study.patient.lesions
        assert 1 <= len(lesions) <= 4
        for lesion in lesions:
            assert 3.0 <= lesion.diameter_mm <= 20.0 and 45.0 <= lesion.peak_hu <= 90.0
            # A sphere of at most 20 mm cuts at most five 5 mm slabs, in a contiguous run.
            assert 1 <= len(lesion.slices) <= math.ceil(lesion.diameter_mm / 5.0) + 1
            assert list(lesion.slices) == list(range(lesion.slices[0], lesion.slices[-1] + 1))
        shown = {k for lesion in lesions for k in lesion.slices}
        with_lesion = np.flatnonzero((study.patient.tissue == Tissue.LESION).any(axis=(1, 2)))
        assert set(with_lesion) <= shown


def test_lesion_cores_are_enhancing_and_inside_the_brain(cohort):
    _, studies = cohort
    checked = 0
    for study in studies.values():
        for lesion in study.patient.lesions:
            radius = lesion.diameter_mm / 2
            k = int(np.abs(study.patient.positions_mm - lesion.centre_mm[2]).argmin())
            core = _disc(study, lesion.centre_mm, radius) & (
                study.patient.tissue[k] == Tissue.LESION
            )
            if lesion.diameter_mm >= 8.0 and core.sum() >= 5:
                assert abs(float(np.median(study.hu[k][core])) - lesion.peak_hu) <= 12.0
                checked += 1
            # The ring just outside the lesion is brain, never bone, scalp or air.
            ring = _disc(study, lesion.centre_mm, radius + 3) & ~_disc(
                study, lesion.centre_mm, radius + 1.5
            )
            around = set(np.unique(study.patient.tissue[k][ring]).tolist())
            assert around <= {int(t) for t in BRAIN | {Tissue.MIXED, Tissue.CALCIFICATION}}
    assert checked >= 2


@pytest.mark.parametrize("positive", [False, True])
def test_distractors_occur_in_either_class(positive):
    cfg = SynthConfig(calcification_probability=1.0, streak_probability=1.0, matrix=128)
    patient = render_patient(np.random.default_rng(3), cfg, positive=positive)
    assert patient.positive == positive
    assert patient.streaks >= 1 and 1 <= len(patient.calcifications) <= 3
    for calcification in patient.calcifications:
        assert 150.0 <= calcification.hu <= 400.0
        k = int(np.abs(patient.positions_mm - calcification.centre_mm[2]).argmin())
        spacing = patient.pixel_spacing_mm[0]
        col = round((calcification.centre_mm[0] - patient.origin_mm[0]) / spacing)
        row = round((calcification.centre_mm[1] - patient.origin_mm[1]) / spacing)
        # Dense even after partial-volume dilution by the slab.
        assert patient.hu[k, row - 2 : row + 3, col - 2 : col + 3].max() > 60.0


def test_thickness_is_configurable():
    cfg = SynthConfig(slice_thickness_mm=2.5, slices=(50, 56), matrix=128, seed=1)
    patient = render_patient(patient_rng(cfg, 0), cfg, positive=True)
    assert 50 <= len(patient.positions_mm) <= 56 and patient.hu.shape[1:] == (128, 128)
    np.testing.assert_allclose(np.diff(patient.positions_mm), 2.5)
    for lesion in patient.lesions:
        assert 1 <= len(lesion.slices) <= math.ceil(lesion.diameter_mm / 2.5) + 1
    assert np.all(patient.hu[:, ~patient.fov_mask] == OUTSIDE_FOV_HU)


# --------------------------------------------------------------------------- determinism


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    """Serial and pooled writing give the same bytes; another seed shares none."""
    cfg = SynthConfig(num_patients=3, matrix=64, slices=(10, 12), seed=5)
    write_synthetic_cohort(tmp_path / "a", cfg, progress=False)
    write_synthetic_cohort(tmp_path / "b", cfg, progress=False, workers=2)  # process pool
    write_synthetic_cohort(tmp_path / "c", cfg.model_copy(update={"seed": 6}), progress=False)
    first, second, other = (_tree(tmp_path / name) for name in "abc")
    assert first == second
    assert len(first) > 30
    dicom = {name: data for name, data in first.items() if name.startswith("dicom")}
    assert set(dicom.values()).isdisjoint(other.values())


def test_rewriting_is_idempotent_and_foreign_folders_are_refused(tmp_path):
    cfg = SynthConfig(num_patients=2, matrix=64, slices=(10, 10))
    write_synthetic_cohort(tmp_path, cfg, progress=False)
    before = _tree(tmp_path)
    write_synthetic_cohort(tmp_path, cfg, progress=False)
    assert _tree(tmp_path) == before
    (tmp_path / "dicom" / "someone-else").mkdir()
    with pytest.raises(FileExistsError, match="someone-else"):
        write_synthetic_cohort(tmp_path, cfg, progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_patient": 3}, "num_patient"),
        ({"slices": (30, 20)}, "slices"),
        ({"slices": (4, 6)}, "slices"),
        ({"lesions_per_positive": (0, 2)}, "lesions_per_positive"),
        ({"lesion_diameter_mm": (5.0, 3.0)}, "lesion_diameter_mm"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"field_of_view_mm": 150.0}, "field_of_view_mm"),
        ({"matrix": "big"}, "matrix"),
        ({"slices": (12, 12), "slice_thickness_mm": 2.5}, "cover at least 50 mm"),
    ],
)
def test_invalid_config_names_the_field(overrides, message):
    with pytest.raises(ValidationError, match=message):
        SynthConfig(**overrides)
