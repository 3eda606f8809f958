"""Class-conditional augmentation on the device, for a whole flat batch of slices at once.

Input and output are float slices [S, 1, H, W] in brain-window units ([0, 1] = [0, 80] HU),
before normalisation (z-scoring comes after augmentation, as specified). Every patient draws
its own parameters, with strengths taken from ``augment.positive`` or ``augment.negative``
according to its label: positives get milder transforms so that a 3-4 pixel metastasis is not
interpolated or drowned away (see ``config.AugmentConfig`` for the default values and their
reasons).

Spatial: one affine per patient (rotation, isotropic scale, translation, left-right flip),
shared by all of its slices so that the stack stays consistent; the per-slice matrices are
gathered by ``patient_index`` and the whole batch is resampled by one ``grid_sample`` call
(bilinear, zero padding = air). The flip is left-right only: heads are roughly symmetric
about the mid-sagittal plane, while an upside-down head is not a plausible scan.

Intensity, drawn per patient, in window units: contrast (a factor in [1-c, 1+c] scaling each
slice about its own mean), gamma (``x ** g`` with g log-uniform in [1-gamma, 1+gamma], so
brightening and darkening are equally likely), then Gaussian noise per pixel (``noise_std``
in window units: 0.01 = 0.8 HU); finally clipped to [0, 1], the range of the stored window.

All randomness comes from a ``torch.Generator`` on the batch's device, so a run is reproducible
and a resumed run continues the same stream (its state is saved with the training state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from brainmets.config import AugmentConfig, AugmentSide

_SIDE_FIELDS = ("rotate_deg", "scale", "translate", "flip_prob", "noise_std", "gamma", "contrast")


def _side_table(positive: AugmentSide, negative: AugmentSide, device: torch.device) -> Tensor:
    """[2, F] strengths: row 0 negatives, row 1 positives (indexed by the label)."""
    rows = [[float(getattr(side, f)) for f in _SIDE_FIELDS] for side in (negative, positive)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """U(-1, 1) draws."""
    return torch.rand(n, generator=generator, device=device) * 2.0 - 1.0


class ClassConditionalAugment:
    """Per-patient random affine + intensity augmentation, strengths chosen by label.

    Args:
        positive, negative: strengths for positive and negative patients.

    Call with ``(images [S,1,H,W] float in [0,1], patient_index long [S], labels [P],
    generator)``; returns augmented images of the same shape, in [0, 1].
    """

    def __init__(self, positive: AugmentSide, negative: AugmentSide) -> None:
        self.positive = positive
        self.negative = negative
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> ClassConditionalAugment:
        return cls(cfg.positive, cfg.negative)

    def _strengths(self, labels: Tensor) -> dict[str, Tensor]:
        # Built once per device: a host-to-device copy every step would stall the stream.
        table = self._tables.get(labels.device)
        if table is None:
            table = _side_table(self.positive, self.negative, labels.device)
            self._tables[labels.device] = table
        per_patient = table[(labels > 0.5).long()]  # [P, F]
        return {name: per_patient[:, i] for i, name in enumerate(_SIDE_FIELDS)}

    def patient_affines(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """[P, 2, 3] ``affine_grid`` matrices (output -> input, normalised coordinates)."""
        s = self._strengths(labels)
        n, device = labels.shape[0], labels.device
        angle = _uniform(n, generator, device) * s["rotate_deg"] * (math.pi / 180.0)
        zoom = 1.0 + _uniform(n, generator, device) * s["scale"]
        # Normalised coordinates span 2 units per image side.
        shift = torch.stack(
            [_uniform(n, generator, device), _uniform(n, generator, device)], dim=1
        ) * (2.0 * s["translate"][:, None])
        flip = torch.rand(n, generator=generator, device=device) < s["flip_prob"]
        sign = torch.where(flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * sign, -sin, shift[:, 0]], dim=1),
                torch.stack([sin * sign, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        return theta

    def __call__(
        self,
        images: Tensor,
        patient_index: Tensor,
        labels: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(
                f"expected float slices [S, 1, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        images = images.float()
        labels = labels.to(images.device)
        theta = self.patient_affines(labels, generator)[patient_index]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return self._intensity(out, patient_index, labels, generator)

    def _intensity(
        self, x: Tensor, patient_index: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Tensor:
        s = self._strengths(labels)
        n, device = labels.shape[0], labels.device
        contrast = (1.0 + _uniform(n, generator, device) * s["contrast"])[patient_index]
        log_gamma_lo = torch.log1p(-s["gamma"])
        log_gamma_hi = torch.log1p(s["gamma"])
        u = torch.rand(n, generator=generator, device=device)
        gamma = torch.exp(log_gamma_lo + u * (log_gamma_hi - log_gamma_lo))[patient_index]
        noise_std = s["noise_std"][patient_index]

        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast.view(-1, 1, 1, 1) + mean
        # Gamma is only defined for non-negative inputs; the clip is the window's own range.
        x = x.clamp(0.0, 1.0).pow(gamma.view(-1, 1, 1, 1))
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x = x + noise * noise_std.view(-1, 1, 1, 1)
        return x.clamp(0.0, 1.0)
