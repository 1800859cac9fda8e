"""Checkpoint files on disk: written atomically, read back as plain data or refused with a reason.

Writing: ``torch.save`` into a hidden temporary file in the destination folder, flushed and
``fsync``-ed, then renamed over the destination (``os.replace``), so the destination is either
the old file or the complete new one; on any failure (disk full, folder not writable) the
temporary file is removed and :class:`CheckpointWriteError` names the destination.

Reading: ``torch.load(weights_only=True)``; a file that is missing, empty, truncated, not
written by ``torch.save``, holding pickled Python objects, of another format or of an
unsupported version raises :class:`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Collection
from os import PathLike
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; ``str(err)`` reads ``"<path>: <problem>"``."""

    def __init__(self, path: str | PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; nothing was left under its name.

    ``errno`` is the operating system's error number when known (``errno.ENOSPC``: disk
    full), ``filename`` the destination."""

    def __init__(self, path: str | PathLike, problem: str, error_number: int | None = None):
        super().__init__(error_number, problem, str(path))
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _describe_write_failure(err: BaseException) -> tuple[str, int | None]:
    if isinstance(err, OSError) and err.errno is not None:
        return (err.strerror or os.strerror(err.errno)), err.errno
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"write failed ({first_line})", None


def save_atomically(payload: dict, path: str | PathLike) -> None:
    """``torch.save(payload)`` to ``path`` via a synced temporary file (module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as err:
        problem, number = _describe_write_failure(err)
        raise CheckpointWriteError(path, f"cannot be written: {problem}", number) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _sync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: not every file system lets a folder be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unpickling_problem(err: Exception) -> str:
    found = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return (f"holds pickled Python objects{what}, which are not loaded (only plain data is "
            "read, torch.load weights_only=True); it was not written by this program")


def _raw_load(path: Path) -> object:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(path, f"cannot be read: {err.strerror or err}") from err
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    if head != _ZIP_MAGIC:
        raise CheckpointError(path, "is not a checkpoint (not a file written by torch.save)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, f"is truncated or damaged ({size} bytes, an incomplete "
                                    "zip archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(path, _unpickling_problem(err)) from err
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(path, f"is damaged ({first_line[:200]})") from err


def load_tagged(path: str | PathLike, fmt: str, versions: Collection[int]) -> dict:
    """The dict saved in ``path``; :class:`CheckpointError` unless it is a complete plain-data
    file tagged ``{"format": fmt, "version": v}`` with ``v`` in ``versions``."""
    path = Path(path)
    state = _raw_load(path)
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else None
        what = f"a {found!r} file" if isinstance(found, str) else "no format tag"
        raise CheckpointError(path, f"is not a {fmt} checkpoint ({what})")
    version = state.get("version")
    if not isinstance(version, int) or version not in versions:
        readable = ", ".join(str(v) for v in sorted(versions))
        raise CheckpointError(path, f"has format version {version!r}; this program reads "
                                    f"version {readable}")
    return state


__all__ = ["CheckpointError", "CheckpointWriteError", "load_tagged", "save_atomically"]
