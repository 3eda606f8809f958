"""Shared fixtures: the real DICOM corpus is found through BRAINMETS_CORPUS; a small
trained-looking run and generated head CT studies for the commands over a run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Root of ../shared/corpus; tests that need it skip cleanly when it is not configured."""
    root = os.environ.get("BRAINMETS_CORPUS")
    if not root:
        pytest.skip("BRAINMETS_CORPUS is not set: real-DICOM corpus tests skipped")
    path = Path(root).resolve()  # tests symlink into it; a relative path would break them
    if not path.is_dir():
        pytest.skip(f"BRAINMETS_CORPUS={root} is not a directory")
    return path


@pytest.fixture
def run_as_main_script(tmp_path):
    """Run Python source as a new process's main script and return its stdout: spawned pool
    workers run that script again, as they would a user's."""
    import subprocess
    import sys

    def run(source: str) -> str:
        script = tmp_path / "parent.py"
        script.write_text(source)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run


# ------------------------------------------------------------------------------- model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder as train writes it, with a seeded ResNet-18 at 48 px and a Platt
    calibration, so that the reported probability goes through calibration."""
    import torch

    from brainmets.model.checkpoint import save_checkpoint
    from brainmets.model.resnet import BrainMetsNet

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = BrainMetsNet("resnet18").eval()
    sidecar = {
        "preprocess": {
            "min_slices": 8,
            "size": 48,
            "slice_mm": 5.0,
            "window_center": 40.0,
            "window_width": 80.0,
        },
        "normalization": "zscore",
        "threshold": 0.5,
        "calibration": {"method": "platt", "slope": 0.8, "intercept": -0.1, "patients": 20},
        "epoch": 0,
    }
    save_checkpoint(model, run / "model.safetensors", sidecar)
    return run


@pytest.fixture(scope="session")
def head_ct_studies(tmp_path_factory) -> Path:
    """``dicom/SYN0001`` … ``SYN0024``: small generated head CT studies (one study each)."""
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    root = tmp_path_factory.mktemp("cohort")
    cfg = SynthConfig(num_patients=24, matrix=64, slices=(10, 12), seed=5)
    write_synthetic_cohort(root, cfg, progress=False)
    return root / "dicom"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread than on two contended ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory, head_ct_studies) -> Path:
    """CV/fold-0 and fold-1 as ``train --folds 2`` leaves them (seeded ResNet-18s at 48 px over
    the ``head_ct_studies`` patients, each with its fold assignment, config, learning curve and
    validation predictions) and their ensemble in CV, made by the product's own code."""
    import numpy as np
    import pandas as pd
    import torch
    from scipy.special import expit

    from brainmets.config import Config, save_config
    from brainmets.model.checkpoint import save_checkpoint
    from brainmets.model.resnet import BrainMetsNet
    from brainmets.train.cross_validation import fold_config
    from brainmets.train.ensemble import build_ensemble
    from brainmets.train.folds import fold_assignment, write_assignment

    cv = tmp_path_factory.mktemp("ensemble") / "cv"
    labels = pd.read_csv(head_ct_studies.parent / "labels.csv", dtype={"patient_id": str})
    index = labels[["patient_id", "label"]].assign(
        split=["test" if i % 4 == 3 else "" for i in range(len(labels))]
    )
    assignment = fold_assignment(index, 2, seed=0)
    cfg = Config.model_validate(
        {"data": {"folds": 2}, "model": {"arch": "resnet18"}, "train": {"epochs": 1}}
    )
    preprocess = {"min_slices": 8, "size": 48, "slice_mm": 5.0, "window_center": 40.0,
                  "window_width": 80.0}  # fmt: skip
    rng = np.random.default_rng(0)
    for k in range(2):
        run = cv / f"fold-{k}"
        torch.manual_seed(10 + k)
        sidecar = {"preprocess": preprocess, "normalization": "zscore", "threshold": 0.5,
                   "epoch": 0}  # fmt: skip
        save_checkpoint(BrainMetsNet("resnet18").eval(), run / "model.safetensors", sidecar)
        save_config(fold_config(cfg, k), run / "config.yaml")
        pd.DataFrame([{"epoch": 0, "auc": 0.8, "val_loss": 0.5}]).to_csv(
            run / "metrics.csv", index=False
        )
        write_assignment(run / "folds.csv", assignment)
        val = assignment[assignment["fold"] == k]
        logits = rng.normal(size=len(val)) + 2.0 * val["label"].to_numpy()
        val[["patient_id", "label"]].assign(probability=expit(logits), logit=logits).to_csv(
            run / "val_predictions.csv", index=False
        )
    build_ensemble([cv], cv)
    return cv
