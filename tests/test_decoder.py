"""Tests for dynamight_core.decoder and dynamight_core.positional_encoding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynamight_core.decoder import DeformationDecoder
from dynamight_core.positional_encoding import (
    encoding_dim,
    normalise_positions,
    positional_encoding,
)

BOX = 32
VOXEL_SIZE = 2.0  # Å
LATENT_DIM = 4


def _positions(n: int = 50, seed: int = 0) -> torch.Tensor:  # (n, 3) Å inside the box
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=generator) - 0.5) * BOX * VOXEL_SIZE * 0.8


def _decoder(**kwargs) -> DeformationDecoder:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return DeformationDecoder(BOX, VOXEL_SIZE, LATENT_DIM, n_neurons=16, n_linear_layers=2,
                              n_freqs=4, **kwargs)


def _randomise_output(decoder: DeformationDecoder) -> None:
    with torch.no_grad():
        nn.init.normal_(decoder.output_layer.weight, std=0.1)
        nn.init.normal_(decoder.output_layer.bias, std=0.1)


# -- positional encoding -------------------------------------------------------------------

def test_positional_encoding_shape_and_range() -> None:
    x = torch.rand(2, 7, 3) * 2 - 1
    features = positional_encoding(x, n_freqs=10)
    assert features.shape == (2, 7, 60) == (2, 7, encoding_dim(10))
    assert float(features.abs().max()) <= 1.0
    # layout (sin|cos, freq, xyz): the first block is sin(pi x), the first cosine block cos(pi x)
    assert torch.allclose(features[..., 0:3], torch.sin(math.pi * x), atol=1e-6)
    assert torch.allclose(features[..., 30:33], torch.cos(math.pi * x), atol=1e-6)
    assert torch.allclose(features[..., 3:6], torch.sin(2 * math.pi * x), atol=1e-6)
    # sin^2 + cos^2 = 1 per frequency and coordinate
    assert torch.allclose(features[..., :30] ** 2 + features[..., 30:] ** 2,
                          torch.ones(2, 7, 30), atol=1e-6)


def test_normalised_box_edge_is_one() -> None:
    edge = torch.tensor([BOX * VOXEL_SIZE / 2, -BOX * VOXEL_SIZE / 2, 0.0])
    assert torch.allclose(normalise_positions(edge, BOX, VOXEL_SIZE), torch.tensor([1., -1., 0.]))


def test_positional_encoding_rejects_non_xyz() -> None:
    with pytest.raises(ValueError):
        positional_encoding(torch.zeros(4, 2))


# -- decoder -------------------------------------------------------------------------------

def test_fresh_decoder_gives_exactly_zero_displacement() -> None:
    decoder = _decoder()
    displacements = decoder(_positions(), torch.randn(3, LATENT_DIM))
    assert displacements.shape == (3, 50, 3)
    assert torch.equal(displacements, torch.zeros(3, 50, 3))


def test_split_first_layer_equals_naive_concatenation() -> None:
    decoder = _decoder()
    _randomise_output(decoder)
    positions, z = _positions(), torch.randn(5, LATENT_DIM)

    # naive: one Linear on [PE(x), z] materialised for every (particle, Gaussian)
    naive_first = nn.Linear(encoding_dim(4) + LATENT_DIM, 16)
    with torch.no_grad():
        naive_first.weight.copy_(torch.cat([decoder.position_layer.weight,
                                            decoder.latent_layer.weight], dim=1))
        naive_first.bias.copy_(decoder.position_layer.bias)
    features = positional_encoding(normalise_positions(positions, BOX, VOXEL_SIZE), 4)

    def naive(codes):
        inputs = torch.cat([features[None].expand(codes.shape[0], -1, -1),
                            codes[:, None, :].expand(-1, positions.shape[0], -1)], dim=-1)
        h = nn.functional.elu(naive_first(inputs))
        for layer in decoder.hidden_layers:
            h = h + nn.functional.elu(layer(h))
        return decoder.output_layer(h) * (BOX * VOXEL_SIZE / 2)

    with torch.no_grad():  # anchored: the output at z = 0 is subtracted
        expected = naive(z) - naive(torch.zeros(1, LATENT_DIM))
        assert torch.allclose(decoder(positions, z), expected, atol=1e-5, rtol=1e-5)


def test_the_prior_mean_code_never_moves_anything() -> None:
    decoder = _decoder()
    for p in decoder.parameters():
        nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        assert torch.equal(decoder(_positions(), torch.zeros(4, LATENT_DIM)),
                           torch.zeros(4, 50, 3))
        assert float(decoder(_positions(), torch.ones(1, LATENT_DIM)).abs().max()) > 0.1


@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_mode_tangents_match_autograd(with_mask: bool) -> None:
    positions = _positions().double()
    mask = positions[:, 0] > 0 if with_mask else None
    decoder = _decoder(movable_mask=mask).double()
    for p in decoder.parameters():
        nn.init.normal_(p, std=0.3)
    z = torch.randn(3, LATENT_DIM, dtype=torch.float64)
    displacements, tangents = decoder.forward_with_tangents(positions, z)
    torch.testing.assert_close(displacements, decoder(positions, z))
    assert tangents.shape == (3, LATENT_DIM, 50, 3) and not tangents.requires_grad
    jacobian = torch.autograd.functional.jacobian(lambda c: decoder(positions, c), z)
    for k in range(LATENT_DIM):  # d(b, n, 3) / d z(b, k), particles independent
        expected = torch.stack([jacobian[b, :, :, b, k] for b in range(3)])
        torch.testing.assert_close(tangents[:, k], expected)
    if with_mask:
        assert torch.equal(tangents[:, :, ~mask], torch.zeros_like(tangents[:, :, ~mask]))
    # along some coordinates only: exactly those rows, in the order asked for
    dims = torch.tensor([LATENT_DIM - 1, 0])
    out, some = decoder.forward_with_tangents(positions, z, dims)
    assert torch.equal(out, displacements)
    assert torch.equal(some, tangents[:, dims])


def test_movable_mask_zeroes_displacement_outside() -> None:
    positions, z = _positions(), torch.randn(3, LATENT_DIM)
    mask = positions[:, 0] > 0
    free = _decoder()
    _randomise_output(free)
    masked = _decoder(movable_mask=mask)
    masked.load_state_dict(free.state_dict() | {"movable_mask": mask})
    with torch.no_grad():
        d_free, d_masked = free(positions, z), masked(positions, z)
    assert torch.equal(d_masked[:, ~mask], torch.zeros_like(d_masked[:, ~mask]))
    assert torch.allclose(d_masked[:, mask], d_free[:, mask], atol=1e-6)
    assert float(d_masked[:, mask].abs().max()) > 0


def test_gradient_flows_to_latent_and_to_output_layer() -> None:
    decoder = _decoder()
    positions = _positions()
    # at initialisation the zero output layer still receives a gradient, so training can start
    z = torch.randn(2, LATENT_DIM)
    decoder(positions, z).sum().backward()
    assert float(decoder.output_layer.weight.grad.abs().sum()) > 0
    # once the output layer is non-zero, the gradient reaches the latent code
    _randomise_output(decoder)
    z = torch.randn(2, LATENT_DIM, requires_grad=True)
    (decoder(positions, z) ** 2).sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    assert float(z.grad.abs().min()) > 0


def test_different_latents_give_different_deformations() -> None:
    decoder = _decoder()
    _randomise_output(decoder)
    with torch.no_grad():
        d = decoder(_positions(), torch.stack([torch.zeros(LATENT_DIM), torch.ones(LATENT_DIM)]))
    assert float((d[0] - d[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("with_mask", [False, True])
def test_config_and_state_dict_round_trip(with_mask: bool) -> None:
    positions = _positions()
    mask = positions[:, 1] < 0 if with_mask else None
    decoder = _decoder(movable_mask=mask)
    _randomise_output(decoder)
    restored = DeformationDecoder(**decoder.config)
    restored.load_state_dict(decoder.state_dict())
    z = torch.randn(2, LATENT_DIM)
    with torch.no_grad():
        assert torch.equal(decoder(positions, z), restored(positions, z))
    assert all(isinstance(v, (int, float)) for v in decoder.config.values())
    if with_mask:
        assert torch.equal(restored.movable_mask, mask)


def test_shape_errors() -> None:
    decoder = _decoder(movable_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="movable_mask"):
        decoder(_positions(50), torch.zeros(1, LATENT_DIM))
    with pytest.raises(ValueError, match="z must be"):
        _decoder()(_positions(), torch.zeros(1, LATENT_DIM + 1))
