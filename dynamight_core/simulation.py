"""Synthetic particle images of a moving Gaussian structure, with known poses and motion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .ctf import ctf_2d_rfft
from .fourier_grids import irfft2_centered
from .gaussian_projection import project_gaussians_rfft, render_gaussians_3d
from .particles import CTFParams
from .rotation import random_rotations
from .shift import apply_relion_origin_rfft
from .synthetic_structure import MovingStructure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationPlan:
    """Per-particle ground truth drawn before any image is made."""

    rotations: torch.Tensor  # (n, 3, 3) RELION A
    shifts_angstrom: torch.Tensor  # (n, 2)
    ctf: CTFParams
    motion: torch.Tensor  # (n,) in [-1, 1]
    half_set: torch.Tensor  # (n,) 1 or 2
    noise_sigma: float  # white noise standard deviation per pixel


def plan_simulation(n_particles: int, *, seed: int = 0, max_shift_angstrom: float = 6.0,
                    defocus_range_angstrom: tuple[float, float] = (8000.0, 25000.0),
                    motion_values: torch.Tensor | None = None) -> SimulationPlan:
    """Random poses, shifts, astigmatic defocus, motion (uniform in [-1, 1]) and half sets.
    The motion is drawn even when ``motion_values`` replaces it, so the same ``seed`` gives the
    same poses, CTFs and half sets with or without motion (a no-motion control of the same
    particles)."""
    g = torch.Generator().manual_seed(seed)
    n = n_particles
    du = torch.empty(n, dtype=torch.float64).uniform_(*defocus_range_angstrom, generator=g)
    dv = du - torch.rand(n, generator=g, dtype=torch.float64) * 1000.0
    ctf = CTFParams.from_values(
        n, defocus_u_angstrom=du, defocus_v_angstrom=dv,
        defocus_angle_degrees=torch.rand(n, generator=g) * 180.0,
    )
    motion = torch.rand(n, generator=g) * 2 - 1
    if motion_values is not None:
        motion = torch.as_tensor(motion_values, dtype=torch.float32).expand(n).clone()
    half = (torch.randperm(n, generator=g) % 2 + 1).long()
    return SimulationPlan(
        rotations=random_rotations(n, generator=g),
        shifts_angstrom=(torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_angstrom,
        ctf=ctf, motion=motion.float(), half_set=half, noise_sigma=0.0,
    )


def _clean_images(structure: MovingStructure, plan: SimulationPlan, idx: slice, box: int,
                  pixel_size: float) -> torch.Tensor:
    positions = structure.deformed_positions(plan.motion[idx])
    sigma = torch.tensor([structure.sigma_angstrom])
    cls = torch.zeros(positions.shape[1], dtype=torch.long)
    ft = project_gaussians_rfft(positions, sigma, structure.masses, cls,
                                plan.rotations[idx].float(), box, pixel_size)
    ft = ft * ctf_2d_rfft(plan.ctf.subset(np.arange(idx.start, idx.stop)), box, pixel_size)
    ft = apply_relion_origin_rfft(ft, plan.shifts_angstrom[idx], pixel_size, box)
    return irfft2_centered(ft, box)


def noise_sigma_for_snr(structure: MovingStructure, plan: SimulationPlan, box: int,
                        pixel_size: float, snr: float, n_probe: int = 64) -> float:
    """Noise standard deviation giving ``snr`` = signal variance / noise variance (whole box)."""
    n = min(n_probe, plan.motion.shape[0])
    signal_var = _clean_images(structure, plan, slice(0, n), box, pixel_size).var(dim=(-2, -1))
    return float(torch.sqrt(signal_var.mean() / snr))


def simulate_images(structure: MovingStructure, plan: SimulationPlan, box: int,
                    pixel_size: float, *, batch_size: int = 256, seed: int = 0
                    ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(particle slice, images (b, box, box))``: CTF-modulated, shifted, plus noise."""
    g = torch.Generator().manual_seed(seed + 1)
    n = plan.motion.shape[0]
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        images = _clean_images(structure, plan, idx, box, pixel_size)
        if plan.noise_sigma > 0:
            images = images + plan.noise_sigma * torch.randn(images.shape, generator=g)
        yield idx, images


def render_state(structure: MovingStructure, motion: float, box: int,
                 pixel_size: float) -> torch.Tensor:
    """Ground-truth map ``(box, box, box)`` of the structure at one motion value."""
    positions = structure.deformed_positions(torch.tensor([motion]))[0]
    return render_gaussians_3d(positions, torch.tensor([structure.sigma_angstrom]),
                               structure.masses, torch.zeros(positions.shape[0], dtype=torch.long),
                               box, pixel_size)


def consensus_map(structure: MovingStructure, box: int, pixel_size: float,
                  n_states: int = 21) -> torch.Tensor:
    """What a consensus refinement of uniformly distributed motion sees: the average state."""
    states = torch.linspace(-1, 1, n_states)
    return sum(render_state(structure, float(t), box, pixel_size) for t in states) / n_states


def soft_mask(volume: torch.Tensor, threshold: float, extend_px: int = 3,
              soft_edge_px: int = 3) -> torch.Tensor:
    """RELION-style mask: ``volume > threshold``, extended by ``extend_px``, cosine soft edge."""
    from scipy import ndimage

    binary = volume.numpy() > threshold
    dist = ndimage.distance_transform_edt(~binary)
    mask = np.where(dist <= extend_px, 1.0,
                    np.where(dist <= extend_px + soft_edge_px,
                             0.5 + 0.5 * np.cos(np.pi * (dist - extend_px) / soft_edge_px), 0.0))
    return torch.tensor(mask, dtype=torch.float32)
