"""The cross-validation section of an ensemble's report: per-fold and out-of-fold tables and
curves, from what the ensemble folder and its fold runs hold::

    CV/ensemble.json            members, OOF threshold, calibration, verdict
    CV/oof_predictions.csv      every fold's validation patients, by their fold's model
    CV/fold-k/model.json        the fold's selected epoch, its own threshold and verdict
    CV/fold-k/metrics.csv       the fold's learning curve

Per fold: its validation patients at its own threshold (what one run would have said), and at
the ensemble's out-of-fold threshold; the out-of-fold row pools them all. Curves: the ROC of
each fold's validation patients with the pooled out-of-fold ROC, and each fold's validation
AUC and loss by epoch. A fold whose files are missing is a row saying so.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from scipy.special import expit
from sklearn.metrics import roc_curve

from brainmets import rundir
from brainmets.metrics import patient_metrics
from brainmets.model.probability import Calibration
from brainmets.ranking import RankingVerdict


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if value != value else f"{value:.{digits}f}"


def _png(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{_esc(alt)}"><figcaption>{_esc(alt)}</figcaption></figure>'
    )


def _json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or not one."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fold_rows(folder: Path, meta: dict[str, Any], oof: pd.DataFrame | None) -> list[str]:
    threshold = float(meta.get("threshold") or 0.5)
    rows = []
    tagged = [(m, False) for m in meta.get("members", [])]
    tagged += [(m, True) for m in meta.get("left_out") or []]
    tagged.sort(key=lambda t: (not isinstance(t[0].get("fold"), int), t[0].get("fold") or 0))
    for member, left_out in tagged:
        run, fold = folder / str(member.get("run")), member.get("fold")
        sidecar = _json_object(run / rundir.MODEL_SIDECAR)
        if left_out:  # its patients are not in the out-of-fold table: its own file
            path = run / rundir.VAL_PREDICTIONS
            part = pd.read_csv(path, dtype={"patient_id": str}) if path.is_file() else None
        else:
            part = oof[oof["fold"] == fold] if oof is not None else None
        if sidecar is None or part is None or part.empty or "logit" not in part:
            rows.append(f"<tr><td>{_esc(fold)}</td><td colspan='8' class='na'>{_esc(run)}: not "
                        "readable</td></tr>")  # fmt: skip
            continue
        y, plain = part["label"].to_numpy(), expit(part["logit"].to_numpy())
        own = patient_metrics(y, plain, float(sidecar.get("threshold") or 0.5))
        common = patient_metrics(y, plain, threshold)
        # Thresholds and separation as each fold run reports them: on its own scale.
        scale = Calibration.from_sidecar(sidecar)
        shown = scale.threshold(float(sidecar.get("threshold") or 0.5))
        separation = patient_metrics(y, scale.probability(part["logit"]), shown)["separation"]
        verdict = RankingVerdict.from_sidecar(sidecar)
        rows.append(
            f"<tr><td>{_esc(fold)}</td><td><code>{_esc(member.get('model_id'))}</code></td>"
            f"<td>{_esc(sidecar.get('epoch'))}</td><td>{len(part)} ({int(y.sum())})</td>"
            f"<td>{_num(own['auc'])}</td><td>{_num(shown, 2)}: "
            f"{_num(own['sensitivity'], 2)} / {_num(own['specificity'], 2)}</td>"
            f"<td>{_num(common['sensitivity'], 2)} / {_num(common['specificity'], 2)}</td>"
            f"<td>{_num(separation)}</td>"
            f"<td>{_esc(verdict.verdict if verdict else 'n/a')}"
            f"{' (left out)' if left_out else ''}</td></tr>"
        )
    return rows


_LEFT_OUT_NOTE = (
    " A fold marked left out does not rank its own patients and was left out of the ensemble "
    "(<code>--members ranking</code>): its patients choose nothing."
)


def _tables(folder: Path, meta: dict[str, Any], oof: pd.DataFrame | None) -> str:
    o = meta.get("oof") or {}
    head = (
        "<tr><th>Fold</th><th>Model</th><th>Epoch</th><th>Validation patients (positive)</th>"
        "<th>AUC</th><th>Own threshold: sens / spec</th><th>Ensemble threshold: sens / spec</th>"
        "<th>Separation</th><th>Verdict</th></tr>"
    )
    oof_row = (
        f"<tr><th>out-of-fold</th><th colspan='2'><code>{_esc(meta.get('model_id'))}</code></th>"
        f"<th>{_esc(o.get('patients'))} ({_esc(o.get('n_pos'))})</th><th>{_num(o.get('auc'))}</th>"
        f"<th>–</th><th>{_num(o.get('sensitivity'), 2)} / {_num(o.get('specificity'), 2)}</th>"
        f"<th>{_num(o.get('separation'))} ({_esc(o.get('separation_band'))})</th>"
        f"<th>{_esc((meta.get('ranking') or {}).get('verdict', 'n/a'))}</th></tr>"
    )
    combine = str(meta.get("combine", "")).replace("_", " ")
    return (
        f"<p>Ensemble <code>{_esc(meta.get('model_id'))}</code>: the {combine} of "
        f"{len(meta.get('members', []))} fold models. Its threshold "
        f"<b>{_num(o.get('threshold', meta.get('threshold')), 3)}</b> (the F1 sweep), its "
        f"probability scale ({_esc(Calibration.from_sidecar(meta).describe())}) and its verdict "
        "were "
        "chosen on the out-of-fold predictions: each non-test patient scored once, by the fold "
        "model that did not train on it.</p>"
        f"<table>{head}{''.join(_fold_rows(folder, meta, oof))}{oof_row}</table>"
        '<p class="meta">Sensitivity / specificity of each fold\'s validation patients at the '
        "fold's own threshold (chosen on those same patients, as a single run chooses it) and "
        f"at the ensemble's.{_LEFT_OUT_NOTE if meta.get('left_out') else ''}</p>"
    )


def _roc_figure(oof: pd.DataFrame) -> str:
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for fold, part in oof.groupby("fold"):
        if part["label"].nunique() == 2:
            fpr, tpr, _ = roc_curve(part["label"], part["logit"])
            ax.plot(fpr, tpr, lw=1, alpha=0.6, label=f"fold {fold}")
    if oof["label"].nunique() == 2:
        fpr, tpr, _ = roc_curve(oof["label"], oof["logit"])
        ax.plot(fpr, tpr, lw=2.5, color="black", label="out-of-fold, all")
    ax.plot([0, 1], [0, 1], ls=":", color="0.6")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, "ROC of each fold's validation patients and of all out-of-fold patients")


def _curves_figure(folder: Path, meta: dict[str, Any]) -> str | None:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    auc_ax, loss_ax = fig.subplots(1, 2)
    drawn = False
    for member in meta.get("members", []):
        path = folder / str(member.get("run")) / rundir.METRICS
        if not path.is_file():
            continue
        frame = pd.read_csv(path)
        label = f"fold {member.get('fold')}"
        auc_ax.plot(frame["epoch"], frame["auc"], marker=".", label=label)
        loss_ax.plot(frame["epoch"], frame["val_loss"], marker=".", label=label)
        if member.get("epoch") is not None:
            chosen = frame[frame["epoch"] == member["epoch"]]
            auc_ax.plot(chosen["epoch"], chosen["auc"], "o", mfc="none", ms=9, color="0.2")
        drawn = True
    if not drawn:
        return None
    auc_ax.set(xlabel="epoch", ylabel="validation AUC", ylim=(0, 1.02))
    loss_ax.set(xlabel="epoch", ylabel="validation loss")
    auc_ax.legend(fontsize=8)
    return _png(fig, "Each fold's validation AUC and loss by epoch (circles: the epoch kept)")


def cross_validation_section(folder: Path) -> str | None:
    """The section's HTML, or None when ``folder`` holds no ensemble."""
    meta = _json_object(folder / rundir.ENSEMBLE)
    if meta is None:
        return None
    oof_path = folder / rundir.OOF_PREDICTIONS
    oof = pd.read_csv(oof_path, dtype={"patient_id": str}) if oof_path.is_file() else None
    figures = [_roc_figure(oof)] if oof is not None and not oof.empty else []
    curves = _curves_figure(folder, meta)
    figures += [curves] if curves else []
    return _tables(folder, meta, oof) + f'<div class="plots">{"".join(figures)}</div>'


def ensemble_verdict(folder: Path) -> RankingVerdict | None:
    meta = _json_object(folder / rundir.ENSEMBLE)
    return None if meta is None else RankingVerdict.from_sidecar(meta)
