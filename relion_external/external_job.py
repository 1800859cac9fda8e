"""DynaMight as one RELION External job (RELION 3.1, 4 and 5): ``relion_dynamight_external``.

RELION runs, from the project directory (``fn_exe`` = this program)::

  relion_dynamight_external --o External/job012/ --in_parts Refine3D/job010/run_data.star \\
      --in_3dref Refine3D/job010/run_class001.mrc [--in_mask MaskCreate/job011/mask.mrc] \\
      [--<label> <value>]... --j 4 [other args] [--pipeline_control External/job012/]

and this program runs the stages asked for (``--stages``, default all three) in the job folder,
each by calling the ``relion_dynamight`` sub-command's ``main`` in-process:

  forward         optimize-deformations (two half-set VAEs)  -> particles.star, checkpoints
  inverse         optimize-inverse-deformations              -> inverse_deformations/
  backprojection  deformable-backprojection                  -> backprojection/map_half{1,2}.mrc

then writes ``RELION_OUTPUT_NODES.star`` (particles with latent coordinates, the two half maps;
both the RELION 3.1 integer types and the RELION 4/5 labels) and exactly one exit file. The
latent space is explored afterwards, interactively:
``relion_dynamight explore-latent-space External/job012/ --half-set 1``.

Parameters (the Params tab: label = our option name with underscores, value; an empty value with
a label is a bare flag, RELION then passes ``--label`` alone):
  - every ``optimize-deformations`` option: ``n_gaussians``, ``n_epochs``,
    ``regularization_factor``, ``batch_size``, ``initial_threshold``, ``n_warmup_epochs``, ...
    (``mask_file`` here is that command's movable-region mask);
  - ``gpu_id``, ``preload_images``: given to every stage that has them;
  - ``n_inverse_epochs``, ``save_deformations``, ``backprojection_batch_size``, and any other
    option of the later stages as ``inverse_<option>`` / ``backprojection_<option>``;
  - ``stages``: comma list out of forward,inverse,backprojection (consecutive);
    ``redo``: stages to run again although they finished (each may resume from its own
    checkpoints; the stages after it then run again too).
Yes/No (true/false, 1/0) are accepted for flags. ``--in_mask`` is the deformed backprojection's
mask; ``--j`` the number of CPU threads. Unknown arguments stop the job with a list of the known
ones. ``relion_dynamight_external --help`` lists every parameter.

Continue. ``_rlnJobIsContinue 1`` in ``<job>/job.star`` (the Continue button), or results of an
earlier run in the job folder, make the job resume: a stage whose outputs are complete
(``forward_deformations/checkpoints/checkpoint_final.pth`` + ``particles.star``;
``inverse_deformations/inv_chkpt.pth``; ``backprojection/map_half{1,2}.mrc``) is skipped, the
first unfinished one resumes from its checkpoints, and every step is logged. A stage that was
interrupted leaves a marker (``.dynamight_<stage>_incomplete``) so that its partial outputs (an
inverse checkpoint written every epoch, say) are not mistaken for finished ones; running a stage
again marks the stages after it as incomplete, since their results came from the old one.

Abort and failure. Every stage polls ``RELION_JOB_ABORT_NOW`` before each batch (through a
poll-only :class:`~relion_external.job_protocol.PipelineControl`: intermediate stages never write
exit files) and the job then writes ``RELION_JOB_EXIT_ABORTED``. Any error writes
``RELION_JOB_EXIT_FAILURE`` and the traceback plus a one-line message to stderr (``run.err``),
exits non-zero and leaves earlier results and checkpoints in place. SIGTERM (``scancel``, a
queue's time limit) counts as a failure.

What RELION 3.1.3 does with External jobs (measured with ``relion_pipeliner``; the tests in
``tests/test_relion_pipeliner.py`` rerun these checks):
  - It never writes an exit file itself: a program that ends without one, with exit code 0 or
    not, leaves the job Running for ever (``_rlnPipeLineProcessStatus 0``) and
    ``relion_pipeliner --RunJobs`` waiting. Whether the executable's path contains ``relion_``
    only changes the command line (``--pipeline_control <job>/`` is appended), not this. Hence
    this program writes the exit file on every path, argument errors included.
  - Process status numbers in ``default_pipeline.star``: 0 running, 1 scheduled, 2 succeeded,
    3 failed, 4 aborted, taken from whichever exit file the job wrote.
  - Before each run RELION deletes old exit files and ``RELION_JOB_ABORT_NOW``; it does not
    remove the abort file after an abort.
  - ``--RunJobs`` on a job that ran before runs the same command again with ``job.star`` as it
    is: ``_rlnJobIsContinue`` stays 0 unless the GUI's Continue (or an edited job.star) set it,
    hence "results present" also counts as a continue.
  - Parameters arrive as ``--<label> <value>`` in param1..param10 order, before ``--j`` and the
    "additional arguments"; with a queue, ``<qsub> <job>/run_submit.script &`` runs the template
    with XXX...XXX placeholders filled (``XXXextraNXXX`` only where RELION_QSUB_EXTRA_COUNT and
    RELION_QSUB_EXTRAn are set, otherwise left as they are).
  - RELION_OUTPUT_NODES.star with the extra ``_rlnPipeLineNodeTypeLabel`` column is accepted
    (with a warning about the unknown label) and its nodes enter the pipeline with their
    integer types.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .commands import (
    deformable_backprojection,
    optimize_deformations,
    optimize_inverse_deformations,
)
from .errors import InputError
from .job_protocol import JobAborted, PipelineControl, job_is_continue
from .output_nodes import (
    HALF_MAP,
    OUTPUT_NODES_STAR,
    PARTICLES,
    OutputNode,
    node_name,
    write_output_nodes,
)

logger = logging.getLogger(__name__)

PROG = "relion_dynamight_external"
STAGES = ("forward", "inverse", "backprojection")
STAGE_MODULES = {
    "forward": optimize_deformations,
    "inverse": optimize_inverse_deformations,
    "backprojection": deformable_backprojection,
}
STAGE_COMMANDS = {
    "forward": "optimize-deformations",
    "inverse": "optimize-inverse-deformations",
    "backprojection": "deformable-backprojection",
}
# a stage's outputs (relative to the job folder): present and no incomplete-marker = finished
STAGE_OUTPUTS = {
    "forward": ("forward_deformations/checkpoints/checkpoint_final.pth", "particles.star"),
    "inverse": ("inverse_deformations/inv_chkpt.pth",),
    "backprojection": ("backprojection/map_half1.mrc", "backprojection/map_half2.mrc"),
}
_PREFIX = {"forward": "", "inverse": "inverse_", "backprojection": "backprojection_"}
# stage options the job sets from RELION's own arguments: never parameters
_FROM_RELION = {"output_directory", "refinement_star_file", "initial_model", "n_threads",
                "pipeline_control", "checkpoint_file", "help"}
_FROM_RELION_STAGE = {("backprojection", "mask_file")}  # from --in_mask
SHARED = ("gpu_id", "preload_images")  # one parameter for every stage that has the option
# short names of the later stages' main options: label -> (stage, option dest)
ALIASES = {
    "n_inverse_epochs": ("inverse", "n_epochs"),
    "save_deformations": ("inverse", "save_deformations"),
    "backprojection_batch_size": ("backprojection", "batch_size"),
}
_ALIAS_IS_FLAG = {"save_deformations": True}
_YES = {"yes", "y", "true", "t", "1", "on"}
_NO = {"no", "n", "false", "f", "0", "off"}


class UsageError(Exception):
    """Bad arguments or parameters of the External job (no traceback is printed for these)."""


class JobTerminated(Exception):
    """SIGTERM arrived (scancel, a queue's time limit)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting."""

    def error(self, message):
        raise UsageError(message)


# -- parameters -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parameter:
    """One Params-tab label and the stage options it sets."""

    label: str
    targets: tuple[tuple[str, str], ...]  # (stage, option dest)
    flag: bool
    help: str = ""


def stage_actions(stage: str) -> dict[str, argparse.Action]:
    """The argparse actions of a stage command, by dest."""
    parser = _Parser(add_help=False)
    STAGE_MODULES[stage].add_args(parser)
    return {a.dest: a for a in parser._actions}


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def parameters() -> dict[str, Parameter]:
    """Every parameter label the job accepts (from the stage commands' options)."""
    actions = {stage: stage_actions(stage) for stage in STAGES}
    table: dict[str, Parameter] = {}
    for stage in STAGES:
        for dest, action in actions[stage].items():
            if (not action.option_strings or dest in _FROM_RELION or dest in SHARED
                    or (stage, dest) in _FROM_RELION_STAGE):
                continue
            label = _PREFIX[stage] + dest
            table[label] = Parameter(label, ((stage, dest),), _is_flag(action),
                                     f"{STAGE_COMMANDS[stage]} {action.option_strings[0]}"
                                     + (f": {action.help}" if action.help else ""))
    for dest in SHARED:
        targets = tuple((s, dest) for s in STAGES if dest in actions[s])
        flag = (_is_flag(actions[targets[0][0]][dest]) if targets
                else dest == "preload_images")
        table[dest] = Parameter(dest, targets, flag,
                                "every stage that has --" + dest.replace("_", "-"))
    for label, (stage, dest) in ALIASES.items():
        action = actions[stage].get(dest)
        flag = _is_flag(action) if action is not None else _ALIAS_IS_FLAG.get(label, False)
        table[label] = Parameter(label, ((stage, dest),), flag,
                                 f"{STAGE_COMMANDS[stage]} --{dest.replace('_', '-')}")
    return table


# -- the External job's command line ----------------------------------------------------------
@dataclass
class JobOptions:
    """What RELION passed, parsed."""

    job_dir: str  # as given (``External/job012/``): node names are built from it
    in_parts: str | None
    in_3dref: str | None
    in_mask: str | None
    threads: int
    stages: tuple[str, ...]
    redo: frozenset[str]
    values: dict[str, str | bool] = field(default_factory=dict)  # label -> value
    defaulted: tuple[str, ...] = ()  # labels given without a value (stage default kept)


def build_parser(params: dict[str, Parameter] | None = None) -> _Parser:
    params = parameters() if params is None else params
    doc = (__doc__ or "").split("\nContinue.")[0].strip()
    parser = _Parser(prog=PROG, description=doc, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    relion = parser.add_argument_group("arguments RELION's External job passes")
    relion.add_argument("--o", dest="job_dir", required=True, metavar="JOB_DIR",
                        help="the job folder (output directory of every stage)")
    relion.add_argument("--in_parts", default=None, metavar="STAR",
                        help="particles STAR of a consensus refinement")
    relion.add_argument("--in_3dref", "--in_3Dref", dest="in_3dref", default=None,
                        metavar="MRC", help="consensus map")
    relion.add_argument("--in_mask", default=None, metavar="MRC",
                        help="mask for the deformed backprojection")
    for name in ("--in_movies", "--in_mics", "--in_coords"):
        relion.add_argument(name, default=None, help=argparse.SUPPRESS)
    relion.add_argument("--j", dest="threads", type=int, default=1, metavar="N",
                        help="CPU threads")
    relion.add_argument("--pipeline_control", "--pipeline-control", dest="pipeline_control",
                        default=None, metavar="DIR",
                        help="ignored (RELION adds it for programs with relion_ in their path)")
    ours = parser.add_argument_group(
        "DynaMight parameters (--<label> <value> from the Params tab; a bare --<label> is Yes "
        "for flags)")
    ours.add_argument("--stages", nargs="?", const="", default=None,
                      help=f"comma list, consecutive, out of {','.join(STAGES)} (default: all)")
    ours.add_argument("--redo", nargs="?", const="", default=None,
                      help="stages to run again although they finished")
    for label, param in sorted(params.items()):
        names = [f"--{label}"]
        if "_" in label:
            names.append(f"--{label.replace('_', '-')}")
        ours.add_argument(*names, dest=f"param__{label}", nargs="?", const="", default=None,
                          metavar="YES/NO" if param.flag else "VALUE", help=param.help)
    return parser


def _stage_list(text: str | None, what: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None or not text.strip():
        return default
    names = {**{s: s for s in STAGES}, **{c: s for s, c in STAGE_COMMANDS.items()}}
    chosen = []
    for item in text.replace(" ", ",").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item not in names:
            raise UsageError(f"--{what} {text!r}: unknown stage {item!r} "
                             f"(stages: {', '.join(STAGES)})")
        chosen.append(names[item])
    return tuple(s for s in STAGES if s in chosen)


def _flag_value(label: str, text: str) -> bool:
    value = text.strip().lower()
    if value == "" or value in _YES:
        return True
    if value in _NO:
        return False
    raise UsageError(f"--{label} {text!r}: a flag takes Yes or No (or no value, meaning Yes)")


def parse_job_options(argv: Sequence[str],
                      params: dict[str, Parameter] | None = None) -> JobOptions:
    """Parse RELION's command line; :class:`UsageError` for anything unknown or malformed."""
    params = parameters() if params is None else params
    parser = build_parser(params)
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise UsageError(
            f"unknown argument(s): {' '.join(unknown)}. Parameter labels are the option names "
            f"of relion_dynamight's commands with underscores (n_gaussians, n_epochs, ...); "
            f"known labels: stages, redo, {', '.join(sorted(params))}")
    for name in ("in_movies", "in_mics", "in_coords"):
        if getattr(args, name):
            raise UsageError(f"--{name} {getattr(args, name)}: DynaMight does not use "
                             f"{name[3:]}; leave that field of the Input tab empty")
    if args.threads < 1:
        raise UsageError(f"--j {args.threads}: needs at least 1 thread")
    stages = _stage_list(args.stages, "stages", STAGES)
    if not stages:
        raise UsageError("--stages: no stage given")
    index = [STAGES.index(s) for s in stages]
    if index != list(range(index[0], index[-1] + 1)):
        raise UsageError(f"--stages {args.stages}: the stages must follow each other "
                         f"({' -> '.join(STAGES)}); {', '.join(stages)} leaves a gap")
    redo = frozenset(_stage_list(args.redo, "redo", ()))
    values: dict[str, str | bool] = {}
    defaulted = []
    for label, param in params.items():
        text = getattr(args, f"param__{label}")
        if text is None:
            continue
        if param.flag:
            values[label] = _flag_value(label, text)
        elif text.strip() == "":
            defaulted.append(label)
        else:
            values[label] = text.strip()
    return JobOptions(job_dir=args.job_dir, in_parts=args.in_parts or None,
                      in_3dref=args.in_3dref or None, in_mask=args.in_mask or None,
                      threads=args.threads, stages=stages, redo=redo, values=values,
                      defaulted=tuple(defaulted))


def stage_namespace(stage: str, job: JobOptions,
                    params: dict[str, Parameter] | None = None) -> argparse.Namespace:
    """The argparse Namespace of one stage command for this job (its ``add_args`` defaults plus
    what RELION passed and the parameters aimed at this stage)."""
    params = parameters() if params is None else params
    command = STAGE_COMMANDS[stage]
    parser = _Parser(prog=f"relion_dynamight {command}", add_help=False)
    STAGE_MODULES[stage].add_args(parser)
    actions = {a.dest: a for a in parser._actions}
    values: dict[str, object] = {"output_directory": job.job_dir}
    if stage == "forward":
        if not job.in_parts:
            raise UsageError("no input particles (--in_parts): select the consensus "
                             "refinement's particles on the Input tab")
        values["refinement_star_file"] = job.in_parts
        if job.in_3dref:
            values["initial_model"] = job.in_3dref
    if "n_threads" in actions:
        values["n_threads"] = job.threads
    if stage == "backprojection" and job.in_mask:
        if "mask_file" in actions:
            values["mask_file"] = job.in_mask
        else:
            logger.warning("%s has no --mask-file: --in_mask %s not used", command, job.in_mask)
    for label, value in job.values.items():
        for target_stage, dest in params[label].targets:
            if target_stage != stage:
                continue
            if dest not in actions:
                raise UsageError(f"--{label}: relion_dynamight {command} has no option "
                                 f"--{dest.replace('_', '-')}")
            values[dest] = value
    positionals: list[str] = []
    options: list[str] = []
    for dest, value in values.items():
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"relion_dynamight {command} has no option for {dest}")
        if not action.option_strings:
            positionals.append(str(value))
        elif _is_flag(action):
            if value:
                options.append(action.option_strings[0])
        else:
            options += [action.option_strings[0], str(value)]
    try:
        return parser.parse_args(positionals + options)
    except UsageError as err:
        raise UsageError(f"relion_dynamight {command} {' '.join(positionals + options)}: "
                         f"{err}") from None


# -- stages: finished, planned, run -----------------------------------------------------------
def incomplete_marker(job_dir: str | Path, stage: str) -> Path:
    """Present while a stage runs and after it was interrupted."""
    return Path(job_dir) / f".dynamight_{stage}_incomplete"


def stage_finished(job_dir: str | Path, stage: str) -> tuple[bool, str]:
    """``(finished, why)`` from the stage's outputs and its incomplete-marker."""
    job_dir = Path(job_dir)
    missing = [name for name in STAGE_OUTPUTS[stage] if not (job_dir / name).is_file()]
    if missing:
        return False, f"no {missing[0]}"
    if incomplete_marker(job_dir, stage).exists():
        return False, "an earlier run of this stage did not complete"
    return True, ", ".join(STAGE_OUTPUTS[stage]) + " present"


def _has_results(job_dir: Path) -> bool:
    checkpoints = job_dir / "forward_deformations" / "checkpoints"
    return ((checkpoints.is_dir() and any(checkpoints.glob("*.pth")))
            or any((job_dir / name).exists() for outputs in STAGE_OUTPUTS.values()
                   for name in outputs))


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    run: bool
    reason: str


def plan_stages(job_dir: str | Path, stages: Sequence[str],
                redo: frozenset[str] = frozenset()) -> list[PlannedStage]:
    """Which of ``stages`` run and why; the stages before them must have finished."""
    for earlier in STAGES[:STAGES.index(stages[0])]:
        finished, why = stage_finished(job_dir, earlier)
        if not finished:
            raise UsageError(f"--stages {','.join(stages)}: the {earlier} stage "
                             f"({STAGE_COMMANDS[earlier]}) has not finished in {job_dir} "
                             f"({why}); add {earlier} to --stages")
    plan, running = [], False
    for stage in stages:
        finished, why = stage_finished(job_dir, stage)
        if running and finished:
            plan.append(PlannedStage(stage, True, "finished earlier, but runs again: an earlier "
                                     "stage runs in this job"))
        elif running:
            plan.append(PlannedStage(stage, True, why))
        elif stage in redo:
            plan.append(PlannedStage(stage, True, "redo asked for"
                                     + ("" if finished else f" ({why})")))
        elif finished:
            plan.append(PlannedStage(stage, False, f"finished earlier ({why})"))
        else:
            plan.append(PlannedStage(stage, True, why))
        running = running or plan[-1].run
    return plan


def _run_stage(stage: str, args: argparse.Namespace, job_dir: Path,
               control: PipelineControl) -> None:
    marker = incomplete_marker(job_dir, stage)
    marker.touch()
    for later in STAGES[STAGES.index(stage) + 1:]:
        if any((job_dir / name).exists() for name in STAGE_OUTPUTS[later]):
            incomplete_marker(job_dir, later).touch()  # made from the old results
    STAGE_MODULES[stage].main(args, control)
    marker.unlink()


def _output_nodes(job_dir: str) -> list[OutputNode]:
    nodes = []
    if stage_finished(job_dir, "forward")[0]:
        nodes.append(OutputNode(node_name(job_dir, "particles.star"), PARTICLES))
    if stage_finished(job_dir, "backprojection")[0]:
        nodes += [OutputNode(node_name(job_dir, name), HALF_MAP)
                  for name in STAGE_OUTPUTS["backprojection"]]
    return nodes


def run_job(job: JobOptions, control: PipelineControl, params: dict[str, Parameter],
            status: dict) -> None:
    """Run the planned stages and write the output nodes (not the exit file)."""
    import torch

    job_dir = Path(job.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(job.threads)
    logger.info("DynaMight External job in %s: stages %s; particles %s, consensus map %s, "
                "mask %s, %d thread(s)", job.job_dir, ",".join(job.stages), job.in_parts,
                job.in_3dref, job.in_mask, job.threads)
    if job.values:
        logger.info("parameters: %s",
                    ", ".join(f"{k}={v}" for k, v in sorted(job.values.items())))
    for label in job.defaulted:
        logger.info("parameter %s given without a value: the command's default is used", label)
    is_continue = job_is_continue(job_dir)
    has_results = _has_results(job_dir)
    if is_continue and has_results:
        logger.info("continuing the job (_rlnJobIsContinue 1): finished stages are skipped, "
                    "an unfinished one resumes from its checkpoints")
    elif is_continue:
        logger.info("continue asked for, but %s holds no results yet: starting from the "
                    "beginning", job.job_dir)
    elif has_results:
        logger.warning("%s holds results of an earlier run although this is not a continue "
                       "(_rlnJobIsContinue %s): continuing from them, not starting over; use a "
                       "new job to start afresh", job.job_dir,
                       "0" if is_continue is False else "not found")
    plan = plan_stages(job_dir, job.stages, job.redo)
    # build every stage's arguments first: a bad parameter fails now, not after hours
    namespaces = {p.stage: stage_namespace(p.stage, job, params) for p in plan if p.run}
    t_job = time.time()
    for number, step in enumerate(plan, start=1):
        control.check_abort()
        head = f"stage {number}/{len(plan)} {step.stage} ({STAGE_COMMANDS[step.stage]})"
        if not step.run:
            logger.info("%s: skipped, %s (redo=%s runs it again)", head, step.reason, step.stage)
            continue
        resumes = (step.stage == "forward"
                   and any((job_dir / "forward_deformations" / "checkpoints").glob("*.pth")))
        logger.info("%s: %s (%s)", head,
                    "resumes from its checkpoints" if resumes else "runs", step.reason)
        status["stage"] = step.stage
        t0 = time.time()
        _run_stage(step.stage, namespaces[step.stage], job_dir, control.poll_only())
        status["stage"] = None
        logger.info("%s: finished in %.0f s", head, time.time() - t0)
    write_output_nodes(job_dir, _output_nodes(job.job_dir))
    logger.info("DynaMight External job finished in %.0f s; explore the latent space with: "
                "relion_dynamight explore-latent-space %s --half-set 1",
                time.time() - t_job, job.job_dir)


# -- entry point ------------------------------------------------------------------------------
def _job_dir_from_argv(argv: Sequence[str]) -> str | None:
    """``--o`` read without the full parser, so even an argument error gets its exit file."""
    for i, arg in enumerate(argv):
        if arg == "--o" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--o="):
            return arg[len("--o="):]
    return None


def _raise_terminated(signum, frame):
    raise JobTerminated(f"received signal {signum} (SIGTERM: scancel or a queue time limit?)")


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    configure_logging()
    job_dir = _job_dir_from_argv(argv)
    control = PipelineControl(job_dir)
    status: dict = {"stage": None}
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_terminated)
    logger.info("%s %s", PROG, shlex.join(argv))

    def fail(kind: str, message: str, *, with_traceback: bool) -> None:
        where = (f" in stage {status['stage']} ({STAGE_COMMANDS[status['stage']]})"
                 if status["stage"] else "")
        if with_traceback:
            traceback.print_exc(file=sys.stderr)
        line = f"{PROG}: {kind}{where}: {message}"
        print(line, file=sys.stderr, flush=True)
        logger.error("%s", line)
        control.finish("aborted" if kind == "aborted" else "failure")

    try:
        if job_dir is not None:
            Path(job_dir).mkdir(parents=True, exist_ok=True)
        control.clear_previous_exit_status()
        if job_dir is not None:  # describes the outcome of this run only
            (Path(job_dir) / OUTPUT_NODES_STAR).unlink(missing_ok=True)
        params = parameters()
        job = parse_job_options(argv, params)
        run_job(job, control, params, status)
    except JobAborted as err:
        fail("aborted", str(err), with_traceback=False)
        return 2
    except UsageError as err:
        fail("argument error", str(err), with_traceback=False)
        return 1
    except InputError as err:
        fail("input error", str(err), with_traceback=True)
        return 1
    except BaseException as err:  # noqa: BLE001 - report everything, then fail the job
        fail("failed", f"{type(err).__name__}: {err}", with_traceback=True)
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    control.finish("success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
