"""Projection of a density map into particle images (RELION's forward model for rigid maps)."""

from __future__ import annotations

import torch
from torch_fourier_slice import project_3d_to_2d

from .ctf import ctf_2d_rfft
from .fourier_grids import irfft2_centered, rfft2_centered
from .particles import CTFParams
from .rotation import rotations_for_fourier_slice
from .shift import apply_relion_origin_rfft


def project_map(
    volume: torch.Tensor,  # (d, d, d) zyx
    rotations: torch.Tensor,  # (b, 3, 3) RELION A
    pad_factor: float = 2.0,
) -> torch.Tensor:  # (b, d, d)
    """Line integrals (in voxel units) of ``volume`` along the viewing directions, centred."""
    mats = rotations_for_fourier_slice(rotations).to(volume.device)
    return project_3d_to_2d(volume.to(torch.float32), mats, pad_factor=pad_factor)


def simulate_particle_images(
    volume: torch.Tensor,  # (d, d, d)
    rotations: torch.Tensor,  # (b, 3, 3)
    shifts_angstrom: torch.Tensor,  # (b, 2)
    ctf: CTFParams,  # b particles
    pixel_size: float,
) -> torch.Tensor:  # (b, d, d)
    """Noise-free particle images as ``relion_project --ctf`` makes them."""
    box = volume.shape[-1]
    f = rfft2_centered(project_map(volume, rotations))
    f = f * ctf_2d_rfft(ctf.to(f.device), box, pixel_size)
    f = apply_relion_origin_rfft(f, shifts_angstrom.to(f.device), pixel_size, box)
    return irfft2_centered(f, box)
