"""Checkpoints of the forward-deformation training: plain data written with ``torch.save``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(path, weights_only=True)`` (no pickled modules or classes)::

    {"format": "dynamight-relion forward deformations", "version": 3,
     "epoch": int,                       # epochs completed
     "config": {...},                    # the command's settings (plain values)
     "half_set": (n,) int8, "validation": (n,) bool,
     "global_rng": torch.get_rng_state(),
     "halves": {"1": HalfSetTrainer.state_dict(), "2": ...}}  # networks, optimiser, RNGs

Nothing is stored that can be recomputed, and the halves' common initial Gaussian positions are
one tensor (``torch.save`` writes a shared tensor once). Version 2 files (int64 half sets and
indices, a per-particle latent precision table) are still read.

A folder of checkpoints holds ``NNN.pth`` (epochs completed) and ``checkpoint_final.pth``.
Files are written beside their destination, synced and renamed (:mod:`.checkpoint_file`), so a
reader never sees half a file; a damaged or foreign file raises :class:`CheckpointError`, and
:func:`load_latest_checkpoint` falls back to the newest intact one with a warning.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

from .checkpoint_file import CheckpointError, load_tagged, save_atomically
from .checkpoint_folder import epoch_checkpoint_name, load_latest, prune

logger = logging.getLogger(__name__)

FORMAT = "dynamight-relion forward deformations"
VERSION = 3  # 2: latent codes per particle, no image encoder; 3: no redundant data
READABLE_VERSIONS = frozenset({2, 3})  # version 2 checkpoints still continue exactly
FINAL_NAME = "checkpoint_final.pth"


def save_checkpoint(path: str | PathLike, state: dict) -> None:
    """Write ``state`` (plain data, see module docstring) atomically to ``path``;
    :class:`~.checkpoint_file.CheckpointWriteError` naming ``path`` when it cannot be."""
    save_atomically({"format": FORMAT, "version": VERSION, **state}, path)
    logger.debug("saved checkpoint %s (epoch %s)", path, state.get("epoch"))


def load_checkpoint(path: str | PathLike) -> dict:
    """Read a checkpoint (``weights_only=True``, CPU tensors); :class:`CheckpointError` naming
    the file when it is damaged, not a checkpoint, or of another version."""
    return load_tagged(path, FORMAT, READABLE_VERSIONS)


def load_latest_checkpoint(folder: str | PathLike) -> tuple[Path, dict] | None:
    """The intact checkpoint of ``folder`` with the most completed epochs and its state, or
    None (:func:`.checkpoint_folder.load_latest`: damaged newer ones are skipped with a
    warning)."""
    return load_latest(folder, Path(folder) / FINAL_NAME, load_checkpoint)


def latest_checkpoint(folder: str | PathLike) -> Path | None:
    """The path :func:`load_latest_checkpoint` chooses, or None."""
    found = load_latest_checkpoint(folder)
    return None if found is None else found[0]


def prune_checkpoints(folder: str | PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``NNN.pth`` files of ``folder`` (``keep`` <= 0:
    none); ``checkpoint_final.pth`` is never deleted."""
    return prune(folder, keep)


__all__ = ["FINAL_NAME", "FORMAT", "READABLE_VERSIONS", "VERSION", "CheckpointError", "epoch_checkpoint_name",
           "latest_checkpoint", "load_checkpoint", "load_latest_checkpoint",
           "prune_checkpoints", "save_checkpoint"]
