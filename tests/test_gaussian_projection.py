"""Projection and rendering of Gaussian models (dynamight_core.gaussian_projection).

A Gaussian's *mass* is its integral in voxel units, so a projection sums to the total mass, and
the projection of one Gaussian is the 2D Gaussian ``m / (2π σ_px²) exp(-|p - (A x)[:2]|² / 2σ²)``.

Reference projections of maps use ``project_map`` (torch-fourier-slice), which, like RELION's
projector, divides the padded map by the trilinear kernel's sinc² before slicing; its total
(the k = 0 sample) is therefore over-estimated for off-centre content (1-3 % for a structure
filling ±9 px of a 32 px box, measured), while ``project_gaussians_rfft`` conserves mass to 1e-4.
The models here stay within ±6 px so that project_map's mass is within 2 %.
"""

from __future__ import annotations

import math

import pytest
import torch
from relion_tools import correlation

from dynamight_core.fourier_grids import irfft2_centered
from dynamight_core.gaussian_projection import (
    project_gaussians_rfft,
    render_gaussians_3d,
    splat_bilinear_2d,
)
from dynamight_core.map_projection import project_map
from dynamight_core.rotation import random_rotations

BOX, PIXEL = 32, 2.0


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    n = 60
    positions = (torch.rand(n, 3, generator=g) - 0.5) * 24.0  # Å, within ±12 Å = ±6 px
    sigmas = torch.tensor([2.5, 4.0])  # Å
    class_index = torch.randint(0, 2, (n,), generator=g)
    masses = 0.5 + torch.rand(n, generator=g)
    rotations = random_rotations(6, generator=g)
    return positions, sigmas, masses, class_index, rotations


def _project(positions, sigmas, masses, class_index, rotations, oversampling=2):
    ft = project_gaussians_rfft(positions, sigmas, masses, class_index, rotations, BOX, PIXEL,
                                oversampling=oversampling)
    return irfft2_centered(ft, BOX)


def _analytic_map(positions, sigmas, masses, class_index) -> torch.Tensor:
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(BOX, BOX, BOX, dtype=torch.float64)
    for pos, cls, m in zip(positions.double() / PIXEL, class_index, masses.double()):
        s = sigmas[cls].double() / PIXEL
        r2 = (x - pos[0]) ** 2 + (y - pos[1]) ** 2 + (z - pos[2]) ** 2
        vol += m * (2 * math.pi * s * s) ** -1.5 * torch.exp(-r2 / (2 * s * s))
    return vol


def _analytic_projections(positions, sigmas, masses, class_index, rotations) -> torch.Tensor:
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    xy = torch.einsum("bij,nj->bni", rotations, positions.double())[..., :2] / PIXEL
    s = (sigmas.double() / PIXEL)[class_index]  # (n,)
    r2 = (x - xy[..., 0, None, None]) ** 2 + (y - xy[..., 1, None, None]) ** 2  # (b, n, h, w)
    g = masses.double()[:, None, None] / (2 * math.pi * s[:, None, None] ** 2)
    return (g * torch.exp(-r2 / (2 * s[:, None, None] ** 2))).sum(1)


def test_matches_analytic_2d_projection(model):
    _positions, _sigmas, masses, _class_index, _rotations = model
    ours = _project(*model)
    analytic = _analytic_projections(*model)
    assert ours.shape == (6, BOX, BOX)
    assert correlation(ours, analytic).min() >= 0.99999  # measured 0.999987
    assert (ours - analytic).abs().max() / analytic.abs().max() < 0.01
    torch.testing.assert_close(ours.sum((-2, -1)).double(), masses.sum().double().expand(6),
                               rtol=1e-4, atol=0)


def test_matches_projection_of_rendered_map(model):
    positions, sigmas, masses, class_index, rotations = model
    ours = _project(*model)
    rendered = render_gaussians_3d(positions, sigmas, masses, class_index, BOX, PIXEL)
    reference = project_map(rendered, rotations)
    assert correlation(ours, reference).min() >= 0.999
    mass_ratio = ours.sum((-2, -1)) / reference.sum((-2, -1))
    assert (mass_ratio - 1).abs().max() <= 0.02, mass_ratio


def test_matches_projection_of_analytically_rendered_map(model):
    positions, sigmas, masses, class_index, rotations = model
    ours = _project(*model)
    reference = project_map(_analytic_map(positions, sigmas, masses, class_index).float(),
                            rotations)
    assert correlation(ours, reference).min() >= 0.999
    mass_ratio = ours.sum((-2, -1)) / reference.sum((-2, -1))
    assert (mass_ratio - 1).abs().max() <= 0.02, mass_ratio


def test_render_equals_analytic_map(model):
    positions, sigmas, masses, class_index, _ = model
    rendered = render_gaussians_3d(positions, sigmas, masses, class_index, BOX, PIXEL)
    analytic = _analytic_map(positions, sigmas, masses, class_index)
    assert rendered.shape == (BOX, BOX, BOX)
    assert correlation(rendered.flatten(), analytic.flatten(), dims=(-1,)) >= 0.9999
    assert rendered.sum().item() == pytest.approx(masses.sum().item(), rel=1e-5)


def test_single_centred_gaussian_is_rotation_invariant():
    positions = torch.zeros(1, 3)
    sigmas = torch.tensor([3.0])
    rotations = random_rotations(8, generator=torch.Generator().manual_seed(2))
    images = _project(positions, sigmas, torch.tensor([2.0]), torch.tensor([0]), rotations)
    torch.testing.assert_close(images, images[:1].expand_as(images), atol=1e-6, rtol=0)
    assert images[0].argmax().item() == (BOX // 2) * BOX + BOX // 2  # peak at the centre pixel


def test_off_centre_gaussian_lands_at_a_times_x():
    positions = torch.tensor([[6.0, -4.0, 10.0]])  # Å
    rotations = torch.cat([torch.eye(3, dtype=torch.float64)[None],
                           random_rotations(3, generator=torch.Generator().manual_seed(4))])
    images = _project(positions, torch.tensor([2.5]), torch.tensor([1.0]), torch.tensor([0]),
                      rotations).double()
    c = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    centroid = torch.stack([(images * x).sum((-2, -1)), (images * y).sum((-2, -1))], -1)
    expected = (rotations @ positions[0].double())[:, :2] / PIXEL
    torch.testing.assert_close(centroid, expected, atol=0.02, rtol=0)
    assert expected[0].tolist() == [3.0, -2.0]  # identity: xyz Å -> xy pixels from the centre


def test_render_mass_equals_sum_of_masses():
    g = torch.Generator().manual_seed(5)
    positions = (torch.rand(20, 3, generator=g) - 0.5) * 40.0
    masses = torch.rand(20, generator=g) * 3.0
    class_index = torch.randint(0, 3, (20,), generator=g)
    vol = render_gaussians_3d(positions, torch.tensor([1.5, 3.0, 5.0]), masses, class_index, BOX,
                              PIXEL)
    assert vol.sum().item() == pytest.approx(masses.sum().item(), rel=1e-5)


def test_splat_bilinear_conserves_mass_and_interpolates():
    xy = torch.tensor([[[3.25, 5.5], [0.0, 0.0], [7.75, 7.0]]])
    masses = torch.tensor([2.0, 1.0, 4.0])
    grid = splat_bilinear_2d(xy, masses, torch.tensor([0, 0, 1]), n_classes=2, size=8)
    assert grid.shape == (1, 2, 8, 8)
    assert grid.sum().item() == pytest.approx(7.0)
    # first Gaussian: x = 3.25, y = 5.5 -> weights 0.75/0.25 in x, 0.5/0.5 in y
    assert grid[0, 0, 5, 3].item() == pytest.approx(2.0 * 0.75 * 0.5)
    assert grid[0, 0, 6, 4].item() == pytest.approx(2.0 * 0.25 * 0.5)
    assert grid[0, 0, 0, 0].item() == pytest.approx(1.0)
    # periodic wrap: x = 7.75 spills 0.75 of its mass onto x = 0 of class 1
    assert grid[0, 1, 7, 0].item() == pytest.approx(4.0 * 0.75)


def test_gradients_flow_to_positions_and_masses(model):
    positions, sigmas, masses, class_index, rotations = model
    positions = positions.clone().requires_grad_(True)
    masses = masses.clone().requires_grad_(True)
    target = _project(*model).detach() * 0.9 + 0.01 * torch.randn(
        6, BOX, BOX, generator=torch.Generator().manual_seed(9))
    ft = project_gaussians_rfft(positions + 0.3, sigmas, masses, class_index, rotations, BOX,
                                PIXEL)
    loss = (irfft2_centered(ft, BOX) - target).pow(2).sum() + ft.abs().pow(2).sum() * 1e-6
    loss.backward()
    for grad in (positions.grad, masses.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (positions.grad.abs().sum(-1) > 0).all()  # every Gaussian receives a gradient


def test_position_gradient_matches_finite_differences():
    """Small float64 model: autograd equals central differences (bilinear splat is linear
    between grid points, so the check holds away from them)."""
    g = torch.Generator().manual_seed(1)
    positions = ((torch.rand(3, 3, generator=g, dtype=torch.float64) - 0.5) * 10.0 + 0.123)
    masses = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    rotations = random_rotations(2, generator=g)
    sigmas = torch.tensor([2.5], dtype=torch.float64)
    cls = torch.zeros(3, dtype=torch.long)

    def f(pos, m):
        ft = project_gaussians_rfft(pos, sigmas, m, cls, rotations, 16, PIXEL)
        return ft.abs().pow(2).sum()

    torch.autograd.gradcheck(f, (positions.requires_grad_(True), masses.requires_grad_(True)),
                             eps=1e-6, atol=1e-5, rtol=1e-4)
