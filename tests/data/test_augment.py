"""Class-conditional, per-patient augmentation of a flat slice batch."""

from __future__ import annotations

import pytest
import torch

from brainmets.config import AugmentConfig, AugmentSide
from brainmets.data.augment import ClassConditionalAugment

ZERO = AugmentSide(
    rotate_deg=0, scale=0, translate=0, flip_prob=0, noise_std=0, gamma=0, contrast=0
)


def _phantom(num_slices: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Head-like slices in window units: a bright ellipse with a small dense dot, off-centre."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = (((xx - 0.1) / 0.7) ** 2 + (yy / 0.85) ** 2 < 1).float() * 0.45
    head[10:13, 18:21] = 0.9  # a metastasis-sized dot
    slices = head.expand(num_slices, 1, size, size).clone()
    return (slices + 0.02 * torch.rand(slices.shape, generator=g)).clamp(0, 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_zero_strength_is_the_identity():
    x = _phantom(6)
    augment = ClassConditionalAugment(ZERO, ZERO)
    out = augment(x, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1.0, 0.0, 1.0]), _gen())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_all_slices_of_a_patient_share_one_spatial_transform():
    side = AugmentSide(
        rotate_deg=20, scale=0.1, translate=0.1, flip_prob=0.5, noise_std=0, gamma=0, contrast=0
    )
    augment = ClassConditionalAugment(side, side)
    x = _phantom(1).repeat(8, 1, 1, 1)  # identical slices
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = augment(x, index, torch.tensor([0.0, 0.0]), _gen(3))
    for patient in (0, 1):
        rows = out[index == patient]
        assert all(torch.equal(rows[0], r) for r in rows[1:])
    assert not torch.allclose(out[0], out[4])  # two patients, two transforms


def _displacement(theta: torch.Tensor) -> torch.Tensor:
    """Mean distance (normalised units) that each patient's affine moves the image corners."""
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    moved = corners @ theta.transpose(1, 2)  # [P, 4, 2]
    return (moved - corners[:, :2]).norm(dim=-1).mean(dim=1)


def test_positives_get_milder_transforms_than_negatives():
    cfg = AugmentConfig()
    no_flip = {"flip_prob": 0.0}  # a flip moves the corners by design; compare the rest
    augment = ClassConditionalAugment(
        cfg.positive.model_copy(update=no_flip), cfg.negative.model_copy(update=no_flip)
    )
    labels = torch.tensor([1.0, 0.0]).repeat(500)
    shift = _displacement(augment.draw(labels, _gen(1)).theta)
    mild, strong = shift[labels == 1].mean(), shift[labels == 0].mean()
    assert mild < 0.7 * strong

    x = _phantom(400, seed=2)
    out = augment(x, torch.arange(400), labels[:400], _gen(2))
    change = (out - x).abs().mean(dim=(1, 2, 3))
    assert change[labels[:400] == 1].mean() < change[labels[:400] == 0].mean()


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_output_stays_in_the_window_range(label):
    strong = AugmentSide(
        rotate_deg=30,
        scale=0.3,
        translate=0.2,
        flip_prob=0.5,
        noise_std=0.3,
        gamma=0.5,
        contrast=0.5,
    )
    augment = ClassConditionalAugment(strong, strong)
    x = torch.cat([torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32), _phantom(2)])
    out = augment(x, torch.arange(4), torch.full((4,), label), _gen(5))
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_generator_seed_gives_the_same_batch():
    augment = ClassConditionalAugment.from_config(AugmentConfig())
    x, index, labels = _phantom(4), torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        augment(x, index, labels, _gen(9)), augment(x, index, labels, _gen(9))
    )
    assert not torch.equal(augment(x, index, labels, _gen(9)), augment(x, index, labels, _gen(10)))


def test_rejects_uint8_input():
    augment = ClassConditionalAugment(ZERO, ZERO)
    with pytest.raises(ValueError, match="float slices"):
        augment(
            torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
            torch.tensor([0, 1]),
            torch.tensor([0.0, 1.0]),
            _gen(),
        )
