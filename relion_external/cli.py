"""The ``dynamight`` (and ``relion_dynamight``) command: one sub-command per pipeline stage.

Each command module exposes ``add_args(parser)`` and ``main(args)``. This entry point configures
logging (line by line on stdout, so RELION's ``run.out`` shows progress as it happens), turns bad
input, damaged checkpoints and outputs that cannot be written (disk full, folder not writable)
into a one-line error, prints full tracebacks for anything else, and writes RELION's exit-status
file when ``--pipeline-control`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from dynamight_core.checkpoint_file import CheckpointError, CheckpointWriteError

from .commands import (
    deformable_backprojection, demo, explore_latent_space, optimize_deformations,
    optimize_inverse_deformations, reconstruct, simulate)
from .errors import InputError, adapter_error
from .job_protocol import JobAborted, PipelineControl

COMMANDS = {
    "simulate": simulate,
    "reconstruct": reconstruct,
    "demo": demo,
    "optimize-deformations": optimize_deformations,
    "optimize-inverse-deformations": optimize_inverse_deformations,
    "deformable-backprojection": deformable_backprojection,
    "explore-latent-space": explore_latent_space,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamight",
        description="DynaMight for RELION: deformations of a Gaussian model per particle, "
                    "inverse deformations and deformed backprojection into two half maps.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        if not any(a.dest == "pipeline_control" for a in p._actions):
            p.add_argument("--pipeline-control", "--pipeline_control", dest="pipeline_control",
                           default=None, metavar="DIR",
                           help="RELION job folder: write exit-status files there and stop "
                                "when RELION_JOB_ABORT_NOW appears")
        p.set_defaults(_module=module)
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
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    control = PipelineControl(args.pipeline_control)
    control.clear_previous_exit_status()
    try:
        args._module.main(args, control)
    except JobAborted as err:
        print(f"dynamight {args.command}: aborted: {err}", file=sys.stderr, flush=True)
        control.finish("aborted")
        return 2
    except (InputError, CheckpointError, CheckpointWriteError) as err:
        error = adapter_error(err)
        print(f"dynamight {args.command}: {error.label}: {error}", file=sys.stderr, flush=True)
        control.finish("failure")
        return 1
    except BaseException as err:  # noqa: BLE001 - report everything, then fail the job
        traceback.print_exc(file=sys.stderr)
        print(f"dynamight {args.command}: failed: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
        control.finish("failure")
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    control.finish("success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
