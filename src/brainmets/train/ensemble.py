"""Fold runs combined into an ensemble, with its choices made on out-of-fold predictions.

Each fold run validated its selected epoch on its own fold (``val_predictions.csv``): together
the folds score every non-test patient once, each by a model that never trained on it. What a
single run chooses on its 20-80 validation patients, the ensemble chooses on all of them:

- the operating threshold: the specified F1 sweep (0.05-0.95) on the plain sigmoid;
- the reported probability: Platt-calibrated when the out-of-fold predictions rank and have ten
  patients of each class, as a single run's (``brainmets.train.scale``);
- the ranking verdict and the separation band.

Every fold is a member by default, as in nnU-Net. ``members="ranking"`` leaves out a fold model
whose own validation fold says it does not rank (its ranking verdict, as a single run's), unless
none ranks; the patients of a left-out fold then choose nothing, and the report still shows the
fold and why. In the transfer study (docs/benchmarks.md, "Does the operating point transfer?")
the rule narrowed the gap between the out-of-fold estimate and held-out patients on the cohorts
it was devised on, but not on the two trained after it was fixed: an option, not the default.

The ensemble scores a patient with every member and averages (``brainmets.model.ensemble``),
so its threshold is one chosen on scores of the same kind: a member's patient logit, which
the average of like members keeps on the same scale.

Members are checked before anything is written: all fold runs of one cross-validation (the
same fold assignment, recorded in each), every fold once, each finished, each validated on
exactly its fold's patients, all with the same preprocessing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from scipy.special import expit

from brainmets import rundir
from brainmets.backends.ensemble import FORMAT, FORMAT_VERSION
from brainmets.io import atomic_write_csv, atomic_write_text
from brainmets.metrics import best_f1_threshold, patient_metrics, separation_band
from brainmets.model.ensemble import COMBINE
from brainmets.model.identity import checked_model_id, ensemble_id
from brainmets.model.probability import Calibration, logits_of
from brainmets.ranking import DOES_NOT_RANK, RankingVerdict
from brainmets.train.folds import assignment_digest, fold_runs, read_assignment
from brainmets.train.scale import epoch_scale

log = logging.getLogger(__name__)

#: The average the ensemble takes unless told otherwise (docs/benchmarks.md, Ensembles).
DEFAULT_COMBINE = "mean_logit"

#: Which fold models an ensemble keeps: every one, or those that rank their own fold.
MEMBER_RULES = ("all", "ranking")
DEFAULT_MEMBERS = "all"

OOF_COLUMNS = ["patient_id", "label", "fold", "model", "probability", "logit"]


@dataclass
class Member:
    """One fold run, as the ensemble reads it."""

    run: Path
    sidecar: dict[str, Any]
    folds: int
    fold: int
    seed: int
    epochs: tuple[int, int]  # (trained, planned)
    calibration: str  # train.calibration
    assignment: pd.DataFrame
    validation: pd.DataFrame  # patient_id, label, probability, logit

    @property
    def model_id(self) -> str:
        return str(self.sidecar["model_id"])

    @cached_property
    def ranking(self) -> RankingVerdict | None:
        return RankingVerdict.from_sidecar(self.sidecar)


@dataclass
class OofChoices:
    """What the ensemble chooses on its out-of-fold predictions."""

    threshold: float
    metrics: dict[str, float]  # at the threshold; class means and separation on the reported scale
    calibration: Calibration
    ranking: RankingVerdict


@dataclass
class EnsembleSummary:
    folder: Path
    meta: dict[str, Any]
    oof: pd.DataFrame

    @property
    def ranking(self) -> RankingVerdict:
        return RankingVerdict.from_sidecar(self.meta)

    @property
    def text(self) -> str:
        m, oof = self.meta, self.meta["oof"]
        left_out = m.get("left_out", [])
        folds = len(m["members"]) + len(left_out)
        kept = f"{len(m['members'])} of {folds} folds" if left_out else f"{folds} folds"
        lines = [
            f"ensemble {self.folder}: model {m['model_id']}, {kept}, "
            f"{m['combine'].replace('_', ' ')} of the members",
            f"  out-of-fold ({oof['patients']} patients, {oof['n_pos']} positive): AUC "
            f"{_fmt(oof['auc'])}, F1 {_fmt(oof['f1'])}, sensitivity {_fmt(oof['sensitivity'])}, "
            f"specificity {_fmt(oof['specificity'])} at threshold {oof['threshold']:.3f}, "
            f"separation {_fmt(oof['separation'])} ({oof['separation_band']})",
            f"  probabilities and thresholds: {Calibration.from_sidecar(m).describe()}",
        ]
        lines += [
            f"  fold {x['fold']} left out (its patients choose nothing): {x['reason']}"
            for x in left_out
        ]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- members


def read_member(run: Path) -> Member:
    """A fold run's model id, fold, assignment and validation predictions; a folder that is
    not a finished fold run is named with what is missing."""
    run = Path(run)
    sidecar_path = run / rundir.MODEL_SIDECAR
    if not sidecar_path.is_file():
        raise FileNotFoundError(f"{run}: no trained model ({rundir.MODEL_SIDECAR}) in this run")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["model_id"] = checked_model_id(sidecar, sidecar_path)
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    data, train = config.get("data", {}), config.get("train", {})
    if int(data.get("folds", 1)) < 2:
        raise ValueError(
            f"{run}: not a fold run (data.folds is {data.get('folds', 1)}); train folds with "
            "brainmets train --folds K"
        )
    validation = pd.read_csv(run / rundir.VAL_PREDICTIONS, dtype={"patient_id": str})
    if "logit" not in validation:  # runs from before the logit was recorded
        validation["logit"] = logits_of(validation["probability"])
    epochs_done = len(pd.read_csv(run / rundir.METRICS)) if (run / rundir.METRICS).is_file() else 0
    return Member(
        run=run,
        sidecar=sidecar,
        folds=int(data["folds"]),
        fold=int(data.get("fold", 0)),
        seed=int(config.get("seed", 0)),
        epochs=(epochs_done, int(train.get("epochs", 0))),
        calibration=str(train.get("calibration", "platt")),
        assignment=read_assignment(run / rundir.FOLDS),
        validation=validation,
    )


def _check_members(members: list[Member]) -> None:
    """One cross-validation, every fold once, each finished and validated on its fold."""
    first = members[0]
    digest = assignment_digest(first.assignment)
    for member in members:
        if member.folds != first.folds or assignment_digest(member.assignment) != digest:
            raise ValueError(
                f"{member.run} and {first.run} are folds of different cross-validations (their "
                f"{rundir.FOLDS} differ: another cache, seed or number of folds); train every "
                "fold from the same cache with the same config"
            )
        done, planned = member.epochs
        if done < planned:
            raise ValueError(
                f"{member.run}: trained {done} of its {planned} epochs; finish it first "
                f"(brainmets train --resume {member.run})"
            )
        for key in ("preprocess", "normalization"):
            if member.sidecar.get(key) != first.sidecar.get(key):
                raise ValueError(f"{member.run}: its {key} differs from {first.run}'s")
        expected = set(first.assignment.loc[first.assignment["fold"] == member.fold, "patient_id"])
        if set(member.validation["patient_id"]) != expected:
            raise ValueError(
                f"{member.run}: its validation patients ({rundir.VAL_PREDICTIONS}) are not the "
                f"patients of its fold {member.fold} in {rundir.FOLDS}"
            )
    folds = sorted(m.fold for m in members)
    if folds != list(range(first.folds)):
        missing = sorted(set(range(first.folds)) - set(folds))
        twice = sorted({f for f in folds if folds.count(f) > 1})
        what = [f"fold {f} is missing (brainmets train ... --fold {f})" for f in missing]
        what += [f"fold {f} is given twice" for f in twice]
        raise ValueError(f"the {first.folds} folds are not all there once: {'; '.join(what)}")


def out_of_fold(members: list[Member]) -> pd.DataFrame:
    """The kept folds' validation patients, each scored by its fold's model: the ensemble's
    evidence (``_check_members`` has checked the folds)."""
    parts = [
        m.validation.assign(fold=m.fold, model=m.model_id)[OOF_COLUMNS]
        for m in sorted(members, key=lambda m: m.fold)
    ]
    oof = pd.concat(parts, ignore_index=True)
    label_of = dict(zip(members[0].assignment["patient_id"], members[0].assignment["label"],
                        strict=True))  # fmt: skip
    wrong = [p for p, y in zip(oof["patient_id"], oof["label"], strict=True) if label_of[p] != y]
    if wrong:
        raise ValueError(f"labels differ between the fold runs and {rundir.FOLDS}: {wrong[:5]}")
    return oof


def oof_choices(labels, logits, *, seed: int = 0, method: str = "platt") -> OofChoices:
    """Threshold (F1 sweep on the plain sigmoid), reported scale and ranking verdict of
    out-of-fold patient logits, by the rule a single run's validation follows (``method``:
    ``train.calibration``)."""
    logits = pd.Series(logits, dtype=float).to_numpy()
    plain = expit(logits)
    threshold, _ = best_f1_threshold(labels, plain)
    predictions = pd.DataFrame({"label": labels, "probability": plain, "logit": logits})
    scale = epoch_scale(predictions, method=method, seed=seed)
    metrics = patient_metrics(labels, plain, threshold)
    # The threshold, class means and separation as shown: on the reported scale.
    metrics.update(scale.row_values(predictions, threshold))
    return OofChoices(
        threshold=float(threshold),
        metrics=metrics,
        calibration=scale.calibration,
        ranking=scale.ranking,
    )


# --------------------------------------------------------------------------- the ensemble


def build_ensemble(
    runs: list[Path],
    out: Path,
    *,
    combine: str = DEFAULT_COMBINE,
    members: str = DEFAULT_MEMBERS,
) -> EnsembleSummary:
    """Combine fold runs (or the folds of cross-validation folders) into ``out``: write
    ``ensemble.json``, ``oof_predictions.csv`` and ``folds.csv`` there. ``members``: keep
    ``all`` fold models or those that rank their own fold (``ranking``)."""
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r} is not supported; choose one of {COMBINE}")
    if members not in MEMBER_RULES:
        raise ValueError(f"members={members!r} is not supported; choose one of {MEMBER_RULES}")
    folds = [read_member(run) for run in expand_runs(runs)]
    _check_members(folds)
    kept, left_out = choose_members(folds, members)
    oof = out_of_fold(kept)
    labels = oof["label"].to_numpy()
    choices = oof_choices(
        labels, oof["logit"].to_numpy(), seed=folds[0].seed, method=folds[0].calibration
    )
    oof["probability"] = choices.calibration.probability(oof["logit"].to_numpy())
    out = Path(out)
    meta = _ensemble_meta(kept, left_out, out, combine, choices)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / rundir.OOF_PREDICTIONS, oof)
    atomic_write_csv(out / rundir.FOLDS, folds[0].assignment)
    atomic_write_text(out / rundir.ENSEMBLE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return EnsembleSummary(out, meta, oof)


def choose_members(folds: list[Member], rule: str) -> tuple[list[Member], list[Member]]:
    """(kept, left out): under ``ranking`` every fold but those whose own verdict says they do
    not rank (an undetermined verdict is kept), or every fold when none ranks (the ensemble's
    verdict then says so); under ``all`` every fold."""
    for member in folds:
        if member.ranking is not None and not member.ranking.ranks:
            log.warning("fold %d (%s): %s", member.fold, member.run, member.ranking.describe())
    not_ranking = [m for m in folds if m.ranking is not None and m.ranking.verdict == DOES_NOT_RANK]
    if rule == "all" or not not_ranking:
        return folds, []
    if len(not_ranking) == len(folds):
        log.warning("no fold model ranks its own fold: the ensemble keeps all %d", len(folds))
        return folds, []
    for member in not_ranking:
        log.warning("fold %d is left out of the ensemble (--members ranking)", member.fold)
    left_out = {m.fold for m in not_ranking}
    return [m for m in folds if m.fold not in left_out], not_ranking


def expand_runs(runs: list[Path]) -> list[Path]:
    """Fold runs as given, a cross-validation folder as its ``fold-*`` runs."""
    expanded = []
    for run in runs:
        run = Path(run)
        folds = [] if (run / rundir.MODEL_SIDECAR).is_file() else fold_runs(run)
        expanded += folds or [run]
    if not expanded:
        raise ValueError("no fold runs given")
    return expanded


def _ensemble_meta(
    members: list[Member], left_out: list[Member], out: Path, combine: str, choices: OofChoices
) -> dict[str, Any]:
    first = members[0]
    ranking = choices.ranking.to_json()
    m = choices.metrics
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "members": [
            {
                **_member_record(member, out),
                "epoch": member.sidecar.get("epoch"),
                "threshold": member.sidecar.get("threshold"),
            }
            for member in sorted(members, key=lambda m: m.fold)
        ],
        "left_out": [
            {**_member_record(member, out), "reason": member.ranking.describe()}
            for member in sorted(left_out, key=lambda m: m.fold)
        ],
        "combine": combine,
        "threshold": choices.threshold,
        "calibration": choices.calibration.to_json(),
        "ranking": ranking,
        "oof": {
            "patients": int(m["n"]),
            "n_pos": int(m["n_pos"]),
            "threshold": float(m["threshold"]),  # on the reported scale
            "sigmoid_threshold": choices.threshold,
            **{
                k: _finite(m[k])
                for k in (
                    "auc",
                    "f1",
                    "sensitivity",
                    "specificity",
                    "mean_pos",
                    "mean_neg",
                    "separation",
                )
            },  # fmt: skip
            "separation_band": separation_band(m["separation"]),
        },
        "cross_validation": {
            "folds": first.folds,
            "seed": first.seed,
            "assignment": assignment_digest(first.assignment),
        },
        "preprocess": first.sidecar["preprocess"],
        "normalization": first.sidecar.get("normalization", "zscore"),
        "versions": rundir.versions(),
    }
    meta["model_id"] = ensemble_id(meta)
    return meta


def _member_record(member: Member, out: Path) -> dict[str, Any]:
    """Where a fold run lies (relative to the ensemble), its model and its fold."""
    run = os.path.relpath(member.run.resolve(), out.resolve())
    return {"run": run, "model_id": member.model_id, "fold": member.fold}


def _finite(value: float) -> float | None:
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None
