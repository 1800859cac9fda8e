"""The exceptions the adapter raises for bad input (files, STAR columns, headers) and for
outputs that cannot be written (disk full, folder not writable), and their mapping from the
core's checkpoint errors."""

from __future__ import annotations

import errno
import logging
from os import PathLike

from dynamight_core.checkpoint_file import CheckpointError, CheckpointWriteError

logger = logging.getLogger(__name__)


class InputError(Exception):
    """Bad input: names the file, the STAR column or header field at fault, and what to do.

    ``str(err)`` reads ``"<path>: <field>: <problem>. <fix>"``; the parts are kept as
    attributes so callers (the CLI, the job-folder protocol) can log or test them. ``label``
    is how the CLI introduces the one-line message.
    """

    label = "input error"

    def __init__(self, path: str | PathLike | None, field: str, problem: str, fix: str):
        super().__init__(path, field, problem, fix)
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        where = self.path if self.path is not None else "<no file>"
        problem = self.problem.rstrip(". ")
        return f"{where}: {self.field}: {problem}. {self.fix}"


class OutputError(InputError):
    """An output that cannot be written; names the path. Whoever raises it has left nothing
    half-written under that name (see ``_atomic``)."""

    label = "output error"

    @classmethod
    def from_os_error(cls, path: str | PathLike, err: BaseException) -> OutputError:
        number = err.errno if isinstance(err, OSError) else None
        if number in (errno.ENOSPC, errno.EDQUOT):
            return cls(path, "write", "no space left on the device (disk full or quota "
                                      "reached)",
                       "Free space (or choose another output directory) and run again; a "
                       "continued run resumes from the last checkpoint.")
        if number in (errno.EACCES, errno.EPERM, errno.EROFS):
            return cls(path, "write", "the folder is not writable",
                       "Make it writable or choose another output directory.")
        if isinstance(err, OSError) and err.strerror:
            problem = err.strerror
        else:
            problem = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return cls(path, "write", f"cannot be written ({problem})",
                   "Check the output directory and the disk, then run again.")


def adapter_error(err: BaseException) -> InputError | None:
    """The adapter's error for a core checkpoint error (None for anything else)."""
    if isinstance(err, CheckpointWriteError):
        return OutputError.from_os_error(err.path, err)
    if isinstance(err, CheckpointError):
        return InputError(err.path, "checkpoint", err.problem,
                          "Use a checkpoint written by this program, or delete this one: a "
                          "continued run then resumes from the previous intact checkpoint.")
    if isinstance(err, InputError):
        return err
    return None


__all__ = ["InputError", "OutputError", "adapter_error"]
