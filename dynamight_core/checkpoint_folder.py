"""A folder of epoch checkpoints: ``NNN.pth`` (epochs completed) plus a final checkpoint.

:func:`load_latest` picks the intact checkpoint with the most completed epochs (the final one
wins a tie), skipping damaged newer ones with a warning; :func:`prune` keeps the newest few
epoch checkpoints. Both work for any checkpoint format: the caller passes its loader, which
raises :class:`~.checkpoint_file.CheckpointError` for a file it cannot use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from os import PathLike
from pathlib import Path

from .checkpoint_file import CheckpointError

logger = logging.getLogger(__name__)

_EPOCH_NAME = re.compile(r"(\d+)\.pth")


def epoch_checkpoint_name(epoch: int) -> str:
    """``NNN.pth``: the name of the checkpoint after ``epoch`` completed epochs."""
    return f"{int(epoch):03d}.pth"


def epoch_checkpoints(folder: str | PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``NNN.pth`` files in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.glob("*.pth")
                  if (m := _EPOCH_NAME.fullmatch(p.name)))


def load_latest(folder: str | PathLike, final: str | PathLike,
                load: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """The intact checkpoint with the most completed epochs (``state["epoch"]``) among the
    ``NNN.pth`` files of ``folder`` and ``final``, and its state; None when there is none.
    Damaged ones are skipped with a warning naming them; :class:`CheckpointError` when every
    one is damaged (never start over silently)."""
    final = Path(final)
    damaged: list[CheckpointError] = []
    final_state = None
    if final.is_file():
        try:
            final_state = load(final)
        except CheckpointError as err:
            damaged.append(err)
    final_epoch = -1 if final_state is None else int(final_state["epoch"])
    for epoch, path in reversed(epoch_checkpoints(folder)):
        if epoch <= final_epoch:
            break
        try:
            return _chosen(path, load(path), damaged)
        except CheckpointError as err:
            damaged.append(err)
    if final_state is not None:
        return _chosen(final, final_state, damaged)
    if damaged:
        raise CheckpointError(damaged[0].path, f"{damaged[0].problem}; no intact earlier "
                                               f"checkpoint was found in {Path(folder)}")
    return None


def _chosen(path: Path, state: dict, damaged: list[CheckpointError]) -> tuple[Path, dict]:
    for err in damaged:
        logger.warning("%s; using the previous intact checkpoint %s (epoch %d) instead",
                       err, path, int(state["epoch"]))
    return path, state


def prune(folder: str | PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``NNN.pth`` files of ``folder`` (``keep`` <= 0:
    none) and return them; other files (the final checkpoint) are never touched."""
    if keep <= 0:
        return []
    old = [path for _, path in epoch_checkpoints(folder)][:-keep]
    for path in old:
        path.unlink(missing_ok=True)
        logger.debug("deleted old checkpoint %s", path)
    return old


__all__ = ["epoch_checkpoint_name", "epoch_checkpoints", "load_latest", "prune"]
