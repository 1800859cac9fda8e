"""The deformed backprojection's voxel lookup in one GPU kernel (Triton), for CUDA devices.

:meth:`.deformed_backprojection.DeformedBackprojector.add` reads, for every voxel ``x`` of the
box and every particle, the particle's oversampled CTF-weighted image at the projection of the
voxel's deformed position, and adds the value to the real-space sum ``S(x)``. The torch code
does that in three passes per chunk of (particle, voxel) pairs: it upsamples the coarse lookup
grid to every voxel (2 floats written per pair), reads those back in ``grid_sample`` (1 float
written per pair) and sums over the chunk's particles. At box 320 a particle has 33 million
voxels, so that traffic (about 24 bytes per pair, 0.8 GB per particle) bounds it on a GPU.

Here one program takes a block of voxels and loops over the batch's particles: each voxel's
trilinear weights on the coarse grid are computed once, the lookup position of each particle
interpolated from its coarse grid and the image read bilinearly, all in registers, and ``S``
is read and written once per batch. Per pair only the coarse grid and the image are read
(both small and shared by neighbouring voxels, so mostly from cache).

The arithmetic is the torch code's: trilinear upsampling with ``align_corners=True`` (node
``k`` of ``g`` at voxel ``k (box - 1) / (g - 1)``) and ``grid_sample``'s bilinear reading with
``align_corners=True`` and zero padding (a corner outside the image reads 0); only the order of
the float32 operations differs.

Used when Triton imports, the tensors are on a CUDA device and ``DYNAMIGHT_FUSED_LOOKUP`` is
not ``0``; otherwise the torch code runs. If the kernel cannot be built or launched, a warning
is logged once and the torch code runs from then on. ``TRITON_INTERPRET=1`` runs it on the CPU
(tests).
"""

from __future__ import annotations

import logging

import torch

from ._triton_support import kernel_may_run, launch_device, record_failure, tl, triton

logger = logging.getLogger(__name__)
_FAILED: list[str] = []  # the first failure's message: the kernel is not tried again
_BLOCK = 256  # voxels per program


def fused_lookup_usable(images: torch.Tensor) -> bool:
    """Whether :func:`lookup_accumulate_fused` can run for oversampled ``images``."""
    return (kernel_may_run(images, "DYNAMIGHT_FUSED_LOOKUP", _FAILED)
            and images.dtype == torch.float32)


if triton is not None:

    @triton.jit
    def _axis(voxel, node_scale, g):
        """Lower node, upper node and fraction of a voxel index along one axis (as torch's
        upsampling with ``align_corners=True``: ``u = voxel (g - 1) / (box - 1)``)."""
        u = voxel.to(tl.float32) * node_scale
        lower = tl.minimum(tl.floor(u).to(tl.int32), g - 1)
        upper = tl.minimum(lower + 1, g - 1)
        return lower, upper, u - lower.to(tl.float32)

    @triton.jit
    def _trilinear(lookup_ptr, o000, o001, o010, o011, o100, o101, o110, o111, ty, tx, tz):
        """One channel of the coarse grid at a voxel: z, then x, then y."""
        v00 = tl.load(lookup_ptr + o000)
        v00 = v00 + tz * (tl.load(lookup_ptr + o001) - v00)
        v01 = tl.load(lookup_ptr + o010)
        v01 = v01 + tz * (tl.load(lookup_ptr + o011) - v01)
        v10 = tl.load(lookup_ptr + o100)
        v10 = v10 + tz * (tl.load(lookup_ptr + o101) - v10)
        v11 = tl.load(lookup_ptr + o110)
        v11 = v11 + tz * (tl.load(lookup_ptr + o111) - v11)
        v0 = v00 + tx * (v01 - v00)
        v1 = v10 + tx * (v11 - v10)
        return v0 + ty * (v1 - v0)

    @triton.jit
    def _pixel(image_ptr, row, column, size, ok):
        inside = ok & (row >= 0) & (row < size) & (column >= 0) & (column < size)
        return tl.load(image_ptr + row * size + column, mask=inside, other=0.0)

    @triton.jit
    def _lookup_accumulate(image_ptr, lookup_ptr, data_ptr, n_particles, box, g, size,
                           node_scale, BLOCK: tl.constexpr):
        voxels = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = voxels < box * box * box
        vx = voxels % box
        vy = (voxels // box) % box
        vz = voxels // (box * box)
        y0, y1, ty = _axis(vy, node_scale, g)
        x0, x1, tx = _axis(vx, node_scale, g)
        z0, z1, tz = _axis(vz, node_scale, g)
        # the coarse grid is (particle, y, x, z, [x, y]) in fine pixels
        r00 = (y0 * g + x0) * g
        r01 = (y0 * g + x1) * g
        r10 = (y1 * g + x0) * g
        r11 = (y1 * g + x1) * g
        o000, o001 = 2 * (r00 + z0), 2 * (r00 + z1)
        o010, o011 = 2 * (r01 + z0), 2 * (r01 + z1)
        o100, o101 = 2 * (r10 + z0), 2 * (r10 + z1)
        o110, o111 = 2 * (r11 + z0), 2 * (r11 + z1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        grid = lookup_ptr  # the current particle's coarse grid and image
        image = image_ptr
        for _ in range(n_particles):
            px = _trilinear(grid, o000, o001, o010, o011, o100, o101, o110, o111, ty, tx, tz)
            py = _trilinear(grid + 1, o000, o001, o010, o011, o100, o101, o110, o111,
                            ty, tx, tz)
            bx = tl.floor(px)
            by = tl.floor(py)
            fx = px - bx
            fy = py - by
            c0 = bx.to(tl.int32)
            r0 = by.to(tl.int32)
            top = ((1.0 - fx) * _pixel(image, r0, c0, size, ok)
                   + fx * _pixel(image, r0, c0 + 1, size, ok))
            bottom = ((1.0 - fx) * _pixel(image, r0 + 1, c0, size, ok)
                      + fx * _pixel(image, r0 + 1, c0 + 1, size, ok))
            acc += (1.0 - fy) * top + fy * bottom
            grid += 2 * g * g * g
            image += size * size
        total = tl.load(data_ptr + voxels, mask=ok, other=0.0)
        tl.store(data_ptr + voxels, total + acc, mask=ok)


def lookup_accumulate_fused(
    images: torch.Tensor,  # (b, s, s) float32 oversampled images
    lookup: torch.Tensor,  # (b, g, g, g, 2) [y, x, z, xy], grid_sample units (align_corners)
    data: torch.Tensor,  # (box, box, box) [z, y, x] float32, contiguous: added to in place
) -> bool:
    """``data[z, y, x] += Σ_p image_p(lookup_p upsampled to voxel (z, y, x))`` in one kernel
    (module docstring); False (and a warning, once) if the kernel cannot run here, with
    ``data`` unchanged."""
    b, size = images.shape[0], images.shape[-1]
    box, g = data.shape[-1], lookup.shape[1]
    if b == 0:
        return True
    try:
        if not data.is_contiguous() or data.dtype != torch.float32:
            raise ValueError("the sum must be a contiguous float32 volume")
        # grid_sample units -> fine pixels (align_corners=True): an affine map, which
        # trilinear interpolation commutes with, so it is applied to the coarse nodes
        pixels = ((lookup.to(torch.float32) + 1.0) * (0.5 * (size - 1))).contiguous()
        node_scale = (g - 1) / max(box - 1, 1)
        with launch_device(data.device):
            _lookup_accumulate[(triton.cdiv(box**3, _BLOCK),)](
                images.contiguous(), pixels, data, b, box, g, size, node_scale, BLOCK=_BLOCK)
        return True
    except Exception as error:  # noqa: BLE001 - any build or launch failure: torch code
        record_failure(_FAILED, error, "fused backprojection lookup", logger)
        return False


__all__ = ["fused_lookup_usable", "lookup_accumulate_fused"]
