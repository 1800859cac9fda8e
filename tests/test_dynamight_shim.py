"""``python -c "from dynamight import cli; exit(cli())"`` (what RELION-5's default executable
``relion_python_dynamight`` runs) runs our ``dynamight`` command and exits with its code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELION5_LINE = "from dynamight import cli; exit(cli())"  # RELION-5's relion_python_dynamight


def run_shim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", RELION5_LINE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_help_runs_our_cli(tmp_path):
    done = run_shim("optimize-deformations", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dynamight optimize-deformations")


def test_return_code_and_exit_file_come_through(tmp_path):
    job = tmp_path / "DynaMight" / "job001"
    job.mkdir(parents=True)
    done = run_shim("deformable-backprojection", "DynaMight/job001/", "--batch-size", "10",
                    "--pipeline-control", "DynaMight/job001/", cwd=tmp_path)
    assert done.returncode == 1  # no optimize-deformations results there: an input error
    assert sorted(p.name for p in job.glob("RELION_JOB_EXIT_*")) == ["RELION_JOB_EXIT_FAILURE"]
    assert done.stderr.splitlines()[-1].startswith(
        "dynamight deformable-backprojection: input error: DynaMight/job001")
    done = run_shim("deformable-backprojection", "--bogus", cwd=tmp_path)
    assert done.returncode == 2


def test_the_package_is_in_the_wheel():
    text = (REPO / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    section = text.split("[tool.hatch.build.targets.wheel]", 1)[1]
    packages = re.search(r"^packages\s*=\s*\[([^\]]*)\]", section, re.MULTILINE).group(1)
    assert '"dynamight"' in packages
