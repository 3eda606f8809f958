"""On-device normalisation of cached brain-window slices."""

from __future__ import annotations

import pytest
import torch

from brainmets.data.normalize import NORMALIZATIONS, normalize_slices, uint8_to_unit


def _head_like_slices() -> torch.Tensor:
    """uint8 brain-window slices as the cache stores them: air (0), a skull ring clipped at 255,
    brain around 35 HU (~112) with noise, plus one all-air slice above the head."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    radius = ((yy - 32) ** 2 + (xx - 32) ** 2).sqrt()
    slices = []
    for scale in (1.0, 0.8, 0.6):
        brain = 112 + 10 * torch.randn(64, 64, generator=generator)
        image = torch.where(radius < 24 * scale, brain, torch.zeros(64, 64))
        image = torch.where((radius >= 24 * scale) & (radius < 28 * scale), 255.0, image)
        slices.append(image)
    slices.append(torch.zeros(64, 64))
    return torch.stack(slices)[:, None].round().clamp(0, 255).to(torch.uint8)


def test_uint8_to_unit_maps_the_window_to_zero_one():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    unit = uint8_to_unit(x)
    assert unit.dtype == torch.float32
    torch.testing.assert_close(unit, torch.tensor([0.0, 128 / 255, 1.0]))


def test_uint8_to_unit_rejects_float():
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_unit(torch.zeros(3))


def test_zscore_is_per_slice_and_constant_slices_become_zero():
    x = uint8_to_unit(_head_like_slices())
    z = normalize_slices(x, "zscore")
    assert z.shape == x.shape and torch.isfinite(z).all()
    torch.testing.assert_close(z[:3].mean(dim=(-2, -1)), torch.zeros(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:3].std(dim=(-2, -1), correction=0), torch.ones(3, 1))
    assert torch.equal(z[3], torch.zeros_like(z[3]))  # all air: zeros, not NaN
    # Each slice is normalised on its own: scaling one slice's contrast changes nothing.
    torch.testing.assert_close(normalize_slices(x[:1] * 0.5), z[:1], atol=1e-5, rtol=0)


def test_zscore_of_a_constant_bright_slice_is_zero():
    z = normalize_slices(torch.full((2, 1, 256, 256), 0.3))
    assert torch.equal(z, torch.zeros_like(z))


def test_minus_one_to_one():
    x = uint8_to_unit(_head_like_slices())
    y = normalize_slices(x, "minus_one_to_one")
    assert y.min() == -1.0 and y.max() == 1.0
    torch.testing.assert_close(y, 2 * x - 1)


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_normalisation_keeps_bf16_and_gradients(mode):
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    normalize_slices(x, mode).sum().backward()
    assert x.grad is not None
    assert normalize_slices(x.detach().bfloat16(), mode).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("x", "mode", "error"),
    [
        (torch.rand(1, 1, 8, 8), "minmax", ValueError),
        (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "zscore", TypeError),
    ],
)
def test_bad_input_is_refused(x, mode, error):
    with pytest.raises(error):
        normalize_slices(x, mode)
