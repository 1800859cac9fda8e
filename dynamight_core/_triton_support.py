"""Triton for the core's GPU kernels (:mod:`._tangent_kernel`, :mod:`._splat_kernel`,
:mod:`._lookup_kernel`), where it is installed: CUDA builds of torch bring it, the CPU wheel
does not (then ``triton`` and ``tl`` are None and the kernels' torch code runs)."""

from __future__ import annotations

import os

try:  # optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU wheel has no Triton
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["interpreting", "tl", "triton"]
