"""Evaluation plots and learning curves: valid, non-blank PNGs; stage boundaries; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from sklearn.calibration import calibration_curve

from brainmets.evaluate.plots import (
    EVALUATION_PLOTS,
    _stage_starts,
    calibration_bins,
    plot_f1_vs_threshold,
    plot_learning_curves,
    plot_roc,
    write_evaluation_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scored_cohort(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    return labels, np.round(np.clip(rng.beta(2, 5, n) + 0.3 * labels, 0.0, 1.0), 2)


def assert_sensible_png(path: Path, min_side: int = 300) -> np.ndarray:
    """A real PNG, of a readable size, with actual drawing on it (not one flat colour)."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert 5_000 < path.stat().st_size < 2_000_000, f"{path}: {path.stat().st_size} bytes"
    image = imread(path)
    height, width = image.shape[:2]
    assert min(height, width) >= min_side, f"{path}: {width}x{height}"
    assert image[..., :3].std() > 0.05, f"{path} looks blank"
    return image


def trainer_metrics_csv(path: Path, epochs: int = 16) -> Path:
    """A metrics.csv with the trainer's columns, one row per epoch."""
    e = np.arange(epochs)
    frame = pd.DataFrame(
        {
            "epoch": e,
            "stage": 1 + (e >= 5) + (e >= 12),
            "train_loss": 0.7 * np.exp(-e / 8) + 0.1,
            "val_loss": 0.7 * np.exp(-e / 10) + 0.15,
            "auc": 0.6 + 0.35 * (1 - np.exp(-e / 5)),
            "f1": 0.5 + 0.3 * (1 - np.exp(-e / 5)),
            "threshold": 0.4,
            "sensitivity": 0.8,
            "specificity": 0.7,
            "mean_pos": 0.5 + 0.01 * e,
            "mean_neg": 0.45 - 0.01 * e,
            "separation": 0.05 + 0.02 * e,
            "lr_head": 5e-5,
            "skipped_steps": 0,
            "seconds": 12.5,
        }
    )
    frame.to_csv(path, index=False)
    return path


def test_write_evaluation_plots_writes_every_plot(tmp_path):
    labels, probs = scored_cohort(300)
    written = write_evaluation_plots(labels, probs, 0.45, tmp_path / "evaluation")
    assert list(written) == list(EVALUATION_PLOTS)
    for name, path in written.items():
        assert path == tmp_path / "evaluation" / EVALUATION_PLOTS[name]
        assert_sensible_png(path)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "evaluation").iterdir()) == sorted(
        EVALUATION_PLOTS.values()
    )


@pytest.mark.parametrize(
    ("labels", "probs"),
    [
        (np.zeros(20, dtype=int), np.linspace(0.0, 0.6, 20)),  # a validation fold with no case
        (np.ones(5, dtype=int), np.full(5, 0.9)),  # all positive, identical scores
        (np.array([0, 1]), np.array([0.2, 0.8])),  # two patients
    ],
    ids=["only-negatives", "only-positives-tied", "two-patients"],
)
def test_degenerate_cohorts_still_plot(tmp_path, labels, probs):
    for path in write_evaluation_plots(labels, probs, 0.5, tmp_path).values():
        assert_sensible_png(path)


def test_plot_rejects_bad_probabilities(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        plot_roc(np.array([0, 1]), np.array([0.1, np.nan]), tmp_path / "roc.png")


def test_calibration_bins_match_sklearn():
    labels, probs = scored_cohort(500, seed=2)
    frac_pos, mean_pred, counts = calibration_bins(labels, probs, n_bins=10)
    ref_frac, ref_pred = calibration_curve(labels, probs, n_bins=10)
    np.testing.assert_allclose(frac_pos, ref_frac)
    np.testing.assert_allclose(mean_pred, ref_pred)
    assert counts.sum() == 500 and (counts > 0).all() and len(counts) == len(frac_pos)
    # The counts are the per-bin denominators: they reproduce the number of positives.
    assert np.round(frac_pos * counts).sum() == labels.sum()


def test_learning_curves_with_stage_boundaries(tmp_path):
    csv = trainer_metrics_csv(tmp_path / "metrics.csv")
    with_stages = assert_sensible_png(
        plot_learning_curves(csv, tmp_path / "curves.png", stage_epochs=[0, 5, 12]), 500
    )
    without = assert_sensible_png(
        plot_learning_curves(csv, tmp_path / "plain.png", stage_epochs=[0]), 500
    )
    # The dashed stage lines are the only difference between the two images.
    assert with_stages.shape == without.shape
    assert np.abs(with_stages - without).max() > 0.2


@pytest.mark.parametrize(
    ("stage_epochs", "stage_column", "expected"),
    [
        ([0, 5, 12], None, [5, 12]),
        ((0, 5, 5), None, [5]),  # an empty stage 2: one boundary, not two
        ([0], [1, 1, 1], []),
        (None, [1, 1, 2, 2, 3], [2, 4]),  # no config: read from the stage column
        (None, None, []),
    ],
)
def test_stage_starts(stage_epochs, stage_column, expected):
    frame = pd.DataFrame({"epoch": range(5)})
    if stage_column is not None:
        frame = frame.iloc[: len(stage_column)].assign(stage=stage_column)
    assert _stage_starts(frame, stage_epochs) == expected


def test_learning_curves_tolerate_missing_columns(tmp_path):
    csv = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [0.7, 0.6, 0.5]}).to_csv(csv, index=False)
    assert_sensible_png(plot_learning_curves(csv, tmp_path / "curves.png"), 500)


@pytest.mark.parametrize(
    "content", ["", "epoch,auc\n", "auc,f1\n0.5,0.5\n"], ids=["empty", "header", "no-epoch"]
)
def test_learning_curves_reject_unusable_csv(tmp_path, content):
    csv = tmp_path / "metrics.csv"
    csv.write_text(content)
    with pytest.raises(ValueError, match="metrics.csv"):
        plot_learning_curves(csv, tmp_path / "curves.png")


def _drawn_figure(monkeypatch, draw) -> Figure:
    """The figure a plotting function saves, drawn (text extents need a renderer)."""
    from brainmets.evaluate import plots

    saved = {}

    def keep(fig, out_png):
        saved["fig"] = fig
        return Path(out_png)

    monkeypatch.setattr(plots, "_save", keep)
    draw()
    fig = saved["fig"]
    FigureCanvasAgg(fig).draw()
    return fig


def test_stage_labels_one_epoch_apart_do_not_overlap(tmp_path, monkeypatch):
    """The CPU demo's 16 epochs with stages from epochs 1 and 2: one label per line."""
    e = np.arange(16)
    csv = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": e, "train_loss": 0.7 - 0.02 * e, "auc": 0.5 + 0.02 * e}).to_csv(
        csv, index=False
    )
    fig = _drawn_figure(
        monkeypatch, lambda: plot_learning_curves(csv, tmp_path / "c.png", [0, 1, 2])
    )
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_text().startswith("stage")]
    assert [t.get_text() for t in labels] == ["stage 2", "stage 3"]
    first, second = (t.get_window_extent(renderer) for t in labels)
    assert not first.overlaps(second)


def test_the_f1_plot_shows_thresholds_on_the_reported_scale(tmp_path, monkeypatch):
    """The sweep runs on the sigmoid, but the axis and the marked threshold are on the scale
    predict and evaluate report: one number for the threshold."""
    from scipy.special import expit, logit

    labels, probs = scored_cohort(60)
    steep = lambda p: expit(3.0 * logit(p) + 6.6)  # noqa: E731
    fig = _drawn_figure(
        monkeypatch,
        lambda: plot_f1_vs_threshold(labels, probs, tmp_path / "f1.png", 0.09, reported=steep),
    )
    (text,) = [t.get_text() for t in fig.axes[0].texts]
    assert text.startswith(f"threshold {float(steep(np.array([0.09]))[0]):.2f}\n")
    assert "sigmoid" not in text and fig.axes[0].get_xlabel() == "threshold (probability)"
    (f1_line, *_) = fig.axes[0].get_lines()
    np.testing.assert_allclose(f1_line.get_xdata()[[0, -1]], steep(np.array([0.05, 0.95])))


def test_the_score_plot_title_is_the_separation_of_its_histograms(tmp_path, monkeypatch):
    from brainmets.evaluate.plots import plot_score_distributions
    from brainmets.metrics import patient_metrics

    labels, probs = scored_cohort(60)
    fig = _drawn_figure(
        monkeypatch,
        lambda: plot_score_distributions(labels, probs, tmp_path / "s.png", 0.5),
    )
    sep = patient_metrics(labels, probs, 0.5)["separation"]
    assert fig.axes[0].get_title().startswith(f"Probabilities by class: separation {sep:.3f}")
