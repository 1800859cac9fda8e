"""Training on a Fourier-cropped box (`optimize-deformations --training-box`): the latent space
learns the motion as well as at the full box, the later stages work at the full box, and the
box is chosen from the consensus resolution when not given."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from dynamight_core.fourier_crop import fourier_crop_volume
from dynamight_core.fsc import fsc
from dynamight_core.quality_scores import knn_r2
from relion_external.cli import main
from relion_external.refinement_resolution import consensus_resolution


@pytest.fixture(scope="module")
def box64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim64")
    assert main(["simulate", "--output-directory", str(out), "--n-particles", "500",
                 "--box-size", "64", "--pixel-size", "3.0", "--snr", "1.0",
                 "--n-gaussians", "500"]) == 0
    return out


def _train(data: Path, out: Path, *extra: str) -> np.ndarray:
    """kNN R² of the true motion from each half's codes."""
    assert main(["optimize-deformations", "--refinement-star-file",
                 str(data / "particles.star"), "--initial-model",
                 str(data / "consensus_map.mrc"), "--mask-file", str(data / "mask.mrc"),
                 "--output-directory", str(out), "--n-gaussians", "500", "--batch-size", "32",
                 "--n-threads", "2", "--n-epochs", "8", "--checkpoint-interval", "8",
                 *extra]) == 0
    p = starfile.read(out / "particles.star")["particles"]
    motion = starfile.read(data / "ground_truth" / "motion.star")["particles"]["dmMotion"]
    codes = p[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()
    return np.array([knn_r2(codes[rows], motion.to_numpy()[rows])
                     for rows in ((p["rlnDynaMightHalfSet"] == h).to_numpy() for h in (1, 2))])


def test_cropped_training_learns_as_the_full_box_and_backprojects_at_full_box(box64, tmp_path):
    full = _train(box64, tmp_path / "full")
    cropped = _train(box64, tmp_path / "cropped", "--training-box", "32")
    print(f"kNN R² full box {full}, box 32 {cropped}")
    # the motion (domains of tens of Å) is resolved far below the cropped Nyquist (12 Å)
    assert full.min() >= 0.85
    assert cropped.min() >= full.min() - 0.05
    state = torch.load(tmp_path / "cropped" / "forward_deformations" / "checkpoints" /
                       "checkpoint_final.pth", weights_only=True)
    assert state["halves"]["1"]["config"]["box_size"] == 32
    assert state["halves"]["1"]["config"]["pixel_size"] == pytest.approx(6.0)
    assert main(["deformable-backprojection", str(tmp_path / "cropped"), "--n-threads",
                 "2"]) == 0
    half_map = mrcfile.read(tmp_path / "cropped" / "backprojection" / "map_half1.mrc")
    assert half_map.shape == (64, 64, 64)
    # the full-box map holds detail beyond the training box's Nyquist (12 Å, shell 16), which a
    # map on the training box could not (FSC 0 there): measured 0.42-0.23 in shells 17-20
    truth = torch.from_numpy(mrcfile.read(box64 / "ground_truth" / "state_+0.00.mrc").copy())
    curve = fsc(torch.from_numpy(half_map.copy()), truth)
    assert float(curve[17:21].mean()) > 0.2, curve


def test_continuing_keeps_the_checkpoints_box(box64, tmp_path):
    out = tmp_path / "job"
    assert main(["optimize-deformations", "--refinement-star-file",
                 str(box64 / "particles.star"), "--initial-model",
                 str(box64 / "consensus_map.mrc"), "--output-directory", str(out),
                 "--n-gaussians", "300", "--n-threads", "2", "--n-epochs", "1",
                 "--training-box", "32"]) == 0
    assert main(["optimize-deformations", "--refinement-star-file",
                 str(box64 / "particles.star"), "--output-directory", str(out),
                 "--n-gaussians", "300", "--n-threads", "2", "--n-epochs", "2"]) == 0
    state = torch.load(out / "forward_deformations" / "checkpoints" / "checkpoint_final.pth",
                       weights_only=True)
    assert state["epoch"] == 2 and state["halves"]["2"]["config"]["box_size"] == 32


def test_training_box_from_the_refinements_model_star(tmp_path):
    refine = tmp_path / "Refine3D" / "job010"
    refine.mkdir(parents=True)
    (refine / "run_model.star").write_text(
        "\n# version 30001\n\ndata_model_general\n\n_rlnReferenceDimensionality 3\n"
        "_rlnCurrentResolution 4.250000\n_rlnPixelSize 1.0\n")
    assert consensus_resolution(refine / "run_data.star") == pytest.approx(4.25)
    assert consensus_resolution(tmp_path / "particles.star") is None
    (refine / "run_model.star").write_text("data_model_general\n_rlnCurrentResolution inf\n")
    assert consensus_resolution(refine / "run_data.star") is None


def test_volume_crop_keeps_values_and_matches_the_image_crop():
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(32, 32, 32, generator=generator)
    smooth = fourier_crop_volume(fourier_crop_volume(volume, 16), 16)
    assert torch.equal(smooth, fourier_crop_volume(smooth, 16))
    ones = torch.ones(40, 40, 40)
    assert torch.allclose(fourier_crop_volume(ones, 20), torch.ones(20, 20, 20), atol=1e-5)
