"""Fourier phase-ramp shifts with RELION's rlnOrigin sign (dynamight_core.shift)."""

from __future__ import annotations

import math

import pytest
import torch

from dynamight_core.fourier_grids import irfft2_centered, rfft2_centered
from dynamight_core.shift import (
    apply_relion_origin_rfft,
    phase_ramp_2d_rfft,
    recentre_relion_images_rfft,
)

BOX = 24


def _images(b: int = 3, box: int = BOX) -> torch.Tensor:
    return torch.randn(b, box, box, generator=torch.Generator().manual_seed(0))


def _gaussian_image(centre_xy: tuple[float, float], sigma: float = 2.0, box: int = BOX):
    """Gaussian at pixel ``centre`` (relative to ``box // 2``), xy order, (h, w) array."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("shift_xy", [(0, 0), (3, 0), (0, -5), (7, -2), (-11, 12)])
def test_integer_phase_ramp_equals_roll(shift_xy):
    images = _images()
    shifts = torch.tensor([shift_xy] * 3, dtype=torch.float32)
    moved = irfft2_centered(rfft2_centered(images) * phase_ramp_2d_rfft(shifts, BOX), BOX)
    expected = torch.roll(images, shifts=(shift_xy[1], shift_xy[0]), dims=(-2, -1))
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=0)


def test_phase_ramp_shape_and_unit_modulus():
    ramp = phase_ramp_2d_rfft(torch.tensor([[0.3, -1.7], [2.0, 0.5]]), BOX)
    assert ramp.shape == (2, BOX, BOX // 2 + 1) and ramp.is_complex()
    torch.testing.assert_close(ramp.abs(), torch.ones(2, BOX, BOX // 2 + 1))


def test_subpixel_shift_moves_a_gaussian():
    """A band-limited blob moved by (0.3, -1.6) px equals the blob drawn at the new centre."""
    image = _gaussian_image((0.0, 0.0))[None]
    shift = torch.tensor([[0.3, -1.6]], dtype=torch.float64)
    moved = irfft2_centered(rfft2_centered(image) * phase_ramp_2d_rfft(shift, BOX), BOX)
    torch.testing.assert_close(moved[0], _gaussian_image((0.3, -1.6)), atol=1e-6, rtol=0)


def test_relion_origin_sign():
    """RELION's image is the projection moved by −rlnOrigin (Å): origin (+6, −3) Å at 1.5 Å/px
    moves the content by (−4, +2) px."""
    images = _images(1)
    pixel = 1.5
    out = irfft2_centered(apply_relion_origin_rfft(
        rfft2_centered(images), torch.tensor([[6.0, -3.0]]), pixel, BOX), BOX)
    torch.testing.assert_close(out, torch.roll(images, shifts=(2, -4), dims=(-2, -1)),
                               atol=1e-5, rtol=0)


def test_apply_then_recentre_is_identity():
    images = _images(4)
    shifts = torch.tensor([[1.37, -2.2], [0.0, 0.0], [-7.9, 3.05], [12.0, 0.1]])
    f = rfft2_centered(images)
    back = recentre_relion_images_rfft(apply_relion_origin_rfft(f, shifts, 1.3, BOX), shifts, 1.3,
                                       BOX)
    torch.testing.assert_close(back, f, atol=1e-4, rtol=1e-5)


def test_phase_ramp_is_exp_minus_2pi_i_k_s():
    shift = torch.tensor([[0.25, -0.75]], dtype=torch.float64)
    ramp = phase_ramp_2d_rfft(shift, BOX)[0]
    ky, kx = 3, 2  # row 3 holds fftfreq 3 / BOX, column 2 holds 2 / BOX
    phase = -2 * math.pi * (kx * 0.25 + ky * -0.75) / BOX
    assert ramp[ky, kx].real.item() == pytest.approx(math.cos(phase), abs=1e-6)
    assert ramp[ky, kx].imag.item() == pytest.approx(math.sin(phase), abs=1e-6)
