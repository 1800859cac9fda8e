"""The decoder's MLP with autograd, forward and backward each in one GPU kernel (Triton).

The training step's decoder pass (:meth:`.LatentConditionedMLP._mlp`, with autograd) is, in
torch, per hidden layer a matrix product, an ELU and a residual add over the whole ``(b, m, w)``
tensor, each read and written again in the backward pass: at the reference size (batch 128,
30,000 Gaussians, width 32, 8 layers) 245 MB per tensor in bfloat16 and about 19 ms of a 51 ms
training step on an H100 (``benchmarks/RESULTS.md``, *On one GPU, again*).

Forward (:func:`_forward_kernel`): a program takes a block of rows (particle × Gaussian), forms
``a0 = W_pos·PE(x) + b + W_z·z`` from one row of the position term and one of the latent term
(both computed in torch, so their own layers keep their autograd), ``h = ELU(a0)``, then per
hidden layer writes ``h_l`` (the layer's input, the only activation kept) and computes
``h ← h + ELU(h W_lᵀ + b_l)``; it writes ``out = h W_outᵀ + b_out``.

Backward (:func:`_backward_kernel`): a program takes a block of Gaussians and a run of particles.
Per particle it recomputes ``a_l = h_l W_lᵀ + b_l`` from the saved ``h_l`` (one small product per
layer) and walks the layers down::

    ∂h_L = ∂out W_out,   ∂a_l = ∂h_{l+1} ⊙ ELU'(a_l),   ∂h_l = ∂h_{l+1} + ∂a_l W_l,
    ∂W_l += ∂a_lᵀ h_l,   ∂b_l += Σ ∂a_l,   ∂a0 = ∂h_0 ⊙ ELU'(a0)

The position term's gradient (``Σ`` over particles of ``∂a0``) stays in registers over the run;
the latent term's (``Σ`` over Gaussians) and the weights' are written as one partial sum per
program and summed in torch. The weights' partial sums accumulate in the program's own slot of
a buffer, a block barrier between particles (the slot is read back by other threads of the
program). ``ELU'(a) = exp(min(a, 0))`` for ``a ≤ 0``, else 1.

Precision: as the torch code under the decoder's autocast: products with bfloat16 operands
(float32 ``ieee`` without autocast), sums, ``h`` and the gradients' accumulation in float32; the
saved ``h_l`` in the pass's dtype (bfloat16 under autocast: the operand the product used).

Used when Triton imports, the tensors are on a CUDA device, the position term is shared by all
codes (``(m, w)``), the layer width is 16, 32 or 64 and ``DYNAMIGHT_FUSED_MLP`` is not ``0``;
otherwise the torch code runs. If the forward kernel cannot be built or launched, a warning is
logged once and the torch code runs from then on; if the backward kernel cannot, that backward
pass is computed by torch autograd from the saved inputs.
``TRITON_INTERPRET=1`` runs both on the CPU (tests).
"""

from __future__ import annotations

import logging

import torch
from torch.nn import functional

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
_PROGRAMS = 1024  # backward: about this many programs (Gaussian blocks × particle runs)
_ROWS: int | None = None  # rows (Gaussians) per program; None: _config's (benchmarks sweep it)
_WARPS: int | None = None  # warps per program of both kernels; None: _config's


def fused_mlp_usable(position_term: torch.Tensor, width: int,
                     weight: torch.Tensor) -> bool:
    """Whether :func:`mlp` can run for a shared position term ``(m, w)`` of layer width
    ``width`` and float32 layer weights (``weight``, any one of them)."""
    if position_term.ndim != 2 or not kernel_may_run(position_term, "DYNAMIGHT_FUSED_MLP",
                                                      _FAILED):
        return False
    return (16 <= width <= 64 and width & (width - 1) == 0 and weight.dtype == torch.float32
            and position_term.dtype in (torch.float32, torch.bfloat16))


def _config(width: int, dtype: torch.dtype) -> tuple[int, int]:
    """Rows (or Gaussians) per program and warps per program. Chosen from ``ptxas -v`` for an
    H100 (sm_90a, Triton 3.9, no GPU needed; ``benchmarks/RESULTS.md``): the backward kernel
    at 8 layers of 32 spills no registers with 64 rows and 8 warps in bfloat16, while float32
    products need far more registers (45 KB of spills at 64 rows and 4 warps, 136 bytes at
    16). Speed on a GPU: ``benchmarks/bench_decoder.py --sweep``."""
    if dtype == torch.bfloat16 or interpreting():  # the interpreter's cost is per program
        rows, warps = (64 if width <= 32 else 32), 8
    else:
        rows, warps = 16, 4
    return (rows if _ROWS is None else _ROWS), (warps if _WARPS is None else _WARPS)


if triton is not None:

    @triton.jit
    def _elu_slope(a):
        return tl.where(a > 0.0, 1.0, tl.exp(tl.minimum(a, 0.0)))

    @triton.jit
    def _forward_kernel(pos_ptr, lat_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr, out_ptr, act_ptr,
                        n_rows, m, L: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                        OP: tl.constexpr, BF16: tl.constexpr, SAVE: tl.constexpr):
        rows, row_ok, particle, gaussian = row_block(n_rows, m, R)  # (R,) each
        cols = tl.arange(0, W)
        h = elu(first_layer(pos_ptr, lat_ptr, particle, gaussian, row_ok, W))  # (R, W)
        for layer in tl.static_range(L):
            if SAVE:  # the layer's input, for the backward pass
                tl.store(act_ptr + (layer * n_rows + rows[:, None]) * W + cols[None, :],
                         h.to(act_ptr.dtype.element_ty), mask=row_ok[:, None])
            # (i, j) = W_l[j, i]: x @ W_l^T
            wt = tl.load(wh_ptr + layer * W * W + cols[None, :] * W + cols[:, None])
            bias = tl.load(bh_ptr + layer * W + cols)
            h = h + elu(product(h, wt, BF16) + bias[None, :])
        outs = tl.arange(0, OP)
        wo = tl.load(wo_ptr + outs[None, :] * W + cols[:, None], mask=outs[None, :] < 3,
                     other=0.0)  # (W, OP): W_out transposed, zero-padded
        bo = tl.load(bo_ptr + outs, mask=outs < 3, other=0.0)
        o = product(h, wo, BF16) + bo[None, :]  # (R, OP)
        tl.store(out_ptr + rows[:, None] * 3 + outs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (outs[None, :] < 3))

    @triton.jit
    def _backward_kernel(pos_ptr, lat_ptr, wh_ptr, bh_ptr, wo_ptr, grad_ptr, act_ptr,
                         dpos_ptr, dlat_ptr, dw_ptr, db_ptr, dwo_ptr, dbo_ptr,
                         m, b, run, L: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                         OP: tl.constexpr, BF16: tl.constexpr):
        block = tl.program_id(0)
        chunk = tl.program_id(1)
        program = chunk * tl.num_programs(0) + block
        gaussian = block.to(tl.int64) * R + tl.arange(0, R).to(tl.int64)  # (R,)
        ok = gaussian < m
        cols = tl.arange(0, W)
        outs = tl.arange(0, OP)
        n_rows = m * b
        position = tl.load(pos_ptr + gaussian[:, None] * W + cols[None, :], mask=ok[:, None],
                           other=0.0).to(tl.float32)  # (R, W)
        wo = tl.load(wo_ptr + outs[:, None] * W + cols[None, :], mask=outs[:, None] < 3,
                     other=0.0)  # (OP, W) zero-padded
        d_position = tl.zeros((R, W), dtype=tl.float32)
        d_wo = tl.zeros((OP, W), dtype=tl.float32)
        d_bo = tl.zeros((OP,), dtype=tl.float32)
        dw_slot = dw_ptr + program.to(tl.int64) * L * W * W
        db_slot = db_ptr + program.to(tl.int64) * L * W
        first = chunk * run
        for i in range(tl.minimum(first + run, b) - first):
            tl.debug_barrier()  # the slot's sums of the last particle are written
            particle = (first + i).to(tl.int64)
            rows = particle * m + gaussian
            a0 = position + tl.load(lat_ptr + particle * W + cols).to(tl.float32)[None, :]
            grad = tl.load(grad_ptr + rows[:, None] * 3 + outs[None, :],
                           mask=ok[:, None] & (outs[None, :] < 3), other=0.0).to(tl.float32)
            if L > 0:  # h_L from the last saved input
                h = tl.load(act_ptr + ((L - 1) * n_rows + rows[:, None]) * W + cols[None, :],
                            mask=ok[:, None], other=0.0).to(tl.float32)
                wt = tl.load(wh_ptr + (L - 1) * W * W + cols[None, :] * W + cols[:, None])
                bias = tl.load(bh_ptr + (L - 1) * W + cols)
                top = h + elu(product(h, wt, BF16) + bias[None, :])
            else:
                top = elu(a0)
            d_wo += product(tl.trans(grad), top, BF16)
            d_bo += tl.sum(grad, axis=0)
            dh = product(grad, wo, BF16)  # (R, W)
            for step in tl.static_range(L):
                layer = L - 1 - step
                h = tl.load(act_ptr + (layer * n_rows + rows[:, None]) * W + cols[None, :],
                            mask=ok[:, None], other=0.0).to(tl.float32)
                weight = tl.load(wh_ptr + layer * W * W + cols[:, None] * W + cols[None, :])
                bias = tl.load(bh_ptr + layer * W + cols)
                a = product(h, tl.trans(weight), BF16) + bias[None, :]
                da = dh * _elu_slope(a)
                here = dw_slot + layer * W * W + cols[:, None] * W + cols[None, :]
                tl.store(here, tl.load(here) + product(tl.trans(da), h, BF16))
                tl.store(db_slot + layer * W + cols, tl.load(db_slot + layer * W + cols)
                         + tl.sum(da, axis=0))
                dh = dh + product(da, weight, BF16)
            da0 = dh * _elu_slope(a0)
            d_position += da0
            tl.store(dlat_ptr + (block.to(tl.int64) * b + particle) * W + cols,
                     tl.sum(da0, axis=0))
        tl.store(dpos_ptr + (chunk.to(tl.int64) * m + gaussian[:, None]) * W + cols[None, :],
                 d_position, mask=ok[:, None])
        tl.store(dwo_ptr + program.to(tl.int64) * OP * W + outs[:, None] * W + cols[None, :],
                 d_wo)
        tl.store(dbo_ptr + program.to(tl.int64) * OP + outs, d_bo)


def _bf16(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter gets bfloat16 products wrong: float32 there
    return dtype == torch.bfloat16 and not interpreting()


def torch_mlp(position_term, latent_term, weights, biases, output_weight, output_bias):
    """The same network in torch, in the terms' dtype (the backward pass's fallback)."""
    dtype = position_term.dtype
    h = functional.elu(position_term[None] + latent_term[:, None])
    for weight, bias in zip(weights, biases, strict=True):
        h = h + functional.elu(functional.linear(h, weight.to(dtype), bias.to(dtype)))
    return functional.linear(h, output_weight.to(dtype), output_bias.to(dtype))


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, position_term, latent_term, weights, biases, output_weight, output_bias,
                save):
        m, w = position_term.shape
        b, n_layers = latent_term.shape[0], weights.shape[0]
        dtype, device = position_term.dtype, position_term.device
        out = torch.empty(b, m, 3, dtype=dtype, device=device)
        activations = torch.empty((n_layers if save else 0), b * m, w, dtype=dtype,
                                  device=device)
        terms = position_term.contiguous(), latent_term.to(dtype).contiguous()
        parameters = (weights.float().contiguous(), biases.float().contiguous(),
                      output_weight.float().contiguous(), output_bias.float().contiguous())
        if b * m:
            rows, warps = _config(w, dtype)
            dummy = parameters[3]  # the pointer of an empty tensor: never read
            with launch_device(position_term.device):
                _forward_kernel[(triton.cdiv(b * m, rows),)](
                    *terms, *(t if t.numel() else dummy for t in parameters[:2]),
                    *parameters[2:], out, activations if activations.numel() else out,
                    b * m, m, L=n_layers, W=w, R=rows, OP=16, BF16=_bf16(dtype), SAVE=save,
                    num_warps=warps)
        if save:
            ctx.save_for_backward(*terms, *parameters, activations)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        position_term, latent_term, weights, biases, wo, bo, activations = ctx.saved_tensors
        try:
            grads = _backward(position_term, latent_term, weights, biases, wo,
                              grad.contiguous(), activations)
        except Exception as error:  # noqa: BLE001 - any build or launch failure: autograd
            record_failure(_FAILED, error, "fused decoder MLP backward", logger)
            with torch.enable_grad():
                inputs = [tensor.detach().requires_grad_() for tensor in
                          (position_term, latent_term, weights, biases, wo, bo)]
                out = torch_mlp(*inputs)
                grads = torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True)
            grads = [torch.zeros_like(tensor) if g is None else g  # no hidden layer
                     for g, tensor in zip(grads, inputs, strict=True)]
        return (*(g if needed else None for g, needed in zip(
            grads, ctx.needs_input_grad[:6], strict=True)), None)


def _backward(position_term, latent_term, weights, biases, wo, grad, activations):
    m, w = position_term.shape
    b, n_layers = latent_term.shape[0], weights.shape[0]
    device = position_term.device
    (rows, warps), op = _config(w, position_term.dtype), 16
    blocks = triton.cdiv(m, rows)
    # about _PROGRAMS programs, their partial sums of the weights' gradients within 64 MB
    wanted = min(_PROGRAMS, max(1, (1 << 24) // max(1, n_layers * w * w)))
    run = triton.cdiv(b, min(b, max(1, triton.cdiv(wanted, blocks))))
    chunks = triton.cdiv(b, run)
    programs = blocks * chunks
    f32 = {"dtype": torch.float32, "device": device}
    d_position = torch.empty(chunks, m, w, **f32)
    d_latent = torch.empty(blocks, b, w, **f32)
    d_weights = torch.zeros(programs, n_layers, w, w, **f32)
    d_biases = torch.zeros(programs, n_layers, w, **f32)
    d_wo = torch.empty(programs, op, w, **f32)
    d_bo = torch.empty(programs, op, **f32)
    dummy = d_bo  # the pointer of an empty tensor: never read or written
    layer_tensors = [t if t.numel() else dummy for t in
                     (weights, biases, activations, d_weights, d_biases)]
    with launch_device(position_term.device):
        _backward_kernel[(blocks, chunks)](
            position_term, latent_term, *layer_tensors[:2], wo, grad, layer_tensors[2],
            d_position, d_latent, *layer_tensors[3:], d_wo, d_bo, m, b, run, L=n_layers, W=w,
            R=rows, OP=op, BF16=_bf16(position_term.dtype), num_warps=warps)
    return (d_position.sum(0).to(position_term.dtype), d_latent.sum(0).to(latent_term.dtype),
            d_weights.sum(0), d_biases.sum(0), d_wo.sum(0)[:3], d_bo.sum(0)[:3])


def mlp(
    position_term: torch.Tensor,  # (m, w) W_pos·PE(x) + b
    latent_term: torch.Tensor,  # (b, w) W_z·z
    hidden: list[tuple[torch.Tensor, torch.Tensor]],  # per hidden layer: weight (w, w), bias (w,)
    output_weight: torch.Tensor,  # (3, w)
    output_bias: torch.Tensor,  # (3,)
) -> torch.Tensor | None:  # (b, m, 3) in the position term's dtype, with autograd
    """The network's output from its two first-layer terms (module docstring), differentiable
    with respect to all of its inputs; None (and a warning, once) if the kernel cannot run
    here."""
    w = position_term.shape[1]
    if hidden:
        weights = torch.stack([weight for weight, _ in hidden])
        biases = torch.stack([bias for _, bias in hidden])
    else:
        weights = output_weight.new_empty(0, w, w)
        biases = output_weight.new_empty(0, w)
    inputs = (position_term, latent_term, weights, biases, output_weight, output_bias)
    save = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
    try:
        return _FusedMLP.apply(*inputs, save)
    except Exception as error:  # noqa: BLE001 - any build or launch failure: torch code
        record_failure(_FAILED, error, "fused decoder MLP", logger)
        return None


__all__ = ["fused_mlp_usable", "mlp", "torch_mlp"]
