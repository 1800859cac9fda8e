"""The RELION CTF (``CTF::getCTF``), evaluated on rfft grids, batched per particle.

We keep our own implementation rather than torch-ctf because RELION data need the B-factor and
scale factor (torch-ctf has neither) and torch-ctf returns NaN when ``DefocusV > DefocusU``. Its
docstring says the astigmatism angle is measured from y, but measured it behaves as RELION's
(from x). ``tests/test_ctf.py`` checks this function against torch-ctf and ``relion_project``.

Formulae (RELION): λ = 12.2643247 / sqrt(V (1 + 0.978466e-6 V)) Å with V in volts;
Δf(θ) = (U + V)/2 + (U − V)/2 · cos 2(θ − angle), θ = atan2(ky, kx), positive = underfocus;
γ = −π λ Δf |k|² + (π/2) Cs λ³ |k|⁴ − phase_shift − atan(Q0 / sqrt(1 − Q0²));
CTF = scale · (−sin γ) · exp(−B |k|² / 4)  (positive at low frequency).
"""

from __future__ import annotations

import math

import torch

from .fourier_grids import fftfreq_grid_2d_rfft
from .particles import CTFParams


def electron_wavelength_angstrom(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength (Å) for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def ctf_2d_rfft(
    ctf: CTFParams,  # n particles
    box_size: int,
    pixel_size: float,  # Å
) -> torch.Tensor:  # (n, box, box // 2 + 1)
    """RELION CTF for each particle on the unshifted rfft grid of a ``box_size`` image.

    The device and dtype follow ``ctf.defocus_u_angstrom``.
    """
    device = ctf.defocus_u_angstrom.device
    k = fftfreq_grid_2d_rfft(box_size, device) / pixel_size  # cycles per Å, (h, w, 2)
    kx, ky = k[..., 0], k[..., 1]
    k2 = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)

    def per_particle(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32)[:, None, None]

    lam = per_particle(electron_wavelength_angstrom(ctf.voltage_kv))
    cs = per_particle(ctf.spherical_aberration_mm) * 1e7
    du, dv = per_particle(ctf.defocus_u_angstrom), per_particle(ctf.defocus_v_angstrom)
    angle = per_particle(torch.deg2rad(ctf.defocus_angle_degrees))
    q0 = per_particle(ctf.amplitude_contrast)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (theta - angle))
    gamma = (
        -math.pi * lam * defocus * k2
        + 0.5 * math.pi * cs * lam**3 * k2 * k2
        - per_particle(torch.deg2rad(ctf.phase_shift_degrees))
        - torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    )
    envelope = torch.exp(-per_particle(ctf.bfactor_angstrom2) * k2 / 4.0)
    return per_particle(ctf.scale) * -torch.sin(gamma) * envelope
