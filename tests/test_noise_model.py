"""Tests for dynamight_core.noise_model: shells, noise spectra and the weighted Fourier loss."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.noise_model import (
    RadialNoiseEstimate,
    nyquist_mask,
    radial_shell_index,
    rfft_multiplicity,
    weighted_fourier_loss,
)

BOX = 16


def test_shell_index_layout_and_values() -> None:
    shells = radial_shell_index(BOX)
    assert shells.shape == (BOX, BOX // 2 + 1) and shells.dtype == torch.long
    assert int(shells[0, 0]) == 0
    assert int(shells[0, 3]) == 3 and int(shells[3, 0]) == 3
    assert int(shells[-3, 0]) == 3  # negative frequencies in the lower rows
    assert int(shells[1, 1]) == 1  # |k| = 1.414 -> 1
    assert int(shells[2, 2]) == 3  # |k| = 2.83 -> 3
    assert int(shells[BOX // 2, BOX // 2]) == 11  # corner, |k| = 11.3
    full = radial_shell_index(BOX, rfft=False)
    assert full.shape == (BOX, BOX)
    assert torch.equal(full[:, : BOX // 2 + 1], shells)
    assert torch.equal(full[:, 1:], torch.flip(full[:, 1:], dims=(1,)))  # |k| symmetric in kx


def test_shell_index_odd_box() -> None:
    shells = radial_shell_index(15)
    assert shells.shape == (15, 8)
    assert int(shells[0, 7]) == 7 and int(shells[7, 0]) == 7 and int(shells[8, 0]) == 7


def test_multiplicity_counts_the_full_spectrum() -> None:
    for box in (BOX, 15):
        assert float(rfft_multiplicity(box).sum()) == box * box
    mask = nyquist_mask(BOX)
    assert bool(mask[0, BOX // 2]) and not bool(mask[BOX // 2, BOX // 2])


def white_noise_rfft(n: int, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.fft.rfft2(sigma * torch.randn(n, BOX, BOX, generator=generator,
                                               dtype=torch.float64))


def test_white_noise_gives_flat_weights_and_known_power() -> None:
    sigma = 3.0
    estimate = RadialNoiseEstimate(BOX)
    for seed in range(4):  # several batches
        estimate.accumulate(white_noise_rfft(100, sigma, seed))
    power = estimate.noise_power()[: BOX // 2 + 1]
    expected = BOX * BOX * sigma**2  # unnormalised FFT of white noise
    assert torch.allclose(power[1:], torch.full_like(power[1:], expected), rtol=0.1)
    assert float(power[0]) == pytest.approx(expected, rel=0.3)  # one real pixel per image
    weights = estimate.weights()
    inside = estimate.within_nyquist
    assert torch.allclose(weights[inside][1:], torch.ones_like(weights[inside][1:]), rtol=0.1)
    assert torch.equal(weights[~inside], torch.zeros_like(weights[~inside]))
    multiplicity = rfft_multiplicity(BOX)
    weighted_mean = (weights * multiplicity).sum() / (multiplicity * inside).sum()
    assert float(weighted_mean) == pytest.approx(1.0, rel=1e-6)


def test_coloured_noise_weights_follow_inverse_power() -> None:
    shells = radial_shell_index(BOX)
    filter_ = 1.0 / (1.0 + shells.to(torch.float64))  # amplitude falls with frequency
    estimate = RadialNoiseEstimate(BOX)
    estimate.accumulate(white_noise_rfft(400, 1.0, 7) * filter_)
    weights = estimate.weights()
    # weights ~ 1 / power ~ (1 + shell)^2: shell 6 vs shell 2 -> (7 / 3)^2
    w2 = weights[shells == 2].mean()
    w6 = weights[shells == 6].mean()
    assert float(w6 / w2) == pytest.approx((7 / 3) ** 2, rel=0.1)


def test_sums_over_batches_equal_one_pass_and_merge_by_addition() -> None:
    noise = white_noise_rfft(20, 1.0, 3)
    whole = RadialNoiseEstimate(BOX)
    whole.accumulate(noise)
    first, second = RadialNoiseEstimate(BOX), RadialNoiseEstimate(BOX)
    first.accumulate(noise[:8])
    second.accumulate(noise[8:])
    # what an all-reduce of the two ranks' sums does
    first.power_sum += second.power_sum
    first.count += second.count
    assert torch.allclose(first.power_sum, whole.power_sum)
    assert torch.equal(first.count, whole.count)
    assert torch.allclose(first.weights(), whole.weights())
    whole.reset()
    assert float(whole.count.sum()) == 0.0
    assert torch.equal(whole.weights(), whole.within_nyquist.to(torch.float32))


def test_weights_are_clamped_for_near_silent_shells() -> None:
    shells = radial_shell_index(BOX)
    filter_ = torch.where(shells == 5, 1e-6, 1.0).to(torch.float64)
    estimate = RadialNoiseEstimate(BOX)
    estimate.accumulate(white_noise_rfft(50, 1.0, 1) * filter_)
    weights = estimate.weights(min_relative_power=1e-2)
    inside = estimate.within_nyquist
    ratio = weights[inside].max() / weights[inside].min()
    assert float(ratio) <= 100.0 * 1.5  # clamp bounds the dynamic range (plus noise)
    assert bool(torch.isfinite(weights).all())


def test_weighted_fourier_loss_is_parseval_with_unit_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, BOX, BOX, generator=generator, dtype=torch.float64)
    b = torch.randn(3, BOX, BOX, generator=generator, dtype=torch.float64)
    everything = torch.ones(BOX, BOX // 2 + 1, dtype=torch.bool)
    ones = torch.ones(BOX, BOX // 2 + 1, dtype=torch.float64)
    loss = weighted_fourier_loss(torch.fft.rfft2(a), torch.fft.rfft2(b), ones, everything)
    assert loss.shape == (3,)
    assert torch.allclose(loss, ((a - b) ** 2).sum(dim=(-2, -1)))
    same = weighted_fourier_loss(torch.fft.rfft2(a), torch.fft.rfft2(a), ones, nyquist_mask(BOX))
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64))


def test_weighted_fourier_loss_whitens_coloured_noise() -> None:
    shells = radial_shell_index(BOX)
    filter_ = 1.0 / (1.0 + 0.3 * shells.to(torch.float64))
    estimate = RadialNoiseEstimate(BOX)
    estimate.accumulate(white_noise_rfft(300, 1.0, 11) * filter_)
    weights = estimate.weights().to(torch.float64)
    residual = white_noise_rfft(200, 1.0, 12) * filter_
    loss = weighted_fourier_loss(residual, torch.zeros_like(residual), weights,
                                 estimate.within_nyquist)
    # whitened residual: every pixel contributes weight * power = same constant on average
    per_pixel = weights * estimate.noise_power()[shells]
    constant = per_pixel[estimate.within_nyquist].mean()
    assert float(loss.mean()) == pytest.approx(float(constant), rel=0.05)
