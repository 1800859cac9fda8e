"""The decoder's latent tangents in one GPU kernel (Triton), for CUDA devices.

:meth:`.LatentConditionedMLP._mlp_and_tangents` carries ``∂out/∂z_k`` through the layers with
the primal pass (see :mod:`._latent_mlp`): per layer one matrix product of the whole tangent
tensor ``(b, d, m, w)`` and one broadcast multiply-add. For the reference model size (30,000
Gaussians, 6 latent dimensions, 8 layers, batch 128) that tensor is 1.5 GB in bfloat16 and is
read and written four times per layer: on an H200 the eight broadcast multiply-adds alone took
21 ms of a 112 ms training step (``benchmarks/RESULTS.md``).

Here every tangent stays in registers: a program takes a block of rows (particle × Gaussian),
builds ``t0_k = ELU'(a0) ⊙ W_z[:, k]`` for all ``k`` at once, applies each layer
``t ← t + ELU'(a_l) ⊙ (t W_lᵀ)`` with a small matrix product, and writes only
``∂out/∂z_k = t W_outᵀ``. It reads the primal activations once per layer and writes
``b·d·m·3`` values. ``ELU'(a) = min(ELU(a), 0) + 1`` is computed from the saved activations.
The tangent is kept in float32; the products take the primal pass's precision (bfloat16
operands under the decoder's bfloat16 autocast, else float32 ``ieee``).

Used when Triton imports, the tensors are on a CUDA device, the layer width is a power of two
of at least 16 and ``DYNAMIGHT_FUSED_TANGENTS`` is not ``0``; otherwise the plain torch code
runs. If the kernel cannot be built or launched (a GPU Triton does not support, say), a warning
is logged once and the torch code runs from then on. ``TRITON_INTERPRET=1`` runs the kernel on
the CPU (tests).
"""

from __future__ import annotations

import logging

import torch

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


def fused_tangents_usable(h: torch.Tensor, width: int) -> bool:
    """Whether :func:`latent_tangents` can run for activations ``h`` of layer width ``width``."""
    if not kernel_may_run(h, "DYNAMIGHT_FUSED_TANGENTS", _FAILED):
        return False
    return width >= 16 and width & (width - 1) == 0 and h.dtype in (torch.float32,
                                                                     torch.bfloat16)


if triton is not None:

    @triton.jit
    def _tangent_kernel(h0_ptr, steps_ptr, wz_ptr, wh_ptr, wo_ptr, out_ptr,
                        n_rows, m, d, L: tl.constexpr,
                        W: tl.constexpr, DP: tl.constexpr, R: tl.constexpr,
                        OP: tl.constexpr, BF16: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * R + tl.arange(0, R).to(tl.int64)  # (R,)
        row_ok = rows < n_rows
        cols = tl.arange(0, W)
        ks = tl.arange(0, DP)
        offsets = rows[:, None] * W + cols[None, :]  # (R, W)
        a0 = tl.load(h0_ptr + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
        slope = tl.minimum(a0, 0.0) + 1.0
        wz = tl.load(wz_ptr + ks[:, None] * W + cols[None, :], mask=ks[:, None] < d,
                     other=0.0).to(tl.float32)  # (DP, W): W_z transposed
        t = slope[None, :, :] * wz[:, None, :]  # (DP, R, W)
        layer_size = n_rows.to(tl.int64) * W
        for layer in tl.static_range(L):
            # (i, j) = W_l[j, i]: t @ W_l^T
            wt = tl.load(wh_ptr + layer * W * W + cols[None, :] * W + cols[:, None])
            a = tl.load(steps_ptr + layer * layer_size + offsets, mask=row_ok[:, None],
                        other=0.0).to(tl.float32)
            slope = tl.minimum(a, 0.0) + 1.0
            flat = tl.reshape(t, (DP * R, W))
            if BF16:
                mixed = tl.dot(flat.to(tl.bfloat16), wt.to(tl.bfloat16))
            else:
                mixed = tl.dot(flat, wt.to(tl.float32), input_precision="ieee")
            t = t + slope[None, :, :] * tl.reshape(mixed, (DP, R, W))
        outs = tl.arange(0, OP)
        wo = tl.load(wo_ptr + outs[None, :] * W + cols[:, None], mask=outs[None, :] < 3,
                     other=0.0)  # (W, OP): W_out transposed, zero-padded
        flat = tl.reshape(t, (DP * R, W))
        if BF16:
            o = tl.dot(flat.to(tl.bfloat16), wo.to(tl.bfloat16))
        else:
            o = tl.dot(flat, wo.to(tl.float32), input_precision="ieee")
        o = tl.reshape(o, (DP, R, OP))
        particle = rows // m
        gaussian = rows % m
        target = (((particle[None, :, None] * d + ks[:, None, None]) * m
                   + gaussian[None, :, None]) * 3 + outs[None, None, :])
        ok = (ks[:, None, None] < d) & row_ok[None, :, None] & (outs[None, None, :] < 3)
        tl.store(out_ptr + target, o.to(out_ptr.dtype.element_ty), mask=ok)


def latent_tangents(
    h0: torch.Tensor,  # (b, m, w) first layer's activation ELU(a0)
    steps: list[torch.Tensor],  # per hidden layer (b, m, w): ELU(W_l h_l + b_l)
    latent_weight: torch.Tensor,  # (w, d) W_z
    hidden_weights: list[torch.Tensor],  # per hidden layer (w, w)
    output_weight: torch.Tensor,  # (3, w) W_out
) -> torch.Tensor | None:  # (b, d, m, 3) in h0's dtype, no autograd graph
    """``∂out/∂z_k`` of :class:`.LatentConditionedMLP` in one kernel (module docstring);
    None (and a warning, once) if the kernel cannot run here."""
    b, m, w = h0.shape
    d = latent_weight.shape[1]
    n_rows = b * m
    with torch.no_grad():
        h0 = h0.detach().contiguous()
        if steps:
            stacked = torch.stack([s.detach() for s in steps]).to(h0.dtype).contiguous()
            weights = torch.stack([x.detach() for x in hidden_weights]).float().contiguous()
        else:  # never read: the layer loop runs zero times
            stacked, weights = h0, latent_weight.detach().float().contiguous()
        wz = latent_weight.detach().t().float().contiguous()  # (d, w)
        wo = output_weight.detach().float().contiguous()  # (3, w)
        out = torch.empty(b, d, m, 3, dtype=h0.dtype, device=h0.device)
        dp = max(2, triton.next_power_of_2(d))
        # rows per program: about 8,192 tangent values in registers whatever the width (for the
        # default width 32: 32 rows at 6 dimensions, 128 at 2)
        rows = max(16, min(128, 8192 // (dp * w)))
        grid = (triton.cdiv(n_rows, rows),)
        # Triton launches on the current CUDA device: make it the tensors' one
        try:
            with launch_device(h0.device):
                _tangent_kernel[grid](h0, stacked, wz, weights, wo, out, n_rows, m, d,
                                      L=len(steps), W=w, DP=dp, R=rows, OP=16,
                                      # Triton's CPU interpreter gets bfloat16 products wrong
                                      BF16=h0.dtype == torch.bfloat16 and not interpreting(),
                                      num_warps=8)
        except Exception as error:  # noqa: BLE001 - any build or launch failure: torch code
            record_failure(_FAILED, error, "fused tangent kernel", logger)
            return None
    return out


__all__ = ["fused_tangents_usable", "latent_tangents"]
