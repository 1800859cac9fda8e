"""Several processes (torch.distributed, gloo on the CPU, started through torchrun's engine by
``--n-processes``): the halves side by side, data-parallel halves, sharded backprojection,
resume on another number of processes, abort. Every run is compared with one process."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from dynamight_core.distributed import Group, ProcessLayout
from relion_external.cli import main

REPO = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("data", "mse", "reg", "kl")


def dynamight(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The command in a subprocess (the processes it starts need a main module of their own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "relion_external.cli", *args], env=env,
                          check=False,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--output-directory", str(out), "--n-particles", "400",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "0.5",
                 "--n-gaussians", "300"]) == 0
    return out


def train(data: Path, out: Path, processes: int, epochs: int, *extra: str):
    return dynamight(
        "optimize-deformations", "--refinement-star-file", str(data / "particles.star"),
        "--initial-model", str(data / "consensus_map.mrc"), "--output-directory", str(out),
        "--n-gaussians", "300", "--n-epochs", str(epochs), "--batch-size", "50",
        "--n-threads", "1", "--early-stopping-patience", "0", "--checkpoint-interval", "2",
        "--decoder-precision", "float32", "--n-processes", str(processes), *extra)


def losses(out: Path) -> np.ndarray:
    """(epochs, 2 halves × data/mse/reg/kl) from loss_log.txt."""
    rows = []
    for line in (out / "forward_deformations" / "loss_log.txt").read_text().splitlines():
        words = line.split()
        values = dict(zip(words[::2], words[1::2], strict=True))
        rows.append([float(values[f"half{h}_{k}"]) for h in (1, 2) for k in LOSS_KEYS])
    return np.array(rows)


def latents(out: Path) -> np.ndarray:
    table = starfile.read(out / "particles.star")["particles"]
    return table[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p1") / "job"
    train(data, out, 1, 4)
    return out


def test_halves_side_by_side_equal_halves_in_sequence(data, one_process, tmp_path):
    out = tmp_path / "job"
    done = train(data, out, 2, 4)
    assert "starting 2 processes (torchrun)" in done.stdout
    np.testing.assert_allclose(losses(out), losses(one_process), rtol=1e-6)
    np.testing.assert_allclose(latents(out), latents(one_process), rtol=1e-5, atol=1e-6)
    for name in ("checkpoint_final.pth", "004.pth"):  # rank 0 holds both halves' whole state
        state = torch.load(out / "forward_deformations" / "checkpoints" / name,
                           weights_only=True)
        assert set(state["halves"]) == {"1", "2"}
    assert sorted(p.name for p in (out / "forward_deformations" / "volumes").iterdir()) == \
        sorted(f"volume_half{h}_{e:03d}.mrc" for e in (2, 4) for h in (1, 2))


def test_data_parallel_halves_match_one_process(data, one_process, tmp_path):
    """Two processes per half share every batch: the same training up to the order of
    floating-point sums (first epoch to 1e-5; training then amplifies rounding slowly)."""
    out = tmp_path / "job"
    train(data, out, 4, 4)
    ours, reference = losses(out), losses(one_process)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-4)
    data_mse = [i for i, (h, k) in enumerate((h, k) for h in (1, 2) for k in LOSS_KEYS)
                if k in ("data", "mse")]
    np.testing.assert_allclose(ours[:, data_mse], reference[:, data_mse], rtol=2e-4)
    ours_z, reference_z = latents(out), latents(one_process)
    correlation = [np.corrcoef(ours_z[:, k], reference_z[:, k])[0, 1] for k in range(2)]
    assert min(correlation) > 0.99, correlation


def test_resume_on_other_numbers_of_processes(data, one_process, tmp_path):
    # 2 processes (exactly one process's training) for 2 epochs, then 1 process to epoch 4:
    # identical to 4 epochs in one process
    out = tmp_path / "job"
    train(data, out, 2, 2)
    train(data, out, 1, 4)
    np.testing.assert_allclose(losses(out), losses(one_process), rtol=1e-6)
    np.testing.assert_allclose(latents(out), latents(one_process), rtol=1e-5, atol=1e-6)
    # 1 process for 2 epochs, then 4 processes (data parallel) to epoch 4: close to it
    other = tmp_path / "job4"
    train(data, other, 1, 2)
    done = train(data, other, 4, 4)
    assert "continuing from" in done.stdout
    ours = losses(other)
    np.testing.assert_array_equal(ours[:2], losses(one_process)[:2])
    np.testing.assert_allclose(ours[2:, [0, 4]], losses(one_process)[2:, [0, 4]], rtol=2e-4)


MULTINODE_TEMPLATE = REPO / "job_templates" / "slurm_dynamight_multinode.sh"


def _free_job_id() -> int:
    """A SLURM job id whose rendezvous port (20000 + id % 10000, as the template) is free."""
    for job_id in range(7000, 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port")


def test_slurm_template_two_nodes_train_as_four_processes_on_one(data, tmp_path):
    """The multi-node SLURM template as RELION fills it in, run with stand-ins for srun (the
    command once per 'node', SLURM_NODEID 0 and 1) and scontrol on this machine: 2 nodes of 2
    processes form the same world as --n-processes 4 on one node, so the same training bit
    for bit; node 0 alone writes the one exit file."""
    single = tmp_path / "single"
    train(data, single, 4, 2)
    out, job = tmp_path / "nodes", tmp_path / "DynaMight" / "job012"
    job.mkdir(parents=True)
    command = [sys.executable, "-m", "relion_external.cli", "optimize-deformations",
               "--refinement-star-file", str(data / "particles.star"),
               "--initial-model", str(data / "consensus_map.mrc"), "--output-directory",
               str(out), "--n-gaussians", "300", "--n-epochs", "2", "--batch-size", "50",
               "--n-threads", "1", "--early-stopping-patience", "0", "--checkpoint-interval",
               "2", "--decoder-precision", "float32", "--n-processes", "2",
               "--pipeline-control", f"{job}/"]
    filled = {"name": f"{job}/", "queue": "gpu", "extra1": "1:00:00", "extra2": "8G",
              "extra3": "2", "extra4": "2", "threads": "1", "outfile": str(job / "run.out"),
              "errfile": str(job / "run.err"), "command": " ".join(command)}
    script = MULTINODE_TEMPLATE.read_text()
    for word, value in filled.items():
        script = script.replace(f"XXX{word}XXX", value)
    assert not re.search(r"XXX[a-z0-9]+XXX", script)
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gres=gpu:2\n" in script
    (job / "run_submit.script").write_text(script)
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("""#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for node in 0 1; do SLURM_NODEID=$node "$@" & done
status=0
for p in $(jobs -p); do wait $p || status=$?; done
exit $status
""")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": str(_free_job_id()), "SLURM_JOB_NODELIST": "node[1-2]",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(job / "run_submit.script")], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "4 processes (torchrun, 2 nodes of 2)" in done.stdout
    np.testing.assert_array_equal(losses(out), losses(single))
    np.testing.assert_array_equal(latents(out), latents(single))
    assert sorted(p.name for p in job.iterdir() if p.name.startswith("RELION_JOB_EXIT")) == [
        "RELION_JOB_EXIT_SUCCESS"]


def test_sharded_backprojection_equals_one_process(one_process, tmp_path):
    maps = {}
    for processes in (1, 4):
        job = tmp_path / f"bp{processes}"
        shutil.copytree(one_process, job)
        dynamight("deformable-backprojection", str(job), "--batch-size", "16", "--n-threads",
                  "1", "--n-processes", str(processes))
        maps[processes] = [mrcfile.read(job / "backprojection" / f"map_half{h}.mrc")
                           for h in (1, 2)]
        assert (job / "backprojection" / "fsc.star").is_file()
    for one, sharded in zip(maps[1], maps[4], strict=True):
        assert np.abs(sharded - one).max() <= 1e-5 * np.abs(one).max()


def test_abort_stops_every_process_with_one_exit_file(data, tmp_path):
    job = tmp_path / "relion_job"
    job.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "relion_external.cli", "optimize-deformations",
               "--refinement-star-file", str(data / "particles.star"),
               "--initial-model", str(data / "consensus_map.mrc"),
               "--output-directory", str(tmp_path / "out"), "--n-gaussians", "300",
               "--n-epochs", "200", "--early-stopping-patience", "0", "--n-threads", "1",
               "--n-processes", "4", "--pipeline-control", str(job)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        deadline = time.time() + 120
        log = tmp_path / "out" / "forward_deformations" / "loss_log.txt"
        while not log.is_file() and time.time() < deadline and process.poll() is None:
            time.sleep(0.5)
        assert log.is_file(), "training did not start"
        (job / "RELION_JOB_ABORT_NOW").touch()
        _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    exits = sorted(p.name for p in job.iterdir() if p.name.startswith("RELION_JOB_EXIT"))
    assert exits == ["RELION_JOB_EXIT_ABORTED"]
    assert err.strip().splitlines()[-1].startswith("dynamight optimize-deformations: aborted")


def test_odd_number_of_processes_is_refused_in_one_line(data, tmp_path):
    done = dynamight("optimize-deformations", "--refinement-star-file",
                     str(data / "particles.star"), "--initial-model",
                     str(data / "consensus_map.mrc"), "--output-directory", str(tmp_path),
                     "--n-processes", "3", check=False)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "--n-processes" in last and "even number" in last
    assert "Traceback" not in done.stderr


def test_group_shares_cover_a_batch_once():
    for size in (1, 2, 3, 4):
        for n in (0, 1, 3, 50, 51):
            rows = [Group(size=size, rank=r).share(n) for r in range(size)]
            covered = np.concatenate([np.arange(s.start, s.stop) for s in rows])
            np.testing.assert_array_equal(covered, np.arange(n))
            assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1
    single = ProcessLayout()
    assert single.halves == (1, 2) and single.is_main and not single.parallel
    assert single.is_leader(1) and single.is_leader(2)
    assert single.gather_halves({1: {"x": torch.ones(1)}})[1]["x"].item() == 1.0


def test_temporal_prior_with_shared_batches_is_refused_in_one_line(data, tmp_path):
    done = dynamight("optimize-deformations", "--refinement-star-file",
                     str(data / "particles.star"), "--initial-model",
                     str(data / "consensus_map.mrc"), "--output-directory", str(tmp_path),
                     "--temporal-prior", "--n-processes", "4", "--n-threads", "1", check=False)
    assert done.returncode == 1
    assert "--temporal-prior: trains each half set in one process" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "dynamight optimize-deformations: failed: a worker process failed")
