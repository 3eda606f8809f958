"""Commands over a trained run: evaluation, localisation, subgroups, paired comparison.

The defaults of ``evaluate``'s localisation options live here, where the command line reads
them without importing numpy or torch (see brainmets.evaluate.localisation).
"""

DEFAULT_TOP_K = 3
"""Lesion-level detection: a slice through the lesion among the patient's top K slices."""
DEFAULT_MARGIN_MM = 15.0
"""The pointing game's tolerance beyond the lesion radius: Zhang et al. allowed 15 pixels on
224-pixel images, 6.7 % of the width, which is 15.4 mm of a 230 mm field of view."""
