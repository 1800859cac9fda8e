"""Checkpoints of the forward-deformation training: plain data written with ``torch.save``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(path, weights_only=True)`` (no pickled modules or classes)::

    {"format": "dynamight-relion forward deformations", "version": 1,
     "epoch": int,                       # epochs completed
     "config": {...},                    # the command's settings (plain values)
     "half_set": (n,) long, "validation": (n,) bool,
     "global_rng": torch.get_rng_state(),
     "halves": {"1": HalfSetTrainer.state_dict(), "2": ...}}  # networks, optimiser, RNGs

Files are written beside their destination and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from os import PathLike
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT = "dynamight-relion forward deformations"
VERSION = 2  # 2: latent codes per particle, no image encoder


def save_checkpoint(path: str | PathLike, state: dict) -> None:
    """Write ``state`` (plain data, see module docstring) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **state}
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("saved checkpoint %s (epoch %s)", path, state.get("epoch"))


def load_checkpoint(path: str | PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` (CPU tensors); checks the format tag."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    if int(state.get("version", -1)) > VERSION:
        raise ValueError(f"{path}: checkpoint version {state['version']} is newer than {VERSION}")
    return state


def latest_checkpoint(folder: str | PathLike) -> Path | None:
    """The checkpoint with the most completed epochs in ``folder`` (``NNN.pth`` or
    ``checkpoint_final.pth``), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for path in folder.glob("*.pth"):
        if not (re.fullmatch(r"\d+\.pth", path.name) or path.name == "checkpoint_final.pth"):
            continue
        epoch = int(load_checkpoint(path)["epoch"])
        rank = (epoch, int(path.name == "checkpoint_final.pth"), path)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return None if best is None else best[2]


__all__ = ["FORMAT", "VERSION", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
