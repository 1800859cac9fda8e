"""The argparse parser of the ``dynamight`` commands.

Three differences from a plain :class:`argparse.ArgumentParser`:

- a bad command line raises :class:`CommandLineError` instead of exiting with code 2, so that
  the entry point can still write RELION's exit file and a one-line reason;
- every value given to an option is recorded (:func:`given_values`), so that an option given
  twice with different values (RELION-5 appends its "Additional arguments" after its own
  options) can be reported: the last one wins, as argparse does;
- :func:`show_defaults` appends ``(default: …)`` to the help of every option whose help text
  does not already state its default.
"""

from __future__ import annotations

import argparse

GIVEN = "_given_values"  # Namespace attribute: dest -> [(option string, value), ...]


class CommandLineError(Exception):
    """A command line argparse rejected; ``usage`` is the usage text of the parser at fault."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class _RecordingStore(argparse._StoreAction):
    """``store``, and a note of the option string and value in the namespace."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = dict(getattr(namespace, GIVEN, None) or {})
        given[self.dest] = [*given.get(self.dest, []), (option_string, values)]
        setattr(namespace, GIVEN, given)
        super().__call__(parser, namespace, values, option_string)


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`CommandLineError` instead of exiting; records the values of ``store``
    options (sub-parsers made by ``add_subparsers`` are of this class too)."""

    commands: dict[str, argparse.ArgumentParser]  # sub-command parsers, where the caller sets them

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = {}
        self.register("action", None, _RecordingStore)
        self.register("action", "store", _RecordingStore)

    def error(self, message):
        raise CommandLineError(message, self.format_usage())


def given_values(args: argparse.Namespace) -> dict[str, list[tuple[str, object]]]:
    """``dest -> [(option string, value), ...]`` in command-line order, for the options that
    were given (``store`` options only: flags cannot disagree with themselves)."""
    return dict(getattr(args, GIVEN, None) or {})


def repeated_with_different_values(args: argparse.Namespace) -> list[str]:
    """One message per option given more than once with different values."""
    messages = []
    for given in given_values(args).values():
        values = [value for _, value in given]
        if len({repr(v) for v in values}) > 1:
            shown = ", ".join(f"{option} {value}" for option, value in given)
            messages.append(f"{given[0][0]} given {len(given)} times with different values "
                            f"({shown}): the last one, {values[-1]}, is used")
    return messages


def _states_default(action: argparse.Action) -> bool:
    return action.help is not None and "default" in action.help.lower()


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: …)`` to the help of each option of ``parser`` that has a default
    worth showing (not None, not a flag's False) and whose help does not mention it already."""
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action.default, bool) or _states_default(action)):
            continue
        note = "(default: %(default)s)"
        action.help = f"{action.help} {note}" if action.help else note


__all__ = ["ArgumentParser", "CommandLineError", "given_values",
           "repeated_with_different_values", "show_defaults"]
