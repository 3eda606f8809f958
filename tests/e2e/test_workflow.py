"""The README workflow through the CLI, on a small generated DICOM cohort:
synth -> index -> prepare -> train -> evaluate -> predict (DICOM, NIfTI, cache) -> report."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from brainmets.cli import main
from brainmets.data.dicom import load_series
from brainmets.data.series_index import read_index, series_files

TINY_TRAIN = [
    "--set", "model.arch=resnet18",
    "--set", "preprocess.size=48",
    "--set", "train.epochs=2",
    "--set", "train.stage_epochs=[0,1,1]",
    "--set", "train.batch_patients=5",
    "--set", "evaluate.n_boot=50",
    "--allow-chance",  # 7 training patients: no model can show it ranks 2 validation patients
]  # fmt: skip


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("workflow")
    assert main(["-q", "synth", str(root / "cohort"), "--patients", "10", "--matrix", "96",
                 "--min-slices", "10", "--max-slices", "12", "--seed", "3"]) == 0  # fmt: skip
    labels = pd.read_csv(root / "cohort" / "labels.csv", dtype={"patient_id": str})
    # Hold out three patients as the manifest's test split.
    labels["split"] = ["test" if i < 3 else "" for i in range(len(labels))]
    labels.to_csv(root / "labels.csv", index=False)
    assert main(["-q", "index", str(root / "cohort" / "dicom"), "--out", str(root / "index"),
                 "--workers", "1"]) == 0  # fmt: skip
    assert main(["-q", "prepare", "--labels", str(root / "labels.csv"), "--index",
                 str(root / "index"), "--out", str(root / "cache"), "--workers", "1",
                 "--set", "preprocess.size=48"]) == 0  # fmt: skip
    assert main(["-q", "train", "--data", str(root / "cache"), "--out", str(root / "run"),
                 *TINY_TRAIN]) == 0  # fmt: skip
    return root, labels


def test_train_writes_a_self_contained_run(workflow):
    root, labels = workflow
    run = root / "run"
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "model.json", "splits.csv",
                 "val_predictions.csv", "environment.json", "train.log"):  # fmt: skip
        assert (run / name).is_file(), name
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    held_out = set(labels.loc[labels["split"] == "test", "patient_id"])
    assert held_out.isdisjoint(splits.loc[splits["split"].isin(["train", "val"]), "patient_id"])
    sidecar = json.loads((run / "model.json").read_text())
    assert 0.05 <= sidecar["threshold"] <= 0.95
    assert sidecar["preprocess"]["size"] == 48
    assert len(pd.read_csv(run / "metrics.csv")) == 2
    # Two validation patients are too few to calibrate on: the plain sigmoid, and why.
    assert sidecar["calibration"]["method"] == "none"
    assert "validation patients" in sidecar["calibration"]["note"]
    val = pd.read_csv(run / "val_predictions.csv")
    assert np.allclose(1 / (1 + np.exp(-val["logit"])), val["probability"], atol=1e-6)


def test_evaluate_on_the_held_out_split(workflow):
    root, _ = workflow
    assert main(["-q", "evaluate", str(root / "run"), "--data", str(root / "cache"),
                 "--split", "test"]) == 0  # fmt: skip
    metrics = json.loads((root / "run" / "evaluation" / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 3 and metrics["split"] == "test"
    assert metrics["seen_in_training"] == {}
    for plot in ("roc.png", "pr.png", "calibration.png", "score_distributions.png"):
        assert (root / "run" / "evaluation" / plot).stat().st_size > 1000
    report = (root / "run" / "report.html").read_text()
    assert "data:image/png;base64," in report
    sidecar = json.loads((root / "run" / "model.json").read_text())
    epoch = sidecar["epoch"]
    assert metrics["model_epoch"] == epoch
    assert (
        f"Evaluated: the test patients of <code>{root / 'cache'}</code> (3 patients), none of "
        f"them was in the run's training or validation split; the weights of epoch {epoch}"
    ) in report
    assert "Other fields" not in report  # nothing left shown as raw JSON
    # Each patient's call, as predict makes it, and accuracy is the share of right calls.
    scored = pd.read_csv(root / "run" / "evaluation" / "predictions.csv")
    plain = 1 / (1 + np.exp(-scored["logit"]))
    assert (scored["decision"] == (plain >= sidecar["threshold"]).astype(int)).all()
    assert metrics["metrics"]["accuracy"] == pytest.approx(
        (scored["decision"] == scored["label"]).mean()
    )


def test_predict_agrees_across_dicom_nifti_and_cache(workflow, tmp_path, capsys):
    root, labels = workflow
    index = read_index(root / "index")
    chosen = index.series[index.series["chosen"]].set_index("patient_id")
    pid = labels["patient_id"].iloc[0]
    # The same patient as NIfTI (HU, axes as dcm2niix would write them).
    volume = load_series(series_files(index, chosen.loc[pid, "series_uid"]))
    spacing = [*volume.pixel_spacing_mm[::-1], float(np.diff(volume.positions_mm).mean())]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nifti = tmp_path / f"{pid}.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(volume.hu, (2, 1, 0))[::-1, ::-1], affine), nifti)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "IM0001.dcm").write_bytes(b"DICM but not really")

    out = tmp_path / "predictions.csv"
    missing = tmp_path / "no-such-study"
    rc = main(["-q", "predict", str(root / "run"), str(root / "cohort" / "dicom"), str(broken),
               str(missing), "--out", str(out), "--heatmaps", str(tmp_path / "heat"),
               "--top-k", "2"])  # fmt: skip
    assert rc == 1  # inputs failed: the exit code says so, the others are predicted
    table = pd.read_csv(out, dtype={"patient_id": str, "error": str}).fillna({"error": ""})
    failed = table[table["error"] != ""].set_index("source")
    assert sorted(failed.index) == sorted([str(broken), str(missing)])
    # The reason names the file that could not be read, and the terminal shows it too.
    assert "IM0001.dcm (not a DICOM file)" in failed.loc[str(broken), "error"]
    assert "IM0001.dcm (not a DICOM file)" in capsys.readouterr().err
    assert failed.loc[str(missing), "error"] == "does not exist"
    # Whole-number columns stay whole beside the failed rows' empty cells.
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    for column in ("decision", "num_slices", "top_slice_index"):
        assert written[column].str.fullmatch(r"\d*").all(), written[column].tolist()
    ok = table[table["error"] == ""].set_index("patient_id")
    assert sorted(ok.index) == sorted(labels["patient_id"])
    assert ((ok["probability"] >= ok["threshold"]).astype(int) == ok["decision"]).all()
    assert (ok["top_slice_index"] < ok["num_slices"]).all()
    assert len(list((tmp_path / "heat").glob("*.png"))) == 2 * len(ok)
    # Their index (for the report's order): each PNG, its patient's probability and slice.
    maps = pd.read_csv(tmp_path / "heat" / "heatmaps.csv", dtype={"patient_id": str})
    assert sorted(maps["file"]) == sorted(p.name for p in (tmp_path / "heat").glob("*.png"))
    top = maps[maps["rank"] == 1].set_index("patient_id")
    assert np.allclose(top.loc[ok.index, "probability"], ok["probability"])
    assert (top.loc[ok.index, "slice_index"] == ok["top_slice_index"]).all()

    # The prepared cache gives the same probabilities as decoding the DICOM again.
    assert main(["-q", "predict", str(root / "run"), str(root / "cache"),
                 "--out", str(tmp_path / "c.csv")]) == 0  # fmt: skip
    cached = pd.read_csv(tmp_path / "c.csv", dtype={"patient_id": str}).set_index("patient_id")
    assert np.allclose(cached.loc[ok.index, "probability"], ok["probability"], atol=1e-5)

    rc = main(["-q", "predict", str(root / "run"), str(nifti), "--out", str(tmp_path / "n.csv")])
    assert rc == 0
    from_nifti = pd.read_csv(tmp_path / "n.csv", dtype={"patient_id": str})
    from_dicom = ok.loc[pid, "probability"]
    assert from_nifti["probability"].iloc[0] == pytest.approx(from_dicom, abs=1e-4)


def test_resume_refuses_a_missing_run_and_bad_config_names_the_key(workflow, capsys):
    root, _ = workflow
    assert main(["train", "--resume", str(root / "nowhere")]) == 2
    assert main(["train", "--data", str(root / "cache"), "--set", "train.epoks=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoks: unknown key; did you mean train.epochs?" in err
    assert "--set train.epoks=3" in err  # the source of the bad key, not a YAML file
    assert f"cannot resume {root / 'nowhere'}: no run there" in err
    # A section given one value says which keys it has.
    assert main(["train", "--data", str(root / "cache"), "--set", "train.lr=1e-3"]) == 2
    assert "train.lr: a section, not a value; set its keys (train.lr.head," in (
        capsys.readouterr().err
    )


def test_quiet_after_the_subcommand_silences_training(workflow, tmp_path, capsys):
    root, _ = workflow
    assert main(["train", "--data", str(root / "cache"), "--out", str(tmp_path / "run"),
                 *TINY_TRAIN, "--set", "train.epochs=1", "-q"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "epoch 0 (stage" not in err  # the progress bar's label


def test_evaluate_on_a_missing_split_says_what_to_do(workflow, capsys):
    root, _ = workflow
    assert main(["-q", "evaluate", str(root / "run"), "--data", str(root / "cache"),
                 "--split", "holdout"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "no patient has split 'holdout'" in err and "splits in this cache: test" in err
    out = root / "typo-eval"
    assert main(["-q", "evaluate", str(root / "run"), "--data", str(root / "cache"),
                 "--split", "tset", "--out", str(out)]) == 2  # fmt: skip
    assert "did you mean --split test?" in capsys.readouterr().err and not out.exists()
    # A mistyped run folder is not created by the attempt.
    typo = root / "runn"
    assert main(["-q", "evaluate", str(typo), "--data", str(root / "cache")]) == 2
    assert "no trained model here" in capsys.readouterr().err and not typo.exists()


def test_a_run_that_cannot_start_says_why_in_its_log(workflow, tmp_path):
    root, _ = workflow
    run = tmp_path / "run"
    missing = tmp_path / "nowhere" / "ResNet50.pt"
    assert main(["-q", "train", "--data", str(root / "cache"), "--out", str(run), *TINY_TRAIN,
                 "--set", f"model.pretrained={missing}"]) == 2  # fmt: skip
    assert "training could not start" in (run / "train.log").read_text()
    # The log was detached: the next run of this process does not write into it.
    size = (run / "train.log").stat().st_size
    assert main(["-q", "train", "--resume", str(root / "run"), "--allow-chance"]) == 0
    assert (run / "train.log").stat().st_size == size


def test_resuming_a_finished_run_says_it_is_complete(workflow):
    root, _ = workflow
    assert main(["-q", "train", "--resume", str(root / "run"), "--allow-chance"]) == 0
    assert "is complete: 2 of 2 epochs trained" in (root / "run" / "train.log").read_text()


def test_synth_lesion_options_reach_the_cohort(tmp_path):
    import json

    assert main(["-q", "synth", str(tmp_path / "c"), "--patients", "2", "--matrix", "64",
                 "--min-slices", "10", "--max-slices", "10", "--lesion-mm", "18", "30",
                 "--lesion-hu", "75", "90", "--workers", "1"]) == 0  # fmt: skip
    config = json.loads((tmp_path / "c" / "synth.json").read_text())
    assert config["lesion_diameter_mm"] == [18.0, 30.0] and config["lesion_hu"] == [75.0, 90.0]


def test_a_calibrated_run_reports_calibrated_probabilities_and_the_same_decisions(
    workflow, tmp_path
):
    """The same weights with a Platt calibration in model.json: predict and evaluate report
    sigmoid(a * logit + b) and the threshold mapped the same way, and every decision and
    every threshold metric stays what the plain sigmoid gave."""
    import shutil

    from scipy.special import expit, logit

    from brainmets.model.identity import model_id

    root, _ = workflow
    plain_run, calibrated_run = tmp_path / "plain", tmp_path / "calibrated"
    for run in (plain_run, calibrated_run):
        shutil.copytree(root / "run", run, ignore=shutil.ignore_patterns("evaluation*"))
    sidecar = json.loads((calibrated_run / "model.json").read_text())
    sidecar["calibration"] = {"method": "platt", "slope": 0.5, "intercept": -1.0, "patients": 9}
    sidecar["model_id"] = model_id(sidecar)  # recalibrated on purpose: another model
    (calibrated_run / "model.json").write_text(json.dumps(sidecar))

    tables, metrics = {}, {}
    for name, run in (("plain", plain_run), ("calibrated", calibrated_run)):
        out = tmp_path / f"{name}.csv"
        assert main(["-q", "predict", str(run), str(root / "cache"), "--out", str(out)]) == 0
        tables[name] = pd.read_csv(out, dtype={"patient_id": str}).set_index("patient_id")
        assert main(["-q", "evaluate", str(run), "--data", str(root / "cache"),
                     "--split", "test"]) == 0  # fmt: skip
        metrics[name] = json.loads((run / "evaluation" / "metrics.json").read_text())

    plain, calibrated = tables["plain"], tables["calibrated"]
    expected = expit(0.5 * logit(plain["probability"]) - 1.0)
    assert np.allclose(calibrated["probability"], expected, atol=1e-6)
    assert (calibrated["decision"] == plain["decision"]).all()
    assert calibrated["threshold"].iloc[0] == pytest.approx(
        expit(0.5 * logit(sidecar["threshold"]) - 1.0)
    )
    assert ((calibrated["probability"] >= calibrated["threshold"]) == calibrated["decision"]).all()

    assert metrics["calibrated"]["calibration"]["method"] == "platt"
    assert metrics["plain"]["calibration"]["method"] == "none"
    for key in ("auc", "sensitivity", "specificity", "f1", "n", "separation"):
        assert metrics["calibrated"]["metrics"][key] == metrics["plain"]["metrics"][key], key
    # The separation band is the specification's, on the plain sigmoid, calibrated or not.
    assert metrics["calibrated"]["separation_band"] == metrics["plain"]["separation_band"]
    assert "calibrated_mean_pos" in metrics["calibrated"]["metrics"]
    assert (
        "Platt-calibrated on 9 validation patients" in (calibrated_run / "report.html").read_text()
    )


def test_a_flat_grad_cam_says_so_in_its_title(workflow, tmp_path, monkeypatch):
    """An all-zero Grad-CAM (no slice region raised the logit) is drawn as a black overlay;
    its title must say that this is the finding, not a broken image."""
    from brainmets import heatmaps
    from brainmets.data.cache import PatientCache
    from brainmets.heatmaps import write_heatmaps
    from brainmets.inference import load_trained

    root, _ = workflow
    trained = load_trained(root / "run", "cpu")
    cache = PatientCache(root / "cache")
    pid = cache.patient_ids[0]
    array = cache.load(pid)
    maps = [np.zeros(array.shape[1:], np.float32), np.ones(array.shape[1:], np.float32)]
    monkeypatch.setattr(heatmaps, "grad_cam", lambda model, inputs: maps)
    titles = []
    monkeypatch.setattr(heatmaps, "save_overlay",
                        lambda image, cam, path, title: titles.append(title) or path)  # fmt: skip
    write_heatmaps(trained, pid, array, np.arange(array.shape[0], dtype=float), tmp_path, 2)
    assert titles[0].endswith("(Grad-CAM flat: no positive evidence)")
    assert "flat" not in titles[1]
    # The patient's calibrated p sits on the top slice only: the calibration maps the patient
    # score (the max slice logit), not any slice's logit.
    top = array.shape[0] - 1
    p = trained.probability(float(top))
    assert titles[0].startswith(f"{pid}  slice {top}  logit {top:.2f} = patient score, p={p:.2f}")
    assert titles[1] == f"{pid}  slice {top - 1}  logit {top - 1:.2f}"


def test_index_exit_code_says_whether_dicom_files_were_damaged(tmp_path, capsys):
    """A note beside the images is listed but is no failure; a truncated DICOM file is one:
    the exit code says so unless --allow-failures, and both stay in index_errors.csv."""
    assert main(["-q", "synth", str(tmp_path / "c"), "--patients", "2", "--matrix", "64",
                 "--min-slices", "10", "--max-slices", "10"]) == 0  # fmt: skip
    dicom = tmp_path / "c" / "dicom"
    (dicom / "README.txt").write_text("exported from PACS on Tuesday\n")
    argv = ["-q", "index", str(dicom), "--out", str(tmp_path / "index"), "--workers", "1"]
    assert main(argv) == 0
    assert "1 unreadable files (0 damaged DICOM, 1 not DICOM)" in capsys.readouterr().out

    images = sorted(p for p in dicom.rglob("*") if p.is_file() and p.suffix != ".txt")
    victim, halved = images[0], images[-1]
    victim.write_bytes(victim.read_bytes()[:300])  # a transfer that stopped in the header
    halved.write_bytes(halved.read_bytes()[: halved.stat().st_size // 2])  # in the pixel data
    assert main(argv) == 1
    assert "index_errors.csv" in capsys.readouterr().err
    assert main([*argv, "--allow-failures"]) == 0
    errors = pd.read_csv(tmp_path / "index" / "index_errors.csv").set_index("path")["reason"]
    assert len(errors) == 3 and str(victim) in errors.index
    assert errors[str(halved)].startswith("truncated: ")
    assert "less than its pixel data alone (8192 bytes)" in errors[str(halved)]


def test_malformed_set_value_is_one_clear_line(workflow, capsys):
    root, _ = workflow
    assert main(["train", "--data", str(root / "cache"), "--set", "train.stage_epochs=[0,1"]) == 2
    err = capsys.readouterr().err
    assert "--set train.stage_epochs=[0,1: the value '[0,1' is not valid YAML" in err
    assert "Traceback" not in err


def test_ctrl_c_during_train_says_how_to_resume(workflow, tmp_path, monkeypatch, capsys):
    """The generic "run the same command again" would start a fresh run into a folder that
    already holds one, and be refused: train's hint names --resume and the run folder."""
    from brainmets.train import trainer

    root, _ = workflow
    run = tmp_path / "run"

    def interrupted(cfg, run_dir, **kwargs):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last_state.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["-q", "train", "--data", str(root / "cache"), "--out", str(run)]) == 130
    assert f"interrupted (go on with: brainmets train --resume {run})" in capsys.readouterr().err


def test_an_interrupted_predict_keeps_its_rows_and_resumes(workflow, tmp_path, monkeypatch):
    """predict over a large cohort can be stopped (Ctrl-C, a kill between saves); the rows done
    are on disk and --resume predicts only the others, to the same table as one whole run."""
    from brainmets import predict as predict_module

    root, _ = workflow
    run, cache, out = root / "run", root / "cache", tmp_path / "p.csv"
    whole = predict_module.predict(run, [cache], out_csv=tmp_path / "whole.csv", progress=False,
                                   batch_slices=1)  # fmt: skip
    real_row, calls = predict_module._row, []

    def stop_at_the_third(trained, item, score):
        calls.append(item.job.patient_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_row(trained, item, score)

    earlier = (tmp_path / "whole.csv").read_text()
    out.write_text(earlier)  # a complete table from before: a stopped rerun must not replace it
    monkeypatch.setattr(predict_module, "_row", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(run, [cache], out_csv=out, progress=False, batch_slices=1)
    assert out.read_text() == earlier
    partial = tmp_path / "p.csv.partial"
    saved = pd.read_csv(partial, dtype=str)
    assert len(saved) == 2 and set(saved["model"]) == set(whole.table["model"])
    monkeypatch.setattr(predict_module, "_row", real_row)
    # Without --resume the saved rows are not thrown away, and no other model's rows are kept.
    with pytest.raises(FileExistsError, match="add --resume to keep them"):
        predict_module.predict(run, [cache], out_csv=out, progress=False)
    saved.assign(model="0123456789ab").to_csv(tmp_path / "other.csv.partial", index=False)
    with pytest.raises(ValueError, match="predicted by model 0123456789ab"):
        predict_module.predict(run, [cache], out_csv=tmp_path / "other.csv", resume=True)

    seen = []
    monkeypatch.setattr(predict_module, "_row",
                        lambda t, item, s: seen.append(item.job.patient_id) or real_row(t, item, s))  # fmt: skip
    resumed = predict_module.predict(run, [cache], out_csv=out, progress=False, resume=True)
    assert not set(seen) & set(calls[:2])  # the two saved patients were not predicted again
    assert not partial.exists()  # the finished table replaced it
    pd.testing.assert_frame_equal(resumed.table, whole.table, check_exact=False, atol=1e-6)
    pd.testing.assert_frame_equal(
        pd.read_csv(out, dtype={"patient_id": str}),
        pd.read_csv(tmp_path / "whole.csv", dtype={"patient_id": str}),
    )


def test_a_stop_during_a_patients_heatmaps_leaves_it_for_resume(workflow, tmp_path, monkeypatch):
    """Grad-CAM takes seconds per patient, so a Ctrl-C lands there more often than anywhere
    else: the patient must not be saved without its heatmaps, or --resume would skip it and
    the report would never show it."""
    from brainmets import predict as predict_module

    root, _ = workflow
    run, cache, heat = root / "run", root / "cache", tmp_path / "heat"
    real_write, calls = predict_module.write_heatmaps, []

    def stop_at_the_third(trained, patient_id, *args):
        calls.append(patient_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(trained, patient_id, *args)

    monkeypatch.setattr(predict_module, "write_heatmaps", stop_at_the_third)
    kwargs = dict(out_csv=tmp_path / "p.csv", heatmaps_dir=heat, top_k=1, progress=False,
                  batch_slices=1)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict(run, [cache], **kwargs)
    saved = pd.read_csv(tmp_path / "p.csv.partial", dtype={"patient_id": str})
    assert saved["patient_id"].tolist() == sorted(calls[:2])  # not the interrupted one
    monkeypatch.setattr(predict_module, "write_heatmaps", real_write)
    done = predict_module.predict(run, [cache], resume=True, **kwargs)
    index = pd.read_csv(heat / "heatmaps.csv", dtype={"patient_id": str})
    assert sorted(index["patient_id"]) == sorted(done.table["patient_id"])
    assert all((heat / name).is_file() for name in index["file"])


def test_a_patients_failure_lists_only_the_unreadable_files_beside_its_series(workflow, tmp_path):
    """A note at the DICOM root explains no patient's failure; a damaged file beside a
    patient's too-short series may, and is named in that patient's row only."""
    root, _ = workflow
    assert main(["-q", "synth", str(tmp_path / "c"), "--patients", "2", "--matrix", "64",
                 "--min-slices", "10", "--max-slices", "10", "--seed", "4"]) == 0  # fmt: skip
    dicom = tmp_path / "c" / "dicom"
    (dicom / "README.txt").write_text("exported from PACS\n")
    folders = [d for d in (dicom / "SYN0001").iterdir() if d.is_dir()]
    volume = max(folders, key=lambda d: len(list(d.iterdir())))  # not the localizer's folder
    damaged = sorted(volume.iterdir())[:3]
    for path in damaged:  # 7 readable slices left: fewer than min_slices
        path.write_bytes(path.read_bytes()[:200])
    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(root / "run"), str(dicom), "--out", str(out)]) == 1
    errors = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("patient_id")["error"]
    assert "too few slices (7 < 8)" in errors["SYN0001"]
    assert all(path.name in errors["SYN0001"] for path in damaged)
    assert errors["SYN0002"] == ""
    assert "README" not in "".join(errors)


def test_predict_never_overwrites_a_file_that_is_not_its_table(workflow, tmp_path):
    root, _ = workflow
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\nA,1\n")
    argv = ["-q", "predict", str(root / "run"), str(root / "cache"), "--out", str(labels)]
    assert main(argv) == 2
    assert labels.read_text() == "patient_id,label\nA,1\n"


def _cut_before_rows(path) -> None:
    """Cut a file inside its header, before the image description (Rows, 0028,0010)."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\x28\x00\x10\x00")])


def test_a_damaged_slice_fails_its_patient_wherever_the_series_is_read(
    workflow, tmp_path, monkeypatch
):
    """A slice cut in its pixel data or in its header leaves a series that still looks whole
    to the index (enough slices, maybe no gap at an end). Scored without it, a patient could
    lose the only slice with a lesion: predict and prepare (patient folders and an index)
    fail that patient, naming the file and why. A damaged file of another series beside it
    (here the patient's localizer) is no reason to fail the patient."""
    root, _ = workflow
    assert main(["-q", "synth", str(tmp_path / "c"), "--patients", "3", "--matrix", "64",
                 "--min-slices", "12", "--max-slices", "12", "--seed", "5"]) == 0  # fmt: skip
    dicom = tmp_path / "c" / "dicom"

    def by_series(patient: str) -> dict[str, list]:
        """The patient's files per series, in InstanceNumber order."""
        files = [p for p in (dicom / patient).rglob("*") if p.is_file()]
        headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
        series: dict[str, list] = {}
        for path in sorted(files, key=lambda p: int(headers[p].InstanceNumber)):
            series.setdefault(headers[path].SeriesInstanceUID, []).append(path)
        return series

    def last_slice(patient: str):
        return max(by_series(patient).values(), key=len)[-1]

    halved, headless = last_slice("SYN0001"), last_slice("SYN0002")
    halved.write_bytes(halved.read_bytes()[: halved.stat().st_size // 2])
    _cut_before_rows(headless)
    (localizer,) = min(by_series("SYN0003").values(), key=len)  # in the volume's folder
    localizer.write_bytes(localizer.read_bytes()[: localizer.stat().st_size // 2])
    assert localizer.parent == last_slice("SYN0003").parent
    expected = {"SYN0001": (halved, "truncated: "), "SYN0002": (headless, "without Rows")}

    out = tmp_path / "p.csv"
    assert main(["-q", "predict", str(root / "run"), str(dicom), "--out", str(out)]) == 1
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("patient_id")
    for patient, (path, why) in expected.items():
        assert str(path) in rows.loc[patient, "error"] and why in rows.loc[patient, "error"]
    assert rows.loc["SYN0003", "error"] == "" and rows.loc["SYN0003", "probability"] != ""

    # An index built from a relative root, read from another folder.
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "index", "c/dicom", "--out", "index", "--allow-failures"]) == 0
    files = pd.read_csv(tmp_path / "index" / "files.csv", dtype=str)["path"]
    assert all(Path(p).is_absolute() for p in files)
    labels = pd.read_csv(tmp_path / "c" / "labels.csv", dtype={"patient_id": str})
    labels.to_csv(tmp_path / "by-index.csv", index=False)  # no path: the index finds them
    labels["path"] = [str(dicom / p) for p in labels["patient_id"]]
    labels.to_csv(tmp_path / "by-folder.csv", index=False)
    monkeypatch.chdir(root)
    for how in ("index", "folder"):
        cache = tmp_path / f"cache-{how}"
        source = ["--index", str(tmp_path / "index")] if how == "index" else []
        argv = ["-q", "prepare", "--labels", str(tmp_path / f"by-{how}.csv"), *source,
                "--out", str(cache), "--workers", "1"]  # fmt: skip
        assert main(argv) == 1, how
        errors = pd.read_csv(cache / "errors.csv", dtype=str).set_index("patient_id")
        assert set(errors.index) == set(expected), how
        for patient, (path, why) in expected.items():
            reason = errors.loc[patient, "reason"]
            assert errors.loc[patient, "file"] == str(dicom / patient), how  # its folder
            assert str(path) in reason and why in reason, how
            # A stored index lists the files: it must be built again once they are mended.
            assert ("run `brainmets index` again" in reason) == (how == "index"), how
        assert pd.read_csv(cache / "index.csv")["patient_id"].tolist() == ["SYN0003"]
