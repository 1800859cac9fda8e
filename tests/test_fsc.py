"""Fourier shell correlation with RELION's shells (dynamight_core.fsc)."""

from __future__ import annotations

import math

import pytest
import torch

from dynamight_core.fourier_grids import radial_shell_index_3d_rfft
from dynamight_core.fsc import fsc, resolution_at_threshold, shell_resolution_angstrom

BOX = 24


def _noise(seed: int, box: int = BOX) -> torch.Tensor:
    return torch.randn(box, box, box, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _plane_wave(k_xyz: tuple[int, int, int], box: int = BOX) -> torch.Tensor:
    """cos(2π k·r / box) on the ``zyx`` grid, r from the box centre: one Fourier pair ±k."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.cos(2 * math.pi * (k_xyz[0] * x + k_xyz[1] * y + k_xyz[2] * z) / box)


def test_identical_maps_give_one_everywhere():
    vol = _noise(0)
    curve = fsc(vol, vol)
    assert curve.shape == (BOX // 2 + 1,)
    torch.testing.assert_close(curve, torch.ones_like(curve), atol=1e-12, rtol=0)


def test_scaled_map_gives_one_and_negated_map_minus_one():
    vol = _noise(1)
    torch.testing.assert_close(fsc(vol, 3.0 * vol)[1:], torch.ones(BOX // 2, dtype=torch.float64))
    torch.testing.assert_close(fsc(vol, -vol)[1:], -torch.ones(BOX // 2, dtype=torch.float64))


def test_independent_noise_gives_small_fsc():
    box = 32
    curve = fsc(_noise(2, box), _noise(3, box))
    shells = radial_shell_index_3d_rfft(box)
    counts = torch.bincount(shells.flatten(), minlength=box // 2 + 1)[: box // 2 + 1]
    # ~1/sqrt(2 N) per shell for N independent complex voxels (the half transform holds each once)
    bound = 4.0 / torch.sqrt(counts[2:].double())
    assert (curve[2:].abs() < bound).all(), (curve, bound)
    assert curve[4:].abs().max() < 0.15
    assert abs(curve[2:].mean().item()) < 0.03


@pytest.mark.parametrize(("k_xyz", "shell"), [
    ((3, 4, 0), 5),  # |k| = 5
    ((3, 2, 0), 4),  # |k| = 3.61: round -> 4 (floor would give 3)
    ((2, 2, 1), 3),  # |k| = 3
    ((1, 1, 0), 1),  # |k| = 1.41
    ((0, 5, 5), 7),  # |k| = 7.07
    ((0, 0, 12), 12),  # Nyquist along z
])
def test_shell_is_round_of_k_times_box(k_xyz, shell):
    """A Fourier component at integer frequency k (cycles per box) counts in shell round(|k|):
    flipping its sign in one map makes that shell, and only that shell, anti-correlated."""
    base = _noise(4)
    wave = 50.0 * _plane_wave(k_xyz)
    curve = fsc(base + wave, base - wave)
    assert curve[shell] < -0.5
    others = torch.ones_like(curve, dtype=torch.bool)
    others[shell] = False
    assert (curve[others] > 0.99).all(), curve


def test_shell_resolution_angstrom():
    res = shell_resolution_angstrom(32, 1.5)
    assert math.isinf(res[0].item())
    assert res[16].item() == pytest.approx(3.0)  # Nyquist = 2 px
    assert res[4].item() == pytest.approx(12.0)  # box * pixel / shell


def test_resolution_at_threshold_on_a_synthetic_curve():
    box, pixel = 32, 2.0
    curve = torch.tensor([1.0, 1.0, 0.95, 0.8, 0.5, 0.2, 0.1, 0.3, 0.05] + [0.0] * 8)
    # first shell below 0.143 is 6: the last good shell is 5 -> 64 / 5 Å
    assert resolution_at_threshold(curve, box, pixel) == pytest.approx(64.0 / 5)
    # the 0.5 criterion: shell 4 is not below 0.5, shell 5 is -> shell 4
    assert resolution_at_threshold(curve, box, pixel, threshold=0.5) == pytest.approx(64.0 / 4)
    # never below: Nyquist
    assert resolution_at_threshold(torch.ones(17), box, pixel) == pytest.approx(2 * pixel)
    # below from shell 1 on: nothing resolved
    assert math.isinf(resolution_at_threshold(torch.tensor([1.0] + [0.0] * 16), box, pixel))


def test_fsc_of_high_frequency_flipped_map():
    """Flipping the sign of shells > 6 gives FSC 1 up to shell 6 and −1 past it, so the 0.143
    resolution is box / 6 pixels. (A plainly low-passed map would leave shells > 6 with round-off
    power only, where the FSC is 0 / 0 and meaningless.)"""
    vol = _noise(5)
    f = torch.fft.rfftn(torch.fft.ifftshift(vol))
    shells = radial_shell_index_3d_rfft(BOX)
    flipped = torch.fft.fftshift(torch.fft.irfftn(torch.where(shells <= 6, f, -f), s=vol.shape))
    curve = fsc(vol, flipped)
    torch.testing.assert_close(curve[:7], torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(curve[7:], -torch.ones(BOX // 2 - 6, dtype=torch.float64))
    assert resolution_at_threshold(curve, BOX, 1.0) == pytest.approx(BOX / 6)
