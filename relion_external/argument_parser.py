"""The argparse parser of the ``dynamight`` commands.

A bad command line raises :class:`CommandLineError` instead of exiting with code 2, so that the
entry point can still write RELION's exit file and a one-line reason.
"""

from __future__ import annotations

import argparse


class CommandLineError(Exception):
    """A command line argparse rejected; ``usage`` is the usage text of the parser at fault."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`CommandLineError` instead of exiting (sub-parsers made by
    ``add_subparsers`` are of this class too)."""

    def error(self, message):
        raise CommandLineError(message, self.format_usage())


__all__ = ["ArgumentParser", "CommandLineError"]
