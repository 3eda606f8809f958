"""Does the epoch and threshold chosen on validation hold on held-out patients?

One training run per generated cohort records every epoch's validation AND test predictions;
every selection rule (``brainmets.train.selection``) is then applied offline to the same runs,
so the rules are compared on identical training trajectories.

    # record (one run per seed; the demo's CPU configuration and cohort unless told otherwise)
    PYTHONPATH=src python benchmarks/selection_transfer.py record --out runs-sel --seeds 0 1 2 3 4
    PYTHONPATH=src python benchmarks/selection_transfer.py record --out runs-sel --seeds 0 1 2 \
        --setting small_bright
    # a candidate CPU configuration: the demo's with some keys changed
    PYTHONPATH=src python benchmarks/selection_transfer.py record --out runs-cosine --seeds 0 \
        --set train.lr_warmup_epochs=1 --set train.lr_schedule=cosine
    # compare the rules on every recorded run: a markdown table and a JSON file
    PYTHONPATH=src python benchmarks/selection_transfer.py analyse --out runs-sel \
        --json benchmarks/results/selection_transfer.json
    # add runs recorded since to an earlier analysis (its rows for other runs are kept)
    PYTHONPATH=src python benchmarks/selection_transfer.py analyse --out runs-more \
        --merge benchmarks/results/selection_transfer.json \
        --json benchmarks/results/selection_transfer.json

For a rule, "validation" is sensitivity / specificity of the chosen epoch's validation patients
at the chosen threshold, "held-out" the same on the test patients; the gap is held-out minus
validation. The held-out AUC of the last epoch says whether the run learned at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from brainmets.data.dataset import PatientDataset
from brainmets.io import atomic_write_csv
from brainmets.train.selection import RULES, replay
from brainmets.train.trainer import Trainer

# Lesion settings of the generated cohorts; "demo" is the CPU demo's own cohort.
SETTINGS = {
    "demo": {},
    # Smaller but brighter metastases than the demo's, a setting the demo does not use.
    "small_bright": {"lesion_diameter_mm": (13.0, 22.0), "lesion_hu": (85.0, 100.0)},
}


class RecordingTrainer(Trainer):
    """A trainer that also scores the test patients after every epoch (not used for any
    decision) and keeps both prediction tables."""

    def __init__(self, *args, records: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records_path = records
        self.records: list[pd.DataFrame] = []
        self._last_val: pd.DataFrame | None = None
        self.test_ids = self.splits["test"]
        self.test_set = PatientDataset(self.cache, self.test_ids, train=False)

    def validate(self):
        metrics, predictions = super().validate()
        self._last_val = predictions
        return metrics, predictions

    def _end_epoch(self, epoch: int, seconds: float):
        row = super()._end_epoch(epoch, seconds)
        val = self._last_val
        held = self.val_set, self.val_store, self.splits
        self.val_set, self.val_store = self.test_set, None
        self.splits = {**self.splits, "val": self.test_ids}
        try:
            _, test = super().validate()
        finally:
            self.val_set, self.val_store, self.splits = held
        for split, table in (("val", val), ("test", test)):
            self.records.append(table.assign(epoch=epoch, split=split))
        # Every epoch, so that a run stopped early still leaves its trajectory.
        atomic_write_csv(self.records_path, pd.concat(self.records, ignore_index=True))
        return row


def record(
    out: Path,
    seed: int,
    setting: str,
    epochs: int | None,
    patients: int | None = None,
    size: int | None = None,
    overrides: list[str] | None = None,
) -> Path:
    from brainmets.config import load_config
    from brainmets.data.labels import read_labels
    from brainmets.data.prepare import prepare_cache
    from brainmets.data.series_index import index_dicom_root
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
    from brainmets.demo import CPU_COHORT, CPU_OVERRIDES, assign_splits, demo_config

    folder = out / f"{setting}-seed{seed}"
    cohort = {**CPU_COHORT, **SETTINGS[setting]}
    if patients is not None:
        cohort["num_patients"] = patients
    cfg = demo_config(full=False, epochs=epochs, device="cpu", seed=seed)
    if overrides:  # a candidate configuration: the demo's with these keys changed
        cfg = load_config(None, [*CPU_OVERRIDES, f"seed={seed}", "train.device=cpu", *overrides])
        if epochs is not None:
            cfg.train.epochs = epochs
    if size is not None:
        cfg.preprocess.size = size
    workers = torch.get_num_threads()
    started = time.perf_counter()
    labels_path = write_synthetic_cohort(
        folder / "cohort", SynthConfig(**cohort, seed=seed), workers=workers
    )
    labels = assign_splits(read_labels(labels_path), seed)
    index = index_dicom_root(folder / "cohort" / "dicom", workers=workers)
    result = prepare_cache(
        labels, folder / "cache", cfg.preprocess, series_index=index, workers=workers
    )
    if result.failed:
        raise RuntimeError(f"{result.failed} patients failed to prepare in {folder}")
    shutil.rmtree(folder / "cohort")  # the DICOM is not needed again; the cache is
    cfg.data.cache = str(folder / "cache")
    run = folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    prepared = time.perf_counter()
    trainer = RecordingTrainer(cfg, run, progress=False, records=folder / "epochs.csv")
    try:
        trainer.fit()
    finally:
        trainer.close()
    trained = time.perf_counter()
    info = {
        "seed": seed,
        "setting": setting,
        "cohort": {k: list(v) if isinstance(v, tuple) else v for k, v in cohort.items()},
        "prepare_seconds": round(prepared - started, 1),
        "train_seconds": round(trained - prepared, 1),
        "threads": torch.get_num_threads(),
        "size": cfg.preprocess.size,
        "epochs": cfg.train.epochs,
    }
    (folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return folder


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs)) if len(set(labels)) == 2 else float("nan")


def _rates(table: pd.DataFrame, threshold: float) -> tuple[float, float]:
    y = table["label"].to_numpy()
    hit = table["probability"].to_numpy() >= threshold
    return float(hit[y == 1].mean()), float((~hit[y == 0]).mean())


def analyse(out: Path, json_path: Path | None, merge: Path | None = None) -> list[dict]:
    rows = []
    for folder in sorted(p for p in out.iterdir() if (p / "info.json").is_file()):
        info = json.loads((folder / "info.json").read_text())
        table = pd.read_csv(folder / "epochs.csv", dtype={"patient_id": str})
        val = {e: t for e, t in table[table["split"] == "val"].groupby("epoch")}
        test = {e: t for e, t in table[table["split"] == "test"].groupby("epoch")}
        last = max(test)
        history = pd.read_csv(folder / "run" / "metrics.csv").to_dict("records")
        for rule in RULES:
            epoch, threshold = replay(rule, history, val)
            v_sens, v_spec = _rates(val[epoch], threshold)
            t_sens, t_spec = _rates(test[epoch], threshold)
            rows.append(
                {
                    "run": folder.name,
                    "setting": info["setting"],
                    "seed": info["seed"],
                    "rule": rule,
                    "epoch": int(epoch),
                    "threshold": float(threshold),
                    "val_sensitivity": v_sens,
                    "val_specificity": v_spec,
                    "test_sensitivity": t_sens,
                    "test_specificity": t_spec,
                    "test_auc": _auc(test[epoch]["label"].to_numpy(), test[epoch]["probability"]),
                    "last_epoch_test_auc": _auc(
                        test[last]["label"].to_numpy(), test[last]["probability"]
                    ),
                    "train_seconds": info["train_seconds"],
                }
            )
    if merge is not None:  # an earlier analysis: its rows for runs not recorded here stay
        here = {row["run"] for row in rows}
        earlier = [row for row in json.loads(merge.read_text()) if row["run"] not in here]
        rows = sorted(earlier + rows, key=lambda row: (row["setting"] != "demo", row["run"]))
    frame = pd.DataFrame(rows)
    print(markdown(frame))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def markdown(frame: pd.DataFrame) -> str:
    frame = frame.assign(
        sens_gap=frame["test_sensitivity"] - frame["val_sensitivity"],
        spec_gap=frame["test_specificity"] - frame["val_specificity"],
        worst=frame[["test_sensitivity", "test_specificity"]].min(axis=1),
    )
    lines = [
        "| rule | held-out sens (mean, min) | held-out spec (mean, min) | sens gap (mean, worst) "
        "| spec gap (mean, worst) | runs with held-out sens and spec >= 0.75 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule, part in frame.groupby("rule", sort=False):
        good = int(((part["test_sensitivity"] >= 0.75) & (part["test_specificity"] >= 0.75)).sum())
        lines.append(
            f"| `{rule}` | {part.test_sensitivity.mean():.2f}, {part.test_sensitivity.min():.2f} "
            f"| {part.test_specificity.mean():.2f}, {part.test_specificity.min():.2f} "
            f"| {part.sens_gap.mean():+.2f}, {part.sens_gap.min():+.2f} "
            f"| {part.spec_gap.mean():+.2f}, {part.spec_gap.min():+.2f} | {good} / {len(part)} |"
        )
    lines += ["", "| run | held-out AUC (last epoch) | training s | " + " | ".join(
        f"`{r}` epoch: sens/spec" for r in RULES) + " |"]  # fmt: skip
    lines.append("| --- | --- | --- |" + " --- |" * len(RULES))
    for run, part in frame.groupby("run", sort=False):
        cells = [
            f"{r.epoch}: {r.test_sensitivity:.2f}/{r.test_specificity:.2f}"
            for r in part.itertuples()
        ]
        first = part.iloc[0]
        lines.append(
            f"| {run} | {first.last_epoch_test_auc:.3f} | {first.train_seconds:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["record", "analyse"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="demo")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--patients", type=int, default=None, help="default: the demo's")
    parser.add_argument("--size", type=int, default=None, help="default: the demo's")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE over the demo's configuration"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--merge", type=Path, default=None, help="an earlier analyse --json to extend"
    )
    args = parser.parse_args()
    if args.command == "record":
        for seed in args.seeds:
            record(args.out, seed, args.setting, args.epochs, args.patients, args.size, args.set)
    else:
        analyse(args.out, args.json, args.merge)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
