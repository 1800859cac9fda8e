"""Trilinear insertion of central slices sampled on the image's own grid into a padded 3D rfft.

torch-fourier-slice inserts slices whose grid matches the volume, which forces images to be padded
in real space; with a rapidly oscillating CTF that is not the same as inserting the measured
samples. RELION inserts the box-grid samples at coordinates scaled by the padding factor; so do we.
Layout: unshifted 3D rfft ``(p, p, p // 2 + 1)`` = ``(z, y, x)``.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _inserted_samples(box_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``index (m,)`` (into the flattened ``(box, box // 2 + 1)`` rfft, row-major as a boolean
    mask would give them) and frequencies ``k (m, 3)`` of the image samples inside Nyquist:
    constants of the box, built once per device (a boolean mask per batch would read its count
    back from a GPU). Read-only."""
    ky = torch.fft.fftfreq(box_size, device=device)
    kx = torch.fft.rfftfreq(box_size, device=device)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    keep = (gx * gx + gy * gy) <= 0.25
    k_img = torch.stack([gx[keep], gy[keep], torch.zeros_like(gx[keep])], dim=-1)  # (m, 3)
    return keep.flatten().nonzero()[:, 0], k_img


def slice_coordinates_rfft(box_size: int, padded_size: int, rotations: torch.Tensor):
    """Volume-frame coordinates (voxels of the padded rfft, xyz) of an image's rfft samples.

    Returns ``coords (b, m, 3)`` and ``index (m,)``: which pixels of an image's rfft, flattened
    (``samples.flatten(-2).index_select(-1, index)``), lie inside Nyquist and are inserted.
    """
    index, k_img = _inserted_samples(box_size, rotations.device)
    # a map point r projects to (A r)[:2]; an image frequency k lies at A^T k in the map's frame
    coords = torch.einsum("bji,mj->bmi", rotations.to(torch.float32), k_img) * padded_size
    return coords, index


def inserted_samples(samples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (b, m)
    """The inserted samples of ``samples (b, box, box // 2 + 1)`` (``index`` from
    :func:`slice_coordinates_rfft`)."""
    return samples.flatten(-2).index_select(-1, index)


def insert_slices_rfft_3d(
    data: torch.Tensor | None,  # (p, p, p//2+1) complex accumulator, updated in place
    weight: torch.Tensor,  # (p, p, p//2+1) real accumulator, updated in place
    values: torch.Tensor | None,  # (b, m) complex samples
    weights: torch.Tensor,  # (b, m) real samples (e.g. CTF²)
    coords: torch.Tensor,  # (b, m, 3) xyz in padded voxels
) -> None:
    """Add ``values`` and ``weights`` at ``coords`` with trilinear weights (Friedel-aware).
    ``data`` and ``values`` may both be None to accumulate the weights alone."""
    p, nx = weight.shape[0], weight.shape[2]
    flip = coords[..., 0] < 0
    coords = torch.where(flip[..., None], -coords, coords).reshape(-1, 3)
    weights = weights.reshape(-1)
    if data is not None:
        values = torch.where(flip, values.conj(), values).reshape(-1)
        flat_data = data.view(-1)
    base = torch.floor(coords)
    frac = coords - base
    base = base.long()
    flat_weight = weight.view(-1)
    for corner in range(8):
        dx, dy, dz = corner & 1, (corner >> 1) & 1, (corner >> 2) & 1
        w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
             * (frac[:, 2] if dz else 1 - frac[:, 2]))
        x = base[:, 0] + dx
        w = w * (x < nx)  # beyond the last stored plane: dropped (masking beats boolean indexing)
        idx = ((base[:, 2] + dz) % p * p + (base[:, 1] + dy) % p) * nx + x.clamp(max=nx - 1)
        flat_weight.index_add_(0, idx, weights * w)
        if data is not None:
            flat_data.index_add_(0, idx, values * w)


def symmetrise_x0_plane(volume_rfft: torch.Tensor, conjugate: bool) -> torch.Tensor:
    """Complete the Hermitian ``x = 0`` plane: add each voxel's Friedel mate ``(-z, -y)``.

    Samples inserted near ``x = 0`` imply mates at ``x <= 0`` that the half transform stores in the
    same plane; adding them makes the plane Hermitian, as ``irfftn`` assumes.
    """
    out = volume_rfft.clone()
    plane = volume_rfft[:, :, 0]
    mate = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    out[:, :, 0] = plane + (mate.conj() if conjugate else mate)
    return out
