"""``train --folds K`` end to end on a tiny CPU config: fold runs, their ensemble from the
out-of-fold predictions, array-job folds, a fold killed and resumed, and what the ensemble
refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from brainmets.cli import main
from brainmets.config import Config, PreprocessConfig, save_config
from brainmets.data.cache import build_cache_from_arrays
from brainmets.metrics import best_f1_threshold
from brainmets.model.identity import ensemble_id
from brainmets.train.cross_validation import fold_config
from brainmets.train.ensemble import build_ensemble
from brainmets.train.scale import epoch_scale
from brainmets.train.trainer import TrainingInterrupted, train

SIZE = 32
FOLDS = 2


def _make_cache(root: Path):
    """12 patients of 3 slices (6 positive, a bright lesion on one slice); 2 are test."""
    rng = np.random.default_rng(0)
    patients, splits = [], {}
    for i in range(12):
        label = int(i % 5 < 2)
        volume = rng.integers(20, 110, size=(3, SIZE, SIZE)).astype(np.uint8)
        if label:
            volume[1, 12:16, 14:18] = 240
        patients.append((f"P{i:02d}", label, volume))
        splits[f"P{i:02d}"] = "test" if i % 5 == 4 else ("val" if i % 5 == 3 else "train")
    return build_cache_from_arrays(root, patients, PreprocessConfig(size=SIZE), splits)


def _config(cache: Path) -> Config:
    return Config.model_validate(
        {
            "seed": 3,
            "data": {"cache": str(cache), "num_workers": 0},
            "model": {"arch": "resnet18", "hidden": 16},
            "train": {
                "epochs": 2,
                "stage_epochs": [0, 1, 1],
                "batch_patients": 4,
                "lr": {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3},
                "bn_calibration_patients": 0,
                "checkpoint_every": 3,
            },
        }
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, cache) of the tiny cohort."""
    root = tmp_path_factory.mktemp("cv")
    _make_cache(root / "cache")
    save_config(_config(root / "cache"), root / "config.yaml")
    return root / "config.yaml", root / "cache"


@pytest.fixture(scope="module")
def cv(setup, tmp_path_factory) -> Path:
    """``train --folds 2``: two fold runs and their ensemble."""
    config, _ = setup
    out = tmp_path_factory.mktemp("trained") / "cv"
    assert main(["-q", "train", "--config", str(config), "--folds", str(FOLDS), "--out",
                 str(out), "--allow-chance"]) == 0  # fmt: skip
    return out


def test_every_fold_is_a_run_validated_on_its_fold_and_the_test_patients_on_none(cv, setup):
    _, cache = setup
    index = pd.read_csv(cache / "index.csv", dtype={"patient_id": str})
    test = set(index.loc[index["split"] == "test", "patient_id"])
    folds = pd.read_csv(cv / "folds.csv", dtype={"patient_id": str})
    assert set(folds["patient_id"]) == set(index["patient_id"]) - test  # train + val pooled
    for k in range(FOLDS):
        run = cv / f"fold-{k}"
        for name in ("model.safetensors", "model.json", "metrics.csv", "train.log", "splits.csv"):
            assert (run / name).is_file(), name
        pd.testing.assert_frame_equal(pd.read_csv(run / "folds.csv", dtype={"patient_id": str}),
                                      folds)  # fmt: skip
        splits = pd.read_csv(run / "splits.csv", dtype=str)
        val = set(splits.loc[splits["split"] == "val", "patient_id"])
        assert val == set(folds.loc[folds["fold"] == k, "patient_id"])
        assert set(splits.loc[splits["split"] == "test", "patient_id"]) == test
        assert set(pd.read_csv(run / "val_predictions.csv", dtype=str)["patient_id"]) == val
        assert "ranking" in json.loads((run / "model.json").read_text())


def test_the_ensemble_chooses_on_all_out_of_fold_patients(cv):
    meta = json.loads((cv / "ensemble.json").read_text())
    oof = pd.read_csv(cv / "oof_predictions.csv", dtype={"patient_id": str})
    folds = pd.read_csv(cv / "folds.csv", dtype={"patient_id": str})
    assert sorted(oof["patient_id"]) == sorted(folds["patient_id"])  # each once
    for k in range(FOLDS):  # the fold's own validation predictions, as its run wrote them
        own = pd.read_csv(cv / f"fold-{k}" / "val_predictions.csv", dtype={"patient_id": str})
        mine = oof[oof["fold"] == k].reset_index(drop=True)
        np.testing.assert_allclose(mine["logit"], own["logit"])
        assert set(mine["model"]) == {meta["members"][k]["model_id"]}
    y, z = oof["label"].to_numpy(), oof["logit"].to_numpy()
    assert meta["threshold"] == best_f1_threshold(y, expit(z))[0]
    # The reported scale by a single run's rule, on all out-of-fold patients.
    oof_scale = epoch_scale(
        pd.DataFrame({"label": y, "probability": expit(z), "logit": z}), method="platt", seed=3
    )
    assert meta["calibration"] == oof_scale.calibration.to_json()
    assert meta["ranking"] == oof_scale.ranking.to_json()
    np.testing.assert_allclose(oof["probability"], oof_scale.calibration.probability(z))
    assert meta["ranking"]["n_pos"] + meta["ranking"]["n_neg"] == len(oof)
    assert meta["model_id"] == ensemble_id(meta)
    assert [m["run"] for m in meta["members"]] == [f"fold-{k}" for k in range(FOLDS)]
    assert "Cross-validation" in (cv / "report.html").read_text()


def test_array_job_folds_and_a_fold_killed_and_resumed_give_the_same_ensemble(cv, setup, tmp_path):
    """Fold 0 as an independent job, fold 1 killed mid-run; ``train --resume CV`` finishes fold 1
    and combines: every fold and the ensemble's model id are those of ``train --folds``."""
    config, cache = setup
    out = tmp_path / "cv"
    for k in (0,):
        assert main(["-q", "train", "--config", str(config), "--folds", str(FOLDS), "--fold",
                     str(k), "--out", str(out), "--allow-chance"]) == 0  # fmt: skip
    assert not (out / "ensemble.json").exists()  # one fold alone combines nothing
    with pytest.raises(TrainingInterrupted):
        cfg = _config(cache).model_copy(update={"data": _config(cache).data.model_copy(
            update={"folds": FOLDS})})  # fmt: skip
        train(fold_config(cfg, 1), out / "fold-1", stop_after_steps=3, progress=False)
    assert main(["-q", "train", "--resume", str(out), "--allow-chance"]) == 0
    for k in range(FOLDS):
        for name in ("metrics.csv", "splits.csv", "folds.csv", "val_predictions.csv"):
            expected = pd.read_csv(cv / f"fold-{k}" / name).drop(columns="seconds", errors="ignore")
            got = pd.read_csv(out / f"fold-{k}" / name).drop(columns="seconds", errors="ignore")
            pd.testing.assert_frame_equal(got, expected, obj=f"fold {k} {name}")
    expected, got = (json.loads((d / "ensemble.json").read_text()) for d in (cv, out))
    assert got["model_id"] == expected["model_id"]
    assert got["members"] == expected["members"]


def _copy(cv: Path, to: Path) -> Path:
    shutil.copytree(cv, to, ignore=shutil.ignore_patterns("tensorboard", "checkpoints"))
    return to


def test_folds_of_another_cross_validation_are_refused(cv, tmp_path):
    other = _copy(cv, tmp_path / "other")
    folds = pd.read_csv(other / "fold-1" / "folds.csv")
    folds["fold"] = (folds["fold"] + 1) % FOLDS  # another seed would deal them otherwise
    folds.to_csv(other / "fold-1" / "folds.csv", index=False)
    with pytest.raises(ValueError, match="folds of different cross-validations"):
        build_ensemble([other], other)


def test_a_missing_a_doubled_and_an_unfinished_fold_are_refused(cv, tmp_path):
    with pytest.raises(ValueError, match=r"fold 1 is missing \(brainmets train \.\.\. --fold 1"):
        build_ensemble([cv / "fold-0"], tmp_path / "e")
    with pytest.raises(ValueError, match="fold 1 is given twice"):
        build_ensemble([cv / "fold-0", cv / "fold-1", cv / "fold-1"], tmp_path / "e")
    short = _copy(cv, tmp_path / "short")
    metrics = pd.read_csv(short / "fold-1" / "metrics.csv")
    metrics.head(1).to_csv(short / "fold-1" / "metrics.csv", index=False)
    with pytest.raises(ValueError, match="fold-1: trained 1 of its 2 epochs; finish it first"):
        build_ensemble([short], short)
    with pytest.raises(ValueError, match="not a fold run"):
        build_ensemble([_single_run(tmp_path)], tmp_path / "e")


def _single_run(tmp_path: Path) -> Path:
    """A run folder that is no fold run (data.folds 1)."""
    run = tmp_path / "single"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"preprocess": {}}))
    save_config(Config(), run / "config.yaml")
    return run


def test_fold_without_folds_is_an_error(setup, capsys):
    config, _ = setup
    assert main(["train", "--config", str(config), "--fold", "1"]) == 2
    assert "--fold 1 needs --folds K" in capsys.readouterr().err
