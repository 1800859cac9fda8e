"""RELION's job-folder protocol: exit-status files, the abort request and the continue flag.

RELION shows a job as Running until exactly one of ``RELION_JOB_EXIT_SUCCESS``,
``RELION_JOB_EXIT_FAILURE`` or ``RELION_JOB_EXIT_ABORTED`` appears in the job folder, and asks a
running job to stop by creating ``RELION_JOB_ABORT_NOW``. Before each run RELION writes the job's
settings to ``<job>/job.star``; ``_rlnJobIsContinue 1`` there means the user pressed Continue.

A program that runs several stages in one job (the External job) gives each stage a
:meth:`PipelineControl.poll_only` view: the stage can poll for an abort, but only the job itself
writes the one exit file at the very end (an exit file written by an intermediate stage would
make RELION show the job as finished while it is still running).

The job folder must be known before the command line is parsed, so that a bad argument also
ends in an exit file: :func:`pipeline_control_from_argv` finds it in the raw arguments.
SIGTERM (``scancel``, a queue's time limit) and SIGHUP become :class:`JobTerminated` inside
:func:`signals_raise_terminated`, so that they too end with an exit file.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_FILES = {
    "success": "RELION_JOB_EXIT_SUCCESS",
    "failure": "RELION_JOB_EXIT_FAILURE",
    "aborted": "RELION_JOB_EXIT_ABORTED",
}
ABORT_REQUEST = "RELION_JOB_ABORT_NOW"
JOB_STAR = "job.star"


PIPELINE_CONTROL_OPTIONS = ("--pipeline-control", "--pipeline_control")
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class JobAborted(Exception):
    """The user asked RELION to abort the job."""


class JobTerminated(Exception):
    """SIGTERM or SIGHUP arrived (scancel, a queue's time limit, a closed terminal)."""


def pipeline_control_from_argv(argv: Sequence[str]) -> str | None:
    """The value of ``--pipeline-control DIR`` / ``--pipeline_control DIR`` (or ``=DIR``) in
    raw arguments, read without any parser (the last one wins, as argparse does); None if
    absent or without a value."""
    found = None
    for i, arg in enumerate(argv):
        for option in PIPELINE_CONTROL_OPTIONS:
            if arg == option and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                found = argv[i + 1]
            elif arg.startswith(option + "="):
                found = arg[len(option) + 1:] or None
    return found


def _raise_terminated(signum, frame):
    name = signal.Signals(signum).name
    raise JobTerminated(f"received {name} (scancel, a queue time limit or a closed terminal?)")


@contextmanager
def signals_raise_terminated() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`JobTerminated` in the main thread
    (elsewhere signal handlers cannot be set, and the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class PipelineControl:
    """Exit files and abort polling for one job folder (a no-op without a folder).

    With ``write_exit_files=False`` the control only polls for aborts: :meth:`finish` and
    :meth:`clear_previous_exit_status` do nothing (see :meth:`poll_only`).
    """

    def __init__(self, folder: str | Path | None, *, write_exit_files: bool = True):
        self.folder = Path(folder) if folder else None
        self.write_exit_files = write_exit_files

    def poll_only(self) -> PipelineControl:
        """A control for the same folder that polls for aborts but never writes exit files."""
        return PipelineControl(self.folder, write_exit_files=False)

    def clear_previous_exit_status(self) -> None:
        """Remove exit files of an earlier run (a continued job starts Running again)."""
        if self.folder is None or not self.write_exit_files:
            return
        for name in (*EXIT_FILES.values(), ABORT_REQUEST):
            (self.folder / name).unlink(missing_ok=True)

    def abort_requested(self) -> bool:
        return self.folder is not None and (self.folder / ABORT_REQUEST).exists()

    def check_abort(self) -> None:
        """Raise :class:`JobAborted` if RELION asked the job to stop."""
        if self.abort_requested():
            raise JobAborted(f"{self.folder / ABORT_REQUEST} found: stopping")

    def finish(self, status: str) -> None:
        """Write exactly one exit file (``success``, ``failure`` or ``aborted``).

        Does nothing for a poll-only control or without a folder.
        """
        if status not in EXIT_FILES:
            raise ValueError(f"unknown exit status {status!r} (one of {sorted(EXIT_FILES)})")
        if self.folder is None:
            return
        if not self.write_exit_files:
            logger.debug("poll-only control: not writing %s", EXIT_FILES[status])
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for other in EXIT_FILES.values():
            (self.folder / other).unlink(missing_ok=True)
        (self.folder / EXIT_FILES[status]).touch()
        logger.debug("wrote %s", EXIT_FILES[status])


def exit_status(folder: str | Path) -> str | None:
    """``"success"``, ``"failure"`` or ``"aborted"`` from the exit file in ``folder``, or None."""
    found = [status for status, name in EXIT_FILES.items() if (Path(folder) / name).exists()]
    if len(found) > 1:
        raise ValueError(f"{folder}: more than one exit file ({', '.join(found)})")
    return found[0] if found else None


_IS_CONTINUE = re.compile(r"^\s*_rlnJobIsContinue\s+(\S+)", re.MULTILINE)


def job_is_continue(folder: str | Path) -> bool | None:
    """``_rlnJobIsContinue`` of ``<folder>/job.star`` (RELION 3.1, 4 and 5 all write it), or
    None when there is no readable job.star (the program was not started by RELION)."""
    path = Path(folder) / JOB_STAR
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    match = _IS_CONTINUE.search(text)
    if match is None:
        return None
    value = match.group(1).strip("\"'").lower()
    return value in ("1", "true", "yes")
