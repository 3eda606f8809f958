"""``brainmets demo``: the whole workflow on the built-in synthetic cohort, in one command.

synth -> index -> prepare -> train -> evaluate (held-out test patients) -> predict -> report.

With a GPU the demo runs the specified configuration (ResNet-50, 256^2, 40 epochs). Without
one it runs a small configuration that finishes in minutes on two CPU cores and keeps the
same three-stage curriculum, only shorter: ResNet-18 at 128^2, 8 epochs with stages at
0 / 2 / 4 and learning rates ten times the specified ones (there are no RadImageNet weights
on a fresh machine, so the backbone starts from random initialisation and must learn more).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainmets.config import Config, load_config
from brainmets.io import atomic_write_csv

log = logging.getLogger(__name__)

# The CPU demo: every override is a key of the config reference.
CPU_OVERRIDES = [
    "name=demo-cpu",
    "model.arch=resnet18",
    "preprocess.size=128",
    "train.epochs=8",
    "train.stage_epochs=[0, 2, 4]",
    "train.lr.head=5.0e-4",
    "train.lr.layer4=1.0e-4",
    "train.lr.layer3=5.0e-5",
    "train.batch_patients=10",
    "evaluate.n_boot=500",
]
GPU_OVERRIDES = ["name=demo-gpu"]
CPU_COHORT = {"patients": 160, "slices": (16, 20)}
GPU_COHORT = {"patients": 400, "slices": (24, 32)}


def demo_config(*, full: bool, epochs: int | None, device: str, seed: int) -> Config:
    overrides = list(GPU_OVERRIDES if full else CPU_OVERRIDES)
    overrides += [f"seed={seed}", f"train.device={device}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    return load_config(None, overrides)


def assign_splits(labels: pd.DataFrame, seed: int, fractions=(0.6, 0.2, 0.2)) -> pd.DataFrame:
    """Stratified train / val / test split of the manifest (the test patients are held out)."""
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=labels.index, dtype=object)
    for _, rows in labels.groupby("label"):
        order = rng.permutation(rows.index.to_numpy())
        n_train = round(len(order) * fractions[0])
        n_val = round(len(order) * fractions[1])
        split[order[:n_train]] = "train"
        split[order[n_train : n_train + n_val]] = "val"
        split[order[n_train + n_val :]] = "test"
    return labels.assign(split=split)


def run_demo(
    out: Path,
    *,
    patients: int | None = None,
    epochs: int | None = None,
    device: str = "auto",
    full: bool = False,
    seed: int = 0,
) -> dict:
    from brainmets.data.cache import prepare_cache
    from brainmets.data.manifest import choose_series, index_dicom_root, read_labels, write_index
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
    from brainmets.evaluate.evaluation import evaluate_run
    from brainmets.evaluate.report import write_report
    from brainmets.predict import predict
    from brainmets.train.trainer import train

    started = time.perf_counter()
    gpu = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    full = full or gpu
    cohort = GPU_COHORT if full else CPU_COHORT
    cfg = demo_config(full=full, epochs=epochs, device=device, seed=seed)
    workers = max(1, (torch.get_num_threads() if not gpu else 8))
    print(f"brainmets demo: {'full specified' if full else 'small CPU'} configuration -> {out}")
    print(
        "No RadImageNet weights on this machine: training from random initialisation. "
        "Pass yours with --set model.pretrained=/path/to/ResNet50.pt in `brainmets train`."
    )

    synth = SynthConfig(
        num_patients=patients or cohort["patients"], slices=cohort["slices"], seed=seed
    )
    labels_path = write_synthetic_cohort(out / "cohort", synth)
    labels = assign_splits(read_labels(labels_path), seed)
    manifest = out / "cohort" / "labels_split.csv"
    atomic_write_csv(manifest, labels)

    index = index_dicom_root(out / "cohort" / "dicom", workers=workers)
    index.series = choose_series(index.series, target_mm=5.0)
    write_index(index, out / "index")

    cache = out / "cache"
    result = prepare_cache(labels, cache, cfg.preprocess, series_index=index, workers=workers)
    if result.failed:
        raise RuntimeError(
            f"demo: {result.failed} synthetic patients failed to prepare; see {cache}/errors.csv"
        )

    cfg.data.cache = str(cache)
    run = out / "runs" / cfg.name
    train(cfg, run)

    summary = evaluate_run(run, cache, split="test", device=device)
    test_dirs = index.series[
        index.series["chosen"]
        & index.series["patient_id"].isin(labels.loc[labels["split"] == "test", "patient_id"])
    ]["directory"]
    predictions = predict(
        run,
        sorted(set(test_dirs)),
        out_csv=out / "predictions.csv",
        heatmaps_dir=run / "heatmaps",
        top_k=1,
        device=device,
    )
    report = write_report(run)
    minutes = (time.perf_counter() - started) / 60
    auc = summary.metrics["metrics"]["auc"]
    print(summary.text)
    print(f"\ndemo finished in {minutes:.1f} min; held-out AUC {auc:.3f}")
    print(f"  cohort       {out / 'cohort'}   (DICOM + labels_split.csv)")
    print(f"  cache        {cache}")
    print(f"  run          {run}   (model.safetensors, metrics.csv, tensorboard/)")
    print(f"  evaluation   {summary.out_dir}")
    print(f"  predictions  {out / 'predictions.csv'} ({predictions.predicted} patients)")
    print(f"  report       {report}")
    return {"auc": auc, "minutes": minutes, "run": run, "report": report}
