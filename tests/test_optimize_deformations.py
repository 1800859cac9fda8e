"""`dynamight optimize-deformations` end to end on simulated data: outputs, resumption, and
recovery of the simulated motion by each half's latent space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from dynamight_core.quality_scores import knn_r2
from relion_external.cli import main
from relion_external.output_nodes import read_output_nodes

# measured 2026-11-27 (fixed seeds): 0.987 / 0.984 over all particles, 0.982 / 0.977 held out
THRESHOLD_ALL, THRESHOLD_HELD = 0.9, 0.9

NEW_COLUMNS = ["rlnDynaMightLatent1", "rlnDynaMightLatent2", "rlnDynaMightHalfSet",
               "rlnDynaMightValidation", "rlnDynaMightDeformationError"]


def simulate(out: Path, n_particles: int) -> Path:
    assert main(["simulate", "--output-directory", str(out), "--n-particles", str(n_particles),
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "1.0",
                 "--n-gaussians", "500"]) == 0
    return out


def optimize(data: Path, out: Path, *extra: str) -> int:
    return main(["optimize-deformations", "--refinement-star-file", str(data / "particles.star"),
                 "--initial-model", str(data / "consensus_map.mrc"),
                 "--output-directory", str(out), "--n-gaussians", "500", "--batch-size", "32",
                 "--n-threads", "2", "--n-warmup-epochs", "1", "--checkpoint-interval", "1",
                 "--consensus-update-interval", "2", *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory.mktemp("sim"), 400)


def test_cli_writes_all_outputs(small, tmp_path):
    out = tmp_path / "job"
    job = tmp_path / "relion_job"
    job.mkdir()
    assert optimize(small, out, "--n-epochs", "3", "--pipeline-control", str(job)) == 0
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    # particles.star with latents is a particles node in both RELION vocabularies
    assert read_output_nodes(job / "RELION_OUTPUT_NODES.star") == [
        (f"{out.as_posix()}/particles.star", 3, "ParticleGroupMetadata.star.relion")]
    fwd = out / "forward_deformations"
    for name in ("001.pth", "002.pth", "003.pth", "checkpoint_final.pth"):
        state = torch.load(fwd / "checkpoints" / name, weights_only=True)
        assert set(state["halves"]) == {"1", "2"}
    for half in (1, 2):
        assert (fwd / "volumes" / f"volume_half{half}_003.mrc").exists()
    assert len((fwd / "loss_log.txt").read_text().splitlines()) == 3

    given = starfile.read(small / "particles.star")["particles"]
    star = starfile.read(out / "particles.star")
    p = star["particles"]
    assert list(star) == ["optics", "particles"]
    assert list(p.columns) == list(given.columns) + NEW_COLUMNS
    assert len(p) == 400
    np.testing.assert_array_equal(p["rlnDynaMightHalfSet"], given["rlnRandomSubset"])
    held = p["rlnDynaMightValidation"] == 1
    assert held.sum() == 40
    assert (p.loc[~held, "rlnDynaMightDeformationError"] == -1).all()
    assert (p.loc[held, "rlnDynaMightDeformationError"] >= 0).all()
    assert np.isfinite(p[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()).all()


def test_cli_resume_matches_an_uninterrupted_run(small, tmp_path):
    assert optimize(small, tmp_path / "straight", "--n-epochs", "4") == 0
    assert optimize(small, tmp_path / "resumed", "--n-epochs", "2") == 0
    assert optimize(small, tmp_path / "resumed", "--n-epochs", "4") == 0
    straight, resumed = ((tmp_path / run / "forward_deformations" / "loss_log.txt")
                         .read_text().splitlines() for run in ("straight", "resumed"))
    assert len(resumed) == 4
    for a, b in zip(straight, resumed):
        va, vb = (np.array(line.split()[3::2], dtype=float) for line in (a, b))
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-8)


def test_latent_space_recovers_the_simulated_motion(tmp_path):
    """Judged on held-out particles (never trained on) as well as on all of a half's particles:
    the cross-validated kNN R² of the true motion from the codes."""
    data = simulate(tmp_path / "sim", 1200)
    out = tmp_path / "job"
    assert main(["optimize-deformations", "--refinement-star-file",
                 str(data / "particles.star"), "--initial-model",
                 str(data / "consensus_map.mrc"), "--output-directory", str(out),
                 "--n-gaussians", "500", "--batch-size", "32", "--n-threads", "2",
                 "--n-epochs", "20", "--validation-fraction", "0.25",
                 "--checkpoint-interval", "10"]) == 0
    p = starfile.read(out / "particles.star")["particles"]
    motion = starfile.read(data / "ground_truth" / "motion.star")["particles"]["dmMotion"]
    codes = p[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()
    held = (p["rlnDynaMightValidation"] == 1).to_numpy()
    for half in (1, 2):
        rows = (p["rlnDynaMightHalfSet"] == half).to_numpy()
        r2_all = knn_r2(codes[rows], motion.to_numpy()[rows])
        r2_held = knn_r2(codes[rows & held], motion.to_numpy()[rows & held], k=10)
        print(f"half {half}: kNN R² {r2_all:.3f}, held-out {r2_held:.3f}")
        assert r2_all >= THRESHOLD_ALL and r2_held >= THRESHOLD_HELD
