"""The one exception the adapter raises for bad user input (files, STAR columns, headers)."""

from __future__ import annotations

import logging
from os import PathLike

logger = logging.getLogger(__name__)


class InputError(Exception):
    """Bad input: names the file, the STAR column or header field at fault, and what to do.

    ``str(err)`` reads ``"<path>: <field>: <problem>. <fix>"``; the parts are kept as
    attributes so callers (the CLI, the job-folder protocol) can log or test them.
    """

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


__all__ = ["InputError"]
