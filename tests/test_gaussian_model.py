"""Tests for dynamight_core.gaussian_model on tiny synthetic maps."""

from __future__ import annotations

import math

import pytest
import torch

from dynamight_core.gaussian_model import (
    GaussianModel,
    automatic_threshold,
    fit_gaussians_to_map,
    init_gaussians_from_map,
    voxel_to_angstrom,
)

BOX = 24
VOXEL_SIZE = 1.5  # Å


def render_direct(positions: torch.Tensor, sigmas: torch.Tensor, masses: torch.Tensor,
                  ) -> torch.Tensor:
    """Analytic Gaussians summed on the ``BOX**3`` grid, ``(z, y, x)``:
    ``mass (2 pi s^2)^-1.5 exp(-|r - p|^2 / 2 s^2)`` in voxel units, evaluated as the product
    of the three 1D factors (the same numbers as the 3D formula, much cheaper)."""
    coords = torch.arange(BOX, dtype=positions.dtype) - BOX // 2  # voxel offsets from centre
    p_px = positions / VOXEL_SIZE  # (n, 3) xyz
    s_px = sigmas / VOXEL_SIZE  # (n,)
    factors = torch.exp(-(coords[None, None, :] - p_px[:, :, None]) ** 2
                        / (2 * s_px[:, None, None] ** 2))  # (n, xyz, BOX)
    scale = masses * (2 * math.pi * s_px**2) ** -1.5
    return torch.einsum("n,nz,ny,nx->zyx", scale, factors[:, 2], factors[:, 1], factors[:, 0])


def angstrom_to_voxel_index(positions: torch.Tensor) -> torch.Tensor:  # (n, 3) zyx long
    return torch.floor(positions / VOXEL_SIZE + BOX // 2 + 0.5).long().flip(-1)


def two_blob_map() -> torch.Tensor:
    centres = torch.tensor([[-5.0, 0.0, 0.0], [5.0, 2.0, -1.0]]) * VOXEL_SIZE
    return render_direct(centres, torch.full((2,), 2.0 * VOXEL_SIZE), torch.tensor([300., 200.]))


def test_voxel_to_angstrom_convention() -> None:
    shape = (BOX, BOX, BOX)
    centre = torch.tensor([[12.0, 12.0, 12.0]])
    assert torch.equal(voxel_to_angstrom(centre, shape, VOXEL_SIZE), torch.zeros(1, 3))
    one_x = torch.tensor([[12.0, 12.0, 13.0]])  # (z, y, x)
    assert torch.allclose(voxel_to_angstrom(one_x, shape, VOXEL_SIZE),
                          torch.tensor([[VOXEL_SIZE, 0.0, 0.0]]))


def test_direct_renderer_puts_mass_and_peak_where_expected() -> None:
    position = torch.tensor([[2.0, -3.0, 1.0]]) * VOXEL_SIZE
    volume = render_direct(position, torch.tensor([2.0 * VOXEL_SIZE]), torch.tensor([50.0]))
    assert volume.sum() == pytest.approx(50.0, rel=1e-4)
    peak = torch.nonzero(volume == volume.max())[0]
    assert peak.tolist() == [12 + 1, 12 - 3, 12 + 2]  # (z, y, x)


def test_automatic_threshold_separates_blobs_from_background() -> None:
    volume = two_blob_map()
    threshold = automatic_threshold(volume)
    assert 0.0 < threshold < float(volume.max())
    assert float(volume[0, 0, 0]) < threshold  # far corner is background


def test_init_from_two_blobs_fills_thresholded_region_and_conserves_mass() -> None:
    volume = two_blob_map()
    generator = torch.Generator().manual_seed(0)
    model, threshold = init_gaussians_from_map(volume, VOXEL_SIZE, 200, generator=generator)
    assert model.n_gaussians == 200 and model.n_classes == 1
    index = angstrom_to_voxel_index(model.positions.detach())
    assert bool((volume[index[:, 0], index[:, 1], index[:, 2]] > threshold).all())
    # both blobs are populated
    x = model.positions.detach()[:, 0]
    assert int((x < 0).sum()) > 20 and int((x > 0).sum()) > 20
    mass_above = float(volume[volume > threshold].sum())
    assert float(model.masses().detach().sum()) == pytest.approx(mass_above, rel=1e-5)
    # widths: at least a voxel, about the spacing of the centres
    assert float(model.class_sigmas.detach()[0]) >= VOXEL_SIZE
    with torch.no_grad():
        rendered = render_direct(*model())
    assert float(rendered.sum()) == pytest.approx(mass_above, rel=1e-3)


def test_init_with_explicit_threshold_and_classes() -> None:
    volume = two_blob_map()
    threshold = 0.5 * float(volume.max())
    model, used = init_gaussians_from_map(volume, VOXEL_SIZE, 30, threshold=threshold,
                                          n_classes=3, generator=torch.Generator().manual_seed(1))
    assert used == threshold
    index = angstrom_to_voxel_index(model.positions.detach())
    assert bool((volume[index[:, 0], index[:, 1], index[:, 2]] > threshold).all())
    assert sorted(set(model.class_index.tolist())) == [0, 1, 2]
    sigmas = model.class_sigmas.detach()
    assert float(sigmas[2] / sigmas[0]) == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(model.amplitudes.detach(), model.amplitudes.detach()[:1].expand(3))
    assert float(model.masses().detach().sum()) == pytest.approx(
        float(volume[volume > threshold].sum()), rel=1e-5)


def test_init_rejects_threshold_above_map() -> None:
    with pytest.raises(ValueError, match="no voxel above threshold"):
        init_gaussians_from_map(two_blob_map(), VOXEL_SIZE, 10, threshold=1e9)


def test_config_round_trip() -> None:
    model, _ = init_gaussians_from_map(two_blob_map(), VOXEL_SIZE, 25, n_classes=2,
                                       generator=torch.Generator().manual_seed(2))
    restored = GaussianModel.from_config(model.config)
    restored.load_state_dict(model.state_dict())
    for a, b in zip(model(), restored(), strict=True):
        assert torch.equal(a, b)


def test_fit_reduces_error_on_map_of_known_gaussians() -> None:
    generator = torch.Generator().manual_seed(0)
    true_positions = (torch.rand(15, 3, generator=generator) - 0.5) * 16 * VOXEL_SIZE
    volume = render_direct(true_positions, torch.full((15,), 2.0 * VOXEL_SIZE),
                           torch.full((15,), 100.0))
    model, _ = init_gaussians_from_map(volume, VOXEL_SIZE, 20,
                                       generator=torch.Generator().manual_seed(2))
    history = fit_gaussians_to_map(model, volume, VOXEL_SIZE, 200, render_direct)
    assert len(history) == 200
    with torch.no_grad():
        final_error = float(torch.mean((render_direct(*model()) - volume) ** 2))
    assert final_error < history[0] / 20
    assert float(model.class_sigmas.detach().min()) >= 0.5 * VOXEL_SIZE


@pytest.mark.parametrize("class_index", [None, [2, 0, 1, 1, 0, 2, 2]])
def test_per_gaussian_values_and_their_gradients_without_sorting_index_backward(class_index):
    """Each Gaussian gets its class's width and mass, and the class parameters' gradients are
    the sums over their Gaussians; not through ``IndexBackward0``, whose CUDA kernel sorts
    (2.7 ms of a training step at 30,000 Gaussians on an H100)."""
    n_classes = 1 if class_index is None else 3
    model = GaussianModel(torch.randn(7, 3), torch.tensor([1.0, 2.0, 3.0][:n_classes]),
                          torch.tensor([5.0, 6.0, 7.0][:n_classes]), class_index)
    index = model.class_index
    weights = torch.arange(1.0, 8.0)
    sigmas, masses = model.sigmas(), model.masses()
    assert torch.equal(masses, model.amplitudes.detach()[index])
    assert torch.equal(sigmas, torch.exp(model.log_sigmas.detach())[index])
    for values in (sigmas, masses):
        assert type(values.grad_fn).__name__ != "IndexBackward0"
    ((sigmas + masses) * weights).sum().backward()
    per_class = torch.zeros(n_classes).index_add_(0, index, weights)
    torch.testing.assert_close(model.amplitudes.grad, per_class)
    torch.testing.assert_close(model.log_sigmas.grad, per_class * torch.exp(model.log_sigmas
                                                                            .detach()))
