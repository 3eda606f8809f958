"""``brainmets demo``: the whole workflow on the built-in synthetic cohort, in one command.

synth -> index -> prepare -> train -> evaluate (held-out test patients) -> predict -> report.
``--folds K`` trains K fold runs over the non-test patients instead of one run, and goes on
with their ensemble (``brainmets.train.cross_validation``).

With a GPU the demo runs the specified configuration (ResNet-50, 256^2, 40 epochs). Without
one it runs the ``cpu-small`` preset of :mod:`brainmets.config` (``brainmets config --preset
cpu-small``): the same three-stage curriculum, only shorter. There are no RadImageNet weights
on a fresh machine, so the backbone starts from random initialisation;
``train.bn_calibration_patients`` first estimates its BatchNorm statistics from training
slices (without it the frozen blocks normalise with the initial mean 0 / variance 1, which
describe no data, and evaluation-mode BatchNorm then differs wildly from training). Both
classes get the same mild augmentation, the library's default.
The CPU cohort is 200 patients of 12-14 slabs (the synthetic head is fitted to the scanned
range, so fewer slabs means fewer slices per patient for the same lesions): the cost of an
epoch stays at that of 160 patients of 16-20 slices while training on 120 patients instead
of 96 and testing on 40 instead of 32. Its metastases are larger and brighter than the default
synthetic cohort's (see CPU_COHORT): the demo shows a network that really learns in minutes,
which a randomly initialised one does only for conspicuous lesions.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from brainmets import rundir
from brainmets.config import Config, load_config, preset_overrides
from brainmets.data.labels import assign_splits
from brainmets.data.synth_settings import LESION_SETTINGS
from brainmets.io import atomic_write_csv

log = logging.getLogger(__name__)

# The CPU demo: the cpu-small preset under its own run name.
CPU_OVERRIDES = ["name=demo-cpu", *preset_overrides("cpu-small")]
# The specified configuration; from random weights the BatchNorm statistics are estimated first
# (without it frozen blocks normalise with mean 0 / variance 1).
GPU_OVERRIDES = ["name=demo-gpu", "train.bn_calibration_patients=48"]
# The CPU cohort's metastases are the conspicuous lesion setting of `brainmets synth --lesions`
# (brainmets.data.synth_settings), which a randomly initialised network learns in minutes.
# When it starts to find them varies with the seed (validation AUC passed 0.85 at epoch 2, 7
# and 10 for seeds 1, 0 and 2 of 12-epoch runs), hence 16 epochs.
CPU_COHORT = {"num_patients": 200, "slices": (12, 14), **LESION_SETTINGS["conspicuous"]}
GPU_COHORT = {**CPU_COHORT, "num_patients": 400, "slices": (24, 32)}


def demo_config(*, full: bool, epochs: int | None, device: str, seed: int) -> Config:
    overrides = list(GPU_OVERRIDES if full else CPU_OVERRIDES)
    overrides += [f"seed={seed}", f"train.device={device}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    return load_config(None, overrides)


def _demo_data(
    out: Path, cfg, cohort: dict, *, patients: int | None, seed: int, workers: int, progress: bool
):
    """synth -> index -> prepare: the cohort's labels with their splits, its index, its cache."""
    from brainmets.data.labels import read_labels
    from brainmets.data.prepare import prepare_cache
    from brainmets.data.series_index import index_dicom_root, write_index
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    synth = SynthConfig(**{**cohort, "num_patients": patients or cohort["num_patients"]}, seed=seed)
    labels_path = write_synthetic_cohort(out / "cohort", synth, workers=workers, progress=progress)
    labels = assign_splits(read_labels(labels_path), seed)
    manifest = out / "cohort" / "labels_split.csv"
    atomic_write_csv(manifest, labels)

    index = index_dicom_root(out / "cohort" / "dicom", workers=workers, progress=progress)
    write_index(index, out / "index")

    cache = out / "cache"
    result = prepare_cache(
        labels, cache, cfg.preprocess, series_index=index, workers=workers, progress=progress
    )
    if result.failed:
        raise RuntimeError(
            f"demo: {result.failed} synthetic patients failed to prepare; see {cache}/errors.csv"
        )

    return labels, index, cache


def run_demo(
    out: Path,
    *,
    patients: int | None = None,
    epochs: int | None = None,
    device: str = "auto",
    full: bool = False,
    seed: int = 0,
    folds: int | None = None,
    progress: bool = True,
) -> dict:
    from brainmets.backends import BackendSpec
    from brainmets.evaluate.evaluation import evaluate_run
    from brainmets.predict import predict
    from brainmets.train.cross_validation import train_folds
    from brainmets.train.trainer import train

    started = time.perf_counter()
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    full = full or gpu
    cohort = GPU_COHORT if full else CPU_COHORT
    cfg = demo_config(full=full, epochs=epochs, device=device, seed=seed)
    workers = max(1, (os.cpu_count() or 1) if gpu else torch.get_num_threads())
    print(f"brainmets demo: {'full specified' if full else 'small CPU'} configuration -> {out}")
    print(
        "No RadImageNet weights on this machine: training from random initialisation. "
        "Pass yours with --set model.pretrained=/path/to/ResNet50.pt in `brainmets train`."
    )

    labels, index, cache = _demo_data(out, cfg, cohort, patients=patients, seed=seed,
                                       workers=workers, progress=progress)  # fmt: skip
    cfg.data.cache = str(cache)
    run = out / "runs" / (cfg.name if not folds else f"{cfg.name}-{folds}-folds")
    if run.exists():
        # The demo's own run folder from an earlier `brainmets demo --out` here: the cohort and
        # cache above were reused (same bytes), the training starts afresh.
        print(f"replacing the earlier demo run in {run}")
        shutil.rmtree(run)
    if folds:
        cfg.data.folds = folds
        print(train_folds(cfg, run, progress=progress).ensemble.text)
    else:
        train(cfg, run, progress=progress)

    test_dirs = index.series[
        index.series["chosen"]
        & index.series["patient_id"].isin(labels.loc[labels["split"] == "test", "patient_id"])
    ]["directory"]
    predictions = predict(
        run,
        sorted(set(test_dirs)),
        out_csv=out / rundir.PREDICTIONS,
        heatmaps_dir=run / rundir.HEATMAPS,
        top_k=1,
        backend=BackendSpec(device=device),
        progress=progress,
    )
    # Evaluation last: it writes report.html, which then already holds the heatmap gallery.
    # With the cohort's lesion truth: does the model look at the metastases (docs/evaluation.md)?
    summary = evaluate_run(
        run,
        cache,
        split="test",
        backend=BackendSpec(device=device),
        lesions=out / "cohort" / "lesions.csv",
        series_index=out / "index",
        progress=progress,
    )
    report = run / rundir.REPORT
    minutes = (time.perf_counter() - started) / 60
    auc = summary.metrics["metrics"]["auc"]
    print(summary.text)
    print(f"\ndemo finished in {minutes:.1f} min; held-out AUC {auc:.3f}")
    if not full:
        print(
            "note: the CPU configuration trains a randomly initialised ResNet-18 for a few "
            "minutes; it shows the workflow, not what the specified, pretrained model reaches "
            "(README, 'The demo')."
        )
    print(f"  cohort       {out / 'cohort'}   (DICOM + labels_split.csv)")
    print(f"  cache        {cache}")
    what = (
        "fold-*/ (one run each), ensemble.json, oof_predictions.csv"
        if folds
        else "model.safetensors, metrics.csv, tensorboard/"
    )
    print(f"  run          {run}   ({what})")
    print(f"  evaluation   {summary.out_dir}")
    print(f"  predictions  {out / 'predictions.csv'} ({predictions.predicted} patients)")
    print(f"  report       {report}")
    return {"auc": auc, "minutes": minutes, "run": run, "report": report}
