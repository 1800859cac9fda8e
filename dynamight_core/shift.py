"""Sub-pixel image shifts as Fourier phase ramps, with RELION's sign for ``rlnOrigin``."""

from __future__ import annotations

import math

import torch

from .fourier_grids import fftfreq_grid_2d_rfft


def phase_ramp_2d_rfft(shifts_px: torch.Tensor, box_size: int) -> torch.Tensor:
    """Phase factors that move an image by ``+shifts_px`` (``(b, 2)``, xy pixels).

    Returns ``(b, box, box // 2 + 1)`` complex: ``exp(-2πi k·s)`` (torch's forward-FFT sign).
    """
    k = fftfreq_grid_2d_rfft(box_size, shifts_px.device)  # (h, w, 2)
    phase = -2.0 * math.pi * torch.einsum("hwc,bc->bhw", k, shifts_px.to(k.dtype))
    return torch.polar(torch.ones_like(phase), phase)


def apply_relion_origin_rfft(
    projections_rfft: torch.Tensor,  # (b, h, w//2+1)
    shifts_angstrom: torch.Tensor,  # (b, 2) rlnOriginX/YAngst
    pixel_size: float,
    box_size: int,
) -> torch.Tensor:
    """Turn centred projections into particle images: RELION's image is the projection moved
    by ``-rlnOrigin``."""
    return projections_rfft * relion_origin_phase_rfft(shifts_angstrom, pixel_size, box_size)


def relion_origin_phase_rfft(
    shifts_angstrom: torch.Tensor,  # (b, 2) rlnOriginX/YAngst
    pixel_size: float,
    box_size: int,
) -> torch.Tensor:  # (b, h, w//2+1)
    """The factor :func:`apply_relion_origin_rfft` multiplies by (for several projections of
    each particle at once)."""
    return phase_ramp_2d_rfft(-shifts_angstrom / pixel_size, box_size)


def recentre_relion_images_rfft(
    images_rfft: torch.Tensor,  # (b, h, w//2+1)
    shifts_angstrom: torch.Tensor,  # (b, 2) rlnOriginX/YAngst
    pixel_size: float,
    box_size: int,
) -> torch.Tensor:
    """Undo :func:`apply_relion_origin_rfft`: move particle images by ``+rlnOrigin``."""
    return images_rfft * phase_ramp_2d_rfft(shifts_angstrom / pixel_size, box_size)
