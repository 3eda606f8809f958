"""A run's self-contained ``report.html``: config, learning curves, metrics, plots, heatmaps.

The report is one HTML file with inline CSS and every image embedded as a base64
``data:`` URI, so it can be mailed, archived with the run or opened on an offline
workstation. It reads only what the run folder holds::

    RUN/config.yaml                  resolved config (shown verbatim; train.stage_epochs)
    RUN/metrics.csv                  one row per epoch (trainer)
    RUN/evaluation/metrics.json      evaluate_predictions() output (brainmets evaluate)
    RUN/evaluation/*.png             evaluation plots
    RUN/evaluation/localisation.png  top slices, Grad-CAM and true lesions (evaluate --lesions)
    RUN/heatmaps/**/*.png            top-slice heatmaps (brainmets predict --heatmaps)

Each section that lacks its input says so in one line instead of failing: a report of a
run still in training is useful. All text taken from files (config, patient identifiers
in heatmap names, JSON fields) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from brainmets import rundir
from brainmets.evaluate.cross_validation import cross_validation_section
from brainmets.evaluate.localisation import LOCALISATION_PNG
from brainmets.evaluate.plots import EVALUATION_PLOTS, plot_learning_curves
from brainmets.io import atomic_write_text
from brainmets.metrics import COUNT_NAMES, METRIC_NAMES
from brainmets.model.probability import Calibration
from brainmets.ranking import RankingVerdict

__all__ = ["MAX_HEATMAPS", "write_report"]

#: Heatmaps embedded at most; each is ~50-200 kB of base64, and a browser tab should open.
MAX_HEATMAPS = 48

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_METRIC_LABELS = {
    "auc": "AUC",
    "average_precision": "Average precision",
    "f1": "F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "accuracy": "Accuracy",
    "brier": "Brier score (lower is better)",
    "mean_pos": "Mean probability, metastasis",
    "mean_neg": "Mean probability, no metastasis",
    "separation": "Separation (mean p+ - mean p-)",
    "n": "Patients",
    "n_pos": "Positive patients",
    "n_neg": "Negative patients",
}

_PLOT_CAPTIONS = {
    "roc": "ROC curve; the dot is the operating threshold",
    "pr": "Precision-recall curve; the dotted line is the prevalence",
    "f1_vs_threshold": "F1, sensitivity and specificity over the threshold sweep",
    "calibration": "Calibration (reliability) curve with patients per bin",
    "score_distributions": "Patient probabilities by class, class means dashed",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1150px; margin: 0 auto; padding: 1.5em; line-height: 1.45; }
h1 { margin-bottom: 0.1em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
.na { color: #777; font-style: italic; }
nav a { margin-right: 1em; }
pre { background: #f6f6f6; border: 1px solid #e2e2e2; padding: 0.8em; overflow-x: auto;
      font-size: 0.85em; max-height: 32em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
.band { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em; color: #fff; }
.band-poor { background: #c0392b; } .band-moderate { background: #d68910; }
.band-good { background: #2e86c1; } .band-excellent { background: #1e8449; }
.band-undefined { background: #888; }
.verdict { border: 2px solid #c0392b; background: #fdedec; padding: 0.6em 1em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 1em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
           gap: 0.8em; }
figure { margin: 0; border: 1px solid #e2e2e2; padding: 0.4em; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.82em; color: #444; margin-top: 0.3em; overflow-wrap: anywhere; }
img.wide { max-width: 100%; height: auto; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _not_available(what: str, path: Path | None = None, reason: str | None = None) -> str:
    where = f" (looked for <code>{_esc(path)}</code>)" if path is not None else ""
    why = f": {_esc(reason)}" if reason else ""
    return f'<p class="na">{_esc(what)} not available{why}{where}.</p>'


def _png_data_uri(path: Path) -> str | None:
    """The PNG as a data URI, or None when the file is not a PNG (it is then left out)."""
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    uri = _png_data_uri(path)
    if uri is None:
        return f'<p class="na">{_esc(path.name)} is not a PNG file; left out.</p>'
    return (
        f'<figure><img src="{uri}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _format(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _esc(value)
    if isinstance(value, int):  # counts: n, n_pos, n_bootstrap
        return str(value)
    return f"{value:.{digits}f}"


def _ci_text(ci: Any, count: bool = False) -> str:
    """'low – high'; counts (patients drawn per class) are shown as whole patients. Counts
    have no interval in newer metrics.json files (they are observed, not estimated)."""
    if count and ci is None:
        return "–"
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return "n/a"
    lo, hi = ci
    if lo is None or hi is None:
        return "n/a"
    if count:
        return "–" if lo == hi else f"{round(lo)} – {round(hi)}"
    return f"{_format(lo)} – {_format(hi)}"


def _band(band: Any) -> str:
    name = str(band) if band in ("poor", "moderate", "good", "excellent") else "undefined"
    return f'<span class="band band-{name}">{_esc(band)}</span>'


# --- sections -------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> tuple[str | None, dict[str, Any], str | None]:
    """(config text, parsed tree or {}, problem) of RUN/config.yaml."""
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        return None, {}, None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return text, {}, f"not valid YAML ({err.__class__.__name__})"
    return text, tree if isinstance(tree, dict) else {}, None


def _stage_epochs(config: dict[str, Any]) -> list[int] | None:
    train = config.get("train")
    stages = train.get("stage_epochs") if isinstance(train, dict) else None
    if isinstance(stages, list | tuple) and all(isinstance(e, int) for e in stages):
        return list(stages)
    return None


def _config_section(run_dir: Path, text: str | None, problem: str | None) -> str:
    if text is None:
        return _not_available("Configuration", run_dir / rundir.CONFIG)
    note = f'<p class="na">config.yaml is {_esc(problem)}; shown as written.</p>' if problem else ""
    return f"{note}<pre>{_esc(text)}</pre>"


def _learning_section(run_dir: Path, stage_epochs: list[int] | None) -> str:
    csv = run_dir / rundir.METRICS
    if not csv.is_file():
        return _not_available("Learning curves", csv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            png = plot_learning_curves(csv, Path(tmp) / "learning_curves.png", stage_epochs)
        except ValueError as err:
            return _not_available("Learning curves", reason=str(err))
        uri = _png_data_uri(png)
    stages = (
        f"Dashed lines: curriculum stages starting at epochs {_esc(stage_epochs)}."
        if stage_epochs
        else "Stage boundaries from the stage column of metrics.csv."
    )
    table = pd.read_csv(csv).to_html(index=False, na_rep="n/a", float_format="{:.4g}".format)
    return (
        f'<img class="wide" src="{uri}" alt="learning curves"><p class="meta">{stages}</p>'
        f"<details><summary>Per-epoch table ({_esc(csv.name)})</summary>{table}</details>"
    )


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"{path.name} is not valid JSON ({err})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not an object"
    return data, None


def _metrics_table(metrics: dict[str, Any], ci: dict[str, Any]) -> str:
    names = [n for n in METRIC_NAMES if n in metrics] + [
        n for n in metrics if n not in METRIC_NAMES
    ]
    rows = "".join(
        f"<tr><td>{_esc(_METRIC_LABELS.get(n, n))}</td><td>{_format(metrics[n])}</td>"
        f"<td>{_ci_text(ci.get(n), count=n in COUNT_NAMES)}</td></tr>"
        for n in names
    )
    return f"<table><tr><th>Metric</th><th>Value</th><th>95% CI</th></tr>{rows}</table>"


def _operating_points_table(points: Iterable[dict[str, Any]]) -> str:
    head = (
        "<tr><th>Target sensitivity</th><th>Chosen on</th><th>Threshold</th>"
        "<th>Sensitivity (95% CI)</th><th>Specificity (95% CI)</th><th>PPV</th><th>F1</th></tr>"
    )
    rows = []
    for point in points:
        m, ci = point.get("metrics") or {}, point.get("ci") or {}
        rows.append(
            f"<tr><td>{_format(point.get('target_sensitivity'), 2)}</td>"
            f"<td>{_esc(point.get('chosen_on', 'n/a'))}</td>"
            f"<td>{_format(point.get('threshold'))}</td>"
            f"<td>{_format(m.get('sensitivity'))} ({_ci_text(ci.get('sensitivity'))})</td>"
            f"<td>{_format(m.get('specificity'))} ({_ci_text(ci.get('specificity'))})</td>"
            f"<td>{_format(m.get('ppv'))}</td><td>{_format(m.get('f1'))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _ci_methods(data: dict[str, Any]) -> str:
    """How the intervals were made, as metrics.json says (files from before ``ci_methods``
    have bootstrap intervals throughout)."""
    bootstrap = (
        f"percentile bootstrap over {_format(data.get('n_boot', 'n/a'))} patient resamples "
        f"(seed {_format(data.get('seed', 'n/a'))})"
    )
    methods = data.get("ci_methods") or {}
    wilson = methods.get("wilson")
    if not wilson:
        return bootstrap
    names = ", ".join(_esc(_METRIC_LABELS.get(n, n)) for n in wilson)
    if not methods.get("bootstrap"):
        return f"Wilson score for {names}; no bootstrap (n_boot 0), so none for the others"
    return f"Wilson score for {names}; {bootstrap} for the others"


def _evaluated_line(data: dict) -> str:
    """Which patients were evaluated, with which epoch's weights, in words."""
    metrics = data.get("metrics") or {}
    split = data.get("split")
    what = f"the {_esc(split)} patients" if split else "every patient"
    where = f" of <code>{_esc(data['data'])}</code>" if data.get("data") else ""
    seen = data.get("seen_in_training")
    if seen is None:
        seen_text = "whether the run saw any of them is unknown (no splits.csv)"
    elif isinstance(seen, dict) and seen:
        shown = ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in seen.items())
        seen_text = f"<b>{shown} of them were in the run's own training or validation split</b>"
    else:
        seen_text = "none of them was in the run's training or validation split"
    epoch = data.get("model_epoch")
    model = (
        f"the weights of epoch {_esc(epoch)} (best by {_esc(data.get('model_best_metric'))})"
        if epoch is not None
        else "the run's best weights"
    )
    return (
        f'<p class="meta">Evaluated: {what}{where} ({_format(metrics.get("n"), 0)} patients), '
        f"{seen_text}; {model}.</p>"
    )


def _metrics_section(run_dir: Path) -> str:
    path = run_dir / rundir.EVALUATION / rundir.EVALUATION_METRICS
    data, problem = _read_metrics(path)
    if data is None:
        return _not_available("Evaluation metrics", path, problem)
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        return (
            '<p class="na">metrics.json has no "metrics" object; shown as written.</p>'
            f"<pre>{_esc(json.dumps(data, indent=2))}</pre>"
        )
    level = data.get("ci_level", 0.95)
    parts = [
        f"<p>Threshold <b>{_format(data.get('threshold'))}</b> · separation band "
        f"{_band(data.get('separation_band', 'undefined'))} · "
        f"{_format(100 * level if isinstance(level, float) else level, 0)}% CIs: "
        f"{_ci_methods(data)}. Probabilities and thresholds: "
        f"{_esc(Calibration.from_sidecar(data).describe())}.</p>",
        _metrics_table(metrics, data.get("ci") or {}),
    ]
    parts.insert(0, _evaluated_line(data))
    points = data.get("operating_points") or []
    if points:
        parts += ["<h3>Screening operating points</h3>", _operating_points_table(points)]
        if any(point.get("chosen_on") != "validation" for point in points):
            parts.append(
                '<p class="meta">Thresholds not chosen on validation were chosen on the '
                "evaluated patients themselves: their sensitivity is optimistic.</p>"
            )
    known = {
        "data",
        "split",
        "seen_in_training",
        "model_epoch",
        "model_best_metric",
        "model_ranking",
        "metrics",
        "ci",
        "threshold",
        "separation_band",
        "ci_level",
        "ci_methods",
        "calibration",
        "n_boot",
        "seed",
        "localisation",
        "subgroups",
    }
    extra = {k: v for k, v in data.items() if k not in known and k != "operating_points"}
    if extra:
        items = "".join(
            f"<tr><td>{_esc(k)}</td><td>{_esc(json.dumps(v))}</td></tr>" for k, v in extra.items()
        )
        parts.append(f"<details><summary>Other fields</summary><table>{items}</table></details>")
    return "".join(parts)


def _plots_section(run_dir: Path) -> str:
    folder = run_dir / rundir.EVALUATION
    pngs = (
        sorted(p for p in folder.glob("*.png") if p.name != LOCALISATION_PNG)
        if folder.is_dir()
        else []
    )
    if not pngs:
        return _not_available("Evaluation plots", folder / "*.png")
    # The standard plots in reading order first, then anything else the run added.
    order = {file: i for i, file in enumerate(EVALUATION_PLOTS.values())}
    pngs.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    by_file = {file: name for name, file in EVALUATION_PLOTS.items()}
    figures = "".join(
        _figure(p, _PLOT_CAPTIONS.get(by_file.get(p.name, ""), p.stem.replace("_", " ")))
        for p in pngs
    )
    return f'<div class="plots">{figures}</div>'


def _estimate_cells(entry: dict[str, Any]) -> str:
    """Value, CI, count and chance of one localisation measure as table cells."""
    ci = entry.get("ci") or [None, None]
    return (
        f"<td>{_format(entry.get('value'))}</td><td>{_ci_text(ci)}</td>"
        f"<td>{_format(entry.get('successes'), 0)} / {_format(entry.get('n'), 0)}</td>"
        f"<td>{_format(entry.get('chance'), 2)}</td>"
    )


def _localisation_section(run_dir: Path) -> str:
    folder = run_dir / rundir.EVALUATION
    data, _ = _read_metrics(folder / rundir.EVALUATION_METRICS)
    loc = (data or {}).get("localisation")
    if not isinstance(loc, dict):  # evaluated without lesion truth: no section
        return ""
    k, margin = loc.get("top_k"), loc.get("margin_mm")
    rows = [
        ("Top-slice hit rate (true positives; top slice within "
         f"{_esc(loc.get('slab_tolerance'))} slab of a lesion)", loc.get("top_slice_hit_rate")),
        (f"Pointing game (Grad-CAM peak within radius + {_format(margin, 0)} mm)",
         loc.get("pointing_game")),
        (f"Lesion detection (a slice through it among the top {_esc(k)})",
         loc.get("lesion_detection")),
    ]  # fmt: skip
    detection = loc.get("lesion_detection") or {}
    rows += [
        (f"&nbsp;&nbsp;lesions {_esc(band)}", entry)
        for band, entry in (detection.get("by_diameter") or {}).items()
    ]
    body = "".join(
        f"<tr><td>{label}</td>{_estimate_cells(entry or {})}</tr>" for label, entry in rows
    )
    cell = (loc.get("pointing_game") or {}).get("heatmap_cell_mm")
    ceiling = (loc.get("pointing_game") or {}).get("resolution_ceiling")
    notes = (
        f'<p class="meta">Lesion truth <code>{_esc(loc.get("lesions_file"))}</code>: '
        f"{_format(loc.get('lesions_placed'), 0)} lesions of "
        f"{_format(loc.get('positive_patients_with_lesions'), 0)} positive patients, "
        f"{_format(loc.get('true_positive_patients'), 0)} of them true positives; "
        f"{len(loc.get('lesions_not_placed') or [])} lesions could not be placed, "
        f"{len(loc.get('positives_without_lesions') or [])} positives have no lesion truth. "
        "95% CIs: Wilson score (lesions of one patient counted as independent). Chance: what a "
        "slice (or a pixel of the head) drawn at random would score for the same patients."
        + (
            f" A Grad-CAM cell spans {_format(cell, 0)} mm and a map peaks on a cell centre: a "
            f"perfect map would score {_format(ceiling, 2)} in the pointing game here."
            if cell and ceiling is not None
            else ""
        )
        + "</p>"
    )
    table = (
        "<table><tr><th>Measure</th><th>Value</th><th>95% CI</th><th>Count</th>"
        f"<th>Chance</th></tr>{body}</table>"
    )
    png = folder / LOCALISATION_PNG
    figure = (
        _figure(png, "Top slice of true-positive patients (misses first): true lesions outlined "
                "(solid: the slice cuts it; dashed: one slab away; dotted: the pointing game's "
                "reach), and the same slice under Grad-CAM with its peak (+)")
        if png.is_file()
        else ""
    )  # fmt: skip
    return notes + table + figure


def _subgroups_section(run_dir: Path) -> str:
    data, _ = _read_metrics(run_dir / rundir.EVALUATION / rundir.EVALUATION_METRICS)
    sub = (data or {}).get("subgroups")
    if not isinstance(sub, dict) or not sub.get("groups"):  # an evaluation from before them
        return ""
    rows = []
    for entry in sub["groups"]:
        cells = []
        for name in ("auc", "sensitivity", "specificity"):
            m = entry.get(name) or {}
            if m.get("value") is None:
                cells.append(f'<td colspan="2" class="na">{_esc(m.get("note") or "n/a")}</td>')
            else:
                cells.append(f"<td>{_format(m['value'])}</td><td>{_ci_text(m.get('ci'))}</td>")
        rows.append(
            f"<tr><td>{_esc(entry.get('by'))}</td><td>{_esc(entry.get('group'))}</td>"
            f"<td>{_format(entry.get('n'), 0)}</td><td>{_format(entry.get('n_pos'), 0)}</td>"
            + "".join(cells)
            + "</tr>"
        )
    head = (
        "<tr><th>By</th><th>Group</th><th>Patients</th><th>Positive</th><th>AUC</th>"
        "<th>95% CI</th><th>Sensitivity</th><th>95% CI</th><th>Specificity</th><th>95% CI</th></tr>"
    )
    return (
        f'<p class="meta">Series fields from the {_esc(sub.get("fields_from"))}. No figure for a '
        f"measure with fewer than {_format(sub.get('min_per_class'), 0)} patients of the class "
        "it needs. AUC: percentile bootstrap; sensitivity and specificity: Wilson score. Lesion "
        "size: the positives whose largest lesion is in the band, against every negative.</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _heatmap_section(run_dir: Path) -> str:
    """The heatmaps of the patients with the highest probability first (from predict's
    ``heatmaps.csv``); without that index, in file name order, and the section says so."""
    folder = run_dir / rundir.HEATMAPS
    pngs = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not pngs:
        return _not_available("Heatmaps", folder / "*.png")
    captions = {p: str(p.relative_to(folder).with_suffix("")) for p in pngs}
    order_note = "in file name order (no heatmaps.csv beside them)"
    index_path = folder / rundir.HEATMAP_INDEX
    if index_path.is_file():
        index = pd.read_csv(index_path, dtype={"patient_id": str, "file": str})
        index = index.sort_values(["probability", "patient_id", "rank"],
                                  ascending=[False, True, True], kind="stable")  # fmt: skip
        listed = []
        truth = _true_labels(run_dir)
        for row in index.itertuples():
            path = folder / row.file
            if path in captions:
                listed.append(path)
                # The manifest's id is the only identifier allowed in outputs.
                label = truth.get(str(row.patient_id))
                known = (
                    f"true label: {_LABEL_WORDS[label]}" if label is not None else "label unknown"
                )
                captions[path] = (
                    f"{row.patient_id} p={row.probability:.2f} ({known}), slice "
                    f"{row.slice_index} (rank {row.rank}, slice logit {row.slice_logit:.2f})"
                )
        first = set(listed)
        pngs = listed + [p for p in pngs if p not in first]
        order_note = "patients with the highest probability first"
    shown = pngs[:MAX_HEATMAPS]
    figures = "".join(_figure(p, captions[p]) for p in shown)
    more = (
        f'<p class="meta">{len(pngs) - len(shown)} more heatmaps in '
        f"<code>{_esc(folder)}</code> are not embedded.</p>"
        if len(pngs) > len(shown)
        else ""
    )
    return (
        f'<p class="meta">{len(shown)} heatmaps, {order_note}.</p>'
        f'<div class="gallery">{figures}</div>{more}'
    )


def _verdict_box(run_dir: Path) -> str:
    """A warning above everything when the run's model does not rank its validation patients
    (model.json's verdict, or an ensemble's out-of-fold one); nothing for a model that does,
    or a run from before the verdict."""
    path = run_dir / rundir.MODEL_SIDECAR
    if not path.is_file():
        path = run_dir / rundir.ENSEMBLE
    data, _ = _read_metrics(path)
    verdict = RankingVerdict.from_sidecar(data or {})
    if verdict is None or verdict.ranks:
        return ""
    return f'<p class="verdict"><b>Warning:</b> {_esc(verdict.warning())}</p>'


def _true_labels(run_dir: Path) -> dict[str, int]:
    """patient_id -> label of the patients whose label the run knows: its validation
    predictions and its evaluation (predict itself knows no labels)."""
    labels: dict[str, int] = {}
    for path in (run_dir / rundir.VAL_PREDICTIONS,
                 run_dir / rundir.EVALUATION / rundir.EVALUATION_PREDICTIONS):  # fmt: skip
        if not path.is_file():
            continue
        try:
            table = pd.read_csv(path, dtype={"patient_id": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        if {"patient_id", "label"} <= set(table.columns):
            labels.update(zip(table["patient_id"], table["label"].astype(int), strict=True))
    return labels


_LABEL_WORDS = {1: "metastasis", 0: "no metastasis"}


# --- the page -------------------------------------------------------------------------------

_SECTIONS = (
    ("cross_validation", "Cross-validation"),
    ("metrics", "Evaluation metrics"),
    ("localisation", "Localisation"),
    ("subgroups", "Subgroups"),
    ("plots", "Evaluation plots"),
    ("curves", "Learning curves"),
    ("heatmaps", "Highest-scoring slices"),
    ("config", "Configuration"),
)


RUN_FILES = rundir.RUN_FILES
"""What makes a folder a run's: any one of these (a run that could not start has only its
log, one stopped before its first epoch its log and config)."""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's self-contained HTML report and return its path.

    ``out`` defaults to ``RUN/report.html``. Sections whose inputs are missing or
    unreadable carry a one-line note; the call fails only when ``run_dir`` is not a folder
    or holds none of a run's files (a wrong path would otherwise get an empty report).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise FileNotFoundError(
            f"{run_dir}: not a run folder (it has none of {', '.join(RUN_FILES)})"
        )
    out = Path(out) if out is not None else run_dir / rundir.REPORT
    config_text, config, problem = _read_config(run_dir)
    verdict = _verdict_box(run_dir)
    cross_validation = cross_validation_section(run_dir)  # an ensemble's folds, else None
    bodies = {
        "cross_validation": cross_validation,
        "metrics": _metrics_section(run_dir),
        "localisation": _localisation_section(run_dir),
        "subgroups": _subgroups_section(run_dir),
        "plots": _plots_section(run_dir),
        "curves": _learning_section(run_dir, _stage_epochs(config))
        if cross_validation is None
        else '<p class="meta">Each fold\'s curves: see Cross-validation.</p>',
        "heatmaps": _heatmap_section(run_dir),
        "config": _config_section(run_dir, config_text, problem),
    }
    # Optional sections (cross-validation, localisation, subgroups) without content are left out.
    shown = [(key, title) for key, title in _SECTIONS if bodies[key]]
    nav = "".join(f'<a href="#{key}">{_esc(title)}</a>' for key, title in shown)
    sections = "".join(
        f'<section id="{key}"><h2>{_esc(title)}</h2>{bodies[key]}</section>' for key, title in shown
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>brainmets report: {_esc(run_dir.resolve().name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>brainmets run report: {_esc(run_dir.resolve().name)}</h1>"
        f'<p class="meta">Run folder <code>{_esc(run_dir.resolve())}</code> · generated '
        f"{generated} · patient-level detection of brain metastases on head CT</p>"
        f"{verdict}<nav>{nav}</nav>{sections}</body></html>\n"
    )
    return atomic_write_text(out, page)
