"""Tests for dynamight_core.encoder."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.encoder import (
    ImageEncoder,
    circular_pixel_mask,
    kl_divergence,
    reparameterize,
)

BOX = 16
LATENT_DIM = 3


def _encoder(**kwargs) -> ImageEncoder:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return ImageEncoder(BOX, LATENT_DIM, n_neurons=32, n_layers=2, **kwargs)


def test_output_shapes_and_finite() -> None:
    mu, logvar = _encoder()(torch.randn(5, BOX, BOX))
    assert mu.shape == logvar.shape == (5, LATENT_DIM)
    assert bool(torch.isfinite(mu).all() and torch.isfinite(logvar).all())


def test_circular_mask_selects_pixels_inside_radius() -> None:
    mask = circular_pixel_mask(BOX, 4.0)
    assert bool(mask[BOX // 2, BOX // 2]) and bool(mask[BOX // 2, BOX // 2 + 4])
    assert not bool(mask[BOX // 2 + 3, BOX // 2 + 3])  # radius sqrt(18) > 4
    assert not bool(mask[0, 0])
    encoder = _encoder(mask_radius_px=4.0)
    assert encoder.n_inputs == int(mask.sum())
    assert _encoder().n_inputs == BOX * BOX


def test_pixels_outside_mask_are_ignored() -> None:
    encoder = _encoder(mask_radius_px=5.0)
    images = torch.randn(2, BOX, BOX)
    altered = images.clone()
    altered[:, 0, 0] += 100.0  # a corner, outside the circle
    with torch.no_grad():
        for a, b in zip(encoder(images), encoder(altered), strict=True):
            assert torch.equal(a, b)


def test_input_standardisation_makes_encoder_scale_and_offset_invariant() -> None:
    encoder = _encoder()
    images = torch.randn(3, BOX, BOX)
    with torch.no_grad():
        mu, _ = encoder(images)
        mu_scaled, _ = encoder(7.0 * images + 3.0)
    assert torch.allclose(mu, mu_scaled, atol=1e-4)


def test_config_round_trip() -> None:
    encoder = _encoder(mask_radius_px=6.0)
    restored = ImageEncoder(**encoder.config)
    restored.load_state_dict(encoder.state_dict())
    images = torch.randn(2, BOX, BOX)
    with torch.no_grad():
        for a, b in zip(encoder(images), restored(images), strict=True):
            assert torch.equal(a, b)


def test_reparameterize_statistics_and_determinism() -> None:
    mu = torch.tensor([[1.0, -2.0, 0.5]]).expand(20000, -1)
    logvar = torch.log(torch.tensor([[0.25, 1.0, 4.0]])).expand(20000, -1)
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean(0), mu[0], atol=0.05)
    assert torch.allclose(z.std(0), torch.tensor([0.5, 1.0, 2.0]), rtol=0.03)
    again = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)


def test_reparameterize_is_differentiable() -> None:
    mu = torch.zeros(4, LATENT_DIM, requires_grad=True)
    logvar = torch.zeros(4, LATENT_DIM, requires_grad=True)
    reparameterize(mu, logvar).pow(2).sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    assert float(logvar.grad.abs().sum()) > 0


def test_kl_divergence_closed_form() -> None:
    zero = torch.zeros(2, LATENT_DIM)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(2))
    mu = torch.tensor([[1.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 2.0]])
    # 0.5 * sum(mu^2 + var - 1 - log var)
    expected = 0.5 * (1.0 + (torch.exp(torch.tensor(2.0)) - 1.0 - 2.0))
    assert kl_divergence(mu, logvar).shape == (1,)
    assert float(kl_divergence(mu, logvar)[0]) == pytest.approx(float(expected), rel=1e-6)
    assert bool((kl_divergence(torch.randn(10, 3), torch.randn(10, 3)) > 0).all())


def test_wrong_image_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="images must be"):
        _encoder()(torch.zeros(1, BOX + 2, BOX + 2))
