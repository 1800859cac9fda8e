"""RELION-5's own DynaMight job under the real RELION-5.0.1 ``relion_pipeliner``
(``../shared/tools/relion5``), through all its tasks, with the package as its executable.

The executable is RELION-5's default, ``relion_python_dynamight``: here a two-line wrapper on
``PATH`` that runs ``python -c "from dynamight import cli; exit(cli())"`` as RELION-5's does,
so the ``dynamight`` package, the ``--pipeline-control`` that RELION appends (the name contains
``relion_``) and the "Additional arguments" appended to every task are all exercised. The
tasks run as the GUI runs them: training first, then each other task as a continuation (set
in ``job.star``, ``_rlnJobIsContinue 1``). ``--RunJobs`` only returns once the job folder has an
exit file, so every call has a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import starfile

REPO = Path(__file__).resolve().parents[1]
RELION5_BIN = REPO.parent / "shared" / "tools" / "relion5" / "bin"
PIPELINER = RELION5_BIN / "relion_pipeliner"
JOB = "DynaMight/job001/"
TIMEOUT = 120  # seconds for one task (each takes a few seconds here)
# tiny training; --batch-size also reaches the inverse and backprojection tasks
ADDITIONAL = "--n-epochs 2 --n-map-fit-steps 20 --batch-size 50"

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(not PIPELINER.is_file(),
                       reason=f"RELION-5 programs not found at {RELION5_BIN} (expected "
                              "../shared/tools/relion5 beside the checkout)"),
]


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(PATH=f"{bin_dir}:{RELION5_BIN}:{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def pipeliner(project: Project, *args: str, timeout: float = TIMEOUT) -> str:
    try:
        done = subprocess.run([str(PIPELINER), *args], cwd=project.root, env=project.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"relion_pipeliner {' '.join(args)} did not finish in {timeout} s (a task "
                    f"without exit file?)\n{_logs(project)}")
    return done.stdout + done.stderr


def _logs(project: Project) -> str:
    return "\n".join(f"--- {p.relative_to(project.root)}\n{p.read_text()[-3000:]}"
                     for p in sorted(project.root.glob("DynaMight/job*/run.*")))


def pipeline(project: Project, block: str):
    """A table of the project's ``default_pipeline.star``."""
    return starfile.read(project.root / "default_pipeline.star", always_dict=True)[block]


def status(project: Project, job: str) -> str:
    processes = pipeline(project, "pipeline_processes")
    row = processes[processes["rlnPipeLineProcessName"] == job]
    return str(row["rlnPipeLineProcessStatusLabel"].iloc[0])


def nodes(project: Project) -> dict[str, str]:
    table = pipeline(project, "pipeline_nodes")
    return dict(zip(table["rlnPipeLineNodeName"], table["rlnPipeLineNodeTypeLabel"]))


def run(project: Project, job: str) -> float:
    t0 = time.time()
    pipeliner(project, "--RunJobs", job, "--sec_wait_after", "1")
    return time.time() - t0


def add_job(project: Project, other_args: str) -> str:
    options = {"fn_star": "Simulated/particles.star", "fn_map": "Simulated/consensus_map.mrc",
               "gpu_id": "", "nr_gaussians": "300", "nr_threads": "1",
               "other_args": other_args}
    pipeliner(project, "--addJob", "dynamight", "--addJobOptions",
              "".join(f"{k} == {v};" for k, v in options.items()))
    return str(pipeline(project, "pipeline_processes")["rlnPipeLineProcessName"].iloc[-1])


def continue_with(project: Project, job: str, task: str, **values: str) -> None:
    """What the GUI's Continue! does: one task set to Yes, the others No, continue flag on."""
    for option in ("do_visualize", "do_inverse", "do_reconstruct"):
        pipeliner(project, "--editJob", f"{job}job.star", "--editOption", option,
                  "--editValue", "Yes" if option == task else "No")
    for option, value in values.items():
        pipeliner(project, "--editJob", f"{job}job.star", "--editOption", option,
                  "--editValue", value)
    path = project.root / job / "job.star"
    path.write_text(re.sub(r"(_rlnJobIsContinue\s+)0", r"\g<1>1", path.read_text()))


def exit_files(project: Project, job: str) -> list[str]:
    return sorted(p.name for p in (project.root / job).glob("RELION_JOB_EXIT_*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("relion5_dataset")
    subprocess.run([sys.executable, "-m", "relion_external.cli", "simulate",
                    "--output-directory", "Simulated", "--n-particles", "200", "--box-size",
                    "32", "--pixel-size", "6", "--n-gaussians", "300", "--motion-states", "2",
                    "--seed", "3"], cwd=base, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return base / "Simulated"


@dataclass
class Project:
    root: Path  # the RELION project directory
    env: dict[str, str]  # PATH with relion_python_dynamight and RELION-5's programs


@pytest.fixture
def project(tmp_path, dataset) -> Project:
    """A RELION-5 project with the simulated particles and a ``relion_python_dynamight`` on
    PATH that is RELION-5's wrapper line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "relion_python_dynamight"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c '
                       '"from dynamight import cli; exit(cli())" "$@"\n')
    wrapper.chmod(0o755)
    root = tmp_path / "project"
    root.mkdir()
    (root / "default_pipeline.star").write_text(
        "\n# version 50001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n\n")
    shutil.copytree(dataset, root / "Simulated")
    return Project(root, _env(bin_dir))


def test_every_task_succeeds_with_additional_arguments(project):
    job = add_job(project, ADDITIONAL)
    assert job == JOB
    seconds = {"optimize-deformations": run(project, job)}
    assert status(project, job) == "Succeeded", _logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_SUCCESS"]
    assert nodes(project)[f"{job}particles.star"] == "ParticleGroupMetadata.star.relion"
    out = (project.root / job / "run.out").read_text()
    assert "epoch 2/2" in out and "epoch 3/" not in out  # --n-epochs 2 from the extra arguments

    continue_with(project, job, "do_inverse", nr_epochs="3")
    seconds["optimize-inverse-deformations"] = run(project, job)
    assert status(project, job) == "Succeeded", _logs(project)
    assert (project.root / job / "inverse_deformations" / "inv_chkpt.pth").is_file()
    out = (project.root / job / "run.out").read_text()
    assert ("--n-epochs given 2 times with different values (--n-epochs 3, --n-epochs 2): the "
            "last one, 2, is used") in out

    continue_with(project, job, "do_reconstruct", backproject_batchsize="10")
    seconds["deformable-backprojection"] = run(project, job)
    assert status(project, job) == "Succeeded", _logs(project)
    registered = nodes(project)
    for half in (1, 2):
        assert f"{job}backprojection/map_half{half}.mrc" in registered
    out = (project.root / job / "run.out").read_text()
    assert "deformable-backprojection ignores --n-epochs 2: an option of" in out
    assert "deformable-backprojection ignores --n-map-fit-steps 20" in out

    continue_with(project, job, "do_visualize", halfset="1")
    seconds["explore-latent-space"] = run(project, job)
    assert status(project, job) == "Succeeded", _logs(project)
    assert (project.root / job / "latent_space" / "embedding_half1.png").is_file()
    assert "note: no display" in (project.root / job / "run.out").read_text()
    assert exit_files(project, job) == ["RELION_JOB_EXIT_SUCCESS"]
    print("seconds per task:", seconds)


def test_a_misspelt_additional_argument_fails_the_job_quickly(project):
    job = add_job(project, "--n-epoch 4")
    seconds = run(project, job)
    assert status(project, job) == "Failed", _logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_FAILURE"]
    err = (project.root / job / "run.err").read_text()
    assert err.rstrip().splitlines()[-1] == (
        "dynamight optimize-deformations: argument error: unrecognized arguments: --n-epoch 4 "
        "(see dynamight optimize-deformations --help)")
    assert seconds < 30


def test_abort_ends_the_job_aborted_within_seconds(project):
    """The GUI's Abort writes RELION_JOB_ABORT_NOW into the job folder; training stops at its
    next batch and the job ends Aborted, with exactly that exit file."""
    job = add_job(project, "--n-epochs 500 --n-map-fit-steps 20 --batch-size 20")
    runner = subprocess.Popen([str(PIPELINER), "--RunJobs", job, "--sec_wait_after", "1"],
                              cwd=project.root, env=project.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        run_out = project.root / job / "run.out"
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and not (
                run_out.is_file() and "epoch 1/500" in run_out.read_text()):
            time.sleep(0.5)
        assert "epoch 1/500" in run_out.read_text(), _logs(project)
        t0 = time.time()
        (project.root / job / "RELION_JOB_ABORT_NOW").touch()
        runner.wait(timeout=TIMEOUT)
        seconds = time.time() - t0
    finally:
        if runner.poll() is None:
            runner.kill()
    assert status(project, job) == "Aborted", _logs(project)
    assert exit_files(project, job) == ["RELION_JOB_EXIT_ABORTED"]
    assert seconds < 20, seconds
