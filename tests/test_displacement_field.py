"""Coarse displacement fields built from Gaussian displacements."""

from __future__ import annotations

import torch

from dynamight_core.displacement_field import (
    displacement_grid_from_gaussians,
    sample_displacement_grid,
    upsample_displacement_grid,
)

BOX, PX = 32, 2.0


def _cloud(n: int = 4000, radius: float = 20.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3, generator=g)
    return p / p.norm(dim=1, keepdim=True) * radius * torch.rand(n, 1, generator=g) ** (1 / 3)


def test_uniform_translation_is_reproduced_inside_the_model():
    pos = _cloud()
    shift = torch.tensor([1.5, -0.5, 2.0])
    grid = displacement_grid_from_gaussians(pos, shift.expand(2, pos.shape[0], 3), BOX, PX,
                                            grid_size=9)
    inner = pos[pos.norm(dim=1) < 12.0]
    got = sample_displacement_grid(grid, inner, BOX, PX)
    torch.testing.assert_close(got, shift.expand_as(got), atol=1e-4, rtol=0)


def test_field_is_zero_far_from_the_gaussians():
    pos = _cloud(radius=10.0)
    d = torch.ones(1, pos.shape[0], 3)
    grid = displacement_grid_from_gaussians(pos, d, BOX, PX, grid_size=9)
    corner = torch.tensor([[-30.0, -30.0, -30.0], [28.0, 28.0, -30.0]])
    assert sample_displacement_grid(grid, corner, BOX, PX).abs().max() == 0.0


def test_linear_field_and_axis_order():
    pos = _cloud()
    # displacement depends on x only: d = (0, 0, 0.1 x); a swapped axis would show up here
    d = torch.zeros(1, pos.shape[0], 3)
    d[0, :, 2] = 0.1 * pos[:, 0]
    grid = displacement_grid_from_gaussians(pos, d, BOX, PX, grid_size=17)
    inner = pos[pos.norm(dim=1) < 10.0]
    got = sample_displacement_grid(grid, inner, BOX, PX)[0]
    assert (got[:, 2] - 0.1 * inner[:, 0]).abs().max() < 0.15
    assert got[:, :2].abs().max() < 1e-5


def test_upsampling_matches_point_sampling_at_voxels():
    pos = _cloud()
    g = torch.Generator().manual_seed(1)
    d = torch.randn(2, pos.shape[0], 3, generator=g)
    grid = displacement_grid_from_gaussians(pos, d, BOX, PX, grid_size=9)
    full = upsample_displacement_grid(grid, BOX)  # (2, 3, z, y, x)
    zyx = torch.tensor([[16, 16, 16], [3, 20, 7], [31, 0, 12]])
    xyz_angstrom = (zyx.flip(-1) - BOX // 2).float() * PX
    got = sample_displacement_grid(grid, xyz_angstrom, BOX, PX)
    want = full[:, :, zyx[:, 0], zyx[:, 1], zyx[:, 2]].transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
