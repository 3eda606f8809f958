"""`brainmets demo`: its two configurations and a small end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from brainmets.config import Config
from brainmets.demo import CPU_COHORT, GPU_COHORT, assign_splits, demo_config, run_demo


def test_gpu_demo_is_the_specified_configuration():
    cfg = demo_config(full=True, epochs=None, device="cuda", seed=0)
    spec = Config()
    assert cfg.model == spec.model and cfg.preprocess == spec.preprocess
    assert cfg.train.epochs == 40 and cfg.train.stage_epochs == (0, 5, 12)
    assert cfg.train.lr == spec.train.lr and cfg.augment == spec.augment
    assert cfg.train.bn_calibration_patients > 0  # random weights: BatchNorm estimated first
    assert GPU_COHORT["num_patients"] == 400


def test_cpu_demo_keeps_the_three_stages_on_a_lighter_model():
    cfg = demo_config(full=False, epochs=None, device="cpu", seed=3)
    assert cfg.model.arch == "resnet18" and cfg.preprocess.size == 128
    assert cfg.train.stage_epochs == (0, 1, 2) and cfg.train.epochs > 2
    assert cfg.seed == 3 and cfg.train.device == "cpu"
    assert cfg.augment == Config().augment  # the library's leak-free default, not its own
    assert CPU_COHORT["lesion_diameter_mm"][0] >= 18  # conspicuous lesions, see demo.py


def test_assign_splits_is_stratified_and_seeded():
    labels = pd.DataFrame(
        {"patient_id": [f"P{i}" for i in range(50)], "label": [1] * 20 + [0] * 30}
    )
    split = assign_splits(labels, seed=1)
    counts = split.groupby(["split", "label"]).size()
    assert counts[("train", 1)] == 12 and counts[("val", 1)] == 4 and counts[("test", 1)] == 4
    assert counts[("train", 0)] == 18 and counts[("val", 0)] == 6 and counts[("test", 0)] == 6
    assert split.equals(assign_splits(labels, seed=1))
    assert not split["split"].equals(assign_splits(labels, seed=2)["split"])


@pytest.mark.slow
def test_small_demo_runs_the_whole_workflow(tmp_path, capsys):
    result = run_demo(tmp_path, patients=20, epochs=1, device="cpu", seed=0)
    assert np.isfinite(result["minutes"]) and result["minutes"] > 0
    run = result["run"]
    for name in ("model.safetensors", "metrics.csv", "evaluation/metrics.json", "report.html"):
        assert (run / name).is_file(), name
    predictions = pd.read_csv(tmp_path / "predictions.csv", dtype={"patient_id": str})
    test_ids = pd.read_csv(tmp_path / "cohort" / "labels_split.csv", dtype={"patient_id": str})
    expected = set(test_ids.loc[test_ids["split"] == "test", "patient_id"])
    assert set(predictions["patient_id"]) == expected and (predictions["error"].isna()).all()
    # The AUC the demo reports is the held-out patients' AUC of the evaluation it wrote, and
    # the evaluated patients are exactly the test split, scored as predict scored them.
    evaluated = pd.read_csv(run / "evaluation" / "predictions.csv", dtype={"patient_id": str})
    assert set(evaluated["patient_id"]) == expected
    assert result["auc"] == pytest.approx(roc_auc_score(evaluated["label"], evaluated["logit"]))
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["metrics"]["auc"] == pytest.approx(result["auc"])
    by_id = predictions.set_index("patient_id")["probability"]
    assert np.allclose(
        evaluated.set_index("patient_id")["probability"], by_id[evaluated["patient_id"]]
    )
    assert any((run / "heatmaps").glob("*.png"))
    assert "(rank 1, slice logit" in (run / "report.html").read_text()  # gallery, by score
    out = capsys.readouterr().out
    assert (
        f"held-out AUC {result['auc']:.3f}" in out and "training from random initialisation" in out
    )
    # Running it again in the same folder reuses the cohort and cache and retrains; without
    # progress bars (brainmets -q demo), and with the same result.
    again = run_demo(tmp_path, patients=20, epochs=1, device="cpu", seed=0, progress=False)
    captured = capsys.readouterr()
    assert "replacing the earlier demo run" in captured.out
    assert not any(bar in captured.err for bar in ("patient/s", "it/s", "file/s"))
    assert again["auc"] == result["auc"]
