"""Options of the other DynaMight tasks, which RELION-5 appends to every task.

RELION-5's DynaMight job has no field for, say, the number of training epochs, so users put
``--n-epochs 4`` into "Additional arguments", and RELION appends that text to the command of
every task of the job: optimize-deformations, optimize-inverse-deformations,
deformable-backprojection and explore-latent-space. Each of these commands therefore accepts
the options of the other three (:func:`accept_options_of_other_tasks`): one that it lacks is
ignored, with a one-line warning (:func:`ignored_option_warnings`). An option a command has is
used as usual, also when RELION's own value comes first (``--n-epochs 200 --n-epochs 4`` for
the inverse task): the last one wins and
:func:`~relion_external.argument_parser.repeated_with_different_values` reports it.
"""

from __future__ import annotations

import argparse

RELION5_TASKS = ("optimize-deformations", "optimize-inverse-deformations",
                 "deformable-backprojection", "explore-latent-space")
IGNORED = "_ignored_options"  # Namespace attribute: [(option string, value, owners), ...]


class _OptionOfOtherTasks(argparse.Action):
    """Takes the values an option of other tasks would take and notes them as ignored."""

    def __init__(self, option_strings, dest, owners: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.owners = owners

    def __call__(self, parser, namespace, values, option_string=None):
        ignored = list(getattr(namespace, IGNORED, None) or [])
        ignored.append((option_string, values, self.owners))
        setattr(namespace, IGNORED, ignored)


def accept_options_of_other_tasks(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Give each task's parser (``command -> parser``) every option string of the other tasks
    that it lacks, with the same number of values, hidden from ``--help`` and ignored."""
    own = {name: [a for a in parser._actions if a.option_strings]
           for name, parser in parsers.items()}
    missing: dict[str, dict[str, tuple[argparse.Action, list[str]]]] = {}
    for name, parser in parsers.items():
        strings = set(parser._option_string_actions)
        for other, actions in own.items():
            if other == name:
                continue
            for action in actions:
                for option in action.option_strings:
                    if option in strings:
                        continue
                    entry = missing.setdefault(name, {}).setdefault(option, (action, []))
                    entry[1].append(other)
    for name, options in missing.items():
        for option, (action, owners) in sorted(options.items()):
            parsers[name].add_argument(
                option, dest=f"_other_task{option.replace('-', '_')}", nargs=action.nargs,
                default=argparse.SUPPRESS, help=argparse.SUPPRESS, metavar="VALUE",
                action=_OptionOfOtherTasks, owners=tuple(owners))


def ignored_option_warnings(args: argparse.Namespace, command: str) -> list[str]:
    """One line per option of other tasks that ``command`` was given and ignores."""
    lines = []
    for option, values, owners in getattr(args, IGNORED, None) or []:
        given = option if values in ([], None) else f"{option} {_shown(values)}"
        lines.append(f"{command} ignores {given}: an option of {' and '.join(owners)} only "
                     "(RELION-5 appends its Additional arguments to every task)")
    return lines


def _shown(values) -> str:
    return " ".join(values) if isinstance(values, list) else str(values)


__all__ = ["RELION5_TASKS", "accept_options_of_other_tasks", "ignored_option_warnings"]
