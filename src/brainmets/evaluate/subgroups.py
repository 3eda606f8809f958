"""Subgroups: for which scanners, kernels, slice thicknesses and lesion sizes does it hold?

AUC, sensitivity and specificity with 95% CIs (percentile bootstrap for the AUC, Wilson score
for the proportions, as for the whole cohort) within each group of:

* ``manufacturer``, ``kernel`` and ``thickness`` (slice thickness band) of the series each
  patient's cache entry was prepared from: from the series index (``brainmets index``) when
  given, else from the first header of the series under the source the cache names;
* ``lesion_size``, when lesion truth is given: the positives whose largest lesion lies in the
  band, against every negative (negatives have no lesion size, so no specificity here).

A group with fewer than MIN_PER_CLASS patients of the class a measure needs gets no number
for it, but the words "too few" and the counts: an estimate on three patients misleads more
than it tells.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from brainmets.data.cache import PatientCache
from brainmets.data.dicom import frame_value, is_multiframe, read_header
from brainmets.data.lesions import PlacedLesions, SeriesFiles
from brainmets.data.series_index import SeriesIndex
from brainmets.evaluate.localisation import DIAMETER_BANDS, diameter_band
from brainmets.metrics import confidence_intervals, patient_metrics

MIN_PER_CLASS = 5
"""Patients of a class below which a subgroup's measure on that class is not given."""
UNKNOWN = "unknown"
THICKNESS_BANDS = (("<2 mm", 2.0), ("2-4 mm", 4.0), (">=4 mm", math.inf))
"""Slice thickness bands: thin reconstructions, intermediate, and the routine 5 mm."""
SERIES_FIELDS = ("manufacturer", "kernel", "slice_thickness_mm")
SUBGROUP_BY = ("manufacturer", "kernel", "thickness", "lesion_size")


def thickness_band(mm: float) -> str:
    if mm is None or not math.isfinite(mm) or mm <= 0:
        return UNKNOWN
    return next(name for name, below in THICKNESS_BANDS if mm < below)


def _header_fields(source: str, series_uid: str, files: SeriesFiles) -> dict[str, Any]:
    """The series fields from its first file's header; unknown when unreadable."""
    if not source or not series_uid or not os.path.exists(source):
        return {}
    try:
        paths = files.of(source, series_uid)
        ds = read_header(paths[0]) if paths else None
    except OSError:
        return {}
    if ds is None:
        return {}
    # An Enhanced CT file keeps kernel and thickness in its first frame's functional groups.
    frame = 0 if is_multiframe(ds) else None
    kernel = frame_value(ds, frame, "CTReconstructionSequence", "ConvolutionKernel") or ""
    try:
        thickness = float(frame_value(ds, frame, "PixelMeasuresSequence", "SliceThickness"))
    except (TypeError, ValueError):
        thickness = math.nan
    return {
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
        "kernel": kernel if isinstance(kernel, str) else "\\".join(map(str, kernel)),
        "slice_thickness_mm": thickness,
    }


def series_fields(
    cache: PatientCache,
    patient_ids: list[str],
    index: SeriesIndex | None = None,
    files: SeriesFiles | None = None,
) -> pd.DataFrame:
    """patient_id, manufacturer, kernel, slice_thickness_mm of each patient's cached series:
    from the series ``index`` when given, else from the first header of the series."""
    rows = cache.index.set_index("patient_id").loc[patient_ids]
    files = files or SeriesFiles()
    by_series: dict[str, dict] = {}
    if index is not None:
        series = index.series
        by_series = {
            str(r["series_uid"]): {f: r[f] for f in SERIES_FIELDS}
            for r in series.to_dict("records")
        }
    out = []
    for pid, row in zip(patient_ids, rows.to_dict("records"), strict=True):
        uid = str(row.get("series_uid", "") or "")
        fields = by_series.get(uid)
        if fields is None and row.get("source_kind") in ("dicom", "dicom_dir"):
            fields = _header_fields(str(row.get("source", "")), uid, files)
        out.append({"patient_id": pid, **{f: "" for f in SERIES_FIELDS[:2]},
                    "slice_thickness_mm": math.nan, **(fields or {})})  # fmt: skip
    table = pd.DataFrame(out)
    for name in SERIES_FIELDS[:2]:
        table[name] = table[name].fillna("").astype(str).str.strip().replace("", UNKNOWN)
    return table


def _measure(value: float, ci: tuple[float, float], count: int, need: str) -> dict[str, Any]:
    if count < MIN_PER_CLASS:
        return {"value": None, "ci": None, "note": f"too few: {count} {need}"}
    clean = [None if math.isnan(x) else float(x) for x in ci]
    return {"value": None if math.isnan(value) else float(value), "ci": clean, "note": ""}


def _group_measures(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int, seed: int, specificity: bool
) -> dict[str, Any]:
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    metrics = patient_metrics(y, p, threshold)
    ci = confidence_intervals(y, p, threshold, n_boot=n_boot, seed=seed)
    out = {
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "auc": _measure(
            metrics["auc"],
            ci["auc"],
            min(n_pos, n_neg),
            "positives" if n_pos < n_neg else "negatives",
        ),  # fmt: skip
        "sensitivity": _measure(metrics["sensitivity"], ci["sensitivity"], n_pos, "positives"),
    }
    if specificity:
        out["specificity"] = _measure(metrics["specificity"], ci["specificity"], n_neg, "negatives")
    else:
        out["specificity"] = {"value": None, "ci": None, "note": "all negatives (no lesion size)"}
    return out


def subgroup_metrics(
    predictions: pd.DataFrame,
    fields: pd.DataFrame,
    threshold: float,
    *,
    placed: PlacedLesions | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One entry per (by, group): its counts and AUC, sensitivity and specificity, each a
    value with its CI or a "too few" note. ``predictions`` holds patient_id, label and
    ``plain`` (the probability ranked and called at ``threshold``)."""
    table = predictions[["patient_id", "label", "plain"]].merge(fields, on="patient_id", how="left")
    table["thickness"] = table["slice_thickness_mm"].map(thickness_band)
    y_all, p_all = table["label"].to_numpy().astype(bool), table["plain"].to_numpy(np.float64)
    result = []
    for by in ("manufacturer", "kernel", "thickness"):
        for group, rows in table.groupby(by, sort=True):
            mask = table.index.isin(rows.index)
            measures = _group_measures(y_all[mask], p_all[mask], threshold, n_boot, seed, True)
            result.append({"by": by, "group": str(group), **measures})
    if placed is not None and placed.lesions:
        largest: dict[str, float] = {}
        for lesion in placed.lesions:
            largest[lesion.patient_id] = max(
                largest.get(lesion.patient_id, 0.0), lesion.diameter_mm
            )
        band = table["patient_id"].map(
            lambda pid: diameter_band(largest[pid]) if pid in largest else ""
        )
        for name, _, _ in DIAMETER_BANDS:
            mask = (~y_all) | ((band == name).to_numpy() & y_all)
            measures = _group_measures(y_all[mask], p_all[mask], threshold, n_boot, seed, False)
            result.append({"by": "lesion_size", "group": name, **measures})
    return result


def format_subgroups(entries: list[dict[str, Any]]) -> list[str]:
    """The subgroup table as lines of the terminal summary."""
    lines = []
    for entry in entries:
        cells = []
        for name, short in (("auc", "AUC"), ("sensitivity", "sens"), ("specificity", "spec")):
            m = entry[name]
            if m["value"] is None:
                cells.append(f"{short} {m['note'] or 'n/a'}")
            else:
                lo, hi = m["ci"] or [None, None]
                ci = f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else ""
                cells.append(f"{short} {m['value']:.3f}{ci}")
        group = f"{entry['by']} {entry['group']}"
        lines.append(f"  {group:<28} n {entry['n']:>4} ({entry['n_pos']}+): " + "; ".join(cells))
    return lines
