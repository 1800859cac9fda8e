"""The consensus map warped into a particle's frame."""

from __future__ import annotations

import numpy as np
import torch
from inverse_fixtures import BOX, PX

from dynamight_core.fixed_point_inverse import fixed_point_inverse_map
from dynamight_core.volume_warp import voxel_positions_angstrom, warp_volume_to_latent


def _blob(centre_xyz: torch.Tensor, sigma: float = 6.0) -> torch.Tensor:  # (box, box, box)
    r = voxel_positions_angstrom(BOX, PX) - centre_xyz
    return torch.exp(-(r**2).sum(-1) / (2 * sigma**2))


def _centroid_xyz(volume: torch.Tensor) -> torch.Tensor:
    r = voxel_positions_angstrom(BOX, PX)
    return (r * volume[..., None]).sum((0, 1, 2)) / volume.sum()


def test_warp_moves_a_blob_by_the_translation():
    blob = _blob(torch.tensor([-4.0, 4.0, 0.0]))
    shift = torch.tensor([12.0, -8.0, 4.0])  # Å, the particle is the consensus moved by shift
    warped = warp_volume_to_latent(blob, lambda y: y - shift, PX)
    torch.testing.assert_close(_centroid_xyz(warped), torch.tensor([8.0, -4.0, 4.0]),
                               atol=0.05, rtol=0)
    # xyz vectors, [z, y, x] arrays: the peak sits at x +2, y -1, z +1 voxels from the centre
    peak = np.unravel_index(int(warped.argmax()), warped.shape)
    assert tuple(int(i) for i in peak) == (BOX // 2 + 1, BOX // 2 - 1, BOX // 2 + 2)


def test_warp_with_fixed_point_inverse_of_a_uniform_translation():
    blob = _blob(torch.zeros(3))
    # the model (a cube of ±36 Å) covers the blob and its tails, so the field is uniform there
    consensus = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) * 72 - 36
    shift = torch.tensor([8.0, 0.0, -4.0])
    inverse = fixed_point_inverse_map(consensus, shift.expand(consensus.shape[0], 3), BOX, PX,
                                      grid_size=17)
    warped = warp_volume_to_latent(blob, inverse, PX)
    torch.testing.assert_close(_centroid_xyz(warped), shift, atol=0.05, rtol=0)
    # outside the mask the consensus is kept
    mask = voxel_positions_angstrom(BOX, PX).norm(dim=-1) < 20.0
    masked = warp_volume_to_latent(blob, inverse, PX, mask=mask)
    assert torch.equal(masked[~mask], blob[~mask])
    torch.testing.assert_close(masked[mask], warped[mask])
