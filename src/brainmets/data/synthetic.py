"""Synthetic head-CT cohort written as real DICOM (``brainmets synth``).

The cohort is the embedded default for the demo and the tests: it exercises the whole
pipeline (index -> prepare -> train -> evaluate) without patient data, and it is hard
enough that a model has to learn something. Each patient is an analytic 3-D head:

* an elliptical skull with cortical tables and diploe (700-1500 HU) of varying thickness,
  scalp, and a skull base with soft tissue and air cells in the lowest slices;
* brain parenchyma with grey/white contrast (cortex and deep nuclei ~35-40 HU, white
  matter ~25-30 HU), sulci, interhemispheric fissure and ventricles filled with CSF;
* positives: 1-4 solid or ring-enhancing metastases (45-90 HU, 3-20 mm) with vasogenic
  oedema (15-22 HU) that spreads through white matter only;
* distractors in either class: calcifications (150-400 HU) and beam-hardening streaks;
* optionally a confounder (``confounder="marker"``): a burned-in label in the corner of every
  positive's images, something unrelated to the lesion that a network can learn instead
  (the cohort on which localisation metrics must expose the shortcut).

Anatomy is sampled on thin sub-slices and averaged over each slab, so lesions show the
partial-volume dilution of a real 5 mm reconstruction; Gaussian noise is added and the
slices are blurred like a soft-tissue kernel, which also gives the noise its grain. The returned HU are integers clipped to what every encoding
can store, so a reader that decodes the DICOM exactly gets :attr:`SyntheticPatient.hu`.

Encodings vary by patient like scanners do (signed or unsigned pixels, padding values,
kernels, file names, folder layout, acquisition direction), and each study holds a
localizer that the series choice must skip. Output is byte-identical for the same
configuration: all randomness comes from ``seed`` and the patient number, UIDs are
derived from them, and dates are fixed. ``lesions.csv`` beside ``labels.csv`` gives each
metastasis's centre (patient coordinates, mm) and diameter in the format
``brainmets evaluate --lesions`` reads (brainmets.data.lesions).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage
from tqdm import tqdm

from brainmets.data import synth_settings as defaults
from brainmets.data.dicom import PADDING_HU
from brainmets.data.labels import assign_splits
from brainmets.io import atomic_write_text

__all__ = [
    "OUTSIDE_FOV_HU",
    "LESION_FILE",
    "MARKER_HU",
    "Calcification",
    "Lesion",
    "SynthConfig",
    "SyntheticPatient",
    "Tissue",
    "assign_labels",
    "derived_uid",
    "patient_id",
    "patient_rng",
    "render_patient",
    "write_synthetic_cohort",
]

_AIR_HU = -1000.0
OUTSIDE_FOV_HU = PADDING_HU
""":attr:`SyntheticPatient.hu` outside the reconstruction circle: what a reader makes of the
padding there (brainmets.data.dicom.PADDING_HU), so a decoded series equals the rendering."""

# The lowest HU every encoding can hold: unsigned 12-bit pixels with intercept -1024 keep
# stored value 0 for padding, so -1024 is not available to real pixels.
_HU_MIN, _HU_MAX = -1023.0, 3071.0
LESION_FILE = "lesions.csv"
MARKER_HU = 1000.0
"""HU of the confounder's burned-in marker: drawn at full intensity, as annotations are."""
# The marker: a bar of (height, width) like a line of burned-in text, this far from the image's
# top-left corner: outside the reconstruction circle for any allowed field of view, where
# annotations sit.
_MARKER_MM, _MARKER_INSET_MM = (12.0, 40.0), 4.0
_MANUFACTURER = "brainmets-synth"
# Name-based UUIDs (RFC 4122 version 5) under the 2.25 root: valid, unique and reproducible.
# pydicom's generate_uid(prefix=None) is random and ignores its entropy sources.
_UID_NAMESPACE = uuid.UUID("0b6a3a52-5f0e-4d38-9a4b-2b5c1f2e7d10")


def derived_uid(*parts: object) -> UID:
    """The same UID for the same parts, e.g. ``derived_uid(config_json, "SYN0001", "study")``."""
    name = "\x1f".join(str(part) for part in parts)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


_IMPLEMENTATION_CLASS_UID = derived_uid("brainmets-synth", "implementation", 1)
_STUDY_DATE, _STUDY_TIME = "20200101", "080000"


class Tissue(IntEnum):
    """Tissue classes of :attr:`SyntheticPatient.tissue`."""

    AIR = 0
    SCALP = 1
    BONE_CORTICAL = 2
    BONE_DIPLOE = 3
    SOFT_TISSUE = 4
    CSF = 5
    GREY = 6
    WHITE = 7
    OEDEMA = 8
    NECROSIS = 9
    LESION = 10
    CALCIFICATION = 11
    MIXED = 255
    """The slab holds more than one tissue at this pixel (partial volume)."""


# Internal label ids: anatomy uses the Tissue values; each lesion and calcification gets
# its own id so that it can carry its own HU in the per-patient lookup table.
_MAX_LESIONS, _MAX_CALCIFICATIONS = 8, 4
_LESION_ID = 16  # lesion i: enhancing part 16 + 2i, necrotic core 17 + 2i
_CALC_ID = _LESION_ID + 2 * _MAX_LESIONS
_NUM_IDS = _CALC_ID + _MAX_CALCIFICATIONS
_ID_TO_TISSUE = np.array(
    [t.value for t in Tissue if t is not Tissue.MIXED]
    + [Tissue.AIR.value] * (_LESION_ID - len(Tissue) + 1)
    + [Tissue.LESION.value, Tissue.NECROSIS.value] * _MAX_LESIONS
    + [Tissue.CALCIFICATION.value] * _MAX_CALCIFICATIONS,
    dtype=np.uint8,
)


_DEFAULT_LESIONS = defaults.LESION_SETTINGS[defaults.DEFAULT_LESIONS]

MIN_COVERAGE_MM = 50.0
"""Shortest scan range the head model fills: below it, brain, lesions and vertex overlap."""


class SynthConfig(BaseModel):
    """Options of a synthetic cohort; every field is part of the output's identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_patients: int = Field(defaults.NUM_PATIENTS, ge=1, le=9999)
    positive_fraction: float = Field(defaults.POSITIVE_FRACTION, ge=0.0, le=1.0)
    """Positives = round(num_patients * positive_fraction), exactly (Python rounding)."""
    slices: tuple[int, int] = defaults.SLICES
    """Inclusive range of the axial series' slice count (brain plus a few slices beyond it)."""
    matrix: int = Field(defaults.MATRIX, ge=64, le=1024)
    slice_thickness_mm: float = Field(defaults.SLICE_THICKNESS_MM, gt=0.0, le=10.0)
    seed: int = Field(defaults.SEED, ge=0)
    field_of_view_mm: float = Field(230.0, ge=220.0, le=500.0)
    """Reconstruction diameter: it must hold the head, hence at least 220 mm."""
    lesions_per_positive: tuple[int, int] = (1, 4)
    # The named lesion settings (default, conspicuous): brainmets.data.synth_settings.
    lesion_diameter_mm: tuple[float, float] = _DEFAULT_LESIONS["lesion_diameter_mm"]
    lesion_hu: tuple[float, float] = _DEFAULT_LESIONS["lesion_hu"]
    """HU of the enhancing tissue before partial-volume averaging."""
    ring_fraction: float = Field(0.35, ge=0.0, le=1.0)
    """Share of lesions of 8 mm or more that are ring-enhancing (necrotic core)."""
    oedema_probability: float = Field(0.7, ge=0.0, le=1.0)
    noise_sigma_hu: tuple[float, float] = (3.0, 8.0)
    calcification_probability: float = Field(0.5, ge=0.0, le=1.0)
    """Chance that a patient (either label) has 1-3 calcifications of 150-400 HU."""
    streak_probability: float = Field(0.3, ge=0.0, le=1.0)
    """Chance that a patient (either label) has beam-hardening streaks in the low slices."""
    confounder: Literal["none", "marker"] = "none"
    """``marker``: every positive's images carry a burned-in 12 x 40 mm bar in the top-left
    corner, outside the field of view (MARKER_HU): a shortcut unrelated to the lesion."""

    @model_validator(mode="after")
    def _check_ranges(self) -> SynthConfig:
        for name in (
            "slices",
            "lesions_per_positive",
            "lesion_diameter_mm",
            "lesion_hu",
            "noise_sigma_hu",
        ):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: lower bound {low} is above upper bound {high}")
        if self.slices[0] < 8:
            raise ValueError(
                f"slices: at least 8 needed to hold brain, vertex and base, got {self.slices}"
            )
        coverage = self.slices[0] * self.slice_thickness_mm
        if coverage < MIN_COVERAGE_MM:
            raise ValueError(
                f"slices x slice_thickness_mm must cover at least {MIN_COVERAGE_MM:g} mm of head "
                f"(skull base, brain, lesions and vertex), got {self.slices[0]} x "
                f"{self.slice_thickness_mm:g} = {coverage:g} mm"
            )
        if not 1 <= self.lesions_per_positive[0] <= self.lesions_per_positive[1] <= _MAX_LESIONS:
            raise ValueError(f"lesions_per_positive must lie in [1, {_MAX_LESIONS}]")
        if self.lesion_diameter_mm[0] <= 0 or self.lesion_diameter_mm[1] > 40:
            raise ValueError("lesion_diameter_mm must lie in (0, 40] mm")
        if self.noise_sigma_hu[0] < 0:
            raise ValueError("noise_sigma_hu must be non-negative")
        return self


@dataclass(frozen=True)
class Lesion:
    """One metastasis, in patient coordinates (LPS, mm)."""

    kind: Literal["solid", "ring"]
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    """Largest axis of the ellipsoid; the other two are 80-100 % of it."""
    peak_hu: float
    oedema_diameter_mm: float
    """0 when the lesion has no oedema."""
    slices: tuple[int, ...]
    """Indices of the slices (inferior -> superior) in which it is rendered."""


@dataclass(frozen=True)
class Calcification:
    """A distractor: small, dense and benign."""

    centre_mm: tuple[float, float, float]
    diameter_mm: float
    hu: float


@dataclass
class SyntheticPatient:
    """A rendered patient; geometry matches what :func:`write_synthetic_cohort` writes."""

    hu: np.ndarray
    """float32 [N, H, W]: integer HU, slices inferior -> superior, OUTSIDE_FOV_HU beyond the FOV."""
    positions_mm: np.ndarray
    """float64 [N]: slice centres along +z (superior), ascending."""
    pixel_spacing_mm: tuple[float, float]
    """(row, column) spacing."""
    origin_mm: tuple[float, float]
    """(x, y) of the centre of pixel [0, 0]; rows run along +y, columns along +x."""
    slice_thickness_mm: float
    tissue: np.ndarray
    """uint8 [N, H, W] of :class:`Tissue`: the tissue filling the whole slab, else MIXED."""
    fov_mask: np.ndarray
    """bool [H, W]: inside the circular reconstruction field of view."""
    lesions: list[Lesion]
    calcifications: list[Calcification]
    noise_sigma_hu: float
    streaks: int
    """Number of beam-hardening streaks added."""
    burned_in: np.ndarray | None = None
    """bool [H, W]: the confounder's marker, stored as pixels although outside the field of
    view (:attr:`hu` holds MARKER_HU there); None without one."""

    @property
    def positive(self) -> bool:
        return bool(self.lesions)


# --------------------------------------------------------------------------- cohort plan


def patient_id(index: int) -> str:
    """Identifier of the patient with 0-based ``index``: SYN0001, SYN0002, ..."""
    return f"SYN{index + 1:04d}"


def patient_rng(cfg: SynthConfig, index: int) -> np.random.Generator:
    """The generator that renders patient ``index``; independent of the other patients."""
    return np.random.default_rng([cfg.seed, index + 1])


def assign_labels(cfg: SynthConfig) -> np.ndarray:
    """bool [num_patients]: exactly round(n * positive_fraction) positives, at random places."""
    num_positive = round(cfg.num_patients * cfg.positive_fraction)
    order = np.random.default_rng([cfg.seed, 0]).permutation(cfg.num_patients)
    return order < num_positive


# --------------------------------------------------------------------------- anatomy


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@dataclass(frozen=True)
class _Ellipsoid:
    """Axis-aligned ellipsoid in the head frame (u: left-right, v: anterior-posterior, z)."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]

    def inside(self, u: np.ndarray, v: np.ndarray, z: float) -> np.ndarray | None:
        dz = (z - self.centre[2]) / self.semi[2]
        if abs(dz) >= 1.0:
            return None
        qu = ((u - self.centre[0]) / self.semi[0]) ** 2
        qv = ((v - self.centre[1]) / self.semi[1]) ** 2
        return qu + qv < 1.0 - dz * dz

    def contains_point(self, u: float, v: float, z: float, margin: float) -> bool:
        q = sum(
            ((p - c) / (s + margin)) ** 2
            for p, c, s in zip((u, v, z), self.centre, self.semi, strict=True)
        )
        return q < 1.0


class _Head:
    """One patient's analytic head, sampled on demand at any height z (mm)."""

    def __init__(self, rng: np.random.Generator, z_low: float, z_high: float, thickness: float):
        # Head size, pose and skull: adults vary by about +-7 % in each axis.
        self.a = _uniform(rng, (68.0, 78.0))  # left-right semi-axis of the outer skull
        self.b = _uniform(rng, (84.0, 96.0))  # anterior-posterior
        self.skull = _uniform(rng, (4.5, 8.0))
        self.skull_wobble = rng.uniform(0.0, 0.25, size=2)
        self.skull_phase = rng.uniform(0.0, 2 * np.pi, size=2)
        self.table = _uniform(rng, (1.2, 2.2))  # cortical table thickness
        self.scalp = _uniform(rng, (3.0, 6.0))
        self.rotation = math.radians(_uniform(rng, (-12.0, 12.0)))

        # Cranio-caudal extent follows the scan range so that any slice count or thickness
        # gives 2-3 slabs of skull base below the brain and 1-2 of vertex above it.
        below, above = int(rng.integers(2, 4)), int(rng.integers(1, 3))
        self.z_base = z_low + (below - _uniform(rng, (0.2, 0.7))) * thickness
        self.z_top = z_high - (above - _uniform(rng, (0.0, 0.4))) * thickness
        self.z_widest = self.z_base + 0.4 * (self.z_top - self.z_base)
        self.vertex = _uniform(rng, (5.0, 8.0))  # skull thickness at the vertex
        self.base_plate = _uniform(rng, (3.0, 6.0))  # floor of the cranial fossae

        # Brain: atrophy widens sulci, the subarachnoid rim and the ventricles together.
        atrophy = _uniform(rng, (0.8, 1.6))
        self.csf_rim = 1.0 * atrophy
        self.cortex = _uniform(rng, (2.5, 3.5))
        self.sulci = int(rng.integers(26, 40))
        self.sulcus_width = _uniform(rng, (1.0, 1.6)) * atrophy
        self.sulcus_depth = _uniform(rng, (8.0, 14.0))
        self.sulcus_phase = rng.uniform(0.0, 2 * np.pi, size=3)
        self.sulcus_twist = _uniform(rng, (0.02, 0.06))  # rad per mm: gyri change with z
        self.fissure = 0.6 * atrophy
        self.deep_grey, self.ventricles = self._deep_structures(rng, atrophy)
        self.air_cells = [
            _Ellipsoid(
                (
                    _uniform(rng, (-30, 30)),
                    _uniform(rng, (-60, 40)),
                    self.z_base - _uniform(rng, (5, 20)),
                ),
                (_uniform(rng, (4, 12)), _uniform(rng, (4, 12)), _uniform(rng, (5, 12))),
            )
            for _ in range(int(rng.integers(2, 5)))
        ]

    def _deep_structures(
        self, rng: np.random.Generator, atrophy: float
    ) -> tuple[list[_Ellipsoid], list[_Ellipsoid]]:
        height = self.z_top - self.z_base
        zv = self.z_widest + 0.2 * height + _uniform(rng, (-3, 3))  # lateral ventricle bodies
        w = 4.0 * atrophy
        grey, csf = [], []
        for side in (-1.0, 1.0):
            grey += [
                _Ellipsoid((side * 11, 6, zv - 0.12 * height), (7, 11, 0.08 * height)),  # thalamus
                _Ellipsoid(
                    (side * 18, -8, zv - 0.10 * height), (6, 13, 0.08 * height)
                ),  # lentiform
            ]
            csf += [
                _Ellipsoid((side * (w + 1.5), 4, zv), (w, 24, 0.08 * height)),  # body
                _Ellipsoid(
                    (side * (w + 1.0), -20, zv - 3), (0.8 * w, 9, 0.06 * height)
                ),  # frontal horn
                _Ellipsoid((side * (w + 8.0), 26, zv - 6), (w, 9, 0.07 * height)),  # trigone
            ]
        csf += [
            _Ellipsoid((0, 2, zv - 0.12 * height), (0.4 * w, 12, 0.06 * height)),  # third
            _Ellipsoid((0, 38, self.z_base + 0.12 * height), (5, 0.8 * w, 0.05 * height)),  # fourth
        ]
        self.ventricle_top = zv + 0.08 * height
        return grey, csf

    # Vertical profiles: the fraction of the full in-plane size at height z.
    def outer_scale(self, z: float) -> float:
        if z <= self.z_widest:
            return 1.0
        t = (z - self.z_widest) / (self.z_top + self.vertex - self.z_widest)
        return math.sqrt(max(0.0, 1.0 - t * t))

    def cavity_scale(self, z: float) -> float:
        if z <= self.z_base or z >= self.z_top:
            return 0.0
        if z >= self.z_widest:
            t = (z - self.z_widest) / (self.z_top - self.z_widest)
            return math.sqrt(1.0 - t * t)
        # A flatter profile at the bottom: the skull base is broad, not a pole.
        t = (self.z_widest - z) / (self.z_widest - self.z_base)
        return (1.0 - t**4) ** 0.25

    def brain_depth_at(self, u: float, v: float, z: float) -> float:
        """Distance (mm, approximately) from the inner table into the brain; < 0 outside."""
        theta = math.atan2(v, u)
        return self.cavity_scale(z) * float(self._inner_radius(np.float64(theta))) - math.hypot(
            u, v
        )

    def _outer_radius(self, theta: np.ndarray) -> np.ndarray:
        return (
            self.a * self.b / np.sqrt((self.b * np.cos(theta)) ** 2 + (self.a * np.sin(theta)) ** 2)
        )

    def _inner_radius(self, theta: np.ndarray) -> np.ndarray:
        wobble = (
            1.0
            + self.skull_wobble[0] * np.sin(2 * theta + self.skull_phase[0])
            + self.skull_wobble[1] * np.sin(3 * theta + self.skull_phase[1])
        )
        return self._outer_radius(theta) - self.skull * wobble


Window = tuple[slice, slice]


def _window(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float) -> Window:
    """Rows and columns of the square that holds a circle of ``radius`` around (cx, cy)."""
    cols = np.searchsorted(x, (cx - radius, cx + radius))
    rows = np.searchsorted(y, (cy - radius, cy + radius))
    return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))


def _intersect(outer: Window, inner: Window) -> tuple[Window, Window] | None:
    """``inner`` clipped to ``outer``: (global window, the same window relative to ``outer``)."""
    rows = slice(max(outer[0].start, inner[0].start), min(outer[0].stop, inner[0].stop))
    cols = slice(max(outer[1].start, inner[1].start), min(outer[1].stop, inner[1].stop))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return None
    local = (
        slice(rows.start - outer[0].start, rows.stop - outer[0].start),
        slice(cols.start - outer[1].start, cols.stop - outer[1].start),
    )
    return (rows, cols), local


class _SliceRenderer:
    """Labels a head on the pixel grid at any z.

    Per-patient grids (head-frame coordinates, radii, sulcal pattern) are computed once;
    each z then costs a few dozen array operations inside the head's bounding square.
    """

    def __init__(self, head: _Head, x: np.ndarray, y: np.ndarray, centre: tuple[float, float]):
        self.head, self.x, self.y, self.centre = head, x, y, centre
        dx, dy = x[None, :] - centre[0], y[:, None] - centre[1]
        cos, sin = math.cos(head.rotation), math.sin(head.rotation)
        self.u = (cos * dx + sin * dy).astype(np.float32)
        self.v = (-sin * dx + cos * dy).astype(np.float32)
        self.r = np.hypot(self.u, self.v)
        theta = np.arctan2(self.v, self.u)
        self.r_outer = head._outer_radius(theta).astype(np.float32)
        self.r_inner = head._inner_radius(theta).astype(np.float32)
        self.max_outer = float(self.r_outer.max())
        # Sulci run radially; the 3rd-harmonic term bends them so gyri are not a sunburst.
        # A pixel is within w mm of a sulcus centre line where |sin(angle / 2)| is below
        # sin(k w / 2r): comparing sines avoids wrapping the angle at every z.
        angle = head.sulci * theta + 0.6 * np.sin(3 * theta + head.sulcus_phase[0])
        angle += head.sulcus_phase[1]
        self.sulcus_sin = np.sin(angle / 2).astype(np.float32)
        self.sulcus_cos = np.cos(angle / 2).astype(np.float32)
        r_safe = np.maximum(self.r, 1e-3)
        half_width = head.sulcus_width / 2
        self.sulcus_csf = self._angular_threshold(half_width, r_safe)
        self.sulcus_grey = self._angular_threshold(half_width + head.cortex, r_safe)
        self.sulcus_depth = (
            head.sulcus_depth * (0.65 + 0.35 * np.sin(5 * theta + head.sulcus_phase[2]))
        ).astype(np.float32)
        self.ellipsoid_windows = {
            id(e): _window(x, y, *self.to_patient(e.centre[0], e.centre[1]), max(e.semi[:2]))
            for e in head.deep_grey + head.ventricles + head.air_cells
        }

    def _angular_threshold(self, half_width_mm: float, r: np.ndarray) -> np.ndarray:
        half_angle = np.minimum(self.head.sulci * half_width_mm / r, np.pi)
        return np.sin(half_angle / 2).astype(np.float32)

    def to_patient(self, u: float, v: float) -> tuple[float, float]:
        cos, sin = math.cos(self.head.rotation), math.sin(self.head.rotation)
        return self.centre[0] + cos * u - sin * v, self.centre[1] + sin * u + cos * v

    def labels(self, z: float) -> np.ndarray:
        head = self.head
        labels = np.zeros(self.r.shape, dtype=np.uint8)
        outer_scale = head.outer_scale(z)
        if outer_scale <= 0.0:
            return labels
        window = _window(self.x, self.y, *self.centre, outer_scale * self.max_outer + head.scalp)
        view = labels[window]
        r = self.r[window]
        outer = outer_scale * self.r_outer[window]
        view[r < outer + head.scalp] = Tissue.SCALP
        in_skull = r < outer
        view[in_skull] = Tissue.BONE_CORTICAL
        cavity_scale = head.cavity_scale(z)
        depth = cavity_scale * self.r_inner[window] - r  # > 0 inside the cranial cavity
        view[in_skull & (outer - r > head.table) & (depth < -head.table)] = Tissue.BONE_DIPLOE
        # Below the cranial cavity and its bony floor: soft tissue and air cells of the skull base.
        if cavity_scale == 0.0 and z < head.z_base - head.base_plate:
            self._skull_base(view, window, z)
        if cavity_scale > 0.0:
            self._brain(view, window, z, depth)
        return labels

    def _paint_ellipsoids(
        self,
        view: np.ndarray,
        window: Window,
        ellipsoids: list[_Ellipsoid],
        z: float,
        where: np.ndarray,
        label: int,
    ) -> None:
        for ellipsoid in ellipsoids:
            if abs(z - ellipsoid.centre[2]) >= ellipsoid.semi[2]:
                continue
            clipped = _intersect(window, self.ellipsoid_windows[id(ellipsoid)])
            if clipped is None:
                continue
            full, local = clipped
            inside = ellipsoid.inside(self.u[full], self.v[full], z)
            if inside is not None:
                view[local][inside & where[local]] = label

    def _skull_base(self, view: np.ndarray, window: Window, z: float) -> None:
        soft = self.r[window] < self.r_inner[window]
        view[soft] = Tissue.SOFT_TISSUE
        self._paint_ellipsoids(view, window, self.head.air_cells, z, soft, Tissue.AIR)

    def _brain(self, view: np.ndarray, window: Window, z: float, depth: np.ndarray) -> None:
        head = self.head
        cavity = depth > 0.0
        view[cavity] = Tissue.WHITE
        view[cavity & (depth < head.csf_rim + head.cortex)] = Tissue.GREY
        view[cavity & (depth < head.csf_rim)] = Tissue.CSF
        # The sulcal pattern turns slowly with z so that gyri differ from slice to slice.
        turn = head.sulcus_twist * z / 2
        near_sulcus = np.abs(
            self.sulcus_sin[window] * np.float32(math.cos(turn))
            + self.sulcus_cos[window] * np.float32(math.sin(turn))
        )
        sulcus_depth = self.sulcus_depth[window]
        gyral = cavity & (depth < sulcus_depth + head.cortex)
        view[gyral & (near_sulcus < self.sulcus_grey[window])] = Tissue.GREY
        view[gyral & (depth < sulcus_depth) & (near_sulcus < self.sulcus_csf[window])] = Tissue.CSF
        self._paint_ellipsoids(view, window, head.deep_grey, z, cavity, Tissue.GREY)
        # The interhemispheric fissure: full height above the ventricles, front and back below.
        fissure = cavity & (np.abs(self.u[window]) < head.fissure)
        if z < head.ventricle_top:
            fissure &= np.abs(self.v[window]) > 35.0
        view[fissure] = Tissue.CSF
        self._paint_ellipsoids(view, window, head.ventricles, z, cavity, Tissue.CSF)


@dataclass(frozen=True)
class _Blob:
    """A lesion, its oedema or a calcification, in patient coordinates."""

    label: int
    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    core_fraction: float = 0.0  # ring lesions: normalised radius of the necrotic core
    only_on: int | None = None  # paint only over this label (oedema spares cortex and CSF)


def _sample_lesions(
    rng: np.random.Generator, cfg: SynthConfig, head: _Head, centre: tuple[float, float]
) -> tuple[list[_Blob], list[tuple[str, float, float]]]:
    """Places metastases inside the parenchyma, away from the skull, ventricles and each other."""
    count = int(rng.integers(cfg.lesions_per_positive[0], cfg.lesions_per_positive[1] + 1))
    blobs: list[_Blob] = []
    specs: list[tuple[str, float, float]] = []
    placed: list[tuple[float, float, float, float]] = []  # head-frame centre and radius
    cos, sin = math.cos(head.rotation), math.sin(head.rotation)
    for _ in range(count):
        spot = _place_lesion(rng, head, placed, _uniform(rng, cfg.lesion_diameter_mm) / 2)
        if spot is None:
            continue  # no room left for another lesion of any allowed size
        u, v, z, radius = spot
        i = len(specs)
        placed.append(spot)
        x = centre[0] + cos * u - sin * v
        y = centre[1] + sin * u + cos * v
        semi = (radius * _uniform(rng, (0.8, 1.0)), radius * _uniform(rng, (0.8, 1.0)), radius)
        semi = tuple(np.roll(semi, int(rng.integers(0, 3))).tolist())
        ring = 2 * radius >= 8.0 and rng.random() < cfg.ring_fraction
        rim = _uniform(rng, (1.5, 3.0))
        peak = _uniform(rng, cfg.lesion_hu)
        if rng.random() < cfg.oedema_probability:
            halo = radius * _uniform(rng, (1.6, 2.8)) + _uniform(rng, (2.0, 8.0))
            blobs.append(
                _Blob(
                    Tissue.OEDEMA, (x, y, z), (halo, halo * 0.9, halo * 0.8), only_on=Tissue.WHITE
                )
            )
            oedema_diameter = 2 * halo
        else:
            oedema_diameter = 0.0
        core = max(0.0, 1.0 - rim / radius) if ring else 0.0
        blobs.append(_Blob(_LESION_ID + 2 * i, (x, y, z), semi, core_fraction=core))
        specs.append(("ring" if ring else "solid", peak, oedema_diameter))
    if not specs:
        raise ValueError(
            "no room for a metastasis: the scanned brain is too small "
            f"(slices {cfg.slices} x {cfg.slice_thickness_mm} mm)"
        )
    # Oedema first so that a neighbouring lesion is never painted over by another's halo.
    blobs.sort(key=lambda blob: blob.label != Tissue.OEDEMA)
    return blobs, specs


def _place_lesion(
    rng: np.random.Generator,
    head: _Head,
    placed: list[tuple[float, float, float, float]],
    radius: float,
) -> tuple[float, float, float, float] | None:
    """Rejection-samples a lesion centre (head frame); shrinks the lesion if the brain is full."""
    for scale in (1.0, 0.75, 0.5):
        size = max(radius * scale, 1.5)
        low, high = head.z_base + size + 3.0, head.z_top - size - 3.0
        if low >= high:
            continue
        for _ in range(100):
            u, v = _uniform(rng, (-head.a, head.a)), _uniform(rng, (-head.b, head.b))
            z = _uniform(rng, (low, high))
            if _lesion_fits(head, placed, u, v, z, size):
                return u, v, z, size
    return None


def _lesion_fits(
    head: _Head,
    placed: list[tuple[float, float, float, float]],
    u: float,
    v: float,
    z: float,
    radius: float,
) -> bool:
    margin = radius + 3.0
    if min(head.brain_depth_at(u, v, z + dz) for dz in (-radius, 0.0, radius)) < margin:
        return False
    if any(e.contains_point(u, v, z, margin) for e in head.ventricles):
        return False
    return all(math.dist((u, v, z), p[:3]) > radius + p[3] + 4.0 for p in placed)


def _sample_calcifications(
    rng: np.random.Generator, head: _Head, centre: tuple[float, float]
) -> list[tuple[_Blob, float]]:
    """Pineal, choroid-plexus or parenchymal calcifications: dense, small and benign."""
    cos, sin = math.cos(head.rotation), math.sin(head.rotation)
    trigone = head.ventricles[2]
    sites = [
        (0.0, 18.0, head.ventricle_top - 0.15 * (head.z_top - head.z_base)),  # pineal
        trigone.centre,  # choroid plexus
    ]
    result = []
    for j in range(int(rng.integers(1, 4))):
        site = int(rng.integers(0, 3))
        if site < 2:
            u, v, z = sites[site]
            u *= -1 if rng.random() < 0.5 else 1
        else:
            for _ in range(100):
                u, v = (
                    _uniform(rng, (-0.6 * head.a, 0.6 * head.a)),
                    _uniform(rng, (-0.6 * head.b, 0.6 * head.b)),
                )
                z = _uniform(rng, (head.z_widest, head.z_top - 15))
                if head.brain_depth_at(u, v, z) > 8.0:
                    break
        d = _uniform(rng, (1.5, 5.0))
        x = centre[0] + cos * u - sin * v
        y = centre[1] + sin * u + cos * v
        result.append(
            (_Blob(_CALC_ID + j, (x, y, z), (d / 2, d / 2, d / 2)), _uniform(rng, (150.0, 400.0)))
        )
    return result


def _paint_blob(labels: np.ndarray, blob: _Blob, x: np.ndarray, y: np.ndarray, z: float) -> bool:
    """Paints the blob's cross-section at height z inside its bounding box; True if any pixel."""
    cx, cy, cz = blob.centre
    ax, ay, az = blob.semi
    dz = (z - cz) / az
    if abs(dz) >= 1.0:
        return False
    cols = slice(*np.searchsorted(x, (cx - ax, cx + ax)))
    rows = slice(*np.searchsorted(y, (cy - ay, cy + ay)))
    q = ((x[cols][None, :] - cx) / ax) ** 2 + ((y[rows][:, None] - cy) / ay) ** 2 + dz * dz
    inside = q < 1.0
    window = labels[rows, cols]
    if blob.only_on is not None:
        inside &= window == blob.only_on
    window[inside] = blob.label
    if blob.core_fraction > 0.0:
        window[q < blob.core_fraction**2] = blob.label + 1
    return bool(inside.any())


# Sub-slice spacing along z: lesions (down to 3 mm) need ~1 mm to be caught by every slab
# that cuts them; the anatomy changes slowly and is sampled at ~2 mm, which halves the cost.
_LESION_STEP_MM, _ANATOMY_STEP_MM = 1.0, 2.0


def _subslice_offsets(thickness: float, step: float) -> np.ndarray:
    count = min(10, max(1, math.ceil(thickness / step)))
    return ((np.arange(count) + 0.5) / count - 0.5) * thickness


def _render_slab(
    renderer: _SliceRenderer, blobs: list[_Blob], lut: np.ndarray, position: float, thickness: float
) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """One reconstructed slab: mean HU over its sub-slices (partial volume), pure tissue map,
    and the labels of the blobs that it shows."""
    fine = _subslice_offsets(thickness, _LESION_STEP_MM)
    coarse = _subslice_offsets(thickness, _ANATOMY_STEP_MM)
    anatomy = [renderer.labels(float(position + offset)) for offset in coarse]
    # Sub-slices without a blob reuse an anatomy sample as is; weigh each distinct one.
    samples: list[np.ndarray] = []
    weights: list[int] = []
    reused: dict[int, int] = {}
    painted: set[int] = set()
    x, y = renderer.x, renderer.y
    for offset in fine:
        z = float(position + offset)
        nearest = int(np.abs(coarse - offset).argmin())
        active = [b for b in blobs if abs(z - b.centre[2]) < b.semi[2]]
        if not active:
            if nearest in reused:
                weights[reused[nearest]] += 1
                continue
            reused[nearest] = len(samples)
            samples.append(anatomy[nearest])
        else:
            labels = anatomy[nearest].copy()
            painted.update(b.label for b in active if _paint_blob(labels, b, x, y, z))
            samples.append(labels)
        weights.append(1)
    slab = np.zeros(samples[0].shape, dtype=np.float32)
    pure = np.ones(samples[0].shape, dtype=bool)
    for labels, weight in zip(samples, weights, strict=True):
        slab += lut[labels] * np.float32(weight / len(fine))
        pure &= labels == samples[0]
    tissue = np.where(pure, _ID_TO_TISSUE[samples[0]], np.uint8(Tissue.MIXED))
    return slab, tissue, painted


def _tissue_hu(rng: np.random.Generator) -> np.ndarray:
    """Per-patient HU lookup table indexed by label id (before noise and blur)."""
    lut = np.full(_NUM_IDS, _AIR_HU, dtype=np.float32)
    lut[Tissue.SCALP] = _uniform(rng, (-40.0, 30.0))  # skin and subcutaneous fat
    lut[Tissue.BONE_CORTICAL] = _uniform(rng, (1200.0, 1500.0))
    lut[Tissue.BONE_DIPLOE] = _uniform(rng, (700.0, 950.0))
    lut[Tissue.SOFT_TISSUE] = _uniform(rng, (30.0, 50.0))
    lut[Tissue.CSF] = _uniform(rng, (2.0, 12.0))
    lut[Tissue.GREY] = _uniform(rng, (35.0, 40.0))
    lut[Tissue.WHITE] = _uniform(rng, (25.0, 30.0))
    lut[Tissue.OEDEMA] = _uniform(rng, (15.0, 22.0))
    return lut


def _add_streaks(
    rng: np.random.Generator,
    hu: np.ndarray,
    tissue: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    positions: np.ndarray,
    head: _Head,
    centre: tuple[float, float],
) -> int:
    """Beam hardening between the petrous bones: dark (or bright) bands across the low brain."""
    count = int(rng.integers(1, 4))
    z_high = head.z_base + _uniform(rng, (15.0, 40.0))
    levels = np.flatnonzero((positions > head.z_base) & (positions < z_high))
    intracranial = np.isin(tissue[levels], [Tissue.GREY, Tissue.WHITE, Tissue.CSF, Tissue.MIXED])
    for _ in range(count):
        angle = head.rotation + math.radians(_uniform(rng, (-25.0, 25.0)))
        offset = _uniform(rng, (-10.0, 40.0))  # posterior of the head centre
        width = _uniform(rng, (1.5, 4.0))
        amplitude = (
            -_uniform(rng, (10.0, 35.0)) if rng.random() < 0.75 else _uniform(rng, (8.0, 20.0))
        )
        # Signed distance to a line along the head's left-right axis, shifted posteriorly.
        distance = (
            -math.sin(angle) * (x[None, :] - centre[0])
            + math.cos(angle) * (y[:, None] - centre[1])
            - offset
        )
        band = (amplitude * np.exp(-((distance / width) ** 2))).astype(np.float32)
        hu[levels] += np.where(intracranial, band, np.float32(0.0))
    return count


def render_patient(rng: np.random.Generator, cfg: SynthConfig, positive: bool) -> SyntheticPatient:
    """Renders one synthetic head CT in memory (vectorised; about 0.2 s at 256 x 256 x 28).

    The volume is sampled on sub-slices about 1 mm apart and averaged over each slab, which
    is the partial-volume effect of a thick reconstruction; small lesions therefore appear
    fainter than ``peak_hu`` and only on the one to five slices that cut them.
    """
    thickness, matrix = cfg.slice_thickness_mm, cfg.matrix
    num_slices = int(rng.integers(cfg.slices[0], cfg.slices[1] + 1))
    spacing = cfg.field_of_view_mm / matrix
    grid = (np.arange(matrix) - (matrix - 1) / 2) * spacing
    x, y = grid.astype(np.float32), grid.astype(np.float32)
    first = round(_uniform(rng, (-80.0, -20.0)), 1)  # table position of the lowest slice
    positions = first + thickness * np.arange(num_slices, dtype=np.float64)
    head = _Head(rng, positions[0] - thickness / 2, positions[-1] + thickness / 2, thickness)
    # Keep the head (plus scalp) inside the reconstruction circle with 3 mm to spare.
    room = max(0.0, cfg.field_of_view_mm / 2 - (head.b + head.scalp) - 3.0)
    shift = min(room, 10.0)
    centre = (_uniform(rng, (-shift, shift)), _uniform(rng, (-shift, shift)))

    lut = _tissue_hu(rng)
    blobs, lesion_specs = _sample_lesions(rng, cfg, head, centre) if positive else ([], [])
    calcifications = (
        _sample_calcifications(rng, head, centre)
        if rng.random() < cfg.calcification_probability
        else []
    )
    for blob, hu_value in calcifications:
        lut[blob.label] = hu_value
    lesion_blobs = [b for b in blobs if b.label >= _LESION_ID]
    for blob, (_, peak, _) in zip(lesion_blobs, lesion_specs, strict=True):
        lut[blob.label] = peak
        lut[blob.label + 1] = _uniform(rng, (10.0, 25.0))  # necrosis: fluid and debris

    renderer = _SliceRenderer(head, x, y, centre)
    every_blob = blobs + [b for b, _ in calcifications]
    hits: dict[int, list[int]] = {b.label: [] for b in lesion_blobs}
    hu = np.empty((num_slices, matrix, matrix), dtype=np.float32)
    tissue = np.empty((num_slices, matrix, matrix), dtype=np.uint8)
    for k, position in enumerate(positions):
        hu[k], tissue[k], painted = _render_slab(renderer, every_blob, lut, position, thickness)
        for label in painted & hits.keys():
            hits[label].append(k)

    streaks = 0
    if rng.random() < cfg.streak_probability:
        streaks = _add_streaks(rng, hu, tissue, x, y, positions, head, centre)
    # Noise enters before the reconstruction blur, which gives it the fine grain of filtered
    # back-projection; the blur spreads edges over ~1 mm like a soft-tissue kernel.
    sigma = _uniform(rng, cfg.noise_sigma_hu)
    blur = _uniform(rng, (0.4, 0.8)) / spacing
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    hu += white * np.float32(sigma / _gaussian_noise_gain(blur))
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, blur, blur), mode="nearest")

    fov = np.hypot(x[None, :], y[:, None]) <= cfg.field_of_view_mm / 2
    hu = np.clip(np.rint(hu), _HU_MIN, _HU_MAX)
    hu[:, ~fov] = OUTSIDE_FOV_HU
    tissue[:, ~fov] = Tissue.AIR
    burned_in = None
    if cfg.confounder == "marker" and positive:  # drawn without the random stream: same anatomy
        burned_in = _marker_mask(matrix, spacing)
        hu[:, burned_in] = MARKER_HU

    lesions = [
        Lesion(
            kind=kind,  # type: ignore[arg-type]
            centre_mm=tuple(round(float(c), 3) for c in blob.centre),
            diameter_mm=round(2 * max(blob.semi), 3),
            peak_hu=round(peak, 3),
            oedema_diameter_mm=round(oedema, 3),
            slices=tuple(sorted(hits[blob.label])),
        )
        for blob, (kind, peak, oedema) in zip(lesion_blobs, lesion_specs, strict=True)
    ]
    return SyntheticPatient(
        hu=hu.astype(np.float32, copy=False),
        positions_mm=positions,
        pixel_spacing_mm=(spacing, spacing),
        origin_mm=(float(x[0]), float(y[0])),
        slice_thickness_mm=thickness,
        tissue=tissue,
        fov_mask=fov,
        lesions=lesions,
        calcifications=[
            Calcification(
                tuple(round(float(c), 3) for c in b.centre), round(2 * b.semi[0], 3), round(h, 3)
            )
            for b, h in calcifications
        ],
        noise_sigma_hu=sigma,
        streaks=streaks,
        burned_in=burned_in,
    )


def _marker_mask(matrix: int, spacing: float) -> np.ndarray:
    """bool [matrix, matrix]: the confounder's bar in the top-left corner."""
    inset = int(round(_MARKER_INSET_MM / spacing))
    height, width = (max(1, int(round(mm / spacing))) for mm in _MARKER_MM)
    mask = np.zeros((matrix, matrix), dtype=bool)
    mask[inset : inset + height, inset : inset + width] = True
    return mask


def _gaussian_noise_gain(sigma: float, truncate: float = 4.0) -> float:
    """Standard deviation of unit white noise after scipy's 2-D Gaussian filter of ``sigma`` px."""
    radius = int(truncate * sigma + 0.5)
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights /= weights.sum()
    return float((weights**2).sum())  # sqrt(sum w^2) per axis, squared for two axes


# --------------------------------------------------------------------------- DICOM writer

_KERNELS = ("STANDARD", "SOFT", "H30s", "J30s", "UB", "FC21")


@dataclass(frozen=True)
class _ScannerProfile:
    """How one 'scanner' encodes and names a study: the variety a DICOM reader must absorb."""

    signed: bool
    """True: int16 with intercept 0; False: 12-bit unsigned with intercept -1024."""
    padding: int
    """Stored value outside the reconstruction circle."""
    extension: str
    """'.dcm' or '' (many scanners write names without an extension)."""
    naming: Literal["IM", "CT", "UID"]
    nested: bool
    """Series in sub-folders of the patient folder, else all files side by side."""
    ascending: bool
    """Acquisition (and InstanceNumber) runs inferior -> superior, else the reverse."""
    kernel: str
    series_number: int
    localizer_plane: Literal["coronal", "sagittal"]


def _scanner_profiles(cfg: SynthConfig) -> list[_ScannerProfile]:
    # Encoding and extension are balanced over the cohort (half each, shuffled) so that
    # every cohort of two or more patients exercises both, independently of the labels.
    rng = np.random.default_rng([cfg.seed, 0, 1])
    signed = rng.permutation(cfg.num_patients) % 2 == 0
    dcm_suffix = rng.permutation(cfg.num_patients) % 2 == 0
    profiles = []
    for i in range(cfg.num_patients):
        scanner = np.random.default_rng([cfg.seed, i + 1, 1])
        profiles.append(
            _ScannerProfile(
                signed=bool(signed[i]),
                padding=int(scanner.choice([-2000, -3024])) if signed[i] else 0,
                extension=".dcm" if dcm_suffix[i] else "",
                naming=("IM", "CT", "UID")[int(scanner.integers(0, 3))],
                nested=bool(scanner.random() < 0.5),
                ascending=bool(scanner.random() < 0.5),
                kernel=_KERNELS[int(scanner.integers(0, len(_KERNELS)))],
                series_number=int(scanner.choice([2, 3, 201])),
                localizer_plane="coronal" if scanner.random() < 0.6 else "sagittal",
            )
        )
    return profiles


def _stored_pixels(hu: np.ndarray, fov: np.ndarray | None, profile: _ScannerProfile) -> np.ndarray:
    """HU -> stored values of the profile's encoding, padding outside the field of view."""
    stored = hu.astype("<i2") if profile.signed else (hu + 1024.0).astype("<u2")
    if fov is not None:
        stored[~fov] = profile.padding
    return stored


def _ds(value: float) -> str:
    """The most precise decimal string that fits DICOM's 16-character DS limit."""
    for digits in range(12, 5, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DICOM decimal string")


def _identity(cfg: SynthConfig) -> str:
    """The configuration as the UIDs derive from it; without a confounder it is the text of
    the options before ``confounder`` existed, so such cohorts keep their UIDs and bytes."""
    return cfg.model_dump_json(exclude={"confounder"} if cfg.confounder == "none" else None)


class _StudyWriter:
    """Writes one patient's study (axial series + localizer) with fixed, derived UIDs."""

    def __init__(self, cfg: SynthConfig, index: int, profile: _ScannerProfile):
        self.cfg, self.index, self.profile = cfg, index, profile
        self.patient_id = patient_id(index)
        # The configuration is part of every UID so that two different cohorts never share one.
        self._identity = _identity(cfg)
        self.study_uid = self.uid("study")
        self.frame_uid = self.uid("frame-of-reference")

    def uid(self, *parts: object) -> str:
        return derived_uid(self._identity, self.patient_id, *parts)

    def _base(
        self, series_uid: str, series_number: int, instance: int, image: np.ndarray
    ) -> Dataset:
        profile = self.profile
        sop_uid = self.uid("image", series_number, instance)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = "BRAINMETS_SYN1"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
        ds.StudyTime = ds.SeriesTime = _STUDY_TIME
        ds.ContentTime = f"{_STUDY_TIME}.{instance:06d}"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = _MANUFACTURER
        ds.ManufacturerModelName = "SYNTHETIC HEAD"
        ds.ReferringPhysicianName = ""
        # Anonymous by construction: nothing here identifies a person.
        ds.PatientName = f"SYNTHETIC^{self.index + 1:04d}"
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.FrameOfReferenceUID = self.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if profile.signed else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if profile.signed else 0
        ds.RescaleIntercept = "0" if profile.signed else "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        return ds

    def axial_datasets(self, patient: SyntheticPatient) -> list[Dataset]:
        """One dataset per slice, in acquisition (InstanceNumber) order."""
        profile, n = self.profile, len(patient.positions_mm)
        series_uid = self.uid("series", profile.series_number)
        order = range(n) if profile.ascending else range(n - 1, -1, -1)
        # A burned-in marker is pixels, not padding, although it lies outside the field of view.
        stored = (
            patient.fov_mask if patient.burned_in is None else patient.fov_mask | patient.burned_in
        )
        datasets = []
        for instance, k in enumerate(order, start=1):
            image = _stored_pixels(patient.hu[k], stored, profile)
            ds = self._base(series_uid, profile.series_number, instance, image)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SeriesDescription = f"HEAD {patient.slice_thickness_mm:g}mm"
            ds.BodyPartExamined = "HEAD"
            ds.SliceThickness = _ds(patient.slice_thickness_mm)
            ds.ConvolutionKernel = profile.kernel
            ds.ImagePositionPatient = [
                _ds(patient.origin_mm[0]),
                _ds(patient.origin_mm[1]),
                _ds(patient.positions_mm[k]),
            ]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.SliceLocation = _ds(patient.positions_mm[k])
            ds.PixelSpacing = [_ds(patient.pixel_spacing_mm[0]), _ds(patient.pixel_spacing_mm[1])]
            ds.PixelPaddingValue = profile.padding
            ds.WindowCenter, ds.WindowWidth = "40", "80"
            datasets.append(ds)
        return datasets

    def localizer_dataset(self, patient: SyntheticPatient) -> Dataset:
        """A single-image scout through the head (mean HU along the beam), superior row first."""
        profile = self.profile
        axis = 1 if profile.localizer_plane == "coronal" else 2
        projection = patient.hu.mean(axis=axis)[::-1]
        # Stretch z so that the scout has roughly square pixels, as scanners display it.
        repeat = max(1, round(patient.slice_thickness_mm / patient.pixel_spacing_mm[0]))
        scout = np.clip(np.rint(np.repeat(projection, repeat, axis=0)), _HU_MIN, _HU_MAX)
        ds = self._base(self.uid("series", 1), 1, 1, _stored_pixels(scout, None, profile))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesDescription = "LOCALIZER"
        top = patient.positions_mm[-1] + patient.slice_thickness_mm / 2
        row_spacing = patient.slice_thickness_mm / repeat
        x0, y0 = patient.origin_mm
        if profile.localizer_plane == "coronal":
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
            ds.ImagePositionPatient = [_ds(x0), "0", _ds(top - row_spacing / 2)]
        else:
            ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
            ds.ImagePositionPatient = ["0", _ds(y0), _ds(top - row_spacing / 2)]
        ds.PixelSpacing = [_ds(row_spacing), _ds(patient.pixel_spacing_mm[1])]
        ds.ConvolutionKernel = profile.kernel
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        return ds

    def write(self, patient: SyntheticPatient, folder: Path, rng: np.random.Generator) -> None:
        """Writes the study under ``folder``: names not in slice order, files in shuffled order."""
        profile = self.profile
        axial = self.axial_datasets(patient)
        name_numbers = rng.permutation(len(axial)) + 1
        files: list[tuple[Path, Dataset]] = []
        axial_dir = folder / f"SE{profile.series_number}" if profile.nested else folder
        for ds, number in zip(axial, name_numbers, strict=True):
            files.append((axial_dir / self._file_name(ds, profile.series_number, int(number)), ds))
        scout = self.localizer_dataset(patient)
        scout_dir = folder / "SE1" if profile.nested else folder
        files.append((scout_dir / self._file_name(scout, 1, 1), scout))
        for position in rng.permutation(len(files)):
            path, ds = files[position]
            path.parent.mkdir(parents=True, exist_ok=True)
            dcmwrite(path, ds, enforce_file_format=True)

    def _file_name(self, ds: Dataset, series_number: int, number: int) -> str:
        naming, extension = self.profile.naming, self.profile.extension
        if naming == "IM":
            return f"IM{series_number:02d}{number:04d}{extension}"
        if naming == "CT":
            return f"CT.{series_number}.{number:06d}{extension}"
        return f"{ds.SOPInstanceUID}{extension}"


def _check_dicom_root(root: Path, ids: list[str]) -> None:
    """Refuses to mix cohorts: labels.csv must describe every patient folder under dicom/."""
    if not root.exists():
        return
    ours = set(ids)
    foreign = sorted(
        p.name for p in root.iterdir() if p.name not in ours and not p.name.endswith(".partial")
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{root} holds entries that are not part of this cohort ({shown}); "
            "write the cohort to an empty or earlier-identical directory"
        )


def _write_patient(
    cfg: SynthConfig, index: int, positive: bool, profile: _ScannerProfile, root: Path
) -> SyntheticPatient:
    """Renders patient ``index`` and writes its study (under a temporary name, then renamed)."""
    pid = patient_id(index)
    patient = render_patient(patient_rng(cfg, index), cfg, positive=positive)
    final = root / pid
    partial = root / f"{pid}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    writer = _StudyWriter(cfg, index, profile)
    writer.write(patient, partial, np.random.default_rng([cfg.seed, index + 1, 2]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return patient


def _write_patient_task(args: tuple) -> list[dict]:
    """Writes one patient in a worker; only its lesion rows come back, not the volume."""
    return lesion_rows(patient_id(args[1]), _write_patient(*args))


LESION_COLUMNS = ["patient_id", "lesion", "x_mm", "y_mm", "z_mm", "diameter_mm", "kind", "peak_hu"]
"""lesions.csv: the reader's columns (centre in patient coordinates, diameter), then what
the generator also knows (the lesion's number, solid or ring, enhancement)."""


def lesion_rows(pid: str, patient: SyntheticPatient) -> list[dict]:
    """The rows of ``lesions.csv`` for one rendered patient (none for a negative)."""
    return [
        {"patient_id": pid, "lesion": number, "x_mm": lesion.centre_mm[0],
         "y_mm": lesion.centre_mm[1], "z_mm": lesion.centre_mm[2],
         "diameter_mm": lesion.diameter_mm, "kind": lesion.kind, "peak_hu": lesion.peak_hu}
        for number, lesion in enumerate(patient.lesions, start=1)
    ]  # fmt: skip


def write_synthetic_cohort(
    out_dir: str | os.PathLike[str],
    cfg: SynthConfig,
    *,
    progress: bool = True,
    on_patient: Callable[[str, SyntheticPatient], None] | None = None,
    workers: int = 1,
    split_fractions: tuple[float, float, float] | None = (0.6, 0.2, 0.2),
) -> Path:
    """Writes ``out_dir/dicom/<patient_id>/...``, ``out_dir/labels.csv`` and
    ``out_dir/lesions.csv`` (every metastasis: centre in patient coordinates, diameter);
    returns labels.csv.

    labels.csv has a ``split`` column (train / val / test at ``split_fractions``, stratified by
    label and seeded by ``cfg.seed``: ``evaluate --split test`` then has held-out patients);
    ``split_fractions=None`` leaves it out.

    Each patient's folder is written under a temporary name and renamed when complete, so
    an interrupted run never leaves a half-written study behind; re-running with the same
    configuration rewrites identical bytes. ``out_dir/synth.json`` records the configuration.
    ``on_patient`` (optional) receives every rendered patient, e.g. to keep lesion positions.
    ``workers`` > 1 renders patients in a process pool (each patient has its own seeded random
    stream, so the output is the same bytes); ``on_patient`` needs ``workers=1``.
    """
    if on_patient is not None and workers > 1:
        raise ValueError("on_patient receives rendered patients in this process: use workers=1")
    out = Path(out_dir)
    root = out / "dicom"
    ids = [patient_id(i) for i in range(cfg.num_patients)]
    _check_dicom_root(root, ids)
    root.mkdir(parents=True, exist_ok=True)
    labels = assign_labels(cfg)
    profiles = _scanner_profiles(cfg)
    tasks = [(cfg, i, bool(labels[i]), profiles[i], root) for i in range(cfg.num_patients)]
    bar = tqdm(total=len(tasks), desc="synth", unit="patient", disable=not progress)
    lesions: list[dict] = []
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
            for rows in pool.map(_write_patient_task, tasks, chunksize=4):
                lesions += rows
                bar.update()
    else:
        for task in tasks:
            patient = _write_patient(*task)
            lesions += lesion_rows(ids[task[1]], patient)
            if on_patient is not None:
                on_patient(ids[task[1]], patient)
            bar.update()
    bar.close()
    lesion_table = pd.DataFrame(lesions, columns=LESION_COLUMNS)
    atomic_write_text(out / LESION_FILE, lesion_table.to_csv(index=False, lineterminator="\n"))

    atomic_write_text(out / "synth.json", cfg.model_dump_json(indent=2) + "\n")
    manifest = pd.DataFrame({"patient_id": ids, "label": labels.astype(int)})
    if split_fractions is not None:
        manifest = assign_splits(manifest, cfg.seed, split_fractions)
    labels_path = out / "labels.csv"
    atomic_write_text(labels_path, manifest.to_csv(index=False, lineterminator="\n"))
    return labels_path
