"""The run report: sections, embedded images only, escaping, missing inputs, headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure
from matplotlib.image import imread

from brainmets.evaluate.plots import plot_roc
from brainmets.evaluate.report import write_report
from brainmets.metrics import evaluate_predictions

SECTION_IDS = ("metrics", "plots", "curves", "heatmaps", "config")
HOSTILE_ID = 'P<002>&"x'  # a manifest id with every character HTML cares about


def write_heatmap(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().imshow(np.random.default_rng(seed).random((32, 32)), cmap="gray")
    fig.savefig(path)
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as train + evaluate + predict leave it."""
    run = tmp_path / "run-2024"
    (run / "evaluation").mkdir(parents=True)
    config = {
        "name": "<script>alert('x')</script>",
        "train": {"stage_epochs": [0, 5, 12], "epochs": 16},
        "model": {"backbone": "resnet50"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    e = np.arange(16)
    pd.DataFrame(
        {
            "epoch": e,
            "stage": 1 + (e >= 5) + (e >= 12),
            "train_loss": 0.7 * np.exp(-e / 8),
            "val_loss": 0.8 * np.exp(-e / 10),
            "auc": 0.6 + 0.02 * e,
            "f1": 0.5 + 0.02 * e,
            "separation": 0.02 * e,
        }
    ).to_csv(run / "metrics.csv", index=False)
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.4).astype(int)
    probs = np.round(np.clip(rng.beta(2, 5, 200) + 0.3 * labels, 0, 1), 2)
    result = evaluate_predictions(labels, probs, 0.45, n_boot=100, sensitivity_targets=(0.9,))
    (run / "evaluation" / "metrics.json").write_text(json.dumps(result))
    plot_roc(labels, probs, run / "evaluation" / "roc.png", threshold=0.45)
    write_heatmap(run / "heatmaps" / "P001_slice10_p0.97.png", 1)
    write_heatmap(run / "heatmaps" / f"{HOSTILE_ID}_slice11_p0.93.png", 2)
    return run


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def test_report_has_every_section_and_embeds_all_images(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in page
    assert "not available" not in page
    sources = image_sources(page)
    # ROC, learning curves, two heatmaps.
    assert len(sources) == 4
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    # Self-contained: no external or file references anywhere.
    for pattern in ('src="http', "src='http", 'href="http', "file://", "<link", "<script", "url("):
        assert pattern not in page, pattern
    # Embedded bytes are the files themselves.
    roc = (run_dir / "evaluation" / "roc.png").read_bytes()
    decoded = [base64.b64decode(src.split(",", 1)[1]) for src in sources]
    assert roc in decoded


def test_report_shows_metrics_with_cis(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    result = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    auc, (lo, hi) = result["metrics"]["auc"], result["ci"]["auc"]
    assert f"<td>AUC</td><td>{auc:.3f}</td><td>{lo:.3f} – {hi:.3f}</td>" in page
    assert f"band-{result['separation_band']}" in page
    assert "Wilson score for Sensitivity, Specificity, PPV (precision), NPV, Accuracy;" in page
    assert "Screening operating points" in page
    threshold = result["operating_points"][0]["threshold"]
    assert f"<td>{threshold:.3f}</td>" in page
    assert "evaluated patients themselves: their sensitivity is optimistic" in page
    assert "stages starting at epochs [0, 5, 12]" in page


def test_report_escapes_file_contents(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script>" not in page
    assert "P&lt;002&gt;&amp;&quot;x_slice11_p0.93" in page
    assert HOSTILE_ID not in page


def test_report_of_a_run_that_stopped_before_its_first_epoch(tmp_path):
    # All a run writes before training starts; every other section says it is missing.
    (tmp_path / "config.yaml").write_text("seed: 17\n")
    out = write_report(tmp_path, tmp_path / "elsewhere" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert out == tmp_path / "elsewhere" / "r.html"
    assert "seed: 17" in page
    for what in (
        "Learning curves",
        "Evaluation metrics",
        "Evaluation plots",
        "Heatmaps",
    ):
        assert f'<p class="na">{what} not available' in page
    assert image_sources(page) == []


def test_report_tolerates_broken_inputs(run_dir):
    (run_dir / "config.yaml").write_text("train: [unclosed\n  stage_epochs: {")
    (run_dir / "metrics.csv").write_text("")
    (run_dir / "evaluation" / "metrics.json").write_text("{not json")
    (run_dir / "evaluation" / "pr.png").write_text("not an image")
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "config.yaml is not valid YAML" in page and "train: [unclosed" in page
    assert "Learning curves not available: " in page
    assert "Evaluation metrics not available: metrics.json is not valid JSON" in page
    assert "pr.png is not a PNG file; left out." in page
    assert len(image_sources(page)) == 3  # ROC and the two heatmaps survive


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a run\n")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian 'chromium') not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    report = write_report(run_dir)
    shot = tmp_path / "report.png"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        report.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (2000, 1280)
    # Not blank: text, tables and plots give many distinct rows and a dark fraction of pixels.
    grey = image.mean(axis=2)
    assert (grey < 0.5).mean() > 0.005
    inked_rows = (grey.min(axis=1) < 0.5).mean()
    assert inked_rows > 0.3, f"only {inked_rows:.0%} of screen rows have content"
    # The embedded ROC plot is drawn: its red curve appears on screen.
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)
    assert red.sum() > 200


def test_heatmaps_of_the_most_probable_patients_come_first(run_dir):
    """predict's heatmaps.csv orders the gallery by patient probability (then rank) and
    captions each image; alphabetical order would show the lowest patient ids instead."""
    folder = run_dir / "heatmaps"
    for name, seed in [("A_rank1_slice3.png", 3), ("Z_rank1_slice7.png", 4),
                       ("Z_rank2_slice6.png", 5)]:  # fmt: skip
        write_heatmap(folder / name, seed)
    pd.DataFrame(
        [
            ["A_rank1_slice3.png", "A", 1, 3, -1.2, 0.10],
            ["Z_rank2_slice6.png", "Z", 2, 6, 1.5, 0.90],
            ["Z_rank1_slice7.png", "Z", 1, 7, 2.25, 0.90],
        ],
        columns=["file", "patient_id", "rank", "slice_index", "slice_logit", "probability"],
    ).to_csv(folder / "heatmaps.csv", index=False)
    page = write_report(run_dir).read_text(encoding="utf-8")
    heatmaps = page[page.index('<section id="heatmaps">') :]
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", heatmaps)
    assert captions[:3] == [
        "Z p=0.90 (label unknown), slice 7 (rank 1, slice logit 2.25)",
        "Z p=0.90 (label unknown), slice 6 (rank 2, slice logit 1.50)",
        "A p=0.10 (label unknown), slice 3 (rank 1, slice logit -1.20)",
    ]
    assert len(captions) == 5  # the two PNGs not in the index follow, by file name
    assert "patients with the highest probability first" in heatmaps


def test_the_gallery_shows_each_patients_true_label_where_known(run_dir):
    """Labels come from the run's evaluation and validation predictions; predict knows none."""
    folder = run_dir / "heatmaps"
    rows = []
    for i, pid in enumerate(["A", "B", "C"]):
        write_heatmap(folder / f"{pid}.png", i)
        rows.append([f"{pid}.png", pid, 1, 2, 0.5, 0.9 - 0.1 * i])
    pd.DataFrame(
        rows, columns=["file", "patient_id", "rank", "slice_index", "slice_logit", "probability"]
    ).to_csv(folder / "heatmaps.csv", index=False)
    pd.DataFrame({"patient_id": ["A"], "label": [1], "probability": [0.9]}).to_csv(
        run_dir / "evaluation" / "predictions.csv", index=False
    )
    pd.DataFrame({"patient_id": ["B"], "label": [0], "probability": [0.8]}).to_csv(
        run_dir / "val_predictions.csv", index=False
    )
    page = write_report(run_dir).read_text(encoding="utf-8")
    captions = re.findall(
        r"<figcaption>([^<]*)</figcaption>", page[page.index('<section id="heatmaps">') :]
    )
    assert captions[:3] == [
        "A p=0.90 (true label: metastasis), slice 2 (rank 1, slice logit 0.50)",
        "B p=0.80 (true label: no metastasis), slice 2 (rank 1, slice logit 0.50)",
        "C p=0.70 (label unknown), slice 2 (rank 1, slice logit 0.50)",
    ]


def test_heatmap_captions_wrap_between_words(run_dir):
    """Captions break at spaces; only a word longer than the figure (a long file name) may be
    broken (break-all split "slice" as "slic / e")."""
    report = write_report(run_dir).read_text()
    css = report[report.index("<style>") : report.index("</style>")]
    caption = css[css.index("figcaption {") :].split("}")[0]
    assert "break-all" not in caption and "overflow-wrap: anywhere" in caption
