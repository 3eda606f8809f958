"""The synthetic cohort's user-facing defaults and named lesion settings, without the renderer.

``SynthConfig`` (:mod:`brainmets.data.synthetic`) takes its defaults from here, and so do the
options and help of ``brainmets synth``, which builds its parser at every start-up: importing
the renderer (pydicom, scipy) there would cost seconds.
"""

from __future__ import annotations

NUM_PATIENTS = 40
POSITIVE_FRACTION = 0.4
SLICES = (24, 32)
MATRIX = 256
SLICE_THICKNESS_MM = 5.0
SEED = 0

DEFAULT_LESIONS = "default"
LESION_SETTINGS: dict[str, dict[str, tuple[float, float]]] = {
    # Metastases as CT shows them, from a 3 mm dot to 2 cm: the pretrained model's task.
    "default": {"lesion_diameter_mm": (3.0, 20.0), "lesion_hu": (45.0, 90.0)},
    # Large and bright: a randomly initialised network given a few hundred optimiser steps on
    # a CPU learns 18-30 mm lesions at 75-90 HU (held-out AUC >= 0.9) but not 10-25 mm ones at
    # 70-90 HU (validation AUC <= 0.57 after 7 epochs), let alone the default's: without
    # pretrained features, a few-pixel lesion a few HU above grey matter is too weak a signal
    # to find in so few steps. Calcifications, streaks and oedema stay as in the default.
    "conspicuous": {"lesion_diameter_mm": (18.0, 30.0), "lesion_hu": (75.0, 90.0)},
}
"""``brainmets synth --lesions NAME``; ``--lesion-mm`` and ``--lesion-hu`` override one range."""


def lesion_ranges(name: str) -> str:
    """``"18-30 mm at 75-90 HU"``: a lesion setting in words, for help and messages."""
    setting = LESION_SETTINGS[name]
    (mm_lo, mm_hi), (hu_lo, hu_hi) = setting["lesion_diameter_mm"], setting["lesion_hu"]
    return f"{mm_lo:g}-{mm_hi:g} mm at {hu_lo:g}-{hu_hi:g} HU"
