"""Deformed weighted backprojection: half maps in the consensus frame from deformed particles.

Particle ``i`` shows the consensus density pulled through its deformation
``φ_i(x) = x + δ_i(x)`` (consensus frame -> particle frame; ``δ_i`` is the field of
:mod:`.displacement_field` made from the decoder's Gaussian displacements). So every consensus
voxel ``x`` receives the value of the particle's CTF-weighted, recentred image at the projection
of its deformed position::

    c_i   = IFT( CTF_i · FT(image_i) · exp(+2πi k·origin_i) )      (image moved back by +origin)
    S(x) += c_i( (A_i (x + δ_i(x)))[:2] / pixel_size + box // 2 )   (every voxel x of the box)
    W(q) += Σ_k CTF_i(k)² · trilinear(q - A_iᵀ k)                    (rigid slice insertion)
    map   = IFT( S^(q) / max(box · W(q), floor) ),   |q| ≤ Nyquist

``S`` is a real-space volume; its 3D DFT on the box grid is ``box ×`` the 2D DFT of ``c_i`` on
the central slice (a projection-constant volume: its DFT is a plane of height ``box``), so the
weights are inserted on the same, unpadded, box grid and scaled by ``box``. The weights use
the rigid approximation (the deformation's effect on the CTF² sampling is ignored), as in the
DynaMight paper; with zero deformation the result matches :class:`.FourierAccumulator`.

On a CUDA device with Triton the lookup and sum over a batch are one kernel
(:mod:`._lookup_kernel`, the same arithmetic); elsewhere the torch code below.

``c_i`` is read by bilinear interpolation of a 2× oversampled copy (Fourier zero-padding) whose
spectrum is divided by the bilinear kernel's transfer function ``sinc²(kx) sinc²(ky)`` (k in
cycles per fine pixel): the gridding correction, which makes a lookup of a band-limited image
accurate to about 1 % (``tests/test_deformed_backprojection.py``). Points projecting outside the
image read 0.

The three sums (``data`` = S, ``weight`` = W, ``n_particles``) are plain additive tensors, so
:meth:`DeformedBackprojector.merge` (or an all-reduce) completes them. Memory per :meth:`add`
call is bounded by ``max_chunk_voxels`` (particle × voxel pairs held at once), whatever the batch.

Conventions: volumes ``[z, y, x]``, vectors ``xyz`` Å relative to voxel ``box // 2``, images
``[y, x]``, RELION ``A`` matrices (:mod:`.rotation`); displacement grids ``(b, 3, g, g, g)`` with
node ``k`` at voxel ``k (box - 1) / (g - 1)`` (:mod:`.displacement_field`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._lookup_kernel import fused_lookup_usable, lookup_accumulate_fused
from ._slice_insertion import (
    insert_slices_rfft_3d,
    inserted_samples,
    slice_coordinates_rfft,
    symmetrise_x0_plane,
)
from .ctf import ctf_2d_rfft
from .fourier_grids import (
    crop_rows,
    fftfreq_grid_2d_rfft,
    irfftn_centered_3d,
    rfft2_centered,
    rfftn_centered_3d,
)
from .particles import CTFParams
from .shift import recentre_relion_images_rfft


def oversample_for_bilinear_lookup(
    images_rfft: torch.Tensor,  # (b, box, box // 2 + 1) centred rfft
    box_size: int,
    *,
    oversampling: int = 2,
) -> torch.Tensor:  # (b, s box, s box) real, centre at index (s box) // 2
    """Images zero-padded to ``oversampling`` times the size in Fourier space (frequencies
    beyond Nyquist, ``|k| > 0.5`` cycles/pixel, dropped), with the gridding correction for
    bilinear reading.

    Values at the coarse pixel positions equal the original image's (up to the correction). An
    even box's Nyquist row and column are split evenly between ``±box / 2`` so the result stays
    the real, band-limited interpolant.
    """
    device = images_rfft.device
    box = box_size
    fine = oversampling * box
    k = fftfreq_grid_2d_rfft(box, device)  # cycles per coarse pixel
    inside = (k * k).sum(-1) <= 0.25
    kf = k / oversampling  # cycles per fine pixel
    kernel = (torch.sinc(kf[..., 0]) * torch.sinc(kf[..., 1])) ** 2
    scale = float(oversampling**2)  # irfft over fine² instead of box² samples
    values = images_rfft * torch.where(inside, scale / kernel, torch.zeros_like(kernel))
    rows = torch.round(torch.fft.fftfreq(box, device=device) * box).long() % fine
    out = images_rfft.new_zeros(images_rfft.shape[0], fine, fine // 2 + 1)
    if box % 2 == 0:
        half = box // 2
        values = values.clone()
        values[..., half] *= 0.5  # Nyquist column: the fine grid holds +half; -half is its mate
        nyquist_row = 0.5 * values[:, half]  # row -half (fftfreq puts it at index half)
        values[:, half] = nyquist_row
        out[:, half, : box // 2 + 1] = nyquist_row  # the +half copy
    out[:, rows, : box // 2 + 1] += values
    return torch.fft.fftshift(torch.fft.irfft2(out, s=(fine, fine)), dim=(-2, -1))


def bilinear_lookup_2d(
    fine_images: torch.Tensor,  # (b, s box, s box) from oversample_for_bilinear_lookup
    xy_px: torch.Tensor,  # (b, m, 2) image positions in coarse pixels relative to box // 2
    *,
    oversampling: int = 2,
) -> torch.Tensor:  # (b, m)
    """Read the (oversampled) images at arbitrary positions; outside the image reads 0."""
    fine = fine_images.shape[-1]
    norm = (fine // 2 + oversampling * xy_px) * (2.0 / (fine - 1)) - 1.0
    out = F.grid_sample(fine_images[:, None], norm[:, :, None, :].to(fine_images.dtype),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0, :, 0]


def _hermitian_column_factor(box_size: int, device) -> torch.Tensor:  # (box // 2 + 1,)
    """0.5 for the rfft columns that hold a sample and its Friedel mate (``kx = 0`` and an even
    box's Nyquist column), 1 elsewhere.

    Inserting the half plane with Friedel flipping puts each pair of those columns at the same
    3D voxel twice; the real-space ``S`` counts every frequency once, so its weights must too.
    (:class:`.FourierAccumulator` double-counts data and weight alike, which cancels there.)
    """
    factor = torch.ones(box_size // 2 + 1, device=device)
    factor[0] = 0.5
    if box_size % 2 == 0:
        factor[-1] = 0.5
    return factor


class DeformedBackprojector:
    """Running sums of one deformed half map (module docstring): ``data`` (real-space
    backprojection ``S``), ``weight`` (CTF² on the box-grid rfft) and ``n_particles``."""

    def __init__(self, box_size: int, pixel_size: float, device: torch.device | str = "cpu",
                 *, max_chunk_voxels: int | None = None, oversampling: int = 2):
        self.box_size = int(box_size)
        self.oversampling = int(oversampling)
        self.pixel_size = float(pixel_size)
        if max_chunk_voxels is None:
            # CPU: small chunks stay in cache (measured fastest at box 64). GPU: large launches;
            # 2**27 (several particles at once even at box 320, about 3 GB) ran box 256 / 320
            # at 1660 / 880 particles/s against 850 / 440 with 2**24 (H200, benchmarks/RESULTS.md)
            max_chunk_voxels = 2**27 if torch.device(device).type == "cuda" else 2**18
        self.max_chunk_voxels = int(max_chunk_voxels)
        box = self.box_size
        self.data = torch.zeros((box, box, box), dtype=torch.float32, device=device)
        self.weight = torch.zeros((box, box, box // 2 + 1), dtype=torch.float32, device=device)
        self.n_particles = 0

    @property
    def device(self) -> torch.device:
        return self.data.device

    def add(
        self,
        images: torch.Tensor,  # (b, box, box) real space
        rotations: torch.Tensor,  # (b, 3, 3) RELION A
        shifts_angstrom: torch.Tensor,  # (b, 2) rlnOriginX/YAngst
        ctf: CTFParams,  # b particles
        displacement_grid: torch.Tensor | None = None,  # (b, 3, g, g, g) Å, consensus -> particle
    ) -> None:
        """Backproject a batch; without ``displacement_grid`` a rigid real-space backprojection."""
        device, box, px = self.device, self.box_size, self.pixel_size
        b = images.shape[0]
        if images.shape[-2:] != (box, box):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the box is {box}")
        rotations = rotations.to(device, torch.float32)
        f = rfft2_centered(images.to(device, torch.float32))
        f = recentre_relion_images_rfft(f, shifts_angstrom.to(device, torch.float32), px, box)
        c = ctf_2d_rfft(ctf.to(device), box, px)
        fine = oversample_for_bilinear_lookup(f * c, box, oversampling=self.oversampling)
        coords, index = slice_coordinates_rfft(box, box, rotations)
        ctf2 = c * c * _hermitian_column_factor(box, device)
        insert_slices_rfft_3d(None, self.weight, None, inserted_samples(ctf2, index), coords)

        lookup = self._lookup_coordinates(rotations, displacement_grid, fine.shape[-1])
        if fused_lookup_usable(fine) and lookup_accumulate_fused(fine, lookup, self.data):
            self.n_particles += b  # one kernel for the whole batch (:mod:`._lookup_kernel`)
            return
        per_particle = box**3
        n_batch = max(1, min(b, self.max_chunk_voxels // per_particle))
        n_z = box if n_batch > 1 else max(1, min(box, self.max_chunk_voxels // (box * box)))
        for p0 in range(0, b, n_batch):
            ps = slice(p0, min(b, p0 + n_batch))
            for z0 in range(0, box, n_z):
                zs = slice(z0, min(box, z0 + n_z))
                nz = zs.stop - zs.start
                points = self._upsample_slab(lookup[ps], zs)  # (pb, box * box, nz, 2)
                values = F.grid_sample(fine[ps, None], points, mode="bilinear",
                                       padding_mode="zeros", align_corners=True)
                self.data[zs] += values.sum(0).view(box, box, nz).permute(2, 0, 1)
        self.n_particles += b

    def _lookup_coordinates(
        self,
        rotations: torch.Tensor,  # (b, 3, 3)
        displacement_grid: torch.Tensor | None,  # (b, 3, g, g, g) Å
        fine_size: int,
    ) -> torch.Tensor:  # (b, g, g, g, 2) [y, x, z, xy] grid_sample units
        """Where each coarse node of the consensus frame is read in the oversampled image:
        ``(A (r + δ(r)))[:2]`` in grid_sample units, for nodes ``r`` (without a field, the 2³
        box corners). Trilinear interpolation reproduces the affine rigid part exactly, so
        upsampling these coordinates gives every voxel's lookup position."""
        box, px, b = self.box_size, self.pixel_size, rotations.shape[0]
        device = rotations.device
        scale = 2.0 * self.oversampling / (fine_size - 1)  # coarse pixels -> grid_sample units
        offset = (fine_size // 2) * 2.0 / (fine_size - 1) - 1.0
        if displacement_grid is None:
            g = 2
            points = torch.zeros(b, 3, g, g, g, device=device)
        else:
            points = displacement_grid.to(device, torch.float32) / px  # voxels
            if points.ndim != 5 or points.shape[:2] != (b, 3) or len(set(points.shape[2:])) != 1:
                raise ValueError(f"displacement_grid must be (b={b}, 3, g, g, g), got "
                                 f"{tuple(displacement_grid.shape)}")
            g = points.shape[-1]
        node = torch.linspace(0.0, box - 1.0, g, device=device) - box // 2  # voxels from centre
        points = points + torch.stack([
            node[None, None, :].expand(g, g, g),  # x varies along the last axis
            node[None, :, None].expand(g, g, g),
            node[:, None, None].expand(g, g, g)])  # (b, 3, z, y, x)
        xy = torch.einsum("bij,bjzyx->byxzi", rotations[:, :2], points)
        return xy * scale + offset

    def _upsample_slab(self, lookup: torch.Tensor, zs: slice) -> torch.Tensor:
        """Trilinear upsampling of ``lookup (pb, g, g, g, 2)`` ([y, x, z, xy]) to the voxels of
        z-slab ``zs``: ``(pb, box * box, nz, 2)``, voxels in [y, x, z] order (channels last, the
        layout in which bilinear upsampling is fast and grid_sample reads directly)."""
        box, g = self.box_size, lookup.shape[1]
        z = torch.arange(zs.start, zs.stop, device=lookup.device, dtype=torch.float32)
        node = z * ((g - 1) / max(box - 1, 1))
        lower = node.floor().long().clamp(max=g - 1)
        upper = (lower + 1).clamp(max=g - 1)
        t = (node - lower)[:, None]
        planes = torch.lerp(lookup[:, :, :, lower], lookup[:, :, :, upper], t)  # (pb,g,g,nz,2)
        pb, nz = planes.shape[0], planes.shape[3]
        channels = planes.reshape(pb, g, g, nz * 2).permute(0, 3, 1, 2)  # channels-last NCHW
        full = F.interpolate(channels, size=(box, box), mode="bilinear", align_corners=True)
        return full.permute(0, 2, 3, 1).reshape(pb, box * box, nz, 2)

    def merge(self, other: DeformedBackprojector) -> None:
        """Add another backprojector's sums (what an all-reduce would do)."""
        self.data += other.data.to(self.device)
        self.weight += other.weight.to(self.device)
        self.n_particles += other.n_particles

    def reconstruct(self, weight_floor_fraction: float = 1e-3) -> torch.Tensor:  # (box,)*3
        """``FT(S) / max(box · W, floor)`` inside Nyquist, floor = fraction × mean weight."""
        box = self.box_size
        weight = symmetrise_x0_plane(self.weight, conjugate=False) * float(box)
        kz = torch.fft.fftfreq(box, device=self.device)
        kx = torch.fft.rfftfreq(box, device=self.device)
        radius2 = kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2
        inside = (radius2 <= 0.25) & (weight > 0)
        floor = weight_floor_fraction * weight[inside].mean() if bool(inside.any()) else 1.0
        ft = rfftn_centered_3d(self.data) / torch.clamp(weight, min=float(floor))
        ft = torch.where(inside, ft, torch.zeros_like(ft))
        return irfftn_centered_3d(ft, box).contiguous()


def choose_grid_size(
    positions: torch.Tensor,  # (n_g, 3) consensus xyz Å
    box_size: int,
    pixel_size: float,
    *,
    gaussians_per_node: float = 8.0,
) -> int:
    """Finest displacement grid (nodes per axis, at most one node per 2 voxels, at least 3)
    whose occupied nodes hold ``gaussians_per_node`` Gaussians on average (nearest node).

    The field at a node is the mean displacement of the Gaussians around it; with too few of
    them, nodes inside the model fall below the field's weight floor and their displacement is
    damped (holes in the field). Eight per node keeps that rare and the field as fine as the
    model allows.
    """
    voxel = positions.detach().to(torch.float64).cpu() / pixel_size + box_size // 2
    for g in range(box_size // 2 + 1, 2, -1):
        node = torch.round(voxel * ((g - 1) / max(box_size - 1, 1))).long().clamp(0, g - 1)
        occupied = torch.unique((node[:, 2] * g + node[:, 1]) * g + node[:, 0]).numel()
        if positions.shape[0] >= gaussians_per_node * occupied:
            return g
    return 3


def downsample_images(images: torch.Tensor, factor: int) -> torch.Tensor:  # (b, n, n)
    """Fourier-crop ``(b, box, box)`` images to ``box // factor`` (pixel size × factor).

    Scaled by ``1 / factor³``: a pixel stays a line integral in (now larger) voxel units, so
    maps reconstructed from the result keep the full-size map's density scale. The new box's
    Nyquist row and column are dropped. ``box`` must be a multiple of ``factor``.
    """
    box = images.shape[-1]
    if factor == 1:
        return images
    new = box // factor
    ft = rfft2_centered(images)[..., crop_rows(box, new, images.device), : new // 2 + 1]
    if new % 2 == 0:
        ft[..., new // 2, :] = 0
        ft[..., new // 2] = 0
    return torch.fft.fftshift(torch.fft.irfft2(ft, s=(new, new)), dim=(-2, -1)) / factor**3


def downsample_map(volume: torch.Tensor, factor: int) -> torch.Tensor:  # (n, n, n)
    """Fourier-crop a ``(box,)*3`` map to ``box // factor`` keeping its values (a mask stays a
    mask, up to ringing at sharp edges)."""
    box = volume.shape[-1]
    if factor == 1:
        return volume
    new = box // factor
    rows = crop_rows(box, new, volume.device)
    ft = rfftn_centered_3d(volume.to(torch.float32))[rows][:, rows][..., : new // 2 + 1]
    return irfftn_centered_3d(ft, new) / factor**3


__all__ = ["DeformedBackprojector", "bilinear_lookup_2d", "choose_grid_size",
           "downsample_images", "downsample_map", "oversample_for_bilinear_lookup"]
