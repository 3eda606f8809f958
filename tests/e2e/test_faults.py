"""The fault matrix: each way a run can meet a bad header, a damaged file, a second process, a
killed parent, a full disk or a read-only folder, and what it must do then.

Nothing is silently wrong (a bad rescale is an error naming its file), no patient is lost (a
patient whose files are all damaged gets an error row), nothing outlives a kill -9 (workers
end with their parent), and every fault is one line naming the path and what to do.
Full disks are real ones: a tiny tmpfs (those tests skip where mounting is not allowed).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from brainmets.cli import main
from brainmets.data.dicom import SeriesError, load_series
from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
from brainmets.predict import predict

# Crafted headers are what these tests are about; pydicom's and torch's warnings about them
# are not.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR DS"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

TINY = [
    "--set", "model.arch=resnet18",
    "--set", "preprocess.size=48",
    "--set", "train.stage_epochs=[0,1,1]",
    "--set", "train.batch_patients=4",
    "--set", "evaluate.n_boot=20",
]  # fmt: skip
TINY_TRAIN = [*TINY, "--set", "train.epochs=2", "--allow-chance"]  # a tiny run ranks nothing
UNPICKLING_ADVICE = ("allow_pickle", "pickle.load", "weights_only=False", "trust")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six synthetic patients as scanner DICOM: ``cohort/dicom/<patient>/...``."""
    out = tmp_path_factory.mktemp("faults") / "cohort"
    cfg = SynthConfig(num_patients=6, matrix=64, slices=(10, 12), seed=11)
    write_synthetic_cohort(out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained run and the cache it was trained on."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    index, cache, run = root / "index", root / "cache", root / "run"
    assert main(["-q", "index", str(cohort / "dicom"), "--out", str(index), "--workers", "1"]) == 0
    assert main(["-q", "prepare", "--labels", str(cohort / "labels.csv"), "--index", str(index),
                 "--out", str(cache), "--workers", "1", *TINY]) == 0  # fmt: skip
    assert main(["-q", "train", "--data", str(cache), "--out", str(run), *TINY,
                 "--set", "train.epochs=1", "--allow-chance"]) == 0  # fmt: skip
    return run, cache


def patient_folders(cohort: Path) -> list[Path]:
    return sorted(p for p in (cohort / "dicom").iterdir() if p.is_dir())


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def axial_files(folder: Path) -> list[Path]:
    """The files of the patient's axial series (the synthetic studies also hold a localizer)."""
    files = [p for p in dicom_files(folder) if "LOCALIZER" not in pydicom.dcmread(p).ImageType]
    assert len(files) >= 10
    return files


def rewrite(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def copy_patient(src: Path, dst: Path) -> Path:
    """A copy of a patient's folder as another patient: PatientID is the folder's name (a
    plain copy would be the same patient, which predict reads once)."""
    for path in dicom_files(copy_tree(src, dst)):
        rewrite(path, PatientID=dst.name)
    return dst


def error_line(err: str) -> str:
    """The CLI's one line for the fault; no traceback around it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("brainmets: ")]
    assert len(lines) == 1, err
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False):
    """A real small (or read-only) file system at ``path``; the test skips where mounting is
    not allowed (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder no one may write to: a read-only tmpfs as root (root ignores permissions),
    else a folder without write permission."""
    if os.geteuid() == 0:
        with tmpfs(path, "1m", read_only=True):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path):
    """Another process holding ``lock`` as a running train or predict holds it."""
    # The lock's protocol spelled out (flock on the file, the holder's PID in it), not
    # exclusive_lock itself: the process under test must honour the lock, whoever took it.
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def read_predictions(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"patient_id": str, "error": str, "source": str})
    return table.fillna({"error": ""})


# --------------------------------------------------------------------------- 1. rescale


@pytest.mark.parametrize("slope", ["NaN", "0", "inf"])
@pytest.mark.parametrize("which", ["one slice", "whole series"])
def test_bad_rescale_slope_is_an_error_naming_the_file(cohort, tmp_path, slope, which):
    """NaN or 0 made all-air slices and flipped a decision; inf saturated the volume."""
    folder = copy_tree(patient_folders(cohort)[0], tmp_path / "patient")
    files = axial_files(folder)
    bad = files[len(files) // 2 :: len(files)] if which == "one slice" else files
    for path in bad:
        rewrite(path, RescaleSlope=slope)
    with pytest.raises(SeriesError) as raised:
        load_series(files)
    assert raised.value.path in {str(p) for p in bad}
    assert "RescaleSlope" in raised.value.reason


def test_bad_rescale_is_the_patients_error_row_in_prepare(cohort, tmp_path, capsys):
    folder = copy_tree(patient_folders(cohort)[0], tmp_path / "patient")
    bad = axial_files(folder)[3]
    rewrite(bad, RescaleIntercept="inf")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"patient_id,label,path\nP,0,{folder}\n")
    rc = main(["-q", "prepare", "--labels", str(labels), "--out", str(tmp_path / "cache"),
               "--workers", "1", *TINY])  # fmt: skip
    assert rc == 1
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv")
    assert list(errors["file"]) == [str(bad)]
    assert "RescaleIntercept inf" in errors["reason"].iloc[0]


# --------------------------------------------------------------------------- 11. spacing


def test_mixed_pixel_spacing_within_a_series_is_a_warning(cohort, tmp_path):
    folder = copy_tree(patient_folders(cohort)[1], tmp_path / "patient")
    files = axial_files(folder)
    spacing = [float(v) for v in pydicom.dcmread(files[0]).PixelSpacing]
    rewrite(files[4], PixelSpacing=[f"{spacing[0] * 1.5:.4f}", f"{spacing[1] * 1.5:.4f}"])
    volume = load_series(files)
    [warning] = [w for w in volume.warnings if "pixel spacing" in w]
    assert str(files[4]) in warning and "1 slice(s)" in warning
    assert not [w for w in load_series(axial_files(patient_folders(cohort)[1])).warnings
                if "pixel spacing" in w]  # fmt: skip


# --------------------------------------------------------------------------- 2, 3. ownership


def test_a_second_train_into_a_run_folder_is_refused(trained, tmp_path, capsys):
    _, cache = trained
    run = tmp_path / "run"
    with lock_held_elsewhere(run / ".lock") as holder:
        rc = main(["-q", "train", "--data", str(cache), "--out", str(run), *TINY_TRAIN])
        line = error_line(capsys.readouterr().err)
    assert rc == 2
    assert f"PID {holder.pid}" in line and str(run) in line
    # Refused before it wrote anything: no config or log of its own mixed into the folder.
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_second_predict_to_one_table_is_refused_until_the_first_dies(
    trained, cohort, tmp_path, capsys
):
    run, cache = trained
    out = tmp_path / "predictions.csv"
    with lock_held_elsewhere(tmp_path / ".predictions.csv.lock") as holder:
        rc = main(["-q", "predict", str(run), str(cache), "--out", str(out)])
        line = error_line(capsys.readouterr().err)
        assert rc == 2 and f"PID {holder.pid}" in line and str(out) in line
        assert not out.exists()
        holder.send_signal(signal.SIGKILL)  # a holder killed -9 refuses nobody
        holder.wait()
        rc = main(["-q", "predict", str(run), str(cache), "--out", str(out)])
    assert rc == 0
    assert len(read_predictions(out)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no lock left


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "predict"])
def test_a_real_second_run_is_refused_while_the_first_runs(trained, cohort, tmp_path, capsys,
                                                            command):  # fmt: skip
    """Two real processes, not a stand-in: the first runs (long enough), the second is refused
    naming the first's PID, and the first goes on undisturbed."""
    run, cache = trained
    if command == "train":
        target = tmp_path / "run"
        lock = target / ".lock"
        argv = ["train", "--data", str(cache), "--out", str(target), *TINY,
                "--set", "train.epochs=200", "--allow-chance"]  # fmt: skip
    else:
        target = tmp_path / "p.csv"
        lock = tmp_path / ".p.csv.lock"
        (tmp_path / "in").mkdir()
        inputs = [str(copy_patient(f, tmp_path / "in" / f"P{i:03d}"))
                  for i, f in enumerate(patient_folders(cohort) * 10)]  # fmt: skip
        argv = ["predict", str(run), *inputs, "--out", str(target)]
    first = subprocess.Popen([sys.executable, "-m", "brainmets", "-q", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        rc = main(["-q", *argv])
        line = error_line(capsys.readouterr().err)
        assert rc == 2 and f"PID {first.pid}" in line and str(target) in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
        first.stderr.close()


# --------------------------------------------------------------------------- 4. lost rows


def test_predict_on_a_root_gives_a_patient_with_only_damaged_files_a_row(
    trained, cohort, tmp_path, capsys
):
    run, _ = trained
    root = copy_tree(cohort / "dicom", tmp_path / "dicom")
    damaged = patient_folders(cohort)[2].name
    for path in dicom_files(root / damaged):
        rewrite(path, Rows=65535, Columns=65535)  # over a 64 x 64 pixel data element
    out = tmp_path / "predictions.csv"
    # In this process (the CLI starts a worker per core: seconds each on a busy machine).
    result = predict(run, [root], out_csv=out, workers=1, progress=False)
    assert result.failed == 1
    table = read_predictions(out).set_index("patient_id")
    assert len(table) == 6
    assert table.loc[damaged, "source"] == str(root / damaged)
    assert "no DICOM file in this folder could be read" in table.loc[damaged, "error"]
    assert (table.drop(index=damaged)["error"] == "").all()


def test_predict_gives_a_dcm_that_is_not_dicom_and_an_empty_patient_folder_a_row(
    trained, cohort, tmp_path
):
    """A file named as a slice that is not DICOM fails its patient, naming the file (a slice may
    be missing); an empty patient folder and one holding only a PDF get rows of their own."""
    run, _ = trained
    root = copy_tree(cohort / "dicom", tmp_path / "dicom")
    patient = patient_folders(cohort)[1].name
    series_folder = axial_files(root / patient)[0].parent
    stray = series_folder / "IM9999.dcm"
    stray.write_text("Report: no acute findings.\n")
    (root / "P-empty").mkdir()
    (root / "P-report").mkdir()
    (root / "P-report" / "report.pdf").write_bytes(b"%PDF-1.4\n")
    out = tmp_path / "predictions.csv"
    result = predict(run, [root], out_csv=out, workers=1, progress=False)
    table = read_predictions(out).set_index("patient_id")
    assert result.failed == 3 and len(table) == 8
    assert str(stray) in table.loc[patient, "error"]
    assert "not a DICOM file, although named as one (.dcm)" in table.loc[patient, "error"]
    assert table.loc["P-empty", "error"] == "no DICOM images (empty folder)"
    assert table.loc["P-empty", "source"] == str(root / "P-empty")
    assert table.loc["P-report", "error"] == "no DICOM images (1 files, none DICOM: report.pdf)"
    assert (table.drop(index=[patient, "P-empty", "P-report"])["error"] == "").all()


def test_damaged_patients_are_found_as_deep_as_the_readable_ones(cohort, tmp_path):
    """A root with a level above the patients (sites): the lost patient is named by its path
    under the root; a damaged file in a readable patient's folder makes no row of its own."""
    from brainmets.config import PreprocessConfig
    from brainmets.data.prepare import jobs_for_inputs

    folders = patient_folders(cohort)
    root = tmp_path / "root"
    (root / "siteA").mkdir(parents=True)
    (root / "siteB").mkdir()
    copy_tree(folders[0], root / "siteA" / "p1")
    copy_tree(folders[1], root / "siteA" / "p2")
    lost = copy_tree(folders[2], root / "siteB" / "p3")
    for path in dicom_files(lost):
        rewrite(path, Rows=65535, Columns=65535)
    (root / "siteA" / "p1" / "truncated.dcm").write_bytes(
        dicom_files(folders[3])[0].read_bytes()[:300]
    )
    jobs, _, errors = jobs_for_inputs([root], PreprocessConfig(size=48))
    assert len(jobs) == 2
    assert [(e["patient_id"], e["source"]) for e in errors] == [("siteB/p3", str(lost))]


# --------------------------------------------------------------------------- 5, 10. cache files


def _damage(cache: Path, patient: str, how: str) -> Path:
    row = pd.read_csv(cache / "index.csv", dtype={"patient_id": str}).set_index("patient_id")
    path = cache / "patients" / row.loc[patient, "file"]
    n = int(row.loc[patient, "num_slices"])
    if how == "wrong shape":  # a whole array of the wrong size, readable as any other
        np.save(path, np.full((n, 64, 64), 200, np.uint8))
    elif how == "float64":
        np.save(path, np.zeros((n, 48, 48), np.float64))
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"slices": list(range(10))}))
    return path


@pytest.mark.parametrize("how", ["wrong shape", "float64", "garbage", "pickle"])
def test_a_damaged_cache_array_is_an_error_row_naming_the_file(trained, tmp_path, capsys, how):
    run, cache = trained
    cache = copy_tree(cache, tmp_path / "cache")
    patient = pd.read_csv(cache / "index.csv", dtype={"patient_id": str})["patient_id"][0]
    path = _damage(cache, patient, how)
    out = tmp_path / "predictions.csv"
    # One slice per batch: the damaged patient is alone in its batch, where nothing else
    # would disagree with its shape.
    rc = main(["-q", "predict", str(run), str(cache), "--out", str(out),
               "--batch-slices", "1"])  # fmt: skip
    assert rc == 1
    table = read_predictions(out).set_index("patient_id")
    assert len(table) == 6
    error = table.loc[patient, "error"]
    assert str(path) in error and "damaged cache array" in error
    assert not any(advice in error for advice in UNPICKLING_ADVICE)
    assert (table.drop(index=patient)["error"] == "").all()


def test_evaluate_names_a_damaged_cache_array(trained, tmp_path, capsys):
    run, cache = trained
    run = copy_tree(run, tmp_path / "run")
    cache = copy_tree(cache, tmp_path / "cache")
    patient = pd.read_csv(cache / "index.csv", dtype={"patient_id": str})["patient_id"][0]
    path = _damage(cache, patient, "garbage")
    rc = main(["-q", "evaluate", str(run), "--data", str(cache)])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and str(path) in line
    assert not any(advice in line for advice in UNPICKLING_ADVICE)


def test_a_pickle_named_safetensors_as_pretrained_weights_is_named(trained, tmp_path, capsys):
    _, cache = trained
    weights = tmp_path / "RadImageNet.safetensors"
    weights.write_bytes(pickle.dumps({"conv1.weight": [0.0] * 64}))
    rc = main(["-q", "train", "--data", str(cache), "--out", str(tmp_path / "run"), *TINY_TRAIN,
               "--set", f"model.pretrained={weights}"])  # fmt: skip
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and str(weights) in line and "not a readable safetensors file" in line


def test_a_pickled_resume_state_is_named_and_not_unpickled(trained, tmp_path, capsys):
    run, _ = trained
    run = copy_tree(run, tmp_path / "run")
    state = run / "checkpoints" / "last_state.pt"
    marker = tmp_path / "unpickled"
    # A payload that would leave a file behind if it were ever unpickled.
    payload = pickle.dumps(_Touch(str(marker)))
    state.write_bytes(payload)
    rc = main(["-q", "train", "--resume", str(run), "--allow-chance"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and str(state) in line
    assert not any(advice in line for advice in UNPICKLING_ADVICE)
    assert not marker.exists()


class _Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# --------------------------------------------------------------------------- 6, 9. read-only


def test_predict_refuses_an_unwritable_out_before_any_work(trained, tmp_path, capsys, monkeypatch):
    run, cache = trained

    def no_scoring(*args, **kwargs):
        raise AssertionError("predict started scoring before it knew it could write --out")

    monkeypatch.setattr("brainmets.predict.load_backend", no_scoring)
    with read_only_folder(tmp_path / "ro") as folder:
        out = folder / "predictions.csv"
        rc = main(["-q", "predict", str(run), str(cache), "--out", str(out)])
        line = error_line(capsys.readouterr().err)
    assert rc == 1
    assert str(folder) in line and ("read-only" in line or "permission denied" in line)


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict --heatmaps"])
def test_a_read_only_output_folder_is_one_line(trained, cohort, tmp_path, capsys, command):
    run, cache = trained
    with read_only_folder(tmp_path / "ro") as folder:
        if command == "train":
            argv = ["train", "--data", str(cache), "--out", str(folder / "run"), *TINY_TRAIN]
        elif command == "prepare":
            argv = ["prepare", "--labels", str(cohort / "labels.csv"), "--index",
                    str(run.parent / "index"), "--out", str(folder / "cache"), *TINY]  # fmt: skip
        elif command == "evaluate":
            argv = ["evaluate", str(run), "--data", str(cache), "--out", str(folder / "ev")]
        else:
            argv = ["predict", str(run), str(cache), "--out", str(tmp_path / "p.csv"),
                    "--heatmaps", str(folder / "heat")]  # fmt: skip
        rc = main(["-q", *argv, "--workers", "1"] if command == "prepare" else ["-q", *argv])
        line = error_line(capsys.readouterr().err)
    assert rc == 1 and str(folder) in line
    assert "read-only" in line or "permission denied" in line


# --------------------------------------------------------------------------- 8. long ids


def test_a_long_patient_id_is_prepared_and_predicted_with_heatmaps(
    trained, cohort, tmp_path, capsys
):
    run, _ = trained
    folders = patient_folders(cohort)
    long_id = "P" * 240  # a labels file allows any length; a file name 255 bytes
    labels = tmp_path / "labels.csv"
    labels.write_text(f"patient_id,label,path\n{long_id},1,{folders[0]}\nshort,0,{folders[1]}\n")
    cache = tmp_path / "cache"
    rc = main(["-q", "prepare", "--labels", str(labels), "--out", str(cache), "--workers", "1",
               *TINY])  # fmt: skip
    assert rc == 0
    index = pd.read_csv(cache / "index.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert len(index.loc[long_id, "file"]) < 100
    out, heat = tmp_path / "predictions.csv", tmp_path / "heat"
    rc = main(["-q", "predict", str(run), str(cache), "--out", str(out), "--heatmaps", str(heat),
               "--top-k", "1"])  # fmt: skip
    assert rc == 0
    assert (read_predictions(out)["error"] == "").all()
    heatmaps = pd.read_csv(heat / "heatmaps.csv", dtype={"patient_id": str})
    assert set(heatmaps["patient_id"]) == {long_id, "short"}
    assert all((heat / name).is_file() for name in heatmaps["file"])


def test_a_patient_whose_write_fails_is_its_own_error_row(cohort, tmp_path, monkeypatch):
    """The write is inside the patient's error handling: one patient's OSError (here a file
    system refusing its file) is that patient's row; the batch goes on."""
    from brainmets.data import prepare

    folders = patient_folders(cohort)[:3]
    real = prepare.write_patient

    def refuse_second(root, row, *args, **kwargs):
        if row["patient_id"] == "B":
            raise OSError(errno.EIO, "Input/output error", str(root / "patients" / "B.npy"))
        return real(root, row, *args, **kwargs)

    monkeypatch.setattr(prepare, "write_patient", refuse_second)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label,path\n" + "".join(
        f"{pid},0,{folder}\n" for pid, folder in zip("ABC", folders, strict=True)))  # fmt: skip
    rc = main(["-q", "prepare", "--labels", str(labels), "--out", str(tmp_path / "cache"),
               "--workers", "1", *TINY])  # fmt: skip
    assert rc == 1
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv", dtype=str)
    assert list(errors["patient_id"]) == ["B"] and "B.npy" in errors["reason"].iloc[0]
    index = pd.read_csv(tmp_path / "cache" / "index.csv", dtype={"patient_id": str})
    assert list(index["patient_id"]) == ["A", "C"]


# --------------------------------------------------------------------------- 9. full disk


def test_prepare_on_a_full_disk_gives_each_patient_an_error_row(cohort, tmp_path, capsys):
    """No room for any patient's array (256 x 256 slices, ~0.7 MB a patient), room for the
    tables: every patient is an error row saying so, and the batch ends with its tables."""
    with tmpfs(tmp_path / "disk", "600k") as disk:
        rc = main(["-q", "prepare", "--labels", str(cohort / "labels.csv"), "--out",
                   str(disk / "cache"), "--workers", "1", "--index",
                   str(_index(cohort, tmp_path))])  # fmt: skip
        assert "Traceback" not in capsys.readouterr().err
        errors = pd.read_csv(disk / "cache" / "errors.csv", dtype=str)
        left = [p.name for p in (disk / "cache" / "patients").iterdir() if p.suffix == ".tmp"]
    assert rc == 1
    assert len(errors) == 6
    for row in errors.itertuples():
        assert f"{disk / 'cache' / 'patients' / row.patient_id}.npy: no space left" in row.reason
    assert left == []  # no half-written temporary files fill the disk further


def test_prepare_warns_early_when_the_cache_will_not_fit(cohort, tmp_path, caplog):
    """Room for about two of the six patients: said after the first, not only as error rows."""
    with tmpfs(tmp_path / "disk", "1600k") as disk:
        rc = main(["-q", "prepare", "--labels", str(cohort / "labels.csv"), "--out",
                   str(disk / "cache"), "--workers", "1", "--index",
                   str(_index(cohort, tmp_path))])  # fmt: skip
        errors = pd.read_csv(disk / "cache" / "errors.csv", dtype=str)
    assert rc == 1 and 0 < len(errors) < 6
    [warning] = [r.getMessage() for r in caplog.records if "GB more are needed" in r.getMessage()]
    assert warning.startswith(f"{disk / 'cache'}: about") and "for 5 more patients" in warning


def test_evaluate_on_a_full_disk_is_one_line(trained, tmp_path, capsys):
    run, cache = trained
    with tmpfs(tmp_path / "disk", "40k") as disk:
        rc = main(["-q", "evaluate", str(run), "--data", str(cache), "--out", str(disk / "ev")])
        line = error_line(capsys.readouterr().err)
        assert not list(disk.rglob("*.tmp"))
    assert rc == 1 and str(disk / "ev") in line and "no space left" in line


def test_predict_heatmaps_on_a_full_disk_keep_the_patients_done(trained, tmp_path, capsys):
    """Room for the heatmaps of one or two patients of six: the patients whose heatmaps were
    written are kept for --resume, with their heatmaps listed; the line says how to go on."""
    run, cache = trained
    out = tmp_path / "p.csv"
    with tmpfs(tmp_path / "disk", "100k") as disk:
        heat = disk / "heat"
        rc = main(["-q", "predict", str(run), str(cache), "--out", str(out), "--heatmaps",
                   str(heat)])  # fmt: skip
        line = error_line(capsys.readouterr().err)
        index = pd.read_csv(heat / "heatmaps.csv", dtype={"patient_id": str})
        drawn = {path.name for path in heat.glob("*.png")}
    assert rc == 1 and str(heat) in line and "no space left" in line and "--resume" in line
    assert not out.exists()
    done = pd.read_csv(out.with_name("p.csv.partial"), dtype={"patient_id": str})
    assert 1 <= len(done) < 6 and (done["error"].isna()).all()
    assert set(index["patient_id"]) == set(done["patient_id"])
    assert {Path(f).name for f in index["file"]} <= drawn


def _index(cohort: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    assert main(["-q", "index", str(cohort / "dicom"), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_train_on_a_full_disk_keeps_the_resumable_state(trained, tmp_path, capsys):
    """The disk fills during epoch 2's save: the line says where and how to go on, the state
    of epoch 1 is intact and resumes to the end once there is room."""
    _, cache = trained
    # The size of a run after its first epoch, measured: the disk holds that and a little.
    probe = tmp_path / "probe"
    assert main(["-q", "train", "--data", str(cache), "--out", str(probe), *TINY,
                 "--set", "train.epochs=1", "--allow-chance"]) == 0  # fmt: skip
    capsys.readouterr()  # the probe's own lines
    used = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    size = f"{math.ceil((used + (8 << 20)) / 1024)}k"
    with tmpfs(tmp_path / "disk", size) as disk:
        run = disk / "run"
        rc = main(["-q", "train", "--data", str(cache), "--out", str(run), *TINY_TRAIN])
        line = error_line(capsys.readouterr().err)
        assert rc == 1
        assert str(run) in line and "no space left" in line and "--resume" in line
        assert not list(run.rglob("*.tmp"))
        saved = copy_tree(run, tmp_path / "saved")
    state = torch.load(saved / "checkpoints" / "last_state.pt", weights_only=True)
    assert state["train_state"]["epoch"] == 1
    assert main(["-q", "train", "--resume", str(saved), "--allow-chance"]) == 0
    metrics = pd.read_csv(saved / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1]


# --------------------------------------------------------------------------- 7. orphans


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (workers, the resource tracker)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its reaping is left to PID 1


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("command", ["prepare", "predict"])
def test_workers_end_when_the_parent_is_killed(trained, cohort, tmp_path, command):
    run, _ = trained
    # Many patients (the six folders, each under many ids) keep the workers busy for a while;
    # predict starts one per core (two or more here: the test needs two cores).
    folders = patient_folders(cohort)
    if command == "prepare":
        labels = tmp_path / "labels.csv"
        labels.write_text("patient_id,label,path\n" + "".join(
            f"P{i:04d},0,{folders[i % 6]}\n" for i in range(400)))  # fmt: skip
        argv = ["prepare", "--labels", str(labels), "--out", str(tmp_path / "cache"),
                "--workers", "2"]  # fmt: skip
    else:
        inputs = [str(copy_patient(folders[i % 6], tmp_path / f"P{i:04d}")) for i in range(240)]
        argv = ["predict", str(run), *inputs, "--out", str(tmp_path / "p.csv")]
    parent = subprocess.Popen(
        [sys.executable, "-m", "brainmets", "-q", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    workers: set[int] = set()
    try:
        # predict reads the inputs' headers in one short-lived pool before it starts the
        # preprocessing pool: wait for two workers seen alive 3 s apart (the steady pool, at
        # work and blocked on their pipes between patients), not the handover between pools.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            seen = _children(parent.pid)
            time.sleep(3)
            workers = seen & _children(parent.pid)
            if len(workers) >= 2:
                break
        assert len(workers) >= 2 and parent.poll() is None
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent"
    finally:  # orphans (where the guarantee fails) are killed too: they hold the test's pipe
        for pid in _children(parent.pid) | workers | {parent.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.stdout.close()


def test_a_lock_names_its_holder_and_is_free_again_after_it(tmp_path):
    from brainmets.io import InUseError, exclusive_lock

    lock = tmp_path / ".lock"
    with lock_held_elsewhere(lock) as holder:
        refused = pytest.raises(InUseError, match=f"the thing is in use .*PID {holder.pid}")
        with refused, exclusive_lock(lock, "the thing"):
            pass
    with exclusive_lock(lock, "the thing"):
        assert lock.read_text().strip() == str(os.getpid())
    # A lock that removes its file: refused meanwhile as any other, gone after.
    with (
        exclusive_lock(lock, "the thing", remove=True),
        pytest.raises(InUseError),
        exclusive_lock(lock, "the thing"),
    ):
        pass
    assert not lock.exists()
