"""The codes step's whole decoder pass in one GPU kernel (Triton), for CUDA devices.

The latent codes are inferred with the model fixed (:meth:`.DeformationModel.linearise`, under
``no_grad``): per step the decoder gives each particle's displacements and their derivatives
``∂out/∂z_k`` (:meth:`.LatentConditionedMLP._mlp_and_tangents`). In torch that pass is, per
hidden layer, a matrix product, an ELU and a residual add over the whole ``(b, m, w)`` tensor
(245 MB in bfloat16 at batch 128 and 30,000 Gaussians), then a stack of the activations for
:mod:`._tangent_kernel`: 11.9 of the 51 ms of a training step at the reference size on an H100
(``benchmarks/RESULTS.md``, *On one GPU, again*).

Here a program takes a block of rows (particle × Gaussian) and keeps everything in registers:
``a0 = W_pos·PE(x) + b`` (one row of the position term, computed once per pass in torch) plus
``W_z·z`` (one row of the latent term), ``h = ELU(a0)`` and the tangents
``t_k = ELU'(a0) ⊙ W_z[:, k]``; then per hidden layer ``a = h W_lᵀ + b_l``, ``h ← h + ELU(a)``,
``t ← t + ELU'(a) ⊙ (t W_lᵀ)``; it writes ``out = h W_outᵀ + b_out`` (3 numbers per row) and
``t W_outᵀ`` (3 per row and coordinate) and reads only the two terms' rows and the weights. The
anchor row ``z = 0`` (:func:`.decoder._with_anchor_row`) is one more particle whose tangents are
not written (``tangent_rows``). ``ELU'(a) = min(ELU(a), 0) + 1``.

Precision: ``h``, ``t`` and the sums in float32; the products take the pass's precision
(bfloat16 operands under the decoder's bfloat16 autocast, float32 ``ieee`` otherwise). The
torch code rounds every intermediate to bfloat16 there, so the two differ by bfloat16 rounding
(the kernel being the more accurate; ``tests/test_decoder_pass_kernel.py``).

Used when Triton imports, the tensors are on a CUDA device, autograd is off, the layer width is
a power of two of at least 16 and ``DYNAMIGHT_FUSED_DECODER_PASS`` is not ``0``; otherwise the
torch code (with :mod:`._tangent_kernel`) runs. If the kernel cannot be built or launched, a
warning is logged once and the torch code runs from then on. ``TRITON_INTERPRET=1`` runs it on
the CPU (tests).
"""

from __future__ import annotations

import logging

import torch

from ._mlp_device_functions import elu, first_layer, product, row_block
from ._triton_support import (
    interpreting,
    kernel_may_run,
    launch_device,
    record_failure,
    tl,
    triton,
)

logger = logging.getLogger(__name__)
_FAILED: list[str] = []  # the first failure's message: the kernel is not tried again


def fused_decoder_pass_usable(term: torch.Tensor, width: int) -> bool:
    """Whether :func:`decoder_pass` can run for a position term ``term`` of layer width
    ``width`` (autograd off: the kernel keeps no graph)."""
    if torch.is_grad_enabled() or not kernel_may_run(term, "DYNAMIGHT_FUSED_DECODER_PASS",
                                                     _FAILED):
        return False
    return width >= 16 and width & (width - 1) == 0 and term.dtype in (torch.float32,
                                                                        torch.bfloat16)


if triton is not None:

    @triton.jit
    def _decoder_pass_kernel(pos_ptr, lat_ptr, wh_ptr, bh_ptr, wz_ptr, wo_ptr, bo_ptr,
                             out_ptr, tan_ptr, n_rows, m, d, n_tangent_particles,
                             L: tl.constexpr, W: tl.constexpr, DP: tl.constexpr,
                             R: tl.constexpr, OP: tl.constexpr, BF16: tl.constexpr):
        rows, row_ok, particle, gaussian = row_block(n_rows, m, R)  # (R,) each
        cols = tl.arange(0, W)
        ks = tl.arange(0, DP)
        h = elu(first_layer(pos_ptr, lat_ptr, particle, gaussian, row_ok, W))  # (R, W)
        slope = tl.minimum(h, 0.0) + 1.0
        wz = tl.load(wz_ptr + ks[:, None] * W + cols[None, :], mask=ks[:, None] < d,
                     other=0.0).to(tl.float32)  # (DP, W): the coordinates' columns of W_z
        t = slope[None, :, :] * wz[:, None, :]  # (DP, R, W)
        for layer in tl.static_range(L):
            # (i, j) = W_l[j, i]: x @ W_l^T
            wt = tl.load(wh_ptr + layer * W * W + cols[None, :] * W + cols[:, None]).to(
                tl.float32)
            bias = tl.load(bh_ptr + layer * W + cols).to(tl.float32)
            a = product(h, wt, BF16) + bias[None, :]
            step = elu(a)
            slope = tl.minimum(step, 0.0) + 1.0
            h = h + step
            mixed = product(tl.reshape(t, (DP * R, W)), wt, BF16)
            t = t + slope[None, :, :] * tl.reshape(mixed, (DP, R, W))
        outs = tl.arange(0, OP)
        wo = tl.load(wo_ptr + outs[None, :] * W + cols[:, None], mask=outs[None, :] < 3,
                     other=0.0).to(tl.float32)  # (W, OP): W_out transposed, zero-padded
        bo = tl.load(bo_ptr + outs, mask=outs < 3, other=0.0).to(tl.float32)
        o = product(h, wo, BF16) + bo[None, :]  # (R, OP)
        tl.store(out_ptr + rows[:, None] * 3 + outs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (outs[None, :] < 3))
        o = tl.reshape(product(tl.reshape(t, (DP * R, W)), wo, BF16), (DP, R, OP))
        target = (((particle[None, :, None] * d + ks[:, None, None]) * m
                   + gaussian[None, :, None]) * 3 + outs[None, None, :])
        ok = ((ks[:, None, None] < d) & (row_ok & (particle < n_tangent_particles))[None, :, None]
              & (outs[None, None, :] < 3))
        tl.store(tan_ptr + target, o.to(tan_ptr.dtype.element_ty), mask=ok)


def _rows(dp: int, width: int, dtype: torch.dtype) -> int:
    """Rows per program: about 8,192 tangent values in registers in bfloat16, as the tangent
    kernel; float32 products need more registers, so 2,048 there (``ptxas -v`` for sm_90a: no
    spills at 2 or 8 latent dimensions, against 0.5-3.5 KB with 8,192;
    ``tests/test_kernels_compile.py``). Triton's interpreter (tests) costs per program, so it
    takes the larger blocks."""
    budget = 8192 if dtype == torch.bfloat16 or interpreting() else 2048
    return max(16, min(128, budget // (dp * width)))


def decoder_pass(
    position_term: torch.Tensor,  # (m, w) W_pos·PE(x) + b
    latent_term: torch.Tensor,  # (b, w) W_z·z
    hidden: list[tuple[torch.Tensor, torch.Tensor]],  # per hidden layer: weight (w, w), bias (w,)
    latent_weight: torch.Tensor,  # (w, k) the columns of W_z of the coordinates wanted
    output_weight: torch.Tensor,  # (3, w)
    output_bias: torch.Tensor,  # (3,)
    tangent_rows: int,  # tangents of the first tangent_rows codes
) -> tuple[torch.Tensor, torch.Tensor] | None:  # out (b, m, 3), tangents (tangent_rows, k, m, 3)
    """The network's output and its latent tangents in one kernel (module docstring), both in
    the position term's dtype and without autograd; None (and a warning, once) if the kernel
    cannot run here."""
    m, w = position_term.shape
    b, k = latent_term.shape[0], latent_weight.shape[1]
    n_rows = b * m
    dtype, device = position_term.dtype, position_term.device
    out = torch.empty(b, m, 3, dtype=dtype, device=device)
    tangents = torch.empty(tangent_rows, k, m, 3, dtype=dtype, device=device)
    if n_rows == 0:
        return out, tangents
    with torch.no_grad():
        position_term = position_term.detach().contiguous()
        latent_term = latent_term.detach().to(dtype).contiguous()
        if hidden:
            weights = torch.stack([weight.detach() for weight, _ in hidden]).float().contiguous()
            biases = torch.stack([bias.detach() for _, bias in hidden]).float().contiguous()
        else:  # never read: the layer loop runs zero times
            weights = biases = output_bias.detach().float().contiguous()
        wz = latent_weight.detach().t().float().contiguous()  # (k, w)
        wo = output_weight.detach().float().contiguous()
        bo = output_bias.detach().float().contiguous()
        dp = max(2, triton.next_power_of_2(k))
        rows = _rows(dp, w, dtype)
        grid = (triton.cdiv(n_rows, rows),)
        try:
            with launch_device(device):
                _decoder_pass_kernel[grid](
                    position_term, latent_term, weights, biases, wz, wo, bo, out, tangents,
                    n_rows, m, k, tangent_rows, L=len(hidden), W=w, DP=dp, R=rows, OP=16,
                    # Triton's CPU interpreter gets bfloat16 products wrong
                    BF16=dtype == torch.bfloat16 and not interpreting(), num_warps=8)
        except Exception as error:  # noqa: BLE001 - any build or launch failure: torch code
            record_failure(_FAILED, error, "fused decoder pass", logger)
            return None
    return out, tangents


__all__ = ["decoder_pass", "fused_decoder_pass_usable"]
