"""The ``dynamight`` (and ``relion_dynamight``) command: one sub-command per pipeline stage.

Each command module exposes ``add_args(parser)`` and ``main(args)``. This entry point configures
logging (line by line on stdout, so RELION's ``run.out`` shows progress as it happens), turns bad
input, damaged checkpoints and outputs that cannot be written (disk full, folder not
writable) into a one-line error, prints full tracebacks for anything else, and writes RELION's
exit-status file when ``--pipeline-control`` is given: on every way out, a bad command line
(found before parsing), ``--help``, SIGTERM and SIGHUP included, with a one-line reason as the
last line of stderr (``run.err``). The tasks of RELION-5's DynaMight job accept each other's
options and ignore the foreign ones with a warning (:mod:`relion_external.appended_options`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import traceback

from dynamight_core.checkpoint_file import CheckpointError, CheckpointWriteError

from . import launch
from .appended_options import RELION5_TASKS, accept_options_of_other_tasks, ignored_option_warnings
from .argument_parser import (
    ArgumentParser,
    CommandLineError,
    repeated_with_different_values,
    show_defaults,
)
from .commands import (
    deformable_backprojection,
    demo,
    explore_latent_space,
    optimize_deformations,
    optimize_inverse_deformations,
    reconstruct,
    simulate,
)
from .errors import InputError, adapter_error
from .job_protocol import (
    JobAborted,
    PipelineControl,
    pipeline_control_from_argv,
    signals_raise_terminated,
)

logger = logging.getLogger(__name__)
PROG = "dynamight"

COMMANDS = {
    "simulate": simulate,
    "reconstruct": reconstruct,
    "demo": demo,
    "optimize-deformations": optimize_deformations,
    "optimize-inverse-deformations": optimize_inverse_deformations,
    "deformable-backprojection": deformable_backprojection,
    "explore-latent-space": explore_latent_space,
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="DynaMight for RELION: deformations of a Gaussian model per particle, "
                    "inverse deformations and deformed backprojection into two half maps.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, module in COMMANDS.items():
        doc = (module.__doc__ or "").strip()
        # no abbreviations (as the reference DynaMight): a misspelt option fails, and it
        # cannot silently become one of the other tasks' options that are ignored here
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
        module.add_args(p)
        if not any(a.dest == "pipeline_control" for a in p._actions):
            p.add_argument("--pipeline-control", "--pipeline_control", dest="pipeline_control",
                           default=None, metavar="DIR",
                           help="RELION job folder: write exit-status files there and stop "
                                "when RELION_JOB_ABORT_NOW appears")
        show_defaults(p)
        p.set_defaults(_module=module)
        parsers[name] = p
    accept_options_of_other_tasks({name: parsers[name] for name in RELION5_TASKS})
    parser.commands = parsers  # for the usage of the command at fault
    return parser


class _CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (not the stream of the
    moment the handler was made, which a caller or a test harness may have closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(verbose: bool = False) -> None:
    handler = _CurrentStdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # several processes (launch): only rank 0 reports progress
    quiet = os.environ.get("RANK", "0") not in ("", "0")
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def _command_name(argv: list[str]) -> str:
    """``dynamight <command>`` for messages, from the raw arguments."""
    return f"{PROG} {argv[0]}" if argv and argv[0] in COMMANDS else PROG


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    # the job folder comes from the raw arguments: a bad command line gets its exit file too
    control = PipelineControl(pipeline_control_from_argv(argv),
                              write_exit_files=not launch.is_worker())
    name = _command_name(argv)

    def fail(kind: str, message: str, status: str = "failure") -> None:
        print(f"{name}: {kind}: {message}", file=sys.stderr, flush=True)  # run.err's last line
        control.finish(status)

    with signals_raise_terminated():
        try:
            control.clear_previous_exit_status()
            parser = build_parser()
            args = parser.parse_args(argv)
            if control.folder is not None:  # run.out starts with the command line
                logger.info("%s %s", PROG, shlex.join(argv))
            for line in (ignored_option_warnings(args, args.command)
                         + repeated_with_different_values(args)):
                logger.warning("warning: %s", line)
            if launch.needed(args):
                launch.launch(launch.wanted(args), argv)
            else:
                args._module.main(args, control)
        except SystemExit as err:  # --help (argparse prints it, then exits with 0)
            if err.code not in (0, None):
                fail("failed", f"exit code {err.code}")
                return int(err.code) if isinstance(err.code, int) else 1
            control.finish("success")
            return 0
        except CommandLineError as err:
            command = parser.commands.get(argv[0]) if name != PROG else None
            print(command.format_usage() if command else err.usage, end="", file=sys.stderr)
            fail("argument error", f"{err} (see {name} --help)")
            return 2
        except JobAborted as err:
            fail("aborted", str(err), "aborted")
            return 2
        except launch.WorkersFailed as err:
            if control.abort_requested():
                fail("aborted", "RELION_JOB_ABORT_NOW found: stopped", "aborted")
                return 2
            fail("failed", str(err))
            return 1
        except (InputError, CheckpointError, CheckpointWriteError) as err:
            error = adapter_error(err)
            fail(error.label, str(error))
            return 1
        except BaseException as err:  # noqa: BLE001 - report everything, then fail the job
            traceback.print_exc(file=sys.stderr)
            fail("failed", f"{type(err).__name__}: {err}")
            return 130 if isinstance(err, KeyboardInterrupt) else 1
    control.finish("success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
