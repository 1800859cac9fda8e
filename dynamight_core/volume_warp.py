"""The consensus map seen in a particle's frame: ``V_z(y) = V(x(y, z))`` through an inverse
deformation ``x`` (:func:`~dynamight_core.inverse_network.network_inverse_map` or
:func:`~dynamight_core.fixed_point_inverse.fixed_point_inverse_map`).

Coordinates: vectors ``xyz`` in Å relative to voxel ``box // 2``; volumes ``[z, y, x]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def voxel_positions_angstrom(box_size: int, pixel_size: float,
                             device: torch.device | str = "cpu") -> torch.Tensor:
    """``(box, box, box, 3)`` xyz Å of every voxel ``[z, y, x]``, relative to voxel ``box//2``."""
    r = (torch.arange(box_size, device=device, dtype=torch.float32) - box_size // 2) * pixel_size
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def sample_volume(
    volume: torch.Tensor,  # (box, box, box) [z, y, x]
    points: torch.Tensor,  # (m, 3) xyz Å
    pixel_size: float,
) -> torch.Tensor:  # (m,)
    """Trilinear value of ``volume`` at ``points`` (zero outside the box)."""
    box = volume.shape[-1]
    coords = (points / pixel_size + box // 2) * (2.0 / (box - 1)) - 1.0
    out = F.grid_sample(volume[None, None], coords.to(volume.dtype).reshape(1, -1, 1, 1, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(-1)


def warp_volume_to_latent(
    volume: torch.Tensor,  # (box, box, box) [z, y, x], the consensus map
    inverse: Callable[[torch.Tensor], torch.Tensor],  # (m, 3) Å particle frame -> consensus frame
    pixel_size: float,
    *,
    mask: torch.Tensor | None = None,  # (box, box, box) bool: voxels to warp (others unchanged)
    chunk: int = 1 << 16,
) -> torch.Tensor:  # (box, box, box)
    """The consensus map seen in one particle's frame: ``V_z(y) = V(x(y, z))`` at every voxel
    ``y`` (inside ``mask``; the other voxels keep their consensus value). ``inverse`` is one
    particle's inverse, e.g. :func:`~dynamight_core.inverse_network.network_inverse_map` or
    :func:`~dynamight_core.fixed_point_inverse.fixed_point_inverse_map`."""
    box = volume.shape[-1]
    if volume.shape != (box, box, box):
        raise ValueError(f"volume must be a cube, got {tuple(volume.shape)}")
    points = voxel_positions_angstrom(box, pixel_size, volume.device).reshape(-1, 3)
    flat = volume.reshape(-1).clone()
    selected = (torch.arange(flat.shape[0], device=volume.device) if mask is None
                else torch.nonzero(mask.reshape(-1).to(volume.device)).squeeze(-1))
    with torch.no_grad():
        for start in range(0, selected.shape[0], chunk):
            idx = selected[start:start + chunk]
            flat[idx] = sample_volume(volume, inverse(points[idx]), pixel_size).to(flat.dtype)
    return flat.reshape(box, box, box)



__all__ = ["sample_volume", "voxel_positions_angstrom", "warp_volume_to_latent"]
