"""The External job entry point (``relion_dynamight_external``) without RELION: command line,
stage arguments, the stage plan on continue, exit files, output nodes and the job templates.

The orchestration tests run fake stage commands (they write the outputs a real stage writes), so
they take milliseconds; ``tests/test_relion_pipeliner.py`` runs the real stages under the real
``relion_pipeliner``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch

from relion_external import external_job as ej
from relion_external import external_job_args as ja
from relion_external import external_job_stages as js
from relion_external.job_protocol import (
    ABORT_REQUEST,
    EXIT_FILES,
    PipelineControl,
    exit_status,
    job_is_continue,
)
from relion_external.output_nodes import (
    DYNAMIGHT_HALF_MAP,
    HALF_MAP,
    PARTICLES,
    OutputNode,
    dynamight_output_nodes,
    node_name,
    read_output_nodes,
    write_output_nodes,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "job_templates"
TEMPLATE_31 = TEMPLATES / "dynamight_external_relion31_job.star"
TEMPLATE_5 = TEMPLATES / "dynamight_external_relion5_job.star"
SLURM_TEMPLATE = TEMPLATES / "slurm_dynamight.sh"

# the command line RELION 3.1.3 built for an External job (relion_pipeliner, note.txt): two
# spaces before --j (a bare flag), other_args appended, --pipeline_control for relion_ programs
RELION31_ARGV = shlex.split(
    "--o External/job006/ --in_parts Import/job001/particles.star "
    "--in_3dref Simulated/consensus_map.mrc --n_gaussians 50 --preload_images  --j 3  "
    "--pipeline_control External/job006/")


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` configures the root logger (stdout handler) as an entry point does: undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# -- job_protocol ------------------------------------------------------------------------------
def test_poll_only_control_polls_but_never_writes_exit_files(tmp_path):
    control = PipelineControl(tmp_path).poll_only()
    control.finish("success")
    control.clear_previous_exit_status()
    assert exit_status(tmp_path) is None
    control.check_abort()
    (tmp_path / ABORT_REQUEST).touch()
    with pytest.raises(ej.JobAborted):
        control.check_abort()
    assert (tmp_path / ABORT_REQUEST).exists()  # a poll-only control leaves it alone


def test_finish_writes_exactly_one_exit_file(tmp_path):
    control = PipelineControl(tmp_path)
    control.finish("failure")
    control.finish("aborted")
    assert exit_status(tmp_path) == "aborted"
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXIT_FILES["aborted"]]
    with pytest.raises(ValueError, match="unknown exit status"):
        control.finish("done")


def test_job_is_continue_reads_relion31_job_star(fixtures_dir, tmp_path):
    pipeline = fixtures_dir / "relion31_pipeline"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "job.star").write_text((pipeline / "external_job.star").read_text())
    (tmp_path / "cont").mkdir()
    (tmp_path / "cont" / "job.star").write_text((pipeline / "job001_job.star").read_text())
    assert job_is_continue(tmp_path / "new") is False
    assert job_is_continue(tmp_path / "cont") is True
    assert job_is_continue(tmp_path / "missing") is None


# -- output nodes ------------------------------------------------------------------------------
def test_output_nodes_have_both_type_columns(tmp_path):
    job = tmp_path / "External" / "job007"
    (job / "backprojection").mkdir(parents=True)
    assert dynamight_output_nodes(job) == []
    (job / "particles.star").touch()
    (job / "backprojection" / "map_half1.mrc").touch()
    assert [n.type for n in dynamight_output_nodes(job)] == [PARTICLES]  # no lone half map
    (job / "backprojection" / "map_half2.mrc").touch()
    nodes = dynamight_output_nodes(job)
    assert [n.type for n in nodes] == [PARTICLES, HALF_MAP, HALF_MAP]
    write_output_nodes(job, dynamight_output_nodes(job, half_map_type=DYNAMIGHT_HALF_MAP))
    rows = read_output_nodes(job / "RELION_OUTPUT_NODES.star")
    assert [(Path(n).name, t, lab) for n, t, lab in rows] == [
        ("particles.star", 3, "ParticleGroupMetadata.star.relion"),
        ("map_half1.mrc", 10, "DensityMap.mrc.relion.halfmap.dynamight"),
        ("map_half2.mrc", 10, "DensityMap.mrc.relion.halfmap.dynamight")]


def test_node_names_are_relative_to_the_project_as_relion_gave_them():
    assert node_name("External/job012/", "backprojection/map_half1.mrc") == \
        "External/job012/backprojection/map_half1.mrc"
    assert node_name("./External/job012", "particles.star") == "External/job012/particles.star"
    with pytest.raises(ValueError, match="spaces"):
        write_output_nodes("/nonexistent-never-written",
                           [OutputNode("a b.star", PARTICLES)])


# -- command line ------------------------------------------------------------------------------
def test_parses_the_command_line_relion31_builds():
    job = ja.parse_job_options(RELION31_ARGV)
    assert job.job_dir == "External/job006/"
    assert job.in_parts == "Import/job001/particles.star"
    assert job.in_3dref == "Simulated/consensus_map.mrc"
    assert job.threads == 3
    assert job.stages == ja.STAGES
    assert job.values == {"n_gaussians": "50", "preload_images": True}


def test_accepts_relion_spelling_variants_and_yes_no_flags():
    job = ja.parse_job_options(
        ["--o", "J/", "--in_3Dref", "m.mrc", "--pipeline-control", "J/", "--preload_images",
         "No", "--n-gaussians", "7", "--gpu_id", "", "--stages", "forward, inverse"])
    assert job.in_3dref == "m.mrc"
    assert job.values == {"preload_images": False, "n_gaussians": "7"}
    assert job.defaulted == ("gpu_id",)  # a label with an empty value keeps the default
    assert job.stages == ("forward", "inverse")


@pytest.mark.parametrize("argv, message", [
    (["--o", "J/", "--n_gausians", "5"], "unknown argument"),
    (["--o", "J/", "--n_gauss", "5"], "unknown argument"),  # no prefix matching
    (["--o", "J/", "--preload_images", "maybe"], "Yes or No"),
    (["--o", "J/", "--stages", "forward,backprojection"], "gap"),
    (["--o", "J/", "--stages", "forward,reverse"], "unknown stage"),
    (["--o", "J/", "--j", "four"], "--j"),
    (["--o", "J/", "--in_mics", "CtfFind/job003/micrographs_ctf.star"], "does not use"),
    (["--in_parts", "p.star"], "--o"),
])
def test_bad_arguments_are_usage_errors(argv, message):
    with pytest.raises(ja.UsageError, match=message):
        ja.parse_job_options(argv)


def test_forward_arguments_come_from_relion_inputs():
    job = ja.parse_job_options(RELION31_ARGV + ["--gpu_id", "0", "--regularization_factor",
                                                "0.5", "--mask_file", "focus.mrc"])
    args = ja.stage_namespace("forward", job)
    assert args.refinement_star_file == "Import/job001/particles.star"
    assert args.initial_model == "Simulated/consensus_map.mrc"
    assert args.output_directory == "External/job006/"
    assert args.n_threads == 3 and args.n_gaussians == 50 and args.preload_images
    assert args.gpu_id == "0" and args.regularization_factor == 0.5
    assert args.mask_file == "focus.mrc"  # forward's movable-region mask, not --in_mask


def test_forward_needs_input_particles():
    job = ja.parse_job_options(["--o", "J/", "--in_3dref", "m.mrc"])
    with pytest.raises(ja.UsageError, match="no input particles"):
        ja.stage_namespace("forward", job)


def _has_options(stage: str, *dests: str) -> bool:
    actions = ja.stage_actions(stage)
    return all(d in actions for d in dests)


@pytest.mark.skipif(not (_has_options("inverse", "n_epochs", "save_deformations")
                         and _has_options("backprojection", "batch_size", "mask_file")),
                    reason="inverse / backprojection commands are still placeholders")
def test_later_stage_arguments():
    job = ja.parse_job_options(RELION31_ARGV + ["--n_inverse_epochs", "12", "--save_deformations",
                                                "--backprojection_batch_size", "9", "--in_mask",
                                                "mask.mrc", "--gpu_id", "1"])
    inverse = ja.stage_namespace("inverse", job)
    assert inverse.output_directory == "External/job006/"
    assert inverse.n_epochs == 12 and inverse.save_deformations
    assert inverse.gpu_id == "1" and inverse.preload_images
    back = ja.stage_namespace("backprojection", job)
    assert back.batch_size == 9 and back.mask_file == "mask.mrc" and back.gpu_id == "1"


# -- fake stages: the orchestration ------------------------------------------------------------
class FakeStage:
    """Stands in for a stage command: writes that stage's outputs; can fail or abort."""

    def __init__(self, stage: str, log: list):
        self.stage, self.log = stage, log
        self.fail = self.abort = self.terminate = False

    def add_args(self, p) -> None:
        if self.stage == "forward":
            p.add_argument("--refinement-star-file", required=True)
            p.add_argument("--output-directory", required=True)
            p.add_argument("--initial-model", default=None)
            p.add_argument("--n-epochs", type=int, default=50)
        else:
            p.add_argument("output_directory")
            p.add_argument("--n-epochs" if self.stage == "inverse" else "--batch-size",
                           type=int, default=5)
        p.add_argument("--gpu-id", default=None)
        p.add_argument("--n-threads", type=int, default=4)
        p.add_argument("--preload-images", action="store_true")

    def main(self, args, control) -> None:
        self.log.append(self.stage)
        control.finish("success")  # must be a no-op: the job is not finished yet
        out = Path(args.output_directory)
        names = js.STAGE_OUTPUTS[self.stage]
        (out / names[0]).parent.mkdir(parents=True, exist_ok=True)
        (out / names[0]).write_text(self.stage)  # partial output first, as a checkpoint
        if self.abort:
            (out / ABORT_REQUEST).touch()
            control.check_abort()
        if self.fail:
            raise RuntimeError(f"{self.stage} exploded")
        if self.terminate:
            os.kill(os.getpid(), signal.SIGTERM)
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".pth"):  # a checkpoint archive, as torch.save writes one
                torch.save({"stage": self.stage}, out / name)
            else:
                (out / name).write_text(self.stage)


@pytest.fixture
def fake_stages(monkeypatch):
    log: list[str] = []
    fakes = {stage: FakeStage(stage, log) for stage in ja.STAGES}
    for stage, fake in fakes.items():
        monkeypatch.setitem(ja.STAGE_MODULES, stage, fake)
    fakes["log"] = log  # type: ignore[assignment]
    return fakes


def _run(tmp_path, *extra: str) -> int:
    job = tmp_path / "External" / "job003"
    return ej.main(["--o", f"{job}/", "--in_parts", "p.star", "--in_3dref", "m.mrc",
                    "--j", "1", *extra])


def test_runs_all_stages_then_one_exit_file_and_nodes(tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    assert _run(tmp_path, "--n_epochs", "3") == 0
    assert fake_stages["log"] == ["forward", "inverse", "backprojection"]
    assert exit_status(job) == "success"
    rows = read_output_nodes(job / "RELION_OUTPUT_NODES.star")
    assert [(Path(n).relative_to(job).as_posix(), t) for n, t, _ in rows] == [
        ("particles.star", 3), ("backprojection/map_half1.mrc", 10),
        ("backprojection/map_half2.mrc", 10)]
    assert not list(job.glob(".dynamight_*"))
    out = capsys.readouterr().out
    assert "stage 1/3 forward (optimize-deformations): runs" in out


def test_continue_skips_finished_stages_and_resumes_the_first_unfinished(
        tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    fake_stages["inverse"].fail = True
    assert _run(tmp_path) == 1
    assert exit_status(job) == "failure"
    assert not (job / "RELION_OUTPUT_NODES.star").exists()
    # the failed stage left a partial output: it must not pass for finished
    assert (job / js.STAGE_OUTPUTS["inverse"][0]).exists()
    assert js.stage_finished(job, "forward")[0] and not js.stage_finished(job, "inverse")[0]
    err = capsys.readouterr().err
    assert "RuntimeError: inverse exploded" in err and "Traceback" in err
    assert "in stage inverse (optimize-inverse-deformations)" in err

    fake_stages["inverse"].fail = False
    fake_stages["log"].clear()
    (job / "job.star").write_text("data_job\n\n_rlnJobType 99\n_rlnJobIsContinue 1\n")
    assert _run(tmp_path) == 0
    assert fake_stages["log"] == ["inverse", "backprojection"]
    out = capsys.readouterr().out
    assert "continuing the job (_rlnJobIsContinue 1)" in out
    assert "stage 1/3 forward (optimize-deformations): skipped, finished earlier" in out

    fake_stages["log"].clear()
    assert _run(tmp_path, "--redo", "inverse") == 0
    assert fake_stages["log"] == ["inverse", "backprojection"]  # later stages follow a redo
    fake_stages["log"].clear()
    assert _run(tmp_path) == 0
    assert fake_stages["log"] == []
    assert exit_status(job) == "success"


def test_continue_reruns_a_stage_whose_final_checkpoint_is_damaged(
        tmp_path, fake_stages, capsys):
    """A truncated checkpoint_final.pth (disk full, a bad copy) is not a finished forward
    stage: Continue runs it again (it then resumes from its newest intact checkpoint)."""
    job = tmp_path / "External" / "job003"
    assert _run(tmp_path) == 0
    final = job / js.STAGE_OUTPUTS["forward"][0]
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    finished, why = js.stage_finished(job, "forward")
    assert not finished and why == (f"{js.STAGE_OUTPUTS['forward'][0]} is damaged (not a "
                                    "complete checkpoint archive)")
    fake_stages["log"].clear()
    (job / "job.star").write_text("data_job\n\n_rlnJobType 99\n_rlnJobIsContinue 1\n")
    assert _run(tmp_path) == 0
    assert fake_stages["log"] == ["forward", "inverse", "backprojection"]
    assert exit_status(job) == "success"


def test_rerun_of_an_earlier_stage_invalidates_later_results(tmp_path, fake_stages):
    job = tmp_path / "External" / "job003"
    assert _run(tmp_path) == 0
    fake_stages["log"].clear()
    assert _run(tmp_path, "--stages", "forward", "--redo", "forward") == 0
    assert fake_stages["log"] == ["forward"]
    assert not js.stage_finished(job, "inverse")[0]  # made from the old forward result
    rows = read_output_nodes(job / "RELION_OUTPUT_NODES.star")
    assert [t for _, t, _ in rows] == [3]  # the stale half maps are not handed to RELION
    fake_stages["log"].clear()
    assert _run(tmp_path) == 0
    assert fake_stages["log"] == ["inverse", "backprojection"]


def test_later_stages_alone_need_the_earlier_ones_finished(tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    assert _run(tmp_path, "--stages", "inverse,backprojection") == 1
    assert exit_status(job) == "failure"
    assert "add forward to --stages" in capsys.readouterr().err
    assert fake_stages["log"] == []


def test_abort_in_a_stage_writes_the_aborted_exit_file(tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    fake_stages["forward"].abort = True
    assert _run(tmp_path) == 2
    assert exit_status(job) == "aborted"
    assert fake_stages["log"] == ["forward"]
    assert "aborted in stage forward" in capsys.readouterr().err


def test_sigterm_fails_the_job(tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    fake_stages["inverse"].terminate = True
    before = signal.getsignal(signal.SIGTERM)
    assert _run(tmp_path) == 1
    assert exit_status(job) == "failure"
    assert "JobTerminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert js.stage_finished(job, "forward")[0] and not js.stage_finished(job, "inverse")[0]


def test_help_lists_the_parameters(capsys):
    assert ej.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--n_inverse_epochs" in out and "--in_3dref" in out


def test_argument_errors_fail_the_job_without_a_traceback(tmp_path, fake_stages, capsys):
    job = tmp_path / "External" / "job003"
    assert _run(tmp_path, "--n_gausians", "5") == 1
    assert exit_status(job) == "failure"
    err = capsys.readouterr().err
    assert "unknown argument(s): --n_gausians 5" in err and "Traceback" not in err
    assert fake_stages["log"] == []


def test_a_bad_stage_option_fails_before_any_stage_runs(tmp_path, fake_stages, capsys):
    assert _run(tmp_path, "--n_epochs", "many") == 1
    assert "invalid int value" in capsys.readouterr().err
    assert fake_stages["log"] == []


# -- job templates -----------------------------------------------------------------------------
def _read_job_star(path: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    text = path.read_text()
    head, _, loop = text.partition("data_joboptions_values")
    job = dict(re.findall(r"^(_rln\w+)\s+(\S+)\s*$", head, re.MULTILINE))
    rows = [line.split(None, 1) for line in loop.splitlines()
            if line.strip() and not line.startswith(("_", "#", "loop_"))]
    options = {k: v.strip() for k, v in rows}
    version = re.search(r"^# version (\d+)", text, re.MULTILINE).group(1)
    return version, job, options


def test_job_templates_agree_and_use_known_parameters():
    v31, job31, opts31 = _read_job_star(TEMPLATE_31)
    v5, job5, opts5 = _read_job_star(TEMPLATE_5)
    assert (v31, job31) == ("30001", {"_rlnJobType": "99", "_rlnJobIsContinue": "0"})
    assert (v5, job5) == ("50001", {"_rlnJobTypeLabel": "relion.external",
                                    "_rlnJobIsContinue": "0", "_rlnJobIsTomo": "0"})
    assert opts31 == opts5
    expected = {"fn_exe", "in_mov", "in_mic", "in_part", "in_coords", "in_3dref", "in_mask",
                "nr_threads", "do_queue", "queuename", "qsub", "qsubscript", "min_dedicated",
                "other_args"} | {f"param{i}_{k}" for i in range(1, 11) for k in ("label", "value")}
    assert set(opts31) == expected
    assert opts31["fn_exe"] == "relion_dynamight_external" and opts31["do_queue"] == "No"
    known = set(ja.parameters()) | {"stages", "redo"}
    labels = {opts31[f"param{i}_label"]: opts31[f"param{i}_value"] for i in range(1, 11)
              if opts31[f"param{i}_label"] != '""'}
    assert set(labels) <= known
    argv = ["--o", "J/"] + [a for k, v in labels.items() for a in (f"--{k}", v)]
    job = ja.parse_job_options(argv)
    assert job.stages == ja.STAGES
    assert isinstance(ja.stage_namespace("forward", ja.parse_job_options(
        argv + ["--in_parts", "p.star"])), argparse.Namespace)


def test_slurm_template_asks_for_one_gpu_and_uses_relion_placeholders():
    text = SLURM_TEMPLATE.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --gres=gpu:1\n" in text
    for word in ("command", "queue", "mpinodes", "threads", "outfile", "errfile", "extra1",
                 "extra2", "name"):
        assert f"XXX{word}XXX" in text
