"""Large datasets from the command line: a preload that does not fit in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from relion_external import image_stack
from relion_external.cli import main


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--output-directory", str(out), "--n-particles", "200",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "1.0",
                 "--n-gaussians", "300"]) == 0
    return out


def test_preload_beyond_the_available_memory_fails_cleanly_and_writes_nothing(
        small, tmp_path, monkeypatch, capsys):
    # 200 images of 32² float32 are 800 KiB: pretend only 512 KiB are available
    monkeypatch.setattr(image_stack, "available_memory_bytes", lambda: 512 * 1024)
    out, job = tmp_path / "job", tmp_path / "relion_job"
    job.mkdir()
    capsys.readouterr()
    status = main(["optimize-deformations", "--refinement-star-file",
                   str(small / "particles.star"), "--initial-model",
                   str(small / "consensus_map.mrc"), "--output-directory", str(out),
                   "--n-gaussians", "300", "--n-epochs", "1", "--preload-images",
                   "--pipeline-control", str(job)])
    assert status == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--preload-images" in last and "GiB is available" in last
    assert not out.exists()
    assert sorted(p.name for p in job.iterdir()) == ["RELION_JOB_EXIT_FAILURE"]
