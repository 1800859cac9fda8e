"""Triton for the core's GPU kernels (:mod:`._tangent_kernel`, :mod:`._splat_kernel`,
:mod:`._lookup_kernel`), where it is installed: CUDA builds of torch bring it, the CPU wheel
does not (then ``triton`` and ``tl`` are None and the kernels' torch code runs)."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

try:  # optional
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU wheel has no Triton
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1``, the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_may_run(tensor, switch: str, failures: list[str]) -> bool:
    """Whether a kernel may run on ``tensor``'s device: Triton is there, the kernel has not
    failed before (``failures``, its module's list), its environment variable ``switch`` is not
    ``0``, and the tensor is on a CUDA device (or the interpreter runs the kernels)."""
    if triton is None or failures or os.environ.get(switch, "1") == "0":
        return False
    return tensor.is_cuda or interpreting()


def record_failure(failures: list[str], error: Exception, kernel: str,
                   logger: logging.Logger) -> None:
    """Note a kernel's build or launch failure: its torch code runs from then on (a warning,
    once, names the kernel and the error)."""
    failures.append(f"{type(error).__name__}: {error}")
    logger.warning("%s unavailable (%s); using the torch code", kernel,
                   failures[0].splitlines()[0])


def launch_device(device: torch.device):
    """Context in which a kernel launches on ``device``: Triton launches on the current CUDA
    device, so a CUDA tensor's own one is made current (nothing for the interpreter's CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


__all__ = ["interpreting", "kernel_may_run", "launch_device", "record_failure", "tl", "triton"]
