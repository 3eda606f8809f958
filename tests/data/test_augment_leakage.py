"""The default augmentation carries no label: a network cannot tell the classes apart by it.

Lesion-free heads with random labels and a natural pose jitter (rotation +-3 deg, size +-3 %,
position +-2 %), augmented by ``ClassConditionalAugment`` as in training; a small CNN learns
"the label" on training patients and is scored on held-out patients. Anything above chance on
held-out patients can only come from the augmentation.
"""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from brainmets.config import AugmentConfig, AugmentSide
from brainmets.data.augment import ClassConditionalAugment

SIZE = 40
# Class-dependent strengths (the milder-positives option of the specification): negatives rotated, zoomed and
# shifted twice as far as positives.
CLASS_DEPENDENT = AugmentConfig(
    negative=AugmentSide(
        rotate_deg=15.0,
        scale=0.10,
        translate=0.08,
        flip_prob=0.5,
        noise_std=0.01,
        gamma=0.05,
        contrast=0.05,
    )
)


def _heads(n: int, generator: torch.Generator) -> torch.Tensor:
    """Head-like slices in window units: skull ring, brain with smooth texture, ventricles,
    each head in its own natural pose."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    u = torch.rand((n, 8), generator=generator)
    a = (0.62 + 0.06 * u[:, 0]).view(n, 1, 1)  # half-width
    b = (0.76 + 0.06 * u[:, 1]).view(n, 1, 1)  # half-length
    r = (xx / a) ** 2 + (yy / b) ** 2
    brain = (r < 0.85).float()
    skull = ((r >= 0.85) & (r < 1.0)).float()
    vent_w = (0.10 + 0.06 * u[:, 2]).view(n, 1, 1)
    ventricles = (((xx.abs() - 0.12) / vent_w) ** 2 + (yy / 0.25) ** 2 < 1).float()
    texture = torch.nn.functional.interpolate(
        torch.rand((n, 1, 6, 6), generator=generator), size=(SIZE, SIZE), mode="bilinear"
    )[:, 0]
    x = brain * (0.45 + 0.15 * texture) * (1 - 0.7 * ventricles) + skull
    # Natural pose: rotation +-3 deg, size +-3 %, position +-2 % of the image.
    angle = (u[:, 3] * 2 - 1) * math.radians(3.0)
    zoom = 1 + (u[:, 4] * 2 - 1) * 0.03
    shift = (u[:, 5:7] * 2 - 1) * 0.04
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([cos, -sin, shift[:, 0], sin, cos, shift[:, 1]], 1).view(n, 2, 3)
    grid = nn.functional.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    return nn.functional.grid_sample(x[:, None], grid, align_corners=False).clamp(0, 1)


def _small_cnn() -> nn.Module:
    # Flattened features, not a global pool: where the head sits and how large it is stay
    # visible to the classifier, as they are to a ResNet through its padding and borders.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (SIZE // 8) ** 2, 32), nn.ReLU(), nn.Linear(32, 1),
    )  # fmt: skip


def held_out_auc(cfg: AugmentConfig, seed: int = 0) -> float:
    """Held-out AUC of random labels, learnt from augmented lesion-free heads."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    augment = ClassConditionalAugment.from_config(cfg)
    n_train, n_test = 600, 600
    heads = _heads(n_train + n_test, generator)
    labels = (torch.rand(n_train + n_test, generator=generator) < 0.5).float()
    train, test = slice(0, n_train), slice(n_train, None)

    def augmented(part: slice) -> torch.Tensor:
        x = heads[part]
        return augment(x, torch.arange(len(x)), labels[part], generator)

    model = _small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):  # a fresh augmentation draw every epoch, as in training
        x, y = augmented(train), labels[train]
        for batch in torch.randperm(n_train, generator=generator).split(50):
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(x[batch]).squeeze(1), y[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(augmented(test)).squeeze(1)
    return float(roc_auc_score(labels[test].numpy(), scores.numpy()))


@pytest.mark.slow
def test_the_default_augmentation_does_not_leak_the_label():
    assert AugmentConfig().class_dependent() == []
    assert held_out_auc(AugmentConfig()) <= 0.60


@pytest.mark.slow
def test_the_experiment_catches_class_dependent_strengths():
    # The same experiment separates the "classes" when only the augmentation differs, so the
    # bound above is a real test.
    assert held_out_auc(CLASS_DEPENDENT) >= 0.70
