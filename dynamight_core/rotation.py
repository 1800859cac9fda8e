"""RELION Euler angles <-> rotation matrices: the only place where angles become matrices.

RELION's convention (``Euler_angles2matrix``): ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with
``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(a) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
``A`` maps a map position ``r`` (xyz, Å or voxels, relative to the box centre) to the projection
frame: the voxel lands at image position ``(A @ r)[:2]`` and ``(A @ r)[2]`` is the depth.
This equals ``scipy.spatial.transform.Rotation.from_euler('ZYZ', [rot, tilt, psi],
degrees=True).as_matrix().T``.
"""

from __future__ import annotations

import torch


def _rz(angle_rad: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rows = [torch.stack([c, s, zero], -1), torch.stack([-s, c, zero], -1),
            torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def _ry(angle_rad: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    rows = [torch.stack([c, zero, -s], -1), torch.stack([zero, one, zero], -1),
            torch.stack([s, zero, c], -1)]
    return torch.stack(rows, -2)


def euler_to_matrix(
    rot_degrees: torch.Tensor,  # (...,)
    tilt_degrees: torch.Tensor,  # (...,)
    psi_degrees: torch.Tensor,  # (...,)
) -> torch.Tensor:  # (..., 3, 3)
    """RELION ``rlnAngleRot/Tilt/Psi`` (degrees) to RELION ``A`` matrices."""
    rot, tilt, psi = (torch.deg2rad(torch.as_tensor(a, dtype=torch.float64))
                      for a in (rot_degrees, tilt_degrees, psi_degrees))
    rot, tilt, psi = torch.broadcast_tensors(rot, tilt, psi)
    return _rz(psi) @ _ry(tilt) @ _rz(rot)


def matrix_to_euler(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`euler_to_matrix`: ``(rot, tilt, psi)`` in degrees, tilt in [0, 180]."""
    a = torch.as_tensor(matrices, dtype=torch.float64)
    # from the product: A[2, :] = (s_t c_r, s_t s_r, c_t) and A[:, 2] = (-c_p s_t, s_p s_t, c_t)
    tilt = torch.arccos(torch.clamp(a[..., 2, 2], -1.0, 1.0))
    sin_tilt = torch.sin(tilt)
    regular = sin_tilt > 1e-6
    rot = torch.atan2(a[..., 2, 1], a[..., 2, 0])
    psi = torch.atan2(a[..., 1, 2], -a[..., 0, 2])
    # gimbal lock: tilt ~ 0 or 180, only rot +/- psi is defined; put it all in psi
    # gimbal lock (tilt 0 or 180): only rot +/- psi is defined; set rot = 0, A = Rz(psi) Ry(tilt)
    rot_lock = torch.zeros_like(rot)
    psi_lock = torch.where(a[..., 2, 2] > 0, torch.atan2(a[..., 0, 1], a[..., 0, 0]),
                           torch.atan2(a[..., 0, 1], a[..., 1, 1]))
    rot = torch.where(regular, rot, rot_lock)
    psi = torch.where(regular, psi, psi_lock)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def random_rotations(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 3, 3)`` rotation matrices drawn uniformly on SO(3) (unit quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotations_for_fourier_slice(relion_a: torch.Tensor) -> torch.Tensor:
    """torch-fourier-slice wants the matrix rotating the slice (image xyz) into the volume
    frame, i.e. ``A`` transposed. Every call into torch-fourier-slice goes through here."""
    return relion_a.transpose(-1, -2).to(torch.float32)


__all__ = ["euler_to_matrix", "matrix_to_euler", "random_rotations",
           "rotations_for_fourier_slice"]
