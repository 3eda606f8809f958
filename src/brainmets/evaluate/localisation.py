"""Localisation: does the model find a patient positive for the lesion, or for something else?

A patient-level AUC cannot tell a model that looks at the metastasis from one that reads a
shortcut (a scanner, a kernel, a burned-in marker that differs between the classes). With
lesion truth (``brainmets.data.lesions``) three measures can:

* **top-slice hit rate**: among true-positive patients, the share whose top-scoring slice
  (the one that gave the patient's score) lies within ``SLAB_TOLERANCE`` slab of a slab that
  cuts a lesion;
* **pointing game** (Zhang et al., 2016): among the same patients, the share whose Grad-CAM
  peak on the top slice lies within a lesion's radius plus ``margin_mm`` of its centre, for a
  lesion that the top slice is within one slab of (a peak over the right spot of the wrong
  slice is no hit). A flat map (no positive evidence) has no peak: a miss;
* **lesion-level detection**: per lesion of every positive patient, whether a slab that cuts
  it is among the patient's ``top_k`` highest-scoring slices; also by diameter band.

Each comes with its chance level: what a slice (or a pixel of the head on the top slice)
drawn at random would score for the same patients, so that "near chance" is a number. All
three get Wilson score intervals. For lesion-level detection they treat the lesions of one
patient as independent, which they are not quite (a model that misses a patient's slices
misses its lesions together): the interval is then somewhat too narrow. A bootstrap over
patients would respect that, but collapses to a point at 100 % detection, which small
cohorts of conspicuous lesions reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from brainmets.data.cache import PatientCache
from brainmets.data.lesions import CachedLesion, PlacedLesions
from brainmets.evaluate import DEFAULT_MARGIN_MM, DEFAULT_TOP_K
from brainmets.metrics import wilson_interval

LOCALISATION_PNG = "localisation.png"
"""The figure of ``evaluate --lesions``: the report shows it in its localisation section."""
SLAB_TOLERANCE = 1
NETWORK_STRIDE = 32
"""Input pixels per cell of ResNet's layer4 map, the map Grad-CAM upsamples."""
"""A top slice this many slabs from a slab through a lesion still counts as on it."""
DIAMETER_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<10 mm", 0.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    (">20 mm", 20.0, math.inf),
)
"""Lesion diameter bands (name, low, high); 10 and 20 mm fall in the middle band."""


PATIENT_COLUMNS = [
    "patient_id", "probability", "decision", "true_positive", "top_slice", "lesions", "hit",
    "hit_chance", "cam_peak_row", "cam_peak_column", "pointing", "pointing_chance", "pointing_ceiling",
    "peak_to_lesion_mm",
]  # fmt: skip
"""localisation_patients.csv: one row per positive patient with placed lesions; the hit and
pointing columns are for true positives only."""
LESION_COLUMNS = [
    "patient_id", "lesion", "line", "diameter_mm", "band", "slices", "detected", "chance",
    "true_positive_patient",
]  # fmt: skip
"""localisation_lesions.csv: one row per placed lesion of a positive patient."""


def diameter_band(diameter_mm: float) -> str:
    """The band of a lesion diameter: below 10 mm, 10 to 20 mm, above 20 mm."""
    if diameter_mm < 10.0:
        return DIAMETER_BANDS[0][0]
    return DIAMETER_BANDS[1][0] if diameter_mm <= 20.0 else DIAMETER_BANDS[2][0]


def slab_distance(slice_index: int, lesion: CachedLesion) -> int:
    """Slabs between ``slice_index`` and the nearest slab that cuts the lesion."""
    return int(min(abs(slice_index - k) for k in lesion.slices))


def slice_hits(num_slices: int, lesions: list[CachedLesion]) -> np.ndarray:
    """bool [num_slices]: the slices that would count as a top-slice hit."""
    index = np.arange(num_slices)
    hits = np.zeros(num_slices, dtype=bool)
    for lesion in lesions:
        for k in lesion.slices:
            hits |= np.abs(index - k) <= SLAB_TOLERANCE
    return hits


def lesion_disc(lesion: CachedLesion, shape: tuple[int, int], margin_mm: float) -> np.ndarray:
    """bool [H, W]: cache pixels within the lesion's radius plus ``margin_mm`` of its centre."""
    rows, cols = np.indices(shape)
    distance = np.hypot(
        (rows - lesion.row) * lesion.pixel_mm[0], (cols - lesion.column) * lesion.pixel_mm[1]
    )
    return distance <= lesion.diameter_mm / 2 + margin_mm


def in_plane_mm(lesion: CachedLesion, row: float, column: float) -> float:
    """Distance (mm, in the slice plane) from a cache pixel to the lesion's centre."""
    return float(
        math.hypot(
            (row - lesion.row) * lesion.pixel_mm[0], (column - lesion.column) * lesion.pixel_mm[1]
        )
    )


@dataclass
class PatientView:
    """What the figure needs of one true-positive patient."""

    patient_id: str
    probability: float
    top_slice: int
    image: np.ndarray
    cam: np.ndarray
    peak: tuple[float, float] | None
    hit: bool
    pointing: bool
    lesions: list[CachedLesion]


@dataclass
class Localisation:
    """The measures (``summary``, for metrics.json) and their per-patient, per-lesion rows."""

    summary: dict[str, Any]
    patients: pd.DataFrame
    lesions: pd.DataFrame
    views: list[PatientView] = field(default_factory=list)


def _slice_logits(trained, array: np.ndarray) -> np.ndarray:
    out = trained.scorer([array])
    return out.slice_logits.float().cpu().numpy()


PEAK_LEVEL = 0.99
"""Pixels at this share of the heatmap's maximum or above form its peak region."""


def heatmap_peak(cam: np.ndarray) -> tuple[float, float] | None:
    """Where the heatmap peaks: the centre of its maximal region (pixels within 1 % of the
    maximum, 8-connected to the first of them); None for a flat map (Grad-CAM found no
    positive evidence).

    Not the first maximal pixel: Grad-CAM's map is a coarse grid upsampled with replicated
    borders, so a maximal cell at the border is a plateau that runs to the image edge, and
    its first pixel lies on the edge, up to a cell away from the cell's centre.
    """
    from scipy import ndimage

    if not np.any(cam > 0) or float(cam.max()) == float(cam.min()):
        return None
    regions, _ = ndimage.label(cam >= PEAK_LEVEL * cam.max(), structure=np.ones((3, 3)))
    first = np.unravel_index(int(np.argmax(cam)), cam.shape)
    rows, columns = np.nonzero(regions == regions[first])
    return float(rows.mean()), float(columns.mean())


class Pointing(NamedTuple):
    """The pointing game on one true positive's top slice."""

    hit: bool
    chance: float
    """Share of the head's pixels (non-air in the brain window) within reach of a lesion."""
    ceiling: bool
    """Whether a heatmap peaking in the best of its cells would hit: Grad-CAM's map is
    upsampled from ResNet's layer4 grid (one cell per 32 input pixels), so its peak can only
    lie at a few places (:func:`reachable_peaks`), and at low resolution even a perfect map
    may not reach a small lesion."""
    distance_mm: float | None
    """From the peak to the nearest eligible lesion centre."""


def _peak_positions(side: int) -> list[float]:
    """Along one axis, where :func:`heatmap_peak` can put the peak of a map upsampled from
    ``side / NETWORK_STRIDE`` cells: a cell centre, or for a border cell the middle of its
    plateau between the edge and its centre."""
    cells = math.ceil(side / NETWORK_STRIDE)
    centres = [(i + 0.5) * side / cells - 0.5 for i in range(cells)]
    if cells == 1:
        return [(side - 1) / 2]
    return [centres[0] / 2, *centres[1:-1], (centres[-1] + side - 1) / 2]


def reachable_peaks(shape: tuple[int, int]) -> list[tuple[float, float]]:
    """Every peak position a Grad-CAM map of this shape can have with one maximal cell."""
    return [(r, c) for r in _peak_positions(shape[0]) for c in _peak_positions(shape[1])]


def pointing_game(
    peak: tuple[float, float] | None,
    image: np.ndarray,
    top: int,
    lesions: list[CachedLesion],
    margin_mm: float,
) -> Pointing:
    """Whether the heatmap ``peak`` on the ``top`` slice ``image`` lies within the radius plus
    ``margin_mm`` of a lesion the top slice is within one slab of (see :class:`Pointing`)."""
    eligible = [les for les in lesions if slab_distance(top, les) <= SLAB_TOLERANCE]
    if not eligible:
        return Pointing(False, 0.0, False, None)
    discs = np.zeros(image.shape, dtype=bool)
    for lesion in eligible:
        discs |= lesion_disc(lesion, image.shape, margin_mm)
    head = image > 0
    chance = float((discs & head).sum() / max(1, head.sum()))
    reach = [les.diameter_mm / 2 + margin_mm for les in eligible]
    centres = reachable_peaks(image.shape)
    ceiling = any(
        min(in_plane_mm(les, *c) for c in centres) <= r
        for les, r in zip(eligible, reach, strict=True)
    )
    if peak is None:
        return Pointing(False, chance, ceiling, None)
    distances = [in_plane_mm(les, *peak) for les in eligible]
    hit = any(d <= r for d, r in zip(distances, reach, strict=True))
    return Pointing(hit, chance, ceiling, min(distances))


def _lesion_rows(
    pid: str, logits: np.ndarray, lesions: list[CachedLesion], top_k: int, tp: bool
) -> list[dict]:
    top = set(np.argsort(-logits, kind="stable")[:top_k].tolist())
    n = len(logits)
    rows = []
    for lesion in lesions:
        cut = set(lesion.slices)
        # A random choice of min(k, n) slices misses every slab of the lesion with probability
        # C(n - |cut|, k) / C(n, k).
        k = min(top_k, n)
        miss = math.comb(n - len(cut), k) / math.comb(n, k) if n - len(cut) >= k else 0.0
        rows.append(
            {
                "patient_id": pid,
                "lesion": lesion.number,
                "line": lesion.line,
                "diameter_mm": lesion.diameter_mm,
                "band": diameter_band(lesion.diameter_mm),
                "slices": " ".join(map(str, lesion.slices)),
                "detected": bool(top & cut),
                "chance": 1.0 - miss,
                "true_positive_patient": tp,
            }
        )
    return rows


def _patient_row(pred, lesions: list[CachedLesion]) -> dict:
    return {
        "patient_id": pred.patient_id,
        "probability": float(pred.probability),
        "decision": int(pred.decision),
        "true_positive": bool(pred.decision == 1),
        "top_slice": int(pred.top_slice_index),
        "lesions": len(lesions),
    }


def _grad_cams(trained, images: list[np.ndarray]) -> np.ndarray:
    import torch

    from brainmets.heatmaps import grad_cam

    if not images:
        return np.zeros((0, 0, 0), dtype=np.float32)
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(trained.device)
    return grad_cam(trained.model, trained.scorer.network_inputs(stacked))


def localise(
    trained,
    cache: PatientCache,
    predictions: pd.DataFrame,
    placed: PlacedLesions,
    *,
    top_k: int = DEFAULT_TOP_K,
    margin_mm: float = DEFAULT_MARGIN_MM,
    alpha: float = 0.05,
) -> Localisation:
    """The localisation measures of ``predictions`` (score_cache's rows with ``decision``)
    against the lesions placed on ``cache``."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if margin_mm < 0:
        raise ValueError(f"the pointing margin must not be negative, got {margin_mm} mm")
    positives = predictions[predictions["label"] == 1]
    with_truth = [p for p in positives.itertuples() if placed.of(p.patient_id)]
    patient_rows, lesion_rows, tp_images, tp_rows = [], [], [], []
    for pred in with_truth:
        lesions = placed.of(pred.patient_id)
        array = cache.load(pred.patient_id)
        logits = _slice_logits(trained, np.asarray(array))
        row = _patient_row(pred, lesions)
        lesion_rows += _lesion_rows(pred.patient_id, logits, lesions, top_k, row["true_positive"])
        if row["true_positive"]:
            hits = slice_hits(len(logits), lesions)
            row.update(hit=bool(hits[row["top_slice"]]), hit_chance=float(hits.mean()))
            tp_images.append(np.asarray(array[row["top_slice"]]))
            tp_rows.append(row)
        patient_rows.append(row)
    cams = _grad_cams(trained, tp_images)
    views = []
    for row, image, cam in zip(tp_rows, tp_images, cams, strict=True):
        lesions = placed.of(row["patient_id"])
        peak = heatmap_peak(cam)
        game = pointing_game(peak, image, row["top_slice"], lesions, margin_mm)
        row.update(
            cam_peak_row=None if peak is None else peak[0],
            cam_peak_column=None if peak is None else peak[1],
            pointing=game.hit,
            pointing_chance=game.chance,
            pointing_ceiling=game.ceiling,
            peak_to_lesion_mm=game.distance_mm,
        )
        views.append(PatientView(row["patient_id"], row["probability"], row["top_slice"], image,
                                 cam, peak, row["hit"], game.hit, lesions))  # fmt: skip
    patients = pd.DataFrame(patient_rows, columns=PATIENT_COLUMNS)
    lesions_table = pd.DataFrame(lesion_rows, columns=LESION_COLUMNS)
    options = {"top_k": top_k, "margin_mm": margin_mm, "alpha": alpha}
    summary = _summary(patients, lesions_table, predictions, placed, options)
    return Localisation(summary, patients, lesions_table, views)


def _proportion(hits: pd.Series, chance: pd.Series, alpha: float) -> dict[str, Any]:
    k, n = int(hits.sum()), int(hits.size)
    lo, hi = wilson_interval(k, n, alpha)
    return {
        "value": k / n if n else None,
        "ci": [None, None] if n == 0 else [lo, hi],
        "successes": k,
        "n": n,
        "chance": float(chance.mean()) if n else None,
        "ci_method": "wilson",
    }


def _detection(table: pd.DataFrame, alpha: float) -> dict[str, Any]:
    return {
        **_proportion(table["detected"].astype(bool), table["chance"], alpha),
        "patients": int(table["patient_id"].nunique()),
    }


def _summary(
    patients: pd.DataFrame,
    lesions: pd.DataFrame,
    predictions: pd.DataFrame,
    placed: PlacedLesions,
    options: dict[str, Any],
) -> dict[str, Any]:
    alpha = options.pop("alpha")
    tp = patients[patients["true_positive"].astype(bool)]
    positives = set(predictions.loc[predictions["label"] == 1, "patient_id"])
    negatives = set(predictions.loc[predictions["label"] == 0, "patient_id"])
    with_lesions = {lesion.patient_id for lesion in placed.lesions}
    detection = _detection(lesions, alpha)
    detection["by_diameter"] = {
        name: _detection(lesions[lesions["band"] == name], alpha) for name, _, _ in DIAMETER_BANDS
    }
    cell_mm = (
        float(np.mean(placed.lesions[0].pixel_mm)) * NETWORK_STRIDE if placed.lesions else None
    )
    return {
        **options,
        "slab_tolerance": SLAB_TOLERANCE,
        "positive_patients": len(positives),
        "positive_patients_with_lesions": len(positives & with_lesions),
        "positives_without_lesions": sorted(positives - with_lesions),
        "negatives_with_lesions": sorted(negatives & with_lesions),
        "true_positive_patients": len(tp),
        "lesions_placed": len(placed.lesions),
        "lesions_not_placed": placed.unplaced,
        "top_slice_hit_rate": _proportion(tp["hit"].astype(bool), tp["hit_chance"], alpha),
        "pointing_game": {
            **_proportion(tp["pointing"].astype(bool), tp["pointing_chance"], alpha),
            "flat_heatmaps": int(tp["cam_peak_row"].isna().sum()),
            "resolution_ceiling": float(tp["pointing_ceiling"].astype(bool).mean())
            if len(tp)
            else None,
            "heatmap_cell_mm": cell_mm,
        },
        "lesion_detection": detection,
    }


def write_localisation_tables(result: Localisation, out: Path) -> None:
    from brainmets.io import atomic_write_csv

    atomic_write_csv(out / "localisation_patients.csv", result.patients)
    atomic_write_csv(out / "localisation_lesions.csv", result.lesions)
