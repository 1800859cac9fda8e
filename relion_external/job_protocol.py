"""RELION's job-folder protocol: exit-status files and the abort request.

RELION shows a job as Running until exactly one of ``RELION_JOB_EXIT_SUCCESS``,
``RELION_JOB_EXIT_FAILURE`` or ``RELION_JOB_EXIT_ABORTED`` appears in the job folder, and asks a
running job to stop by creating ``RELION_JOB_ABORT_NOW``.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_FILES = {
    "success": "RELION_JOB_EXIT_SUCCESS",
    "failure": "RELION_JOB_EXIT_FAILURE",
    "aborted": "RELION_JOB_EXIT_ABORTED",
}
ABORT_REQUEST = "RELION_JOB_ABORT_NOW"


class JobAborted(Exception):
    """The user asked RELION to abort the job."""


class PipelineControl:
    """Exit files and abort polling for one job folder (a no-op without a folder)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    def clear_previous_exit_status(self) -> None:
        """Remove exit files of an earlier run (a continued job starts Running again)."""
        if self.folder is None:
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
        """Write exactly one exit file (``success``, ``failure`` or ``aborted``)."""
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for other in EXIT_FILES.values():
            (self.folder / other).unlink(missing_ok=True)
        (self.folder / EXIT_FILES[status]).touch()
        logger.debug("wrote %s", EXIT_FILES[status])
