"""`dynamight simulate` and `dynamight reconstruct` end to end, and the job-folder protocol."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from dynamight_core.fsc import fsc
from relion_external.cli import main


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--output-directory", str(out), "--n-particles", "600",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "1.0",
                 "--n-gaussians", "400"]) == 0
    return out


def test_simulate_writes_a_relion_dataset(simulated):
    star = starfile.read(simulated / "particles.star")
    assert list(star) == ["optics", "particles"]
    p = star["particles"]
    assert len(p) == 600 and set(p["rlnRandomSubset"]) == {1, 2}
    with mrcfile.open(simulated / "particles.mrcs", permissive=False) as m:
        assert m.data.shape == (600, 32, 32)
        assert float(m.voxel_size.x) == pytest.approx(6.0)
    truth = starfile.read(simulated / "ground_truth" / "motion.star")["particles"]
    assert truth["dmMotion"].between(-1, 1).all() and truth["dmMotion"].std() > 0.4
    assert len(list((simulated / "ground_truth").glob("state_*.mrc"))) == 5
    for name in ("consensus_map.mrc", "mask.mrc"):
        assert (simulated / name).is_file()


def test_preset_makes_a_realistic_dataset_and_its_motion_free_twin(tmp_path):
    """A protein-like preset at low SNR: its consensus is a reconstruction of the particles
    (close to the motion-averaged truth), region masks come with the truth, and --no-motion
    images the same particles (poses, CTFs, half sets, noise) in the reference state."""
    common = ["--preset", "clamp", "--n-particles", "300", "--box-size", "32",
              "--pixel-size", "3.0", "--seed", "4"]
    moving, still = tmp_path / "moving", tmp_path / "still"
    assert main(["simulate", "--output-directory", str(moving), *common]) == 0
    assert main(["simulate", "--output-directory", str(still), "--no-motion", *common]) == 0
    a = starfile.read(moving / "particles.star")
    b = starfile.read(still / "particles.star")
    assert float(a["optics"]["rlnImagePixelSize"][0]) == 3.0  # explicit options win
    columns = [c for c in a["particles"].columns if c != "rlnImageName"]
    assert a["particles"][columns].equals(b["particles"][columns])
    t = starfile.read(moving / "ground_truth" / "motion.star")["particles"]["dmMotion"]
    assert t.std() > 0.4
    assert (starfile.read(still / "ground_truth" / "motion.star")["particles"]["dmMotion"]
            == 0).all()
    images = {k: mrcfile.read(d / "particles.mrcs") for k, d in (("a", moving), ("b", still))}
    diff = images["a"] - images["b"]  # same noise: only the moving lobes' signal differs
    assert float(diff.std()) < 0.3 * float(images["b"].std())
    order = np.argsort(np.abs(t.to_numpy()))  # the difference grows with the motion
    assert float(np.linalg.norm(diff[order[0]])) < 0.2 * float(np.linalg.norm(diff[order[-1]]))
    for name in ("moving_region.mrc", "static_region.mrc"):
        region = mrcfile.read(moving / "ground_truth" / name)
        assert region.shape == (32, 32, 32) and region.max() == pytest.approx(1.0)
    consensus = torch.from_numpy(mrcfile.read(moving / "consensus_map.mrc").copy())
    truth = torch.from_numpy(mrcfile.read(moving / "ground_truth" / "state_+0.00.mrc").copy())
    assert float(fsc(consensus, truth)[1:6].mean()) > 0.8  # a noisy reconstruction, not a copy
    assert float(fsc(consensus, truth)[1:].mean()) < 0.999


def test_reconstruct_recovers_the_consensus(simulated, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["reconstruct", "--refinement-star-file", str(simulated / "particles.star"),
                 "--output-directory", str(out),
                 "--mask-file", str(simulated / "mask.mrc")]) == 0
    assert "Resolution:" in capsys.readouterr().out
    consensus = torch.tensor(mrcfile.read(simulated / "consensus_map.mrc").copy())
    half1 = torch.tensor(mrcfile.read(out / "map_half1.mrc").copy())
    with mrcfile.open(out / "map_half1.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(6.0)
    curve = fsc(half1, consensus)
    assert float(curve[1:8].min()) > 0.9  # low resolution: the average conformation
    table = starfile.read(out / "fsc.star")
    assert "rlnFourierShellCorrelationMaskedMaps" in table["fsc"].columns
    assert (out / "fsc.png").stat().st_size > 1000


def test_bad_input_fails_the_job_and_writes_nothing(tmp_path, capsys):
    job = tmp_path / "job"
    job.mkdir()
    code = main(["reconstruct", "--refinement-star-file", str(tmp_path / "missing.star"),
                 "--output-directory", str(job / "out"), "--pipeline-control", str(job)])
    assert code == 1
    err = capsys.readouterr().err
    assert "missing.star" in err and "input error" in err
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "out").exists()


def test_abort_request_stops_the_job(simulated, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    # RELION creates the abort file while the job runs; PipelineControl clears stale ones at
    # start, so create it from within the run through the first abort check.
    from relion_external import job_protocol

    original = job_protocol.PipelineControl.check_abort

    def abort_now(self):
        (job / job_protocol.ABORT_REQUEST).touch()
        return original(self)

    job_protocol.PipelineControl.check_abort = abort_now
    try:
        code = main(["reconstruct", "--refinement-star-file", str(simulated / "particles.star"),
                     "--output-directory", str(job), "--pipeline-control", str(job)])
    finally:
        job_protocol.PipelineControl.check_abort = original
    assert code == 2
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "map_half1.mrc").exists()
    assert np.all([not (job / f).exists() for f in
                   ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE")])
