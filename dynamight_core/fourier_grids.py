"""Frequency grids in torch's *unshifted* rfft layout, the one layout the core uses.

A real-space image ``(h, w)`` with its centre at ``(h // 2, w // 2)`` is transformed with
:func:`rfft2_centered` (``ifftshift`` then ``rfft2``), so phases refer to the box centre.
Rows carry ``fftfreq(h)``, columns ``rfftfreq(w)``; frequencies are in cycles per pixel unless
the name says ``_angstrom`` (cycles per Å).
"""

from __future__ import annotations

import torch


def fftfreq_grid_2d_rfft(box_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(box, box // 2 + 1, 2)`` grid of ``(kx, ky)`` in cycles per pixel (unshifted rfft)."""
    ky = torch.fft.fftfreq(box_size, device=device)
    kx = torch.fft.rfftfreq(box_size, device=device)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def radial_shell_index_3d_rfft(box_size: int, device=None) -> torch.Tensor:
    """RELION shell index ``round(|k| * box)`` for each 3D rfft voxel, ``(d, h, w // 2 + 1)``."""
    kz = torch.fft.fftfreq(box_size, device=device)
    kx = torch.fft.rfftfreq(box_size, device=device)
    gz, gy, gx = torch.meshgrid(kz, kz, kx, indexing="ij")
    return torch.round(torch.sqrt(gz**2 + gy**2 + gx**2) * box_size).long()


def crop_rows(box_size: int, new_box: int, device=None) -> torch.Tensor:
    """Rows of a ``box_size`` unshifted (r)fft that hold the frequencies of a ``new_box`` one
    (Fourier cropping)."""
    return torch.round(torch.fft.fftfreq(new_box, device=device) * new_box).long() % box_size


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """``(..., h, w)`` real images centred at ``(h//2, w//2)`` -> unshifted rfft ``(..., h, w//2+1)``."""
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def irfft2_centered(images_rfft: torch.Tensor, box_size: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered` for square ``box_size`` images."""
    real = torch.fft.irfft2(images_rfft, s=(box_size, box_size))
    return torch.fft.fftshift(real, dim=(-2, -1))


def rfftn_centered_3d(volume: torch.Tensor) -> torch.Tensor:
    """``(..., d, h, w)`` volume centred at ``(d//2, h//2, w//2)`` -> unshifted 3D rfft."""
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1))


def irfftn_centered_3d(volume_rfft: torch.Tensor, box_size: int) -> torch.Tensor:
    """Inverse of :func:`rfftn_centered_3d` for cubic ``box_size`` volumes."""
    real = torch.fft.irfftn(volume_rfft, s=(box_size,) * 3, dim=(-3, -2, -1))
    return torch.fft.fftshift(real, dim=(-3, -2, -1))
