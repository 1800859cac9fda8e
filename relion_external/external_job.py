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
queue's time limit) and SIGHUP count as failures.

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
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from dynamight_core.checkpoint_file import CheckpointError, CheckpointWriteError

from .errors import InputError, adapter_error
from .external_job_args import (
    PROG,
    STAGE_COMMANDS,
    STAGE_MODULES,
    STAGES,
    JobOptions,
    Parameter,
    UsageError,
    build_parser,
    parameters,
    parse_job_options,
    stage_namespace,
)
from .external_job_stages import (
    STAGE_OUTPUTS,
    has_earlier_results,
    incomplete_marker,
    plan_stages,
    stage_finished,
)
from .job_protocol import (
    JobAborted,
    PipelineControl,
    job_is_continue,
    signals_raise_terminated,
)
from .output_nodes import (
    HALF_MAP,
    OUTPUT_NODES_STAR,
    PARTICLES,
    OutputNode,
    node_name,
    write_output_nodes,
)

logger = logging.getLogger(__name__)

# ``--help``: this docstring up to the continue/abort details
HELP_DESCRIPTION = (__doc__ or "").split("\nContinue.")[0].strip()


# -- running the stages --------------------------------------------------------------------
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
    has_results = has_earlier_results(job_dir)
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


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser(description=HELP_DESCRIPTION).print_help()
        return 0
    configure_logging()
    job_dir = _job_dir_from_argv(argv)
    control = PipelineControl(job_dir)
    status: dict = {"stage": None}
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

    with signals_raise_terminated():
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
        except (InputError, CheckpointError, CheckpointWriteError) as err:
            error = adapter_error(err)
            fail(error.label, str(error), with_traceback=True)
            return 1
        except BaseException as err:  # noqa: BLE001 - report everything, then fail the job
            fail("failed", f"{type(err).__name__}: {err}", with_traceback=True)
            return 130 if isinstance(err, KeyboardInterrupt) else 1
    control.finish("success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
