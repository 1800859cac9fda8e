"""RELION-5 appends its DynaMight job's "Additional arguments" to every task's command: each
task accepts the other tasks' options, ignores the ones it lacks with a one-line warning, and
reports an option given twice with different values (the last one wins)."""

from __future__ import annotations

import logging
import shlex

import pytest

from relion_external import cli
from relion_external.appended_options import RELION5_TASKS, ignored_option_warnings
from relion_external.argument_parser import repeated_with_different_values
from relion_external.cli import build_parser

JOB = "DynaMight/job012/"
# the commands RELION-5 builds for each task (as in tests/test_relion5_command_lines.py)
TASK_LINES = {
    "optimize-deformations": (
        f"optimize-deformations  --refinement-star-file Refine3D/job010/run_data.star "
        f"--output-directory {JOB} --initial-model Refine3D/job010/run_class001.mrc "
        f"--n-gaussians 10000 --regularization-factor 1 --n-threads 4 --gpu-id 0"),
    "optimize-inverse-deformations": f"optimize-inverse-deformations {JOB} --n-epochs 200 "
                                     "--gpu-id 0",
    "deformable-backprojection": f"deformable-backprojection {JOB} --batch-size 10 --gpu-id 0",
    "explore-latent-space": f"explore-latent-space {JOB} --half-set 1 --gpu-id 0",
}
ADDITIONAL = "--n-epochs 4 --n-map-fit-steps 20 --save-deformations"


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def parse(line: str):
    return build_parser().parse_args(shlex.split(line))


def messages(args):
    return ignored_option_warnings(args, args.command) + repeated_with_different_values(args)


@pytest.mark.parametrize("task", RELION5_TASKS)
def test_every_task_accepts_the_additional_arguments(task):
    line = f"{TASK_LINES[task]} {ADDITIONAL}  --pipeline-control {JOB}"
    args = parse(line)
    assert args.command == task and args.pipeline_control == JOB
    lines = messages(args)
    for option in ("--n-epochs 4", "--n-map-fit-steps 20", "--save-deformations"):
        name = option.split()[0].replace("--", "").replace("-", "_")
        if hasattr(args, name):
            assert not any(f"ignores {option}" in m for m in lines), (task, option)
        else:
            assert any(m.startswith(f"{task} ignores {option}: an option of ") for m in lines)


def test_forward_uses_the_appended_epochs():
    args = parse(f"{TASK_LINES['optimize-deformations']} {ADDITIONAL}")
    assert (args.n_epochs, args.n_map_fit_steps) == (4, 20)
    assert messages(args) == [(
        "optimize-deformations ignores --save-deformations: an option of "
        "optimize-inverse-deformations only (RELION-5 appends its Additional arguments to "
        "every task)")]


def test_inverse_gets_its_epochs_twice_and_the_last_one_wins():
    args = parse(f"optimize-inverse-deformations {JOB} --n-epochs 5 --n-epochs 4")
    assert args.n_epochs == 4
    assert messages(args) == [(
        "--n-epochs given 2 times with different values (--n-epochs 5, --n-epochs 4): "
        "the last one, 4, is used")]


def test_the_same_value_twice_is_no_news():
    args = parse(f"optimize-inverse-deformations {JOB} --n-epochs 4 --n-epochs 4")
    assert messages(args) == []


def test_backprojection_names_where_the_option_belongs():
    args = parse(f"{TASK_LINES['deformable-backprojection']} --n-epochs 4")
    assert not hasattr(args, "n_epochs")
    assert messages(args) == [(
        "deformable-backprojection ignores --n-epochs 4: an option of optimize-deformations "
        "and optimize-inverse-deformations only (RELION-5 appends its Additional arguments to "
        "every task)")]


@pytest.mark.parametrize("task", RELION5_TASKS)
def test_every_option_of_every_other_task_is_accepted(task):
    """Each option string of another task, with a value if it takes one."""
    parser = build_parser()
    own = parser.commands[task]
    for other in RELION5_TASKS:
        for action in parser.commands[other]._actions:
            if not action.option_strings or action.dest.startswith("_other_task") or \
                    action.dest == "help":
                continue
            for option in action.option_strings:
                value = [] if action.nargs == 0 else [_example(action)]
                base = shlex.split(TASK_LINES[task])
                own.parse_args([*base[1:], option, *value])  # CommandLineError if refused


def _example(action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "1"
    if isinstance(action.default, str):  # e.g. a colouring name
        return action.default
    return "1,0" if action.dest in ("point", "movie_from", "movie_to") else "x"


def test_unknown_options_are_still_refused(capsys):
    assert cli.main(shlex.split(f"{TASK_LINES['explore-latent-space']} --n-epochz 4")) == 2
    assert "unrecognized arguments: --n-epochz 4" in capsys.readouterr().err


def test_warnings_go_to_run_out(tmp_path, capsys):
    """The warnings are logged (stdout: RELION's run.out) before the command runs."""
    argv = ["deformable-backprojection", str(tmp_path), "--n-epochs", "4", "--batch-size", "10",
            "--batch-size", "20"]
    assert cli.main(argv) == 1  # no forward run in tmp_path: an input error, after the warnings
    out = capsys.readouterr().out
    assert ("warning: deformable-backprojection ignores --n-epochs 4: an option of "
            "optimize-deformations and optimize-inverse-deformations only") in out
    assert ("warning: --batch-size given 2 times with different values (--batch-size 10, "
            "--batch-size 20): the last one, 20, is used") in out
