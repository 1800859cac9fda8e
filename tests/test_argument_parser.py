"""The commands' parser: errors raised (not exited), repeated values recorded, and every option's
default shown in ``--help`` exactly once."""

from __future__ import annotations

import argparse
import re

import pytest

from relion_external.argument_parser import (
    ArgumentParser,
    CommandLineError,
    given_values,
    repeated_with_different_values,
    show_defaults,
)
from relion_external.cli import COMMANDS, build_parser


def toy() -> ArgumentParser:
    p = ArgumentParser(prog="toy")
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--named", default="pca", help="the method")
    p.add_argument("--stated", type=int, default=10, help="frames (default 10)")
    p.add_argument("--maybe", default=None, help="a file")
    p.add_argument("--flag", action="store_true", help="a switch")
    return p


def test_errors_raise_with_the_usage():
    with pytest.raises(CommandLineError, match="unrecognized arguments: --zzz 1") as err:
        toy().parse_args(["--zzz", "1"])
    assert err.value.usage.startswith("usage: toy")


def test_values_of_each_option_are_recorded_in_order():
    args = toy().parse_args(["--n", "1", "--named", "umap", "--n", "2", "--flag"])
    assert given_values(args) == {"n": [("--n", 1), ("--n", 2)], "named": [("--named", "umap")]}
    assert repeated_with_different_values(args) == [
        "--n given 2 times with different values (--n 1, --n 2): the last one, 2, is used"]
    assert args.n == 2


def test_defaults_are_shown_once():
    p = toy()
    show_defaults(p)
    text = re.sub(r"\s+", " ", p.format_help())
    assert "--n N (default: 5)" in text
    assert "--named NAMED the method (default: pca)" in text
    assert "--stated STATED frames (default 10) --maybe" in text  # stated already: not twice
    assert "--maybe MAYBE a file --flag" in text  # no "(default: None)"
    assert "a switch" in text and "default: False" not in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_with_a_default_states_it_in_help(command):
    parser = build_parser().commands[command]
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or action.default in (None, False, argparse.SUPPRESS)):
            continue
        text = formatter._expand_help(action)
        if "default" not in text.lower():
            missing.append(action.option_strings[0])
        assert text.lower().count("default") == 1 or "default:" not in text, text
    assert missing == []


def test_optimize_deformations_help_shows_the_numbers(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["optimize-deformations", "--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for shown in ("--n-gaussians N_GAUSSIANS (default: 10000)",
                  "--batch-size BATCH_SIZE (default: 100)",
                  "--regularization-factor REGULARIZATION_FACTOR (default: 1.0)",
                  "--n-threads N_THREADS (default: 4)"):
        assert shown in text
