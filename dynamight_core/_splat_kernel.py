"""The bilinear splat of the Gaussian projection in one GPU kernel (Triton), for CUDA devices.

:func:`.gaussian_projection.splat_bilinear_2d` scatters each Gaussian's mass onto the four
pixels around its projected position, with bilinear weights, on a periodic grid. In torch that
is about 60 operations per render over ``(b, n)`` tensors (floor, fractions, the four corners'
wrapped indices and weights) and as many again in the backward pass, each reading and writing
the whole batch: at the reference model size (30,000 Gaussians, batch 128) about 15 MB per
operation, on every one of a training step's renders.

Here one program takes a block of (particle, Gaussian) pairs, computes the four corners in
registers and adds them to the grid atomically (as ``index_add_`` does on a GPU); the backward
kernel gathers the output gradient at the same four pixels and writes the gradients of the
positions and masses. The floor has no gradient, so ``∂/∂x`` is that of the fractional part::

    w = m (1 - fx)(1 - fy), m fx (1 - fy), m (1 - fx) fy, m fx fy      at (x0, y0), (x1, y0), ...
    ∂L/∂m  = Σ_corners (w / m) g,   ∂L/∂x = m [(1 - fy)(g10 - g00) + fy (g11 - g01)],
    ∂L/∂y = m [(1 - fx)(g01 - g00) + fx (g11 - g10)]

Used when Triton imports, the tensors are float32 on a CUDA device and ``DYNAMIGHT_FUSED_SPLAT``
is not ``0``; otherwise the torch code runs. If the kernel cannot be built or launched, a warning
is logged once and the torch code runs from then on. ``TRITON_INTERPRET=1`` runs it on the CPU
(tests).
"""

from __future__ import annotations

import logging

import torch

from ._triton_support import kernel_may_run, launch_device, record_failure, tl, triton

logger = logging.getLogger(__name__)
_FAILED: list[str] = []  # the first failure's message: the kernel is not tried again
_BLOCK = 256  # (particle, Gaussian) pairs per program


def fused_splat_usable(xy_px: torch.Tensor) -> bool:
    """Whether :func:`splat_bilinear_fused` can run for positions ``xy_px``."""
    return (kernel_may_run(xy_px, "DYNAMIGHT_FUSED_SPLAT", _FAILED)
            and xy_px.dtype == torch.float32)


if triton is not None:

    @triton.jit
    def _corners(xy_ptr, cls_ptr, pairs, n, n_classes, size, ok):
        """Fractions and the four wrapped flat indices of a block of pairs."""
        x = tl.load(xy_ptr + 2 * pairs, mask=ok, other=0.0)
        y = tl.load(xy_ptr + 2 * pairs + 1, mask=ok, other=0.0)
        bx = tl.floor(x)
        by = tl.floor(y)
        fx = x - bx
        fy = y - by
        # periodic wrap as torch's remainder (the result takes the divisor's sign)
        x0 = ((bx.to(tl.int64) % size) + size) % size
        y0 = ((by.to(tl.int64) % size) + size) % size
        x1 = (x0 + 1) % size
        y1 = (y0 + 1) % size
        particle = pairs // n
        cls = tl.load(cls_ptr + pairs % n, mask=ok, other=0)
        row = (particle * n_classes + cls) * size
        return fx, fy, (row + y0) * size + x0, (row + y0) * size + x1, \
            (row + y1) * size + x0, (row + y1) * size + x1

    @triton.jit
    def _masses(mass_ptr, pairs, n, ok, BATCHED_MASS: tl.constexpr):
        """Each pair's mass: per particle and Gaussian, or one per Gaussian."""
        if BATCHED_MASS:
            index = pairs
        else:
            index = pairs % n
        return tl.load(mass_ptr + index, mask=ok, other=0.0)

    @triton.jit
    def _splat_forward(xy_ptr, mass_ptr, cls_ptr, grid_ptr, n_pairs, n, n_classes, size,
                       BATCHED_MASS: tl.constexpr, BLOCK: tl.constexpr):
        pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = pairs < n_pairs
        fx, fy, i00, i10, i01, i11 = _corners(xy_ptr, cls_ptr, pairs, n, n_classes, size, ok)
        m = _masses(mass_ptr, pairs, n, ok, BATCHED_MASS)
        # the weights as the torch code forms them: (mass * wy) * wx
        tl.atomic_add(grid_ptr + i00, m * (1.0 - fy) * (1.0 - fx), mask=ok)
        tl.atomic_add(grid_ptr + i10, m * (1.0 - fy) * fx, mask=ok)
        tl.atomic_add(grid_ptr + i01, m * fy * (1.0 - fx), mask=ok)
        tl.atomic_add(grid_ptr + i11, m * fy * fx, mask=ok)

    @triton.jit
    def _splat_backward(xy_ptr, mass_ptr, cls_ptr, grad_ptr, grad_xy_ptr, grad_mass_ptr,
                        n_pairs, n, n_classes, size,
                        BATCHED_MASS: tl.constexpr, BLOCK: tl.constexpr):
        pairs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = pairs < n_pairs
        fx, fy, i00, i10, i01, i11 = _corners(xy_ptr, cls_ptr, pairs, n, n_classes, size, ok)
        m = _masses(mass_ptr, pairs, n, ok, BATCHED_MASS)
        g00 = tl.load(grad_ptr + i00, mask=ok, other=0.0)
        g10 = tl.load(grad_ptr + i10, mask=ok, other=0.0)
        g01 = tl.load(grad_ptr + i01, mask=ok, other=0.0)
        g11 = tl.load(grad_ptr + i11, mask=ok, other=0.0)
        gm = ((1.0 - fy) * ((1.0 - fx) * g00 + fx * g10) + fy * ((1.0 - fx) * g01 + fx * g11))
        gx = m * ((1.0 - fy) * (g10 - g00) + fy * (g11 - g01))
        gy = m * ((1.0 - fx) * (g01 - g00) + fx * (g11 - g10))
        tl.store(grad_mass_ptr + pairs, gm, mask=ok)
        tl.store(grad_xy_ptr + 2 * pairs, gx, mask=ok)
        tl.store(grad_xy_ptr + 2 * pairs + 1, gy, mask=ok)


def _launch(kernel, n_pairs: int, device: torch.device, *args) -> None:
    grid = (triton.cdiv(n_pairs, _BLOCK),)
    # Triton launches on the current CUDA device: make it the tensors' one
    with launch_device(device):
        kernel[grid](*args, BLOCK=_BLOCK)


class _Splat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xy, masses, class_index, n_classes, size):
        b, n, _ = xy.shape
        xy = xy.detach().contiguous()
        batched = masses.ndim == 2
        masses_c = masses.detach().contiguous()
        class_index = class_index.contiguous()
        grid = torch.zeros(b * n_classes * size * size, dtype=xy.dtype, device=xy.device)
        _launch(_splat_forward, b * n, xy.device, xy, masses_c, class_index, grid, b * n, n,
                n_classes, size, batched)
        ctx.save_for_backward(xy, masses_c, class_index)
        ctx.shape = (b, n, n_classes, size, batched)
        return grid.view(b, n_classes, size, size)

    @staticmethod
    def backward(ctx, grad):
        xy, masses, class_index = ctx.saved_tensors
        b, n, n_classes, size, batched = ctx.shape
        grad_xy = torch.empty_like(xy)
        grad_mass = torch.empty(b, n, dtype=xy.dtype, device=xy.device)
        _launch(_splat_backward, b * n, xy.device, xy, masses, class_index,
                grad.contiguous(), grad_xy, grad_mass, b * n, n, n_classes, size, batched)
        return grad_xy, (grad_mass if batched else grad_mass.sum(0)), None, None, None


def splat_bilinear_fused(
    xy_px: torch.Tensor,  # (b, n, 2) float32, fine pixels, origin at index 0
    masses: torch.Tensor,  # (b, n) or (n,)
    class_index: torch.Tensor,  # (n,) long
    n_classes: int,
    size: int,
) -> torch.Tensor | None:  # (b, n_classes, size, size), None if the kernel cannot run here
    """:func:`.gaussian_projection.splat_bilinear_2d` in one kernel (and one for its gradient);
    None (and a warning, once) if the kernel cannot run here."""
    try:
        return _Splat.apply(xy_px, masses.to(xy_px.dtype), class_index, int(n_classes),
                            int(size))
    except Exception as error:  # noqa: BLE001 - any build or launch failure: torch code
        record_failure(_FAILED, error, "fused splat kernel", logger)
        return None


__all__ = ["fused_splat_usable", "splat_bilinear_fused"]
