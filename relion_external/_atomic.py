"""Output files: written under a hidden temporary name in the same folder, synced and renamed,
so a reader never sees a half-written file; failures become :class:`OutputError` naming the
path (disk full, folder not writable), with nothing left under the final name."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

from .errors import OutputError

logger = logging.getLogger(__name__)


def make_folder(path: str | PathLike) -> Path:
    """``mkdir -p path``; :class:`OutputError` naming it when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError.from_os_error(path, err) from err
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is made if need be); when the block
    succeeds the file is synced and replaces ``path`` in one step (``os.replace``); on any
    error it is removed, and an :class:`OSError` (or an error of a writer library) raised
    while writing becomes :class:`OutputError` naming ``path``."""
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except OutputError:
            raise
        except OSError as err:
            raise OutputError.from_os_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def append_text(path: str | PathLike, text: str) -> None:
    """Append ``text`` to a log file; :class:`OutputError` naming it when that fails."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as err:
        raise OutputError.from_os_error(path, err) from err


__all__ = ["append_text", "atomic_output", "make_folder"]
