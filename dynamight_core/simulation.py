"""Synthetic particle images of a moving Gaussian structure, with known poses and motion."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class TrackPlan:
    """A :class:`SimulationPlan` of time series: particle ``i`` is frame ``time[i]`` of track
    ``track[i]`` (rows ordered track by track, frame by frame)."""

    plan: SimulationPlan
    track: torch.Tensor  # (n,) int64
    time: torch.Tensor  # (n,) float32, frame index


def _axis_angle_matrices(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotations (n, 3, 3) by ``angle`` (n,) radians about unit ``axis`` (n, 3)."""
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return torch.eye(3, dtype=axis.dtype) + s * k + (1 - c) * (k @ k)


def _reflect_into_unit_interval(m: torch.Tensor) -> torch.Tensor:
    """Fold values onto [-1, 1] by reflection at ±1 (a random walk with reflecting walls)."""
    return 1 - torch.abs(torch.remainder(m + 1, 4) - 2)


def plan_tracks(n_tracks: int, n_frames: int, *, seed: int = 0, drift_per_frame: float = 0.04,
                diffusion_per_frame: float = 0.05, rotation_degrees_per_frame: float = 3.0,
                max_shift_angstrom: float = 3.0,
                defocus_range_angstrom: tuple[float, float] = (8000.0, 25000.0)) -> TrackPlan:
    """Molecules filmed for ``n_frames`` frames each (liquid-phase EM): per track, the motion
    coordinate starts uniform in [-1, 1] and moves by a constant drift (uniform in
    ±``drift_per_frame``) plus Gaussian diffusion (standard deviation ``diffusion_per_frame``
    per frame), reflected at ±1; the pose turns smoothly (a random start, a random axis, an
    angular speed uniform up to ``rotation_degrees_per_frame``); the shift jitters (tracking
    error, up to ``max_shift_angstrom``); one astigmatic defocus per track (one movie). Half
    sets are drawn per track, so no track is split between halves."""
    g = torch.Generator().manual_seed(seed)
    n = n_tracks * n_frames
    frames = torch.arange(n_frames, dtype=torch.float32)
    start = torch.rand(n_tracks, generator=g) * 2 - 1
    drift = (torch.rand(n_tracks, generator=g) * 2 - 1) * drift_per_frame
    steps = torch.randn(n_tracks, n_frames, generator=g) * diffusion_per_frame
    steps[:, 0] = 0
    motion = _reflect_into_unit_interval(start[:, None] + drift[:, None] * frames
                                         + steps.cumsum(1)).reshape(n)
    r0 = random_rotations(n_tracks, generator=g)
    axis = torch.randn(n_tracks, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    speed = torch.rand(n_tracks, generator=g, dtype=torch.float64) * math.radians(
        rotation_degrees_per_frame)
    turn = _axis_angle_matrices(axis.repeat_interleave(n_frames, 0),
                                (speed[:, None] * frames.double()).reshape(n))
    rotations = r0.repeat_interleave(n_frames, 0) @ turn
    du = torch.empty(n_tracks, dtype=torch.float64).uniform_(*defocus_range_angstrom, generator=g)
    dv = du - torch.rand(n_tracks, generator=g, dtype=torch.float64) * 1000.0
    angle = torch.rand(n_tracks, generator=g) * 180.0
    per_frame = lambda a: a.repeat_interleave(n_frames, 0)
    ctf = CTFParams.from_values(n, defocus_u_angstrom=per_frame(du),
                                defocus_v_angstrom=per_frame(dv),
                                defocus_angle_degrees=per_frame(angle))
    half = per_frame((torch.randperm(n_tracks, generator=g) % 2 + 1).long())
    shifts = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_angstrom
    plan = SimulationPlan(rotations=rotations, shifts_angstrom=shifts, ctf=ctf,
                          motion=motion.float(), half_set=half, noise_sigma=0.0)
    return TrackPlan(plan=plan, track=per_frame(torch.arange(n_tracks)),
                     time=frames.repeat(n_tracks))


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
                 pixel_size: float, device: torch.device | None = None) -> torch.Tensor:
    """Ground-truth map ``(box, box, box)`` of the structure at one motion value, rendered on
    ``device`` (default: the CPU) and returned on the CPU."""
    positions = structure.deformed_positions(torch.tensor([motion]))[0].to(device)
    return render_gaussians_3d(positions,
                               torch.tensor([structure.sigma_angstrom], device=positions.device),
                               structure.masses.to(positions.device),
                               torch.zeros(positions.shape[0], dtype=torch.long,
                                           device=positions.device),
                               box, pixel_size).cpu()


def consensus_map(structure: MovingStructure, box: int, pixel_size: float,
                  n_states: int = 21, device: torch.device | None = None) -> torch.Tensor:
    """What a consensus refinement of uniformly distributed motion sees: the average state
    (rendered on ``device``, default the CPU; returned on the CPU)."""
    states = torch.linspace(-1, 1, n_states)
    return sum(render_state(structure, float(t), box, pixel_size, device)
               for t in states) / n_states


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
