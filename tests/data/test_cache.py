"""prepare and the cache: resumable, sharded, errors recorded, stale caches refused."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainmets.config import PreprocessConfig
from brainmets.data.cache import (
    CacheError,
    PatientCache,
    build_cache_from_arrays,
    finalize_index,
    patient_stem,
)
from brainmets.data.prepare import prepare_cache
from brainmets.data.workers import WORKER_DIED

PRE = PreprocessConfig(size=32, slice_mm=5.0)


def _write_nifti(path, hu: np.ndarray, slice_mm: float = 2.5) -> str:
    """HU volume [N, H, W] as NIfTI with slices along the third voxel axis."""
    affine = np.diag([0.9, 0.9, slice_mm, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)).astype(np.int16), affine), path)
    return str(path)


@pytest.fixture
def manifest(tmp_path):
    """Four NIfTI patients (2.5 mm slices, a ramp in HU) and one unreadable file."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(4):
        hu = np.full((8, 40, 40), 20.0) + rng.normal(0, 5, (8, 40, 40))
        hu[:, 10:30, 10:30] += 10 * i  # a per-patient brightness we can find in the cache
        rows.append(
            {
                "patient_id": f"P{i}",
                "label": i % 2,
                "path": _write_nifti(tmp_path / f"p{i}.nii.gz", hu),
            }
        )
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    rows.append({"patient_id": "BROKEN", "label": 1, "path": str(broken)})
    return pd.DataFrame(rows)


def test_prepare_writes_windowed_slabs_and_records_failures(tmp_path, manifest):
    out = tmp_path / "cache"
    result = prepare_cache(manifest, out, PRE, workers=2, progress=False)
    assert result.prepared == 4 and result.failed == 1
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors["patient_id"]) == ["BROKEN"]
    assert "broken.nii.gz" in errors.loc[0, "file"] and errors.loc[0, "reason"]

    cache = PatientCache(out)
    assert cache.patient_ids == ["P0", "P1", "P2", "P3"]
    assert list(cache.labels) == [0, 1, 0, 1]
    volumes = [np.asarray(cache.load(pid)) for pid in cache.patient_ids]
    for array in volumes:
        # 8 slices of 2.5 mm -> 4 slabs of 5 mm, resized to 32^2, uint8
        assert array.shape == (4, 32, 32) and array.dtype == np.uint8
    centres = [float(a[:, 12:20, 12:20].mean()) * 80 / 255 for a in volumes]
    # 20 HU + 10 HU per patient index inside the square, within the noise of averaging
    assert np.allclose(centres, [20, 30, 40, 50], atol=1.5)


def test_prepare_resumes_and_keeps_done_patients(tmp_path, manifest):
    out = tmp_path / "cache"
    first = prepare_cache(manifest.iloc[:2], out, PRE, progress=False)
    assert first.prepared == 2
    done = out / "patients" / f"{patient_stem('P0')}.npy"
    stamp = done.stat().st_mtime_ns
    # A label change in the manifest is taken without recomputing the array.
    changed = manifest.copy()
    changed.loc[0, "label"] = 1
    second = prepare_cache(changed, out, PRE, progress=False)
    assert (second.prepared, second.skipped, second.failed) == (2, 2, 1)
    assert done.stat().st_mtime_ns == stamp
    assert PatientCache(out).row("P0")["label"] == 1


def test_shards_share_one_cache(tmp_path, manifest):
    out = tmp_path / "cache"
    for shard in range(2):
        prepare_cache(manifest, out, PRE, num_shards=2, shard_id=shard, progress=False)
    cache = PatientCache(out)
    assert cache.patient_ids == ["P0", "P1", "P2", "P3"]
    shard_errors = [pd.read_csv(out / f"errors-shard{k}-of2.csv") for k in range(2)]
    assert sum(len(e) for e in shard_errors) == 1
    with pytest.raises(ValueError, match="shard_id"):
        prepare_cache(manifest, out, PRE, num_shards=2, shard_id=2, progress=False)


def test_changed_preprocessing_is_never_silently_reused(tmp_path, manifest):
    out = tmp_path / "cache"
    prepare_cache(manifest.iloc[:1], out, PRE, progress=False)
    other = PRE.model_copy(update={"window_center": 35.0})
    with pytest.raises(CacheError, match="window_center"):
        prepare_cache(manifest.iloc[:1], out, other, progress=False)
    result = prepare_cache(manifest.iloc[:1], out, other, overwrite=True, progress=False)
    assert result.prepared == 1
    assert PatientCache(out).config_hash == other.config_hash()
    # A sidecar from other parameters left behind (e.g. copied in) makes the cache refuse.
    meta = json.loads((out / "preprocess.json").read_text())
    meta["config_hash"] = "0" * 16
    (out / "preprocess.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="other preprocessing"):
        PatientCache(out)


def test_missing_or_unfinished_cache_says_what_to_do(tmp_path):
    with pytest.raises(CacheError, match="brainmets prepare"):
        PatientCache(tmp_path)
    build_cache_from_arrays(tmp_path, [("a", 0, np.zeros((2, 8, 8), np.uint8))], PRE)
    (tmp_path / "index.csv").unlink()
    with pytest.raises(CacheError, match="index.csv"):
        PatientCache(tmp_path)


@pytest.mark.parametrize(
    ("patient_id", "safe"),
    [("SYN0001", "SYN0001"), ("a/b", None), ("../x", None), ("Müller 1", None)],
)
def test_patient_file_names_are_safe_and_unique(patient_id, safe):
    stem = patient_stem(patient_id)
    assert "/" not in stem and not stem.startswith(".")
    if safe:
        assert stem == safe
    else:
        assert stem != patient_stem(patient_id + "x")


@pytest.mark.parametrize(
    ("overrides", "description"),
    [
        ([], "STD BRAIN 5MM"),
        (["preprocess.slice_mm=1.0"], "STD BRAIN 1MM, iDose"),
        # The 5 mm series has 28 slices: below min_slices it is not eligible at any target.
        (["preprocess.min_slices=30"], "STD BRAIN 1MM, iDose"),
    ],
)
def test_patient_folders_choose_the_series_for_the_preprocessing(
    corpus, tmp_path, overrides, description
):
    """``index``, a folder given to prepare (``path`` column) and a folder given to predict
    pick the same series for one config: its slab thickness and minimum slice count."""
    from brainmets.cli import main
    from brainmets.config import load_config
    from brainmets.data.prepare import PatientJob, jobs_for_inputs, load_patient_volume
    from brainmets.data.series_index import index_dicom_root

    preprocess = load_config(None, overrides).preprocess
    folder = corpus / "dcm_qa_ct/In/Philips/S21570"
    series = index_dicom_root(folder, progress=False).series
    expected = series.loc[series["description"] == description, "series_uid"].item()

    job = PatientJob(patient_id="PLASTIC", label=0, kind="dicom_dir", path=str(folder))
    volume, uid = load_patient_volume(job, preprocess)
    assert uid == expected
    assert volume.hu.shape[0] == series.loc[series["series_uid"] == expected, "num_slices"].item()

    jobs, _, errors = jobs_for_inputs([folder], preprocess)
    assert not errors and [j.series_uid for j in jobs] == [expected]

    sets = [arg for key in overrides for arg in ("--set", key)]
    assert main(["-q", "index", str(folder), "--out", str(tmp_path / "index"), *sets]) == 0
    indexed = pd.read_csv(tmp_path / "index" / "series.csv", dtype=str)
    assert indexed.loc[indexed["chosen"] == "True", "series_uid"].tolist() == [expected]


def test_a_patient_folder_without_an_eligible_series_says_why(corpus, tmp_path):
    """No series of the folder has enough slices: an errors row naming the folder, whose
    reason gives each series' reason for rejection."""
    folder = corpus / "dcm_qa_ct/In/Philips/S21570"
    labels = pd.DataFrame([{"patient_id": "FEW", "label": 1, "path": str(folder)}])
    result = prepare_cache(labels, tmp_path / "cache", PreprocessConfig(min_slices=10_000),
                           progress=False)  # fmt: skip
    assert result.prepared == 0
    (error,) = result.errors.to_dict("records")
    assert error["file"] == str(folder)
    assert error["reason"].startswith("no usable series: ")
    assert "too few slices" in error["reason"] and "localizer" in error["reason"]


def test_series_uid_pins_the_series_of_a_patient_folder(corpus, tmp_path):
    """A labels row with a DICOM folder and a ``series_uid`` prepares that series, not the
    automatic choice (the 5 mm series here); a pin the folder lacks, or an ineligible one, is
    an error row that says why, and the other patients are still prepared."""
    from brainmets.data.series_index import index_dicom_root

    folder = corpus / "dcm_qa_ct/In/Philips/S21570"
    series = index_dicom_root(folder, progress=False).series
    thin = series.loc[series["description"] == "STD BRAIN 1MM, iDose", "series_uid"].item()
    scout = series.loc[series["image_type"].str.contains("LOCALIZER"), "series_uid"].item()
    labels = pd.DataFrame(
        [
            {"patient_id": "THIN", "label": 1, "path": str(folder), "series_uid": thin},
            {"patient_id": "GONE", "label": 0, "path": str(folder), "series_uid": "1.2.3.4"},
            {"patient_id": "SCOUT", "label": 0, "path": str(folder), "series_uid": scout},
        ]
    )
    result = prepare_cache(labels, tmp_path / "cache", PRE, progress=False)

    assert result.prepared == 1
    index = PatientCache(tmp_path / "cache").index.set_index("patient_id")
    assert index.loc["THIN", "series_uid"] == thin
    assert index.loc["THIN", "num_slices"] < series["num_slices"].max()  # 1 mm into 5 mm slabs
    errors = result.errors.set_index("patient_id")
    # The folder goes in the file column; the reason is bare, as every other reason there.
    assert errors.loc["GONE", "file"] == errors.loc["SCOUT", "file"] == str(folder)
    assert errors.loc["GONE", "reason"].startswith(
        "no usable series: pinned series 1.2.3.4 not found"
    )
    assert thin in errors.loc["GONE", "reason"]
    # The scanner's one-slice localizer may be pinned, but it is not a volume.
    assert errors.loc["SCOUT", "reason"].startswith(
        f"no usable series: {scout}: pinned in the manifest but not eligible: localizer"
    )


def test_resume_prepares_again_when_the_series_changes(corpus, tmp_path):
    """A patient cached from the automatic choice and then pinned to another series gets the
    pinned series on the next prepare, not the cached array of the old one."""
    from brainmets.data.series_index import index_dicom_root

    folder = corpus / "dcm_qa_ct/In/Philips/S21570"
    series = index_dicom_root(folder, progress=False).series
    thin = series.loc[series["description"] == "STD BRAIN 1MM, iDose", "series_uid"].item()
    row = {"patient_id": "PLASTIC", "label": 0, "path": str(folder)}
    first = prepare_cache(pd.DataFrame([row]), tmp_path / "cache", PRE, progress=False)
    assert first.index["series_uid"].item() != thin

    pinned = pd.DataFrame([{**row, "series_uid": thin}])
    again = prepare_cache(pinned, tmp_path / "cache", PRE, progress=False)
    assert (again.prepared, again.skipped) == (1, 0)
    assert again.index["series_uid"].item() == thin
    # Unchanged since: nothing to do.
    assert prepare_cache(pinned, tmp_path / "cache", PRE, progress=False).skipped == 1
    # A pin that now fails: the old array must leave the index, also when another shard
    # (which knows nothing of this failure) writes the index last.
    broken = pd.DataFrame([{**row, "series_uid": "9.9.9"}])
    failed = prepare_cache(broken, tmp_path / "cache", PRE, progress=False)
    assert failed.failed == 1 and failed.index.empty
    assert finalize_index(tmp_path / "cache", manifest=["PLASTIC"]).empty


def test_a_worker_that_dies_fails_its_patient_only(tmp_path, manifest, run_as_main_script):
    """A decoder's segfault or the OOM killer ends a worker process without an exception.
    prepare must record that patient with the reason and prepare every other one, as it does
    for a file it cannot read; a shared pool would fail every patient in flight and stop
    the whole run without writing its index."""
    manifest.to_csv(tmp_path / "labels.csv", index=False)
    stdout = run_as_main_script(
        "import os, signal\n"
        "import pandas as pd\n"
        "import brainmets.data.prepare as prepare\n"
        "from brainmets.config import PreprocessConfig\n\n"
        "real = prepare.preprocess_patient\n\n"
        "def crash_on_p2(job, preprocess):  # workers run this script first: they get it too\n"
        "    if job.patient_id == 'P2':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(job, preprocess)\n\n"
        "prepare.preprocess_patient = crash_on_p2\n\n"
        "if __name__ == '__main__':\n"
        f"    labels = pd.read_csv({str(tmp_path / 'labels.csv')!r})\n"
        f"    result = prepare.prepare_cache(labels, {str(tmp_path / 'cache')!r},\n"
        "        PreprocessConfig(size=32, slice_mm=5.0), workers=2, progress=False)\n"
        "    print(result.prepared, sorted(result.index['patient_id']))\n"
        "    for row in result.errors.itertuples():\n"
        "        print(row.patient_id, '|', row.reason)\n",
    )
    lines = stdout.strip().splitlines()
    assert lines[0] == "3 ['P0', 'P1', 'P3']"
    assert sorted(lines[1:])[1] == f"P2 | {WORKER_DIED}"
    assert sorted(lines[1:])[0].startswith("BROKEN | ")
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv")
    assert sorted(errors["patient_id"]) == ["BROKEN", "P2"]


def test_patients_dropped_from_the_manifest_leave_the_index(tmp_path, manifest):
    """A patient removed from labels.csv (withdrawn consent, a wrong label being checked) must
    not be trained on from the cache with its old label; its files stay for a later return."""
    readable = manifest[manifest["patient_id"] != "BROKEN"]
    out = tmp_path / "cache"
    prepare_cache(readable, out, PRE, progress=False)
    fewer = prepare_cache(readable[readable["patient_id"] != "P1"], out, PRE, progress=False)
    assert list(fewer.index["patient_id"]) == ["P0", "P2", "P3"]
    assert list(PatientCache(out).patient_ids) == ["P0", "P2", "P3"]
    back = prepare_cache(readable, out, PRE, progress=False)
    assert (back.prepared, back.skipped) == (0, 4)  # P1's array was kept and is reused
    assert list(back.index["patient_id"]) == ["P0", "P1", "P2", "P3"]


def test_a_nifti_volume_meets_the_same_slice_floor_as_dicom(tmp_path):
    """A 3-slice NIfTI is no more a head CT volume than a 3-slice DICOM series: both fail."""
    thin = _write_nifti(tmp_path / "thin.nii.gz", np.full((3, 40, 40), 30.0))
    labels = pd.DataFrame([{"patient_id": "THIN", "label": 1, "path": thin}])
    result = prepare_cache(labels, tmp_path / "cache", PRE, progress=False)
    assert result.prepared == 0 and list(result.errors["reason"]) == [
        "not eligible: too few slices (3 < 8)"
    ]
    assert list(result.errors["file"]) == [thin]


@pytest.mark.parametrize("name", ["gone", "gone.nii.gz"])
def test_a_missing_path_says_it_does_not_exist(tmp_path, name):
    labels = pd.DataFrame([{"patient_id": "P", "label": 0, "path": str(tmp_path / name)}])
    result = prepare_cache(labels, tmp_path / "cache", PRE, progress=False)
    assert list(result.errors["reason"]) == ["does not exist"]
