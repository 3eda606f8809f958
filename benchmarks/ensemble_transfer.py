"""Does a K-fold ensemble with its out-of-fold threshold hold on held-out patients, where one run
with a threshold from its own validation patients does not?

The epoch-selection transfer study (``selection_transfer.py``) extended. Per generated cohort
(the CPU demo's configuration, ~100 patients split 60 / 20 / 20 by the manifest):

- ``single``: today's run, trained on the manifest's 60 train patients, its epoch and threshold
  chosen on its 20 validation patients;
- ``fold-0`` ... ``fold-4``: ``train --folds 5 --fold k`` on the 80 non-test patients, combined
  by ``brainmets.train.ensemble`` (OOF threshold, calibration, verdict).

Every run is an ordinary run folder written by the product's trainer. A recording subclass
also scores, after every epoch, the validation and the test patients with the weights and with
an exponential moving average of them (``brainmets.train.ema``, horizon ``--ema-epochs``),
which never feeds back into training: one trajectory answers for both. The 20 test patients
choose nothing.

    # record (resumable: run it again after a stop; two runs at a time, one thread each)
    PYTHONPATH=src python benchmarks/ensemble_transfer.py record --out runs-ens \
        --cohorts demo:0 demo:1 demo:2 small_bright:0 small_bright:1
    # the table and the JSON
    PYTHONPATH=src python benchmarks/ensemble_transfer.py analyse --out runs-ens \
        --json benchmarks/results/ensemble_transfer.json
    # the recorded runs on 200 more held-out patients of each cohort's setting
    PYTHONPATH=src python benchmarks/ensemble_transfer.py analyse-extra --out runs-ens \
        --cohorts demo:0 small_bright:1 --json benchmarks/results/ensemble_transfer_again.json
    # the demo's cohort: demo --folds 5 against the single demo run of the same seed
    brainmets demo --folds 5 --out demo-folds && brainmets demo --out demo-single
    PYTHONPATH=src python benchmarks/ensemble_transfer.py analyse-demo --demo demo-folds \
        --single demo-single/runs/demo-cpu --json benchmarks/results/ensemble_transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit

from brainmets import rundir
from brainmets.data.dataset import PatientDataset
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.train.ema import WeightAverage
from brainmets.train.selection import improves, replay
from brainmets.train.trainer import Trainer

# Lesion settings of the generated cohorts, as in selection_transfer.py.
SETTINGS = {
    "demo": {},
    "small_bright": {"lesion_diameter_mm": (13.0, 22.0), "lesion_hu": (85.0, 100.0)},
}
FOLDS = 5
DONE = "recorded.json"
EMA_STATE = "ema_state.pt"


class RecordingTrainer(Trainer):
    """The product's trainer, which also keeps an exponential moving average of the weights
    (never used by the run) and applies the run's own selection rule to it online: after every
    epoch the average scores the validation patients, and, when it improves on its best epoch
    so far (and at the last epoch), the test patients. The run folder is what the trainer alone
    writes; the average's tables lie beside it (``ema_*.csv``)."""

    def __init__(self, *args, ema_epochs: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.test_ids = self.splits["test"]
        self.test_set = PatientDataset(self.cache, self.test_ids, train=False)
        self.shadow = WeightAverage(self.model, ema_epochs, self.sampler.num_batches())
        self.ema_rows: list[dict] = []
        if self.state.epoch or self.state.global_step:  # resumed: the average as saved
            self.shadow.load_state_dict(torch.load(self.ckpt_dir / EMA_STATE, weights_only=True))
            rows = pd.read_csv(self.run_dir / "ema_metrics.csv")
            self.ema_rows = rows[rows["epoch"] < self.state.epoch].to_dict("records")

    def train_step(self, batch):
        out = super().train_step(batch)
        self.shadow.update(self.model)
        return out

    def _save_last(self) -> None:
        torch.save(self.shadow.state_dict(), self.ckpt_dir / EMA_STATE)
        super()._save_last()

    def _score(self, model, patients: str) -> tuple[dict, pd.DataFrame]:
        """validate() with ``model`` on the validation or the test patients."""
        held = self.model, self.val_set, self.val_store, self.splits
        self.model = model
        if patients == "test":
            self.val_set, self.val_store = self.test_set, None
            self.splits = {**self.splits, "val": self.test_ids}
        try:
            return super().validate()
        finally:
            self.model, self.val_set, self.val_store, self.splits = held

    def _end_epoch(self, epoch: int, seconds: float):
        row = super()._end_epoch(epoch, seconds)
        metrics, val = self._score(self.shadow.module, "val")
        ema_row = {"epoch": epoch, **metrics}
        best = next((r for r in self.ema_rows if r["epoch"] == self._ema_best_epoch()), None)
        self.ema_rows.append(ema_row)
        last = epoch == self.cfg.train.epochs - 1
        improved = improves(self.best_metric, ema_row, best)
        if improved or last:
            _, test = self._score(self.shadow.module, "test")
            for name, wanted in (("best", improved), ("last", last)):
                if wanted:
                    atomic_write_csv(self.run_dir / f"ema_val_{name}.csv", val.assign(epoch=epoch))
                    atomic_write_csv(
                        self.run_dir / f"ema_test_{name}.csv", test.assign(epoch=epoch)
                    )
        atomic_write_csv(self.run_dir / "ema_metrics.csv", pd.DataFrame(self.ema_rows))
        return row

    def _ema_best_epoch(self) -> int | None:
        if not self.ema_rows:
            return None
        return replay(self.best_metric, self.ema_rows)[0]


# --------------------------------------------------------------------------- record


def prepare_cohort(
    folder: Path, setting: str, seed: int, patients: int, *, all_held_out: bool = False
) -> Path:
    """The cohort's cache (made once; the DICOM is removed after); with ``all_held_out`` every
    patient is a test patient (a further held-out cohort of the same setting)."""
    from brainmets.data.labels import assign_splits, read_labels
    from brainmets.data.prepare import prepare_cache
    from brainmets.data.series_index import index_dicom_root
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
    from brainmets.demo import CPU_COHORT, demo_config

    cache = folder / "cache"
    if (folder / "cohort.json").is_file():
        return cache
    shutil.rmtree(folder, ignore_errors=True)
    cohort = {**CPU_COHORT, **SETTINGS[setting], "num_patients": patients}
    preprocess = demo_config(full=False, epochs=None, device="cpu", seed=seed).preprocess
    labels_path = write_synthetic_cohort(
        folder / "cohort", SynthConfig(**cohort, seed=seed), workers=1, progress=False
    )
    labels = assign_splits(read_labels(labels_path), seed)
    if all_held_out:
        labels = labels.assign(split="test")
    index = index_dicom_root(folder / "cohort" / "dicom", workers=1, progress=False)
    result = prepare_cache(labels, cache, preprocess, series_index=index, workers=1, progress=False)
    if result.failed:
        raise RuntimeError(f"{result.failed} patients failed to prepare in {folder}")
    shutil.rmtree(folder / "cohort")
    info = {k: list(v) if isinstance(v, tuple) else v for k, v in cohort.items()}
    atomic_write_text(folder / "cohort.json", json.dumps({"seed": seed, **info}) + "\n")
    return cache


def train_one(
    run: Path, cache: Path, seed: int, fold: int | None, ema_epochs: float, epochs: int | None
) -> None:
    """One recorded run: started, or resumed where it stopped."""
    from brainmets.demo import demo_config

    torch.set_num_threads(1)
    if (run / DONE).is_file():
        return
    cfg = demo_config(full=False, epochs=epochs, device="cpu", seed=seed)
    cfg.data.cache = str(cache)
    if fold is not None:
        cfg.data.folds, cfg.data.fold = FOLDS, fold
    resume = rundir.resume_state(run).is_file()
    if not resume:
        shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    trainer = RecordingTrainer(cfg, run, resume=resume, progress=False, ema_epochs=ema_epochs)
    try:
        trainer.fit()
    finally:
        trainer.close()
    info = {"seconds": round(time.perf_counter() - started, 1), "resumed": resume}
    atomic_write_text(run / DONE, json.dumps(info) + "\n")


def record(
    out: Path, cohorts: list[str], patients: int, ema_epochs: float, jobs: int, epochs: int | None
) -> None:
    """Every cohort's runs, ``jobs`` processes at a time, each on one thread."""
    tasks = []
    for spec in cohorts:
        setting, _, seed = spec.partition(":")
        folder = out / f"{setting}-seed{seed}"
        cache = prepare_cohort(folder, setting, int(seed), patients)
        tasks.append((folder / "single", cache, seed, None))
        tasks += [(folder / "cv" / f"fold-{k}", cache, seed, k) for k in range(FOLDS)]
    pending = [t for t in tasks if not (t[0] / DONE).is_file()]
    running: list[tuple[subprocess.Popen, Path]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < jobs:
            run, cache, seed, fold = pending.pop(0)
            run.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "train-one", "--run", str(run),
                       "--cache", str(cache), "--seed", str(seed), "--ema-epochs",
                       str(ema_epochs)] + ([] if fold is None else ["--fold", str(fold)]) + (
                       [] if epochs is None else ["--epochs", str(epochs)])  # fmt: skip
            log = open(run.parent / f"{run.name}.log", "a")  # noqa: SIM115 - closed with the run
            running.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), run))
            print(f"{time.strftime('%H:%M:%S')} started {run}", flush=True)
        time.sleep(5)
        for process, run in list(running):
            if process.poll() is not None:
                running.remove((process, run))
                state = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(f"{time.strftime('%H:%M:%S')} {state} {run}", flush=True)


# --------------------------------------------------------------------------- analyse

METHODS = {
    "single": "today's run: its epoch and threshold from its 20 validation patients",
    "single_ema": "the same run's weight average, selected and thresholded the same way",
    "ensemble": "all K = 5 fold models, mean patient logit, OOF threshold (the product)",
    "ensemble_ranking_folds": "the fold models that rank their own fold (--members ranking), "
    "mean patient logit, the OOF threshold of their folds",
    "ensemble_mean_probability": "all fold models, mean probability, the ensemble's threshold",
    "ensemble_ema": "all folds' weight averages, mean patient logit, OOF threshold",
}


def _rates(labels, logits, threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    called = expit(np.asarray(logits, dtype=np.float64)) >= threshold
    return {
        "auc": float(roc_auc_score(y, logits)) if len(set(y)) == 2 else float("nan"),
        "sensitivity": float(called[y == 1].mean()),
        "specificity": float((~called[y == 0]).mean()),
    }


def _row(cohort: str, method: str, threshold: float, estimate: pd.DataFrame, held: pd.DataFrame):
    """One cohort and method: held-out figures at ``threshold``, and the estimate the method
    had of them (its validation or out-of-fold patients at the same threshold)."""
    test = _rates(held["label"], held["logit"], threshold)
    guess = _rates(estimate["label"], estimate["logit"], threshold)
    return {
        "cohort": cohort,
        "method": method,
        "threshold": threshold,
        "estimate_patients": len(estimate),
        **{f"estimate_{k}": v for k, v in guess.items()},
        **{f"test_{k}": v for k, v in test.items()},
        "sens_gap": test["sensitivity"] - guess["sensitivity"],
        "spec_gap": test["specificity"] - guess["specificity"],
    }


def _ema_tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The weight average's validation and test predictions at the epoch the run's rule chose
    for it (checked against its recorded history)."""
    val = pd.read_csv(run / "ema_val_best.csv", dtype={"patient_id": str})
    test = pd.read_csv(run / "ema_test_best.csv", dtype={"patient_id": str})
    rule = json.loads((run / "model.json").read_text())["best_metric"]
    epoch, _ = replay(rule, pd.read_csv(run / "ema_metrics.csv").to_dict("records"))
    if not int(val["epoch"].iloc[0]) == int(test["epoch"].iloc[0]) == epoch:
        raise RuntimeError(f"{run}: the stored weight-average tables are not of epoch {epoch}")
    return val, test


def analyse_cohort(folder: Path) -> list[dict]:
    """A recorded cohort: the single run, its weight average, the ensembles of its folds."""
    from brainmets.metrics import best_f1_threshold
    from brainmets.model.ensemble import combine_numpy
    from brainmets.train.ensemble import oof_choices

    name, cv = folder.name, folder / "cv"
    rows, held_out = _compared(name, folder / "cache", folder / "single", cv, folder)
    ema_val, ema_test = _ema_tables(folder / "single")
    threshold = best_f1_threshold(ema_val["label"], expit(ema_val["logit"]))[0]
    rows.insert(1, _row(name, "single_ema", threshold, ema_val, ema_test))
    tables = [_ema_tables(cv / f"fold-{k}") for k in range(FOLDS)]
    ema_oof = pd.concat([v for v, _ in tables], ignore_index=True)
    choice = oof_choices(ema_oof["label"], ema_oof["logit"])
    test_ids = held_out["patient_id"].tolist()
    ema_logits = np.stack([t.set_index("patient_id").loc[test_ids, "logit"] for _, t in tables], 1)
    ema_held = pd.DataFrame(
        {"label": held_out["label"], "logit": combine_numpy(ema_logits, "mean_logit")}
    )
    rows.append(_row(name, "ensemble_ema", choice.threshold, ema_oof, ema_held))
    return rows


def _compared(
    name: str, cache_dir: Path, single: Path, cv: Path, scratch: Path
) -> tuple[list[dict], pd.DataFrame]:
    """Rows of the single run, the product's ensemble of ``cv`` (every fold), the ensemble of
    the folds that rank (into ``scratch/ensemble-ranking``) and the mean probability; and the
    held-out patients (id and label)."""
    from brainmets.backends import BackendSpec, load_backend
    from brainmets.data.cache import PatientCache
    from brainmets.inference import score_cache
    from brainmets.model.ensemble import combine_numpy
    from brainmets.train.ensemble import build_ensemble
    from brainmets.train.folds import fold_runs

    torch.set_num_threads(1)
    cache = PatientCache(cache_dir)
    test_ids = cache.index.loc[cache.index["split"] == "test", "patient_id"].tolist()
    cpu = BackendSpec(device="cpu")

    def held_out(run: Path) -> pd.DataFrame:
        return score_cache(load_backend(run, cpu), cache, test_ids, progress=False)

    meta = json.loads((single / "model.json").read_text())
    val = pd.read_csv(single / rundir.VAL_PREDICTIONS, dtype={"patient_id": str})
    rows = [_row(name, "single", float(meta["threshold"]), val, held_out(single))]
    members = [held_out(run) for run in fold_runs(cv)]  # by fold number
    logits = np.stack([m["logit"].to_numpy() for m in members], axis=1)
    labels = members[0]["label"]
    for method, rule, out in (("ensemble", "all", cv), ("ensemble_ranking_folds", "ranking",
                              scratch / "ensemble-ranking")):  # fmt: skip
        ensemble = build_ensemble([cv], out, members=rule)  # the product's ensemble
        product = held_out(out)
        kept = [m["fold"] for m in ensemble.meta["members"]]
        if not np.allclose(
            product["logit"], combine_numpy(logits[:, kept], "mean_logit"), atol=1e-4
        ):
            raise RuntimeError(f"{out}: the ensemble's scores are not its members' mean")
        rows.append(_row(name, method, ensemble.meta["threshold"], ensemble.oof, product)
                    | {"members": kept})  # fmt: skip
        if rule == "all":
            mean_p = pd.DataFrame(
                {"label": labels, "logit": combine_numpy(logits[:, kept], "mean_probability")}
            )
            rows.append(_row(name, "ensemble_mean_probability", ensemble.meta["threshold"],
                             ensemble.oof, mean_p))  # fmt: skip
    return rows, members[0][["patient_id", "label"]]


def analyse_demo(demo: Path, single: Path, json_path: Path | None) -> list[dict]:
    """``brainmets demo --folds 5 --out DEMO`` against the single run of ``brainmets demo`` at
    the same seed (``SINGLE``: its run folder), on the demo's held-out patients; rows added to
    ``json_path`` (replacing the demo's earlier ones)."""
    (cv,) = [p for p in (demo / "runs").iterdir() if (p / rundir.ENSEMBLE).is_file()]
    rows, _ = _compared(f"demo-{cv.name}", demo / "cache", single, cv, demo)
    print(markdown(pd.DataFrame(rows)))
    _add_rows(json_path, rows)
    return rows


def _add_rows(json_path: Path | None, rows: list[dict]) -> None:
    """``rows`` into ``json_path``, in place of any earlier rows of the same cohorts."""
    if json_path is None:
        return
    cohorts = {r["cohort"] for r in rows}
    kept = json.loads(json_path.read_text()) if json_path.is_file() else []
    kept = [r for r in kept if r["cohort"] not in cohorts]
    json_path.write_text(json.dumps(kept + rows, indent=1) + "\n")


def analyse_extra(
    out: Path, cohorts: list[str], patients: int, seed_offset: int, json_path: Path | None
) -> list[dict]:
    """The recorded runs of ``cohorts`` scored on a further held-out cohort of their setting
    (``patients`` new patients generated with seed ``seed + seed_offset``, all held out), with
    the thresholds and estimates they chose on their own validation or out-of-fold patients:
    the held-out figures from more than 20 patients. Rows added to ``json_path``."""
    rows = []
    for spec in cohorts:
        setting, _, seed = spec.partition(":")
        folder = out / f"{setting}-seed{seed}"
        extra_seed = int(seed) + seed_offset
        extra = folder / f"held-out-seed{extra_seed}"
        cache = prepare_cohort(extra, setting, extra_seed, patients, all_held_out=True)
        name = f"{folder.name}, {patients} more held out (seed {extra_seed})"
        part, _ = _compared(name, cache, folder / "single", folder / "cv", extra)
        rows += part
    print(markdown(pd.DataFrame(rows)))
    _add_rows(json_path, rows)
    return rows


def analyse(out: Path, json_path: Path | None) -> list[dict]:
    rows = []
    for folder in sorted(p for p in out.iterdir() if (p / "cohort.json").is_file()):
        runs = [folder / "single", *(folder / "cv" / f"fold-{k}" for k in range(FOLDS))]
        if all((run / DONE).is_file() for run in runs):
            rows += analyse_cohort(folder)
        else:
            print(f"{folder.name}: not every run is recorded yet; left out", file=sys.stderr)
    frame = pd.DataFrame(rows)
    print(markdown(frame))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def markdown(frame: pd.DataFrame) -> str:
    """Per cohort and method: held-out AUC, sensitivity / specificity at the method's
    threshold, and the gap to its own estimate; then the summary the goal is stated in."""
    lines = [
        "| cohort | method | threshold | held-out AUC | held-out sens / spec | estimate sens / "
        "spec (patients) | gap sens / spec |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in frame.itertuples():
        lines.append(
            f"| {r.cohort} | `{r.method}` | {r.threshold:.2f} | {r.test_auc:.3f} | "
            f"{r.test_sensitivity:.2f} / {r.test_specificity:.2f} | {r.estimate_sensitivity:.2f} "
            f"/ {r.estimate_specificity:.2f} ({r.estimate_patients}) | {r.sens_gap:+.2f} / "
            f"{r.spec_gap:+.2f} |"
        )
    lines += ["", "| method | mean \\|gap\\| | cohorts with held-out AUC >= 0.90 | of them, sens and "
              "spec >= 0.75 | mean held-out sens / spec |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for method, part in frame.groupby("method", sort=False):
        gap = ((part["sens_gap"].abs() + part["spec_gap"].abs()) / 2).mean()
        learned = part[part["test_auc"] >= 0.90]
        held = int(((learned["test_sensitivity"] >= 0.75)
                    & (learned["test_specificity"] >= 0.75)).sum())  # fmt: skip
        lines.append(
            f"| `{method}` | {gap:.3f} | {len(learned)} / {len(part)} | {held} / {len(learned)} | "
            f"{part['test_sensitivity'].mean():.2f} / {part['test_specificity'].mean():.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["record", "train-one", "analyse", "analyse-demo", "analyse-extra"]
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cohorts", nargs="+", default=["demo:0", "demo:1", "demo:2",
                        "small_bright:0", "small_bright:1"])  # fmt: skip
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--ema-epochs", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--run", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--fold", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--demo", type=Path, help="analyse-demo: the demo --folds 5 folder")
    parser.add_argument("--single", type=Path, help="analyse-demo: the single demo's run")
    parser.add_argument("--extra-patients", type=int, default=200, help="analyse-extra")
    parser.add_argument("--extra-seed-offset", type=int, default=1000, help="analyse-extra")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.cohorts, args.patients, args.ema_epochs, args.jobs, args.epochs)
    elif args.command == "train-one":
        train_one(args.run, args.cache, args.seed, args.fold, args.ema_epochs, args.epochs)
    elif args.command == "analyse-extra":
        analyse_extra(
            args.out, args.cohorts, args.extra_patients, args.extra_seed_offset, args.json
        )
    elif args.command == "analyse-demo":
        analyse_demo(args.demo, args.single, args.json)
    else:
        analyse(args.out, args.json)


if __name__ == "__main__":
    main()
