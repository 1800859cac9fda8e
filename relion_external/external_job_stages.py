"""Stage bookkeeping of the External job for continue: which stages finished, which run.

A stage has finished when its outputs (:data:`STAGE_OUTPUTS`, relative to the job folder) are
present and its incomplete-marker (:func:`incomplete_marker`) is not; :func:`plan_stages` decides
from that, and from ``redo``, which of the asked-for stages run and why.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .external_job_args import STAGE_COMMANDS, STAGES, UsageError

logger = logging.getLogger(__name__)

# a stage's outputs (relative to the job folder): present and no incomplete-marker = finished
STAGE_OUTPUTS = {
    "forward": ("forward_deformations/checkpoints/checkpoint_final.pth", "particles.star"),
    "inverse": ("inverse_deformations/inv_chkpt.pth",),
    "backprojection": ("backprojection/map_half1.mrc", "backprojection/map_half2.mrc"),
}


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
    # a damaged checkpoint (truncated: disk full, a bad copy) is not a finished stage: the
    # stage runs again and continues from its newest intact checkpoint
    damaged = [name for name in STAGE_OUTPUTS[stage]
               if name.endswith(".pth") and not zipfile.is_zipfile(job_dir / name)]
    if damaged:
        return False, f"{damaged[0]} is damaged (not a complete checkpoint archive)"
    return True, ", ".join(STAGE_OUTPUTS[stage]) + " present"


def has_earlier_results(job_dir: Path) -> bool:
    """Any checkpoint or output of an earlier run in the job folder."""
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
