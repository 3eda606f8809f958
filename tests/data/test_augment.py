"""Class-conditional, per-patient augmentation of a flat slice batch."""

from __future__ import annotations

import pytest
import torch

from brainmets.config import AugmentConfig, AugmentSide
from brainmets.data.augment import ClassConditionalAugment, class_dependent_warning

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


def test_default_strengths_are_equal_for_both_classes():
    cfg = AugmentConfig()
    assert cfg.positive == cfg.negative and cfg.class_dependent() == []
    assert cfg.positive.rotate_deg <= 7 and cfg.positive.scale <= 0.05  # mild: small lesions


def test_class_dependent_strengths_stay_available():
    wider = AugmentConfig().negative.model_copy(
        update={"rotate_deg": 15.0, "scale": 0.10, "translate": 0.08}
    )
    cfg = AugmentConfig(negative=wider)
    assert cfg.class_dependent() == [
        "rotate_deg 7 vs 15", "scale 0.05 vs 0.1", "translate 0.04 vs 0.08"
    ]  # fmt: skip
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


def test_train_warns_when_the_classes_are_augmented_differently():
    cfg = AugmentConfig(negative=AugmentConfig().negative.model_copy(update={"noise_std": 0.03}))
    warning = class_dependent_warning(cfg)
    assert "noise_std 0.01 vs 0.03" in warning and "label" in warning
    assert class_dependent_warning(AugmentConfig()) is None
    assert class_dependent_warning(cfg.model_copy(update={"enabled": False})) is None


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
