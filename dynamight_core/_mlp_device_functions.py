"""Triton device functions shared by the decoder MLP's kernels (:mod:`._decoder_pass_kernel`,
:mod:`._mlp_kernel`): the ELU, a product in the pass's precision, a program's block of rows
and the first layer's pre-activation of it. None where Triton is not installed."""

from __future__ import annotations

from ._triton_support import tl, triton

if triton is not None:

    @triton.jit
    def elu(a):
        return tl.where(a > 0.0, a, tl.exp(tl.minimum(a, 0.0)) - 1.0)

    @triton.jit
    def product(x, y, BF16: tl.constexpr):
        """``x @ y`` in the pass's precision (bfloat16 operands or float32 ``ieee``), float32
        result."""
        if BF16:
            return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
        return tl.dot(x, y, input_precision="ieee")

    @triton.jit
    def row_block(n_rows, m, R: tl.constexpr):
        """This program's ``R`` rows of the flattened (particle, Gaussian) pass: the row
        indices (int64), whether each exists, and its particle and Gaussian."""
        rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R).to(tl.int64)
        return rows, rows < n_rows, rows // m, rows % m

    @triton.jit
    def first_layer(pos_ptr, lat_ptr, particle, gaussian, row_ok, W: tl.constexpr):
        """``a0 = W_pos·PE(x) + b + W_z·z`` of rows (particle, Gaussian): one row of the
        position term plus one of the latent term, float32, ``(R, W)``; 0 for rows not
        ``row_ok``."""
        cols = tl.arange(0, W)
        return (tl.load(pos_ptr + gaussian[:, None] * W + cols[None, :], mask=row_ok[:, None],
                        other=0.0).to(tl.float32)
                + tl.load(lat_ptr + particle[:, None] * W + cols[None, :],
                          mask=row_ok[:, None], other=0.0).to(tl.float32))

else:  # pragma: no cover - the CPU wheel has no Triton
    elu = product = row_block = first_layer = None

__all__ = ["elu", "first_layer", "product", "row_block"]
