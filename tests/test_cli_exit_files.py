"""Under ``--pipeline-control``, every way ``dynamight`` ends leaves exactly one RELION exit file
and a one-line reason as the last line of stderr (RELION's run.err): a bad command line (which
argparse would end with code 2 and no exit file, leaving the job Running for ever), ``--help``,
an input error, a crash, an abort request, SIGTERM and SIGHUP."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relion_external import cli
from relion_external.errors import InputError
from relion_external.job_protocol import pipeline_control_from_argv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging():
    """``cli.main`` points the root logger at the sys.stdout of the moment (capsys's)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def exit_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("RELION_JOB_EXIT_*"))


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


@pytest.fixture
def job(tmp_path) -> Path:
    folder = tmp_path / "DynaMight" / "job012"
    folder.mkdir(parents=True)
    (folder / "RELION_JOB_EXIT_SUCCESS").touch()  # of an earlier run: must not survive
    return folder


@pytest.fixture
def failing_command(monkeypatch):
    """Makes ``deformable-backprojection``'s main run a given function instead."""
    def use(function):
        module = cli.COMMANDS["deformable-backprojection"]
        monkeypatch.setattr(module, "main", function)
    return use


@pytest.mark.parametrize("spelling", [["--pipeline-control", "J"], ["--pipeline_control", "J"],
                                      ["--pipeline-control=J"], ["--pipeline_control=J"]])
def test_pipeline_control_is_found_without_a_parser(spelling):
    argv = ["optimize-inverse-deformations", "D/", "--n-epochs", "4", "--bogus", *spelling]
    assert pipeline_control_from_argv(argv) == "J"


def test_no_pipeline_control_or_no_value():
    assert pipeline_control_from_argv(["explore-latent-space", "D/", "--half-set", "1"]) is None
    assert pipeline_control_from_argv(["x", "--pipeline-control"]) is None
    assert pipeline_control_from_argv(["x", "--pipeline-control", "--half-set", "1"]) is None


@pytest.mark.parametrize("bad", [
    ["--n-epoch", "4"],  # a misspelt option
    ["--batch-size", "many"],  # a value of the wrong type
    ["--half-set"],  # an option without its value
])
def test_bad_command_line_fails_the_job_with_one_line(job, capsys, bad):
    argv = ["deformable-backprojection", str(job), *bad, "--pipeline-control", str(job)]
    assert cli.main(argv) == 2
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    err = capsys.readouterr().err
    assert last_line(err).startswith("dynamight deformable-backprojection: argument error: ")
    assert "usage: dynamight deformable-backprojection" in err


def test_unknown_command_fails_the_job(job, capsys):
    assert cli.main(["optimise-deformations", "--pipeline-control", str(job)]) == 2
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    line = last_line(capsys.readouterr().err)
    assert line.startswith("dynamight: argument error: argument COMMAND: invalid choice: "
                           "'optimise-deformations'")


def test_missing_required_option_fails_the_job(job, capsys):
    argv = ["optimize-deformations", "--output-directory", str(job), "--pipeline-control",
            str(job)]
    assert cli.main(argv) == 2
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    assert "--refinement-star-file" in last_line(capsys.readouterr().err)


def test_help_ends_the_job_as_succeeded(job, capsys):
    assert cli.main(["explore-latent-space", "--help", "--pipeline-control", str(job)]) == 0
    assert exit_files(job) == ["RELION_JOB_EXIT_SUCCESS"]
    assert "--half-set" in capsys.readouterr().out


def test_without_pipeline_control_no_exit_file_is_written(tmp_path, capsys):
    assert cli.main(["deformable-backprojection", str(tmp_path), "--n-epoch", "4"]) == 2
    assert exit_files(tmp_path) == []
    assert "argument error: unrecognized arguments: --n-epoch 4" in capsys.readouterr().err


def test_input_error_crash_and_abort(job, capsys, failing_command):
    argv = ["deformable-backprojection", str(job), "--pipeline-control", str(job)]

    def input_error(args, control):
        raise InputError(Path("x.star"), "rlnImageName", "missing", "Give it.")
    failing_command(input_error)
    assert cli.main(argv) == 1
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    line = last_line(capsys.readouterr().err)
    assert line.startswith("dynamight deformable-backprojection: input error: ")
    assert "x.star" in line and "rlnImageName" in line

    def crash(args, control):
        raise ZeroDivisionError("boom")
    failing_command(crash)
    assert cli.main(argv) == 1
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert last_line(err) == ("dynamight deformable-backprojection: failed: "
                              "ZeroDivisionError: boom")

    def aborted(args, control):
        (job / "RELION_JOB_ABORT_NOW").touch()
        control.check_abort()
    failing_command(aborted)
    assert cli.main(argv) == 2
    assert exit_files(job) == ["RELION_JOB_EXIT_ABORTED"]
    assert "aborted" in last_line(capsys.readouterr().err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_fails_the_job_and_restores_the_handler(job, capsys, failing_command, signum):
    def killed(args, control):
        os.kill(os.getpid(), signum)
    failing_command(killed)
    before = signal.getsignal(signum)
    assert cli.main(["deformable-backprojection", str(job), "--pipeline-control", str(job)]) == 1
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    line = last_line(capsys.readouterr().err)
    assert line.startswith("dynamight deformable-backprojection: failed: JobTerminated: "
                           f"received {signal.Signals(signum).name}")
    assert signal.getsignal(signum) is before


def test_bad_option_as_relion_runs_it(tmp_path):
    """The whole program in a subprocess, output redirected as RELION does."""
    job = tmp_path / "DynaMight" / "job003"
    job.mkdir(parents=True)
    with open(job / "run.out", "w") as out, open(job / "run.err", "w") as err:
        done = subprocess.run(
            [sys.executable, "-m", "relion_external.cli", "explore-latent-space",
             "DynaMight/job003/", "--half-set", "1", "--n-epoch", "4", "--pipeline-control",
             "DynaMight/job003/"], cwd=tmp_path, stdout=out, stderr=err, timeout=120,
            check=False, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert exit_files(job) == ["RELION_JOB_EXIT_FAILURE"]
    assert last_line((job / "run.err").read_text()) == (
        "dynamight explore-latent-space: argument error: unrecognized arguments: --n-epoch 4 "
        "(see dynamight explore-latent-space --help)")

