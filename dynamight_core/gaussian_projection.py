"""Projection of a Gaussian pseudo-atomic model, and its rendering as a map.

A Gaussian ``g`` has centre ``x_g`` (Å, xyz, relative to the box centre), width ``σ_g`` (Å) and
*mass* ``m_g``: its integral in voxel units, so the map it renders has voxel values
``m (2π σ_px²)^(-3/2) exp(-|r - x|² / 2σ²)`` and its projection is the line integral in voxels.
The projection is computed as in DynaMight: rotate the centres, splat the masses bilinearly onto
a grid ``oversampling`` times finer than the image, FFT, keep the image's frequencies, divide by
the splat kernel's transform (sinc²), multiply by each width class's Gaussian kernel
``exp(-2π² σ² |k|²)`` and by the CTF, and shift by ``-rlnOrigin``.
"""

from __future__ import annotations

import functools
import math

import torch

from ._splat_kernel import fused_splat_usable, splat_bilinear_fused
from .fourier_grids import fftfreq_grid_2d_rfft


def _fine_grid_rows(box_size: int, fine_size: int, device) -> torch.Tensor:
    """Row indices of the fine rfft that hold the coarse rfft's frequencies."""
    m = torch.round(torch.fft.fftfreq(box_size, device=device) * box_size).long()
    return m % fine_size


def splat_bilinear_2d(
    xy_px: torch.Tensor,  # (b, n, 2) positions in fine pixels, origin at index 0
    masses: torch.Tensor,  # (b, n) or (n,)
    class_index: torch.Tensor,  # (n,) long, width class of each Gaussian
    n_classes: int,
    size: int,
) -> torch.Tensor:  # (b, n_classes, size, size)
    """Scatter masses onto a periodic grid with bilinear weights (differentiable in xy and
    mass). On a GPU with Triton one kernel does it (:mod:`._splat_kernel`)."""
    if fused_splat_usable(xy_px):
        grid = splat_bilinear_fused(xy_px, masses, class_index, n_classes, size)
        if grid is not None:
            return grid
    b, n, _ = xy_px.shape
    masses = masses.expand(b, n)
    base = torch.floor(xy_px)
    frac = xy_px - base
    base = base.long()
    offset = (torch.arange(b, device=xy_px.device)[:, None] * n_classes + class_index[None]) * size
    indices, weights = [], []
    for dy in (0, 1):
        wy = frac[..., 1] if dy else 1 - frac[..., 1]
        y = (base[..., 1] + dy) % size
        for dx in (0, 1):
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            x = (base[..., 0] + dx) % size
            indices.append(((offset + y) * size + x).reshape(-1))
            weights.append((masses * wy * wx).reshape(-1))
    # the four corners in one in-place scatter: an out-of-place index_add per corner copied
    # the whole fine grid each time (4 x 134 MB per render at box 256, batch 128); the same
    # sums in the same order (bitwise equal on CPU), and autograd needs no old grid
    grid = torch.zeros(b * n_classes * size * size, dtype=xy_px.dtype, device=xy_px.device)
    grid.index_add_(0, torch.cat(indices), torch.cat(weights))
    return grid.view(b, n_classes, size, size)


@functools.lru_cache(maxsize=32)
def _fourier_factors(box_size: int, pixel_size: float, oversampling: int, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # (box, box // 2 + 1) each
    """The splat kernel's transform (sinc²) and ``|k|²`` in (cycles per Å)² on the image's
    rfft grid: constants of a geometry, computed once (a training step projects several
    times). Read-only."""
    k = fftfreq_grid_2d_rfft(box_size, device)  # cycles per coarse pixel
    splat_kernel = (torch.sinc(k[..., 0] / oversampling) * torch.sinc(k[..., 1] / oversampling)) ** 2
    return splat_kernel, (k * k).sum(-1) / pixel_size**2


def project_gaussians_rfft(
    positions: torch.Tensor,  # (n, 3) or (b, n, 3) Å, xyz relative to the box centre
    sigmas: torch.Tensor,  # (n_classes,) Å
    masses: torch.Tensor,  # (n,) or (b, n) voxel-unit masses
    class_index: torch.Tensor,  # (n,) long
    rotations: torch.Tensor,  # (b, 3, 3) RELION A
    box_size: int,
    pixel_size: float,
    oversampling: int = 2,
) -> torch.Tensor:  # (b, box, box // 2 + 1) complex, centred (unshifted rfft layout)
    """Fourier transform of the projections of a Gaussian model (no CTF, no shift)."""
    b = rotations.shape[0]
    if positions.ndim == 2:
        positions = positions.expand(b, -1, -1)
    # the rotated x and y alone (z is integrated over): one batched product, (b, n, 2)
    rotated_xy = torch.matmul(positions, rotations[:, :2].to(positions.dtype).transpose(-1, -2))
    fine = box_size * oversampling
    # the box centre at index 0 of the periodic grid: the splat is the ifftshift of a
    # centred splat, and the rfft2 needs no shift
    xy_fine = rotated_xy / pixel_size * oversampling
    n_classes = sigmas.shape[0]
    grid = splat_bilinear_2d(xy_fine, masses, class_index, n_classes, fine)
    ft = torch.fft.rfft2(grid)
    # the rows of _fine_grid_rows as two slices (an index tensor's gradient sorts on a GPU)
    half, negative = box_size // 2 + 1, box_size // 2
    ft = torch.cat([ft[..., : box_size - negative, :half], ft[..., fine - negative:, :half]],
                   dim=-2)  # (b, c, box, box//2+1)
    splat_kernel, k2 = _fourier_factors(box_size, float(pixel_size), oversampling,
                                        positions.device)
    gauss = torch.exp(-2.0 * math.pi**2 * sigmas.to(k2.dtype)[:, None, None] ** 2 * k2)
    return (ft * (gauss / splat_kernel)).sum(dim=1)


def render_gaussians_3d(
    positions: torch.Tensor,  # (n, 3) Å
    sigmas: torch.Tensor,  # (n_classes,) Å
    masses: torch.Tensor,  # (n,)
    class_index: torch.Tensor,  # (n,)
    box_size: int,
    pixel_size: float,
    oversampling: int = 2,
) -> torch.Tensor:  # (box, box, box) zyx
    """The map of a Gaussian model, band-limited to the box's Nyquist frequency."""
    device = positions.device
    fine = box_size * oversampling
    p = positions / pixel_size * oversampling + fine // 2  # fine voxels, xyz
    base = torch.floor(p)
    frac = p - base
    base = base.long()
    n_classes = sigmas.shape[0]
    indices, weights = [], []
    for corner in range(8):
        d = [(corner >> a) & 1 for a in range(3)]  # dx, dy, dz
        w = masses.clone()
        idx = class_index * fine
        for axis in (2, 1, 0):  # z, y, x
            w = w * (frac[:, axis] if d[axis] else 1 - frac[:, axis])
            idx = (idx + (base[:, axis] + d[axis]) % fine) * (fine if axis else 1)
        indices.append(idx)
        weights.append(w)
    # one in-place scatter (as splat_bilinear_2d): no copy of the fine grid per corner
    grid = torch.zeros(n_classes * fine**3, dtype=positions.dtype, device=device)
    grid.index_add_(0, torch.cat(indices), torch.cat(weights))
    grid = grid.view(n_classes, fine, fine, fine)
    ft = torch.fft.rfftn(torch.fft.ifftshift(grid, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    rows = _fine_grid_rows(box_size, fine, device)
    ft = ft[:, rows][:, :, rows][..., : box_size // 2 + 1]
    kz = torch.fft.fftfreq(box_size, device=device)
    kx = torch.fft.rfftfreq(box_size, device=device)
    gz, gy, gx = torch.meshgrid(kz, kz, kx, indexing="ij")
    kernel = (torch.sinc(gz / oversampling) * torch.sinc(gy / oversampling)
              * torch.sinc(gx / oversampling)) ** 2
    k2 = (gz**2 + gy**2 + gx**2) / pixel_size**2
    gauss = torch.exp(-2.0 * math.pi**2 * sigmas.to(k2.dtype)[:, None, None, None] ** 2 * k2)
    ft = (ft * (gauss / kernel)).sum(0)
    vol = torch.fft.irfftn(ft, s=(box_size,) * 3, dim=(-3, -2, -1))
    return torch.fft.fftshift(vol, dim=(-3, -2, -1))
