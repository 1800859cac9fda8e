"""The External job's command line: RELION's arguments and our Params-tab parameters.

RELION passes ``--o``, ``--in_parts``, ``--in_3dref``, ``--in_mask``, ``--j`` (and
``--pipeline_control``) plus every Params-tab row as ``--<label> <value>``. The labels are the
options of the stage commands (``relion_dynamight``'s sub-commands), so they are read from those
commands' ``add_args``: :func:`parameters` builds the table, :func:`parse_job_options` parses a
command line into :class:`JobOptions`, and :func:`stage_namespace` turns it into one stage
command's argparse Namespace. Anything unknown or malformed raises :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .commands import (
    deformable_backprojection,
    optimize_deformations,
    optimize_inverse_deformations,
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


def build_parser(params: dict[str, Parameter] | None = None,
                 description: str | None = None) -> _Parser:
    """The job's parser; ``description`` heads ``--help`` (the entry point passes its own)."""
    params = parameters() if params is None else params
    parser = _Parser(prog=PROG, description=description, allow_abbrev=False,
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
