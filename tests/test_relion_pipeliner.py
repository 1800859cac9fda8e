"""The External job under the real ``relion_pipeliner`` (RELION 3.1.3).

Each test builds a fresh RELION project in ``tmp_path``: a minimal ``default_pipeline.star``, a
small ``dynamight simulate`` dataset (box 32, 6 Å/px, 300 particles) imported with an Import job,
then adds our RELION 3.1 template (``--addJobFromStar`` + ``--addJobOptions``) and runs it with
``--RunJobs``. RELION never writes an External job's exit file itself (see
``relion_external.external_job``), so a job that forgets one hangs as Running: every pipeliner
call has a timeout.

Process status numbers in a RELION 3.1 ``default_pipeline.star``: 0 running, 1 scheduled,
2 succeeded, 3 failed, 4 aborted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from relion_external import external_job_args as ja

TEMPLATES = Path(__file__).resolve().parents[1] / "job_templates"
TEMPLATE_31 = TEMPLATES / "dynamight_external_relion31_job.star"
SLURM_TEMPLATE = TEMPLATES / "slurm_dynamight.sh"
PROGRAMS = ("relion_pipeliner", "relion_import", "relion_postprocess")
SCRIPTS = Path(sys.executable).parent
EXTERNAL_EXE = SCRIPTS / "relion_dynamight_external"
RUNNING, SCHEDULED, SUCCEEDED, FAILED, ABORTED = range(5)
TIMEOUT = 180  # seconds for one pipeliner run (a job takes ~10 s here)

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(any(shutil.which(p) is None for p in PROGRAMS),
                       reason=f"RELION programs ({', '.join(PROGRAMS)}) not on PATH: "
                              "apt-get install relion"),
    pytest.mark.skipif(not EXTERNAL_EXE.is_file(),
                       reason=f"{EXTERNAL_EXE} not installed: pip install -e ."),
]

# tiny settings: the whole pipeline in a few seconds on one CPU thread
SMALL = {"n_gaussians": "100", "n_epochs": "2", "batch_size": "100", "n_inverse_epochs": "2",
         "backprojection_batch_size": "50", "gpu_id": "-1"}
SMALL_OTHER_ARGS = "--n_map_fit_steps 20"


def _full_pipeline_available() -> bool:
    actions = {s: ja.stage_actions(s) for s in ("inverse", "backprojection")}
    return "n_epochs" in actions["inverse"] and "batch_size" in actions["backprojection"]


needs_all_stages = pytest.mark.skipif(
    not _full_pipeline_available(),
    reason="optimize-inverse-deformations / deformable-backprojection are still placeholders")


# -- RELION project helpers --------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def pipeliner(project: Path, *args: str, env: dict | None = None,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["relion_pipeliner", *args], cwd=project, capture_output=True,
                              text=True, timeout=timeout, env=env or _env(), check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"relion_pipeliner {' '.join(args)} did not finish in {timeout} s "
                    f"(a job without exit file?)\n{_job_logs(project)}\n{err.stdout}")


def _job_logs(project: Path) -> str:
    parts = []
    for log in sorted(project.glob("External/job*/run.*")):
        parts.append(f"--- {log.relative_to(project)}\n{log.read_text()[-4000:]}")
    return "\n".join(parts)


def _star_loop(path: Path, block: str) -> list[dict[str, str]]:
    """Rows of the loop in ``data_<block>`` of a STAR file RELION wrote."""
    lines = path.read_text().splitlines()
    try:
        i = lines.index(f"data_{block}")
    except ValueError:
        return []
    columns, rows = [], []
    for line in lines[i + 1:]:
        text = line.strip()
        if text.startswith("data_"):
            break
        if text.startswith("_"):
            columns.append(text.split()[0][1:])
        elif text and not text.startswith(("loop_", "#")) and columns:
            rows.append(dict(zip(columns, text.split())))
        elif not text and rows:
            break
    return rows


def process_status(project: Path, job: str) -> int:
    for row in _star_loop(project / "default_pipeline.star", "pipeline_processes"):
        if row["rlnPipeLineProcessName"] == job:
            return int(row["rlnPipeLineProcessStatus"])
    raise AssertionError(f"{job} not in {project / 'default_pipeline.star'}")


def pipeline_nodes(project: Path) -> dict[str, int]:
    return {r["rlnPipeLineNodeName"]: int(r["rlnPipeLineNodeType"])
            for r in _star_loop(project / "default_pipeline.star", "pipeline_nodes")}


def _last_job(project: Path) -> str:
    return _star_loop(project / "default_pipeline.star",
                      "pipeline_processes")[-1]["rlnPipeLineProcessName"]


def _template_slots() -> dict[str, int]:
    """Parameter label -> its param<N> slot in our RELION 3.1 template."""
    pairs = re.findall(r"^param(\d+)_label\s+(\S+)", TEMPLATE_31.read_text(), re.MULTILINE)
    return {label: int(n) for n, label in pairs if label != '""'}


def add_dynamight_job(project: Path, params: dict[str, str], **options: str) -> str:
    """``--addJobFromStar`` our template with parameter values and job options set."""
    slots = _template_slots()
    settings = {f"param{slots[k]}_value": v for k, v in params.items()}
    settings.update({"fn_exe": str(EXTERNAL_EXE), "in_part": "Import/job001/particles.star",
                     "in_3dref": "Simulated/consensus_map.mrc", "nr_threads": "1",
                     "other_args": SMALL_OTHER_ARGS})
    settings.update(options)
    joined = "".join(f"{k} == {v};" for k, v in settings.items())
    proc = pipeliner(project, "--addJobFromStar", str(TEMPLATE_31), "--addJobOptions", joined)
    job = _last_job(project)
    assert job.startswith("External/"), proc.stdout + proc.stderr
    assert process_status(project, job) == SCHEDULED
    return job


def run_job(project: Path, job: str, **kwargs) -> subprocess.CompletedProcess:
    return pipeliner(project, "--RunJobs", job, "--sec_wait_after", "1", **kwargs)


def set_continue(project: Path, job: str, **values: str) -> None:
    """What the GUI's Continue does to ``<job>/job.star`` (and any changed values)."""
    path = project / job / "job.star"
    text = re.sub(r"(_rlnJobIsContinue\s+)0", r"\g<1>1", path.read_text())
    for variable, value in values.items():
        text, n = re.subn(rf"^(\s*{variable}\s+)\S+\s*$", rf"\g<1>{value} ", text,
                          flags=re.MULTILINE)
        assert n == 1, variable
    path.write_text(text)


def exit_files(project: Path, job: str) -> list[str]:
    return sorted(p.name for p in (project / job).glob("RELION_JOB_EXIT_*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """``Simulated/`` (image names relative to the project) from ``dynamight simulate``."""
    base = tmp_path_factory.mktemp("dynamight_dataset")
    subprocess.run([str(SCRIPTS / "dynamight"), "simulate", "--output-directory", "Simulated",
                    "--n-particles", "300", "--box-size", "32", "--pixel-size", "6",
                    "--n-gaussians", "300", "--motion-states", "2", "--seed", "3"],
                   cwd=base, check=True, capture_output=True, env=_env(), timeout=300)
    return base / "Simulated"


@pytest.fixture
def project(tmp_path, dataset) -> Path:
    """A RELION 3.1 project with the simulated particles imported as Import/job001/."""
    (tmp_path / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n\n")
    shutil.copytree(dataset, tmp_path / "Simulated")
    (tmp_path / "import_job.star").write_text(
        "# version 30001\n\ndata_job\n\n_rlnJobType 0\n_rlnJobIsContinue 0\n\n"
        "# version 30001\n\ndata_joboptions_values\n\nloop_\n_rlnJobOptionVariable #1\n"
        "_rlnJobOptionValue #2\ndo_raw No\ndo_other Yes\n"
        "fn_in_other Simulated/particles.star\nnode_type \"Particles STAR file (.star)\"\n\n")
    pipeliner(tmp_path, "--addJobFromStar", "import_job.star")
    run_job(tmp_path, "Import/job001/")
    assert process_status(tmp_path, "Import/job001/") == SUCCEEDED
    assert pipeline_nodes(tmp_path)["Import/job001/particles.star"] == 3
    return tmp_path


# -- tests -------------------------------------------------------------------------------------
@needs_all_stages
def test_full_pipeline_succeeds_with_output_nodes_and_postprocess(project):
    job = add_dynamight_job(project, SMALL, in_mask="Simulated/mask.mrc")
    t0 = time.time()
    run_job(project, job)
    elapsed = time.time() - t0
    assert process_status(project, job) == SUCCEEDED, _job_logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_SUCCESS"]
    nodes = pipeline_nodes(project)
    assert nodes[f"{job}particles.star"] == 3
    assert nodes[f"{job}backprojection/map_half1.mrc"] == 10
    assert nodes[f"{job}backprojection/map_half2.mrc"] == 10
    note = (project / job / "note.txt").read_text()
    assert "--pipeline_control" in note  # relion_ in the executable's path
    out = (project / job / "run.out").read_text()
    assert "stage 3/3 backprojection (deformable-backprojection): finished" in out
    assert elapsed < 120

    (project / "PostProcess").mkdir()
    post = subprocess.run(
        ["relion_postprocess", "--i", f"{job}backprojection/map_half1.mrc",
         "--i2", f"{job}backprojection/map_half2.mrc", "--mask", "Simulated/mask.mrc",
         "--angpix", "6", "--o", "PostProcess/postprocess"],
        cwd=project, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert post.returncode == 0, post.stdout + post.stderr
    match = re.search(r"FINAL RESOLUTION:\s+([\d.]+)", post.stdout)
    assert match and 12.0 <= float(match.group(1)) < 60.0, post.stdout
    assert (project / "PostProcess" / "postprocess_masked.mrc").is_file()


def test_bad_input_fails_the_job_with_the_message_in_run_err(project):
    # a consensus map of the wrong box; the executable's path without "relion_" this time
    with mrcfile.new(project / "small_map.mrc") as mrc:
        mrc.set_data(np.zeros((16, 16, 16), dtype=np.float32))
        mrc.voxel_size = 6.0
    exe = project / "dynamight_job"
    exe.symlink_to(EXTERNAL_EXE)
    job = add_dynamight_job(project, {**SMALL, "stages": "forward"}, fn_exe=str(exe),
                            in_3dref="small_map.mrc")
    run_job(project, job)
    assert process_status(project, job) == FAILED, _job_logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_FAILURE"]
    assert "--pipeline_control" not in (project / job / "note.txt").read_text()
    err = (project / job / "run.err").read_text()
    assert "relion_dynamight_external: input error in stage forward" in err
    assert "small_map.mrc" in err
    assert not (project / job / "RELION_OUTPUT_NODES.star").exists()
    assert f"{job}particles.star" not in pipeline_nodes(project)


def test_abort_then_continue_resumes_from_checkpoints(project):
    params = {**SMALL, "n_epochs": "400", "batch_size": "50"}
    if not _full_pipeline_available():
        params["stages"] = "forward"
    job = add_dynamight_job(project, params,
                            other_args=f"{SMALL_OTHER_ARGS} --checkpoint_interval 1")
    proc = subprocess.Popen(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", "1"],
                            cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        second = project / job / "forward_deformations" / "checkpoints" / "002.pth"
        deadline = time.time() + 120
        while not second.exists():
            assert time.time() < deadline, _job_logs(project)
            assert proc.poll() is None, _job_logs(project)
            time.sleep(0.2)
        (project / job / "RELION_JOB_ABORT_NOW").touch()
        t_abort = time.time()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert process_status(project, job) == ABORTED, _job_logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_ABORTED"]
    assert "aborted in stage forward" in (project / job / "run.err").read_text()
    checkpoints = sorted(p.name for p in (project / job / "forward_deformations" /
                                          "checkpoints").glob("*.pth"))
    assert checkpoints and "checkpoint_final.pth" not in checkpoints
    assert not (project / job / "particles.star").exists()
    log = (project / job / "forward_deformations" / "loss_log.txt").read_text().splitlines()
    assert len(log) < 400 and time.time() - t_abort < 60

    # Continue with fewer epochs: forward resumes from its latest checkpoint
    slot = _template_slots()["n_epochs"]
    set_continue(project, job, **{f"param{slot}_value": str(len(log) + 1)})
    run_job(project, job)
    assert process_status(project, job) == SUCCEEDED, _job_logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_SUCCESS"]
    out = (project / job / "run.out").read_text()
    assert "continuing the job (_rlnJobIsContinue 1)" in out
    assert "forward (optimize-deformations): resumes from its checkpoints" in out
    assert re.search(r"continuing from \S+\.pth \(epoch \d+\)", out)
    assert f"{job}particles.star" in pipeline_nodes(project)


def test_continue_skips_finished_stages(project):
    job = add_dynamight_job(project, {**SMALL, "stages": "forward"})
    run_job(project, job)
    assert process_status(project, job) == SUCCEEDED, _job_logs(project)
    assert {n for n in pipeline_nodes(project) if n.startswith(job)} == {
        f"{job}particles.star"}
    final = project / job / "forward_deformations" / "checkpoints" / "checkpoint_final.pth"
    mtime = final.stat().st_mtime_ns

    stages = "forward,inverse,backprojection" if _full_pipeline_available() else "forward"
    set_continue(project, job, **{f"param{_template_slots()['stages']}_value": stages})
    run_job(project, job)
    assert process_status(project, job) == SUCCEEDED, _job_logs(project)
    out = (project / job / "run.out").read_text()
    assert "forward (optimize-deformations): skipped, finished earlier" in out
    assert final.stat().st_mtime_ns == mtime
    if _full_pipeline_available():
        assert "stage 3/3 backprojection (deformable-backprojection): finished" in out
        assert pipeline_nodes(project)[f"{job}backprojection/map_half2.mrc"] == 10


def test_queue_submission_with_the_slurm_template(project, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("fake_slurm")
    sbatch = bin_dir / "sbatch"
    # stand-in sbatch: checks the script RELION wrote, then runs it synchronously with the
    # output files its #SBATCH lines name
    sbatch.write_text(r"""#!/bin/bash
script="$1"
echo "$@" > "$(dirname "$script")/sbatch_args"
if grep -q 'XXX[a-z0-9]*XXX' "$script"; then echo "placeholders left in $script" >&2; exit 1; fi
grep -q '^#SBATCH --gres=gpu:1$' "$script" || { echo "no GPU requested" >&2; exit 1; }
out=$(sed -n 's/^#SBATCH --output=//p' "$script")
err=$(sed -n 's/^#SBATCH --error=//p' "$script")
bash "$script" >> "$out" 2>> "$err"
""")
    sbatch.chmod(0o755)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               RELION_QSUB_EXTRA_COUNT="2",
               RELION_QSUB_EXTRA1="Wall-clock limit:", RELION_QSUB_EXTRA1_DEFAULT="1:00:00",
               RELION_QSUB_EXTRA2="Memory:", RELION_QSUB_EXTRA2_DEFAULT="8G")
    slots = _template_slots()
    settings = {f"param{slots[k]}_value": v for k, v in {**SMALL, "stages": "forward"}.items()}
    settings.update({"fn_exe": str(EXTERNAL_EXE), "in_part": "Import/job001/particles.star",
                     "in_3dref": "Simulated/consensus_map.mrc", "nr_threads": "1",
                     "other_args": SMALL_OTHER_ARGS, "do_queue": "Yes", "qsub": "sbatch",
                     "queuename": "gpu", "qsubscript": str(SLURM_TEMPLATE)})
    pipeliner(project, "--addJobFromStar", str(TEMPLATE_31), "--addJobOptions",
              "".join(f"{k} == {v};" for k, v in settings.items()), env=env)
    job = _last_job(project)
    run_job(project, job, env=env)
    assert process_status(project, job) == SUCCEEDED, _job_logs(project)
    script = (project / job / "run_submit.script").read_text()
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --cpus-per-task=1\n" in script
    assert "#SBATCH --time=1:00:00\n" in script and "#SBATCH --mem=8G\n" in script
    assert f"{EXTERNAL_EXE} --o {job}" in script
    assert (project / job / "sbatch_args").read_text().split() == [f"{job}run_submit.script"]
    out = (project / job / "run.out").read_text()
    assert "DynaMight on " in out and "stage 1/1 forward (optimize-deformations): finished" in out
    assert exit_files(project, job) == ["RELION_JOB_EXIT_SUCCESS"]


def _dummy_job(project: Path, script: str, body: str) -> str:
    exe = project / script
    exe.write_text("#!/bin/bash\n" + body)
    exe.chmod(0o755)
    (project / f"{script}.star").write_text(
        "# version 30001\n\ndata_job\n\n_rlnJobType 99\n_rlnJobIsContinue 0\n\n"
        "# version 30001\n\ndata_joboptions_values\n\nloop_\n_rlnJobOptionVariable #1\n"
        f"_rlnJobOptionValue #2\nfn_exe ./{script}\nnr_threads 1\n\n")
    pipeliner(project, "--addJobFromStar", f"{script}.star")
    return _last_job(project)


def test_relion31_external_job_facts(project):
    """What relion_external.external_job's docstring says RELION 3.1.3 does (no DynaMight)."""
    quiet = _dummy_job(project, "ext_quiet.sh", "exit 0\n")
    failing = _dummy_job(project, "relion_ext_quiet.sh", "echo oops >&2\nexit 3\n")
    ok = _dummy_job(project, "relion_ext_ok.sh",
                    'touch "$2/RELION_JOB_EXIT_SUCCESS"\n')  # $1 $2 = --o <job>
    # no exit file: Running for ever, exit code 0 or not, relion_ in the path or not
    procs = [subprocess.Popen(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", "1"],
                              cwd=project, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for job in (quiet, failing)]
    time.sleep(6)
    for proc in procs:
        assert proc.poll() is None  # still waiting for the exit file
        proc.kill()
        proc.wait()
    for job in (quiet, failing):
        assert process_status(project, job) == RUNNING and exit_files(project, job) == []
    assert "--pipeline_control" not in (project / quiet / "note.txt").read_text()
    assert f"--pipeline_control {failing}" in (project / failing / "note.txt").read_text()
    assert "oops" in (project / failing / "run.err").read_text()
    shutil.rmtree(project / ".relion_lock", ignore_errors=True)
    # --RunJobs twice: the same command again, _rlnJobIsContinue stays 0
    run_job(project, ok)
    run_job(project, ok)
    assert process_status(project, ok) == SUCCEEDED
    assert (project / ok / "note.txt").read_text().count("Executing new job") == 2
    assert re.search(r"_rlnJobIsContinue\s+0", (project / ok / "job.star").read_text())


def test_relion31_rejects_the_relion5_template(project):
    proc = pipeliner(project, "--addJobFromStar",
                     str(TEMPLATES / "dynamight_external_relion5_job.star"))
    assert "unrecognised job-type" in proc.stdout + proc.stderr
    assert _last_job(project) == "Import/job001/"
