"""Choosing the torch device from a user's ``--gpu-id`` (never hard-coded)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def choose_device(gpu_id: str | int | None) -> torch.device:
    """``cuda:<id>`` when a GPU id is given and CUDA is available; otherwise the CPU.

    ``gpu_id`` may be ``None``/``""``/``-1`` (CPU) or a RELION-style ``"0"`` / ``"0,1"`` (first id).
    """
    text = "" if gpu_id is None else str(gpu_id).strip()
    first = text.split(",")[0].split(":")[0].strip()
    if first in ("", "-1"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning("GPU %s requested but CUDA is not available: running on the CPU", first)
        return torch.device("cpu")
    index = int(first)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--gpu-id {first}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(f"cuda:{index}")
