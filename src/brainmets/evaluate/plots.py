"""Evaluation and training plots as PNG files.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``) rather than
``pyplot``: no global figure state, no GUI backend (the Agg canvas is used on save), so the
functions are safe on headless cluster nodes and inside a training process. Every plotting
function writes one PNG atomically and returns its path. Inputs are patient-level
(one label and one probability per patient), as in :mod:`brainmets.metrics`.

A plot whose curve is undefined for the data (ROC with one class) is still written, with a
short note in place of the curve, so that a report never has a hole without explanation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from brainmets.io import atomic_write
from brainmets.metrics import (
    THRESHOLDS,
    check_patient_arrays,
    patient_metrics,
    separation_band,
    threshold_sweep,
)

__all__ = [
    "EVALUATION_PLOTS",
    "plot_calibration",
    "plot_f1_vs_threshold",
    "plot_learning_curves",
    "plot_pr",
    "plot_roc",
    "plot_score_distributions",
    "write_evaluation_plots",
]

#: Plot name -> file name written by :func:`write_evaluation_plots`, in reading order.
EVALUATION_PLOTS: dict[str, str] = {
    "roc": "roc.png",
    "pr": "pr.png",
    "f1_vs_threshold": "f1_vs_threshold.png",
    "calibration": "calibration.png",
    "score_distributions": "score_distributions.png",
}

_DPI = 110
_POS_COLOUR = "#c0392b"  # positive patients (metastasis) in red, negatives in blue
_NEG_COLOUR = "#2e86c1"
_THRESHOLD_COLOUR = "#444444"


def _save(fig: Figure, out_png: str | Path) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically (a report never reads half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return atomic_write(out_png, lambda fh: fh.write(buffer.getvalue()))


def _new_figure(width: float = 5.5, height: float = 4.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _note(ax: Axes, text: str) -> None:
    """A centred note where a curve cannot be drawn."""
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="0.35",
        bbox={"facecolor": "white", "edgecolor": "none"},
    )


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.any() and not y.all())


def _threshold_label(threshold: float) -> str:
    return f"threshold {threshold:.2f}"


def _shown(threshold: float, shown: float | None) -> float:
    return threshold if shown is None else shown


def plot_roc(
    labels: ArrayLike,
    probs: ArrayLike,
    out_png: str | Path,
    *,
    threshold: float | None = None,
    shown_threshold: float | None = None,
) -> Path:
    """ROC curve with its AUC; the operating point at ``threshold`` marked when given
    (labelled with ``shown_threshold`` when the reported scale is another one)."""
    y, p = check_patient_arrays(labels, probs)
    fig, ax = _new_figure()
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", label="chance")
    if _both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        # AUC does not depend on the threshold: one call gives it and the operating point.
        m = patient_metrics(y, p, 0.5 if threshold is None else threshold)
        ax.plot(fpr, tpr, color=_POS_COLOUR, lw=2, label=f"AUC {m['auc']:.3f}")
        if threshold is not None:
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=_THRESHOLD_COLOUR)
            ax.annotate(
                f"{_threshold_label(_shown(threshold, shown_threshold))}\n"
                f"sens {m['sensitivity']:.2f}, "
                f"spec {m['specificity']:.2f}",
                (1 - m["specificity"], m["sensitivity"]),
                xytext=(12, -28),
                textcoords="offset points",
                fontsize=8,
            )
    else:
        _note(ax, "ROC undefined: only one class")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="1 - specificity (false-positive rate)",
        ylabel="sensitivity",
        title=f"ROC ({y.size} patients, {int(y.sum())} positive)",
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    return _save(fig, out_png)


def plot_pr(
    labels: ArrayLike,
    probs: ArrayLike,
    out_png: str | Path,
    *,
    threshold: float | None = None,
    shown_threshold: float | None = None,
) -> Path:
    """Precision-recall curve with average precision; the prevalence is the chance level."""
    y, p = check_patient_arrays(labels, probs)
    fig, ax = _new_figure()
    prevalence = float(y.mean())
    ax.axhline(prevalence, ls=":", color="0.6", label=f"prevalence {prevalence:.2f}")
    if _both_classes(y):
        precision, recall, _ = precision_recall_curve(y, p)
        m = patient_metrics(y, p, 0.5 if threshold is None else threshold)
        ap = m["average_precision"]
        ax.step(recall, precision, where="post", color=_POS_COLOUR, lw=2, label=f"AP {ap:.3f}")
        if threshold is not None and not np.isnan(m["ppv"]):
            ax.plot(m["sensitivity"], m["ppv"], "o", color=_THRESHOLD_COLOUR)
            ax.annotate(
                _threshold_label(_shown(threshold, shown_threshold)),
                (m["sensitivity"], m["ppv"]),
                xytext=(-90, -20),
                textcoords="offset points",
                fontsize=8,
            )
    else:
        _note(ax, "precision-recall undefined: only one class")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall",
    )
    ax.legend(loc="lower left")
    return _save(fig, out_png)


def plot_f1_vs_threshold(
    labels: ArrayLike,
    probs: ArrayLike,
    out_png: str | Path,
    threshold: float,
    *,
    thresholds: Sequence[float] | np.ndarray = THRESHOLDS,
    reported: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """F1, sensitivity and specificity over the threshold sweep; the chosen threshold marked.

    ``probs``, ``threshold`` and the sweep are on the plain sigmoid, where the specification
    chooses the threshold. With ``reported`` (a run's calibration), the axis shows each
    threshold of the sweep on the reported scale, the one every command shows."""
    y, p = check_patient_arrays(labels, probs)
    grid = np.asarray(thresholds, dtype=np.float64)
    curves = threshold_sweep(y, p, grid)  # the same definitions as the reported numbers
    shown = reported or (lambda t: t)
    x, at = np.asarray(shown(grid), dtype=np.float64), float(shown(np.array([threshold]))[0])
    fig, ax = _new_figure(6.0, 4.2)
    for name, style in (("f1", "-"), ("sensitivity", "--"), ("specificity", "-.")):
        ax.plot(x, curves[name], ls=style, lw=2 if name == "f1" else 1.2, label=name)
    ax.axvline(at, color=_THRESHOLD_COLOUR, lw=1)
    f1_at = patient_metrics(y, p, threshold)["f1"]
    ax.annotate(
        f"{_threshold_label(at)}\nF1 {f1_at:.3f}",
        (at, 0.05),
        xytext=(5, 0),
        textcoords="offset points",
        fontsize=8,
    )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="threshold (probability)",
        ylabel="value",
        title="F1 against threshold",
    )
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out_png)


def calibration_bins(
    labels: ArrayLike, probs: ArrayLike, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fraction positive, mean predicted, patient count) of the non-empty uniform bins.

    The counts use scikit-learn's own bin rule (``searchsorted`` on the inner edges), so
    they line up one to one with :func:`sklearn.calibration.calibration_curve`.
    """
    y, p = check_patient_arrays(labels, probs)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    return frac_pos, mean_pred, counts[counts > 0]


def plot_calibration(
    labels: ArrayLike, probs: ArrayLike, out_png: str | Path, *, n_bins: int = 10
) -> Path:
    """Reliability curve (10 uniform bins) with patients per bin below it."""
    y, p = check_patient_arrays(labels, probs)
    frac_pos, mean_pred, counts = calibration_bins(y, p, n_bins)
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], ls=":", color="0.6", label="perfectly calibrated")
    brier = patient_metrics(y, p, 0.5)["brier"]
    top.plot(mean_pred, frac_pos, "o-", color=_POS_COLOUR, label=f"model (Brier {brier:.3f})")
    for x, f, c in zip(mean_pred, frac_pos, counts, strict=True):
        top.annotate(str(c), (x, f), xytext=(4, 4), textcoords="offset points", fontsize=7)
    top.set(ylim=(-0.02, 1.02), ylabel="fraction positive", title="Calibration (reliability)")
    top.legend(loc="upper left", fontsize=8)
    bottom.hist(p, bins=np.linspace(0.0, 1.0, n_bins + 1), color="0.55", rwidth=0.85)
    bottom.set(xlim=(0, 1), xlabel="mean predicted probability in bin", ylabel="patients")
    return _save(fig, out_png)


def plot_score_distributions(
    labels: ArrayLike,
    probs: ArrayLike,
    out_png: str | Path,
    threshold: float,
    *,
    bins: int = 40,
) -> Path:
    """Histograms of patient probabilities by class, class means and the threshold; the
    title's separation is that of the same probabilities."""
    y, p = check_patient_arrays(labels, probs)
    m = patient_metrics(y, p, threshold)
    sep = m["separation"]
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, ax = _new_figure(6.0, 4.2)
    for mask, colour, name, mean in (
        (y, _POS_COLOUR, "metastasis", m["mean_pos"]),
        (~y, _NEG_COLOUR, "no metastasis", m["mean_neg"]),
    ):
        if mask.any():
            ax.hist(p[mask], bins=edges, color=colour, alpha=0.55, label=f"{name} (n={mask.sum()})")
            ax.axvline(mean, color=colour, ls="--", lw=1)
    ax.axvline(threshold, color=_THRESHOLD_COLOUR, lw=1.5, label=_threshold_label(threshold))
    sep_text = "n/a" if np.isnan(sep) else f"{sep:.3f}"
    ax.set(
        xlim=(0, 1),
        xlabel="patient probability",
        ylabel="patients",
        title=f"Probabilities by class: separation {sep_text} ({separation_band(sep)})",
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out_png)


def _stage_starts(frame: pd.DataFrame, stage_epochs: Sequence[int] | None) -> list[int]:
    """Epochs at which a new curriculum stage starts (the first stage's 0 excluded)."""
    if stage_epochs is not None:
        return sorted({int(e) for e in stage_epochs if int(e) > 0})
    if "stage" in frame:  # no config at hand: the trainer's stage column tells the same story
        changed = frame["stage"].ne(frame["stage"].shift()) & frame.index.to_series().gt(0)
        return [int(e) for e in frame.loc[changed, "epoch"]]
    return []


def plot_learning_curves(
    metrics_csv: str | Path, out_png: str | Path, stage_epochs: Sequence[int] | None = None
) -> Path:
    """Loss, AUC, F1 and separation per epoch from the trainer's metrics.csv.

    ``stage_epochs`` are the first epochs of the curriculum stages (config key
    ``train.stage_epochs``, e.g. ``[0, 5, 12]``); a dotted line is drawn before each stage
    after the first. Without it, boundaries come from the ``stage`` column when present.
    Missing columns leave their panel with a note, so an older or partial CSV still plots.
    """
    metrics_csv = Path(metrics_csv)
    try:
        frame = pd.read_csv(metrics_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{metrics_csv}: cannot read metrics CSV ({err})") from err
    if frame.empty or "epoch" not in frame:
        raise ValueError(f"{metrics_csv}: no epoch rows (expected an 'epoch' column)")
    frame = frame.sort_values("epoch").reset_index(drop=True)
    epochs = frame["epoch"]

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (
        ("loss", (("train_loss", "train"), ("val_loss", "validation"))),
        ("AUC (validation)", (("auc", "AUC"),)),
        ("F1 at best threshold", (("f1", "F1"), ("sensitivity", "sens"), ("specificity", "spec"))),
        (
            "separation",
            (("separation", "mean p+ - mean p-"), ("mean_pos", "mean p+"), ("mean_neg", "mean p-")),
        ),
    )
    for ax, (title, series) in zip(axes, panels, strict=True):
        drawn = 0
        for i, (column, label) in enumerate(series):
            if column in frame and frame[column].notna().any():
                ax.plot(epochs, frame[column], marker="o", ms=3, lw=2 if i == 0 else 1, label=label)
                drawn += 1
        if drawn == 0:
            _note(ax, f"no {title} in metrics.csv")
        elif drawn > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    # The specification's separation bands: 0.10 / 0.20 / 0.30.
    for level in (0.10, 0.20, 0.30):
        axes[3].axhline(level, color="0.7", ls=":", lw=0.8)
    for stage, start in enumerate(_stage_starts(frame, stage_epochs), start=2):
        for ax in axes:
            ax.axvline(start - 0.5, color=_THRESHOLD_COLOUR, ls="--", lw=0.8)
        # One line lower per stage: stages one epoch apart would print on top of each other.
        axes[0].annotate(
            f"stage {stage}",
            (start - 0.5, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12 - 11 * (stage - 2)),
            textcoords="offset points",
            fontsize=8,
        )
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"Learning curves ({len(frame)} epochs)")
    return _save(fig, out_png)


def write_evaluation_plots(
    labels: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    out_dir: str | Path,
    *,
    plain: tuple[ArrayLike, float] | None = None,
    reported: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Path]:
    """All evaluation plots into ``out_dir`` (names in :data:`EVALUATION_PLOTS`).

    ``probs`` and ``threshold`` are on the reported scale. ``plain`` = (probabilities,
    threshold) of the same patients on the plain sigmoid, for a calibrated run, with
    ``reported`` its map to the reported scale: the ROC, PR and F1 curves rank and call patients
    there (as the metrics do) and label every threshold on the reported scale; the calibration
    and score plots show the reported probabilities.
    """
    y, p = check_patient_arrays(labels, probs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / file for name, file in EVALUATION_PLOTS.items()}
    ranked, ranked_at, shown = p, threshold, None
    if plain is not None:
        ranked, ranked_at, shown = check_patient_arrays(y, plain[0])[1], plain[1], threshold
    return {
        "roc": plot_roc(y, ranked, files["roc"], threshold=ranked_at, shown_threshold=shown),
        "pr": plot_pr(y, ranked, files["pr"], threshold=ranked_at, shown_threshold=shown),
        "f1_vs_threshold": plot_f1_vs_threshold(
            y,
            ranked,
            files["f1_vs_threshold"],
            ranked_at,
            reported=reported if plain is not None else None,
        ),  # fmt: skip
        "calibration": plot_calibration(y, p, files["calibration"]),
        "score_distributions": plot_score_distributions(
            y, p, files["score_distributions"], threshold
        ),
    }


# --------------------------------------------------------------------------- localisation


def plot_localisation(views: Sequence, out_png: str | Path, margin_mm: float) -> Path:
    """For each true-positive patient of ``views`` (``localisation.PatientView``): the top
    slice with the true lesion outlines, and the same slice under its Grad-CAM with the peak.

    A lesion the top slice cuts is outlined solid, one a slab away dashed; the dotted circle
    is the pointing game's reach (radius + margin).
    """
    from matplotlib.patches import Circle

    per_row = min(3, max(1, len(views)))
    rows = max(1, math.ceil(len(views) / per_row))
    fig = Figure(figsize=(2.3 * 2 * per_row, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    if not views:
        _note(axes[0, 0], "no true-positive patient with lesions")
    for i, view in enumerate(views):
        plain, heat = (
            axes[i // per_row, 2 * (i % per_row)],
            axes[i // per_row, 2 * (i % per_row) + 1],
        )
        for ax in (plain, heat):
            ax.imshow(view.image, cmap="gray", vmin=0, vmax=255)
            for lesion in view.lesions:
                if min(abs(view.top_slice - k) for k in lesion.slices) > 1:
                    continue
                cut = view.top_slice in lesion.slices
                radius = lesion.diameter_mm / 2 / float(np.mean(lesion.pixel_mm))
                ax.add_patch(Circle((lesion.column, lesion.row), radius, fill=False, lw=1.2,
                                    color="#2ecc71", ls="-" if cut else "--"))  # fmt: skip
                reach = (lesion.diameter_mm / 2 + margin_mm) / float(np.mean(lesion.pixel_mm))
                ax.add_patch(Circle((lesion.column, lesion.row), reach, fill=False, lw=0.6,
                                    color="#2ecc71", ls=":"))  # fmt: skip
        heat.imshow(view.cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
        if view.peak is not None:
            heat.plot(view.peak[1], view.peak[0], "+", color="white", ms=10, mew=2)
        plain.set_title(f"{view.patient_id} slice {view.top_slice}\np={view.probability:.2f}",
                        fontsize=7)  # fmt: skip
        verdict = (
            f"slice {'hit' if view.hit else 'miss'}, peak {'hit' if view.pointing else 'miss'}"
        )
        heat.set_title(f"Grad-CAM\n{verdict}", fontsize=7)
        for ax in (plain, heat):
            ax.set_xlim(-0.5, view.image.shape[1] - 0.5)
            ax.set_ylim(view.image.shape[0] - 0.5, -0.5)
    return _save(fig, out_png)


def plot_roc_pair(
    labels: ArrayLike,
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    names: tuple[str, str],
    out_png: str | Path,
    *,
    note: str = "",
) -> Path:
    """Both runs' ROC curves on the same patients, AUC in the legend; ``note`` under them
    (the DeLong test's result)."""
    y, a = check_patient_arrays(labels, probs_a)
    _, b = check_patient_arrays(labels, probs_b)
    fig, ax = _new_figure()
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", label="chance")
    if _both_classes(y):
        for probs, name, colour in ((a, names[0], _NEG_COLOUR), (b, names[1], _POS_COLOUR)):
            fpr, tpr, _ = roc_curve(y, probs)
            auc = patient_metrics(y, probs, 0.5)["auc"]
            ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name}: AUC {auc:.3f}")
    else:
        _note(ax, "ROC undefined: only one class")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    if note:
        ax.set_title(note, fontsize=8)
    return _save(fig, out_png)
