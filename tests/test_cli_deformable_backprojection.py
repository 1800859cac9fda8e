"""`dynamight deformable-backprojection` end to end: simulate -> optimize-deformations (a few
epochs) -> deformed half maps, FSC, exit files, errors; and the halves' independence."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from dynamight_core import backprojection_stage
from relion_external.cli import main
from relion_external.commands.deformable_backprojection import backproject_half
from relion_external.forward_run import load_forward_run

BOX, PX = 32, 6.0


@pytest.fixture(autouse=True)
def _restore_logging():
    """``cli.main`` points the root logger at the sys.stdout of the moment (capsys's, in some
    tests); put the previous handlers back so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A small simulated dataset and a 2-epoch optimize-deformations run on it."""
    root = tmp_path_factory.mktemp("dbp")
    data, job = root / "sim", root / "job"
    assert main(["simulate", "--output-directory", str(data), "--n-particles", "160",
                 "--box-size", str(BOX), "--pixel-size", str(PX), "--snr", "1.0",
                 "--n-gaussians", "300"]) == 0
    assert main(["optimize-deformations", "--refinement-star-file", str(data / "particles.star"),
                 "--initial-model", str(data / "consensus_map.mrc"), "--output-directory",
                 str(job), "--n-gaussians", "300", "--batch-size", "32", "--n-threads", "1",
                 "--n-epochs", "2", "--n-map-fit-steps", "20"]) == 0
    return data, job


def test_writes_half_maps_fsc_and_exit_file(trained, tmp_path, capsys):
    data, job = trained
    control = tmp_path / "relion_job"
    control.mkdir()
    assert main(["deformable-backprojection", str(job), "--batch-size", "24", "--n-threads", "1",
                 "--mask-file", str(data / "mask.mrc"), "--pipeline-control", str(control)]) == 0
    assert (control / "RELION_JOB_EXIT_SUCCESS").exists()
    nodes = starfile.read(control / "RELION_OUTPUT_NODES.star")
    assert nodes["rlnPipeLineNodeName"].tolist() == [
        f"{job.as_posix()}/backprojection/map_half{h}.mrc" for h in (1, 2)]
    assert set(nodes["rlnPipeLineNodeTypeLabel"]) == {"DensityMap.mrc.relion.halfmap.dynamight"}
    assert set(nodes["rlnPipeLineNodeType"]) == {10}
    out = job / "backprojection"
    maps = []
    for half in (1, 2):
        with mrcfile.open(out / f"map_half{half}.mrc") as mrc:
            assert mrc.data.shape == (BOX, BOX, BOX)
            assert mrc.voxel_size.x == pytest.approx(PX)
            maps.append(np.array(mrc.data))
    assert all(np.isfinite(m).all() and m.std() > 0 for m in maps)
    assert not np.allclose(maps[0], maps[1])  # two independent reconstructions
    table = starfile.read(out / "fsc.star")
    curve = table["fsc"]
    assert len(curve) == BOX // 2 + 1
    assert {"rlnFourierShellCorrelationUnmaskedMaps",
            "rlnFourierShellCorrelationMaskedMaps"} <= set(curve.columns)
    assert curve["rlnFourierShellCorrelationUnmaskedMaps"].iloc[1:4].min() > 0.5
    assert (out / "fsc.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Resolution:" in printed
    assert "particles/s" in printed


def test_downsample_halves_the_box(trained, tmp_path):
    _, job = trained
    assert main(["deformable-backprojection", str(job), "--batch-size", "64", "--n-threads", "1",
                 "--downsample", "2"]) == 0
    with mrcfile.open(job / "backprojection" / "map_half1.mrc") as mrc:
        assert mrc.data.shape == (BOX // 2,) * 3
        assert mrc.voxel_size.x == pytest.approx(2 * PX)
    assert main(["deformable-backprojection", str(job), "--downsample", "3"]) == 1


def test_bad_output_directory_fails_clearly(tmp_path, capsys):
    control = tmp_path / "relion_job"
    control.mkdir()
    missing = tmp_path / "nowhere"
    assert main(["deformable-backprojection", str(missing), "--pipeline-control",
                 str(control)]) == 1
    assert (control / "RELION_JOB_EXIT_FAILURE").exists()
    err = capsys.readouterr().err
    assert str(missing) in err and "optimize-deformations" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["deformable-backprojection", str(empty)]) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_halves_share_no_model(trained, monkeypatch):
    """Gold standard by value: each half's map depends on that half's model and codes only.
    Wrecking half 2 leaves half 1's map bit for bit as it was and changes half 2's own map (and
    the other way round); every particle of the half is used, validation ones included."""
    _, job = trained
    run = load_forward_run(job)
    storage = {half: {p.untyped_storage().data_ptr() for p in run.models[half].parameters()}
               for half in (1, 2)}
    assert not storage[1] & storage[2]
    assert (run.models[1].gaussians.positions.untyped_storage().data_ptr()
            != run.models[2].gaussians.positions.untyped_storage().data_ptr())
    before = {h: backproject_half(run, h, batch_size=40, grid_size=9) for h in (1, 2)}
    for wrecked, kept in ((2, 1), (1, 2)):
        run = load_forward_run(job)
        with torch.no_grad():
            for p in run.models[wrecked].decoder.parameters():
                p.add_(0.3 * torch.randn_like(p))
            trainer = run.trainers[wrecked]
            trainer.final_latents = trainer.stored_latents(trainer.known_indices) + 1.0
        assert torch.equal(backproject_half(run, kept, batch_size=40, grid_size=9),
                           before[kept])
        changed = backproject_half(run, wrecked, batch_size=40, grid_size=9)
        assert float((changed - before[wrecked]).abs().max()) > 1e-3 * float(
            before[wrecked].abs().max())
    seen = []

    class Counting(backprojection_stage.DeformedBackprojector):
        def add(self, images, *args, **kwargs):
            seen.append(images.shape[0])
            super().add(images, *args, **kwargs)

    monkeypatch.setattr(backprojection_stage, "DeformedBackprojector", Counting)
    backproject_half(run, 1, batch_size=40, grid_size=9)
    in_half = run.half_set == 1
    assert (run.validation.numpy() & in_half).any()
    assert sum(seen) == int(in_half.sum()) and len(seen) == -(-int(in_half.sum()) // 40)


def test_codes_used_are_the_ones_written_to_particles_star(trained):
    """The backprojection reads each particle's code from its own half (as written to
    particles.star); the other half's model infers different codes for the same images."""
    _, job = trained
    run = load_forward_run(job)
    table = starfile.read(job / "particles.star")["particles"]
    written = table[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()
    for half in (1, 2):
        rows = np.flatnonzero(run.half_set == half)[:30]
        batch = next(iter(run.batches(rows, 30)))
        own = run.latents(half, batch).cpu().numpy()
        np.testing.assert_allclose(own, written[rows], rtol=1e-5, atol=1e-6)
        other = run.latents(3 - half, batch).cpu().numpy()
        assert np.abs(other - own).max() > 1e-3


def _one_line_error(capsys, *names: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


def test_disk_full_is_a_one_line_error_and_leaves_no_partial_map(trained, tmp_path, capsys,
                                                                 monkeypatch):
    _, job = trained
    out = tmp_path / "job"
    shutil.copytree(job / "forward_deformations", out / "forward_deformations")
    shutil.copy(job / "particles.star", out / "particles.star")

    def disk_full(fd):  # the data written so far only fails to reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    control = tmp_path / "relion_job"
    control.mkdir()
    assert main(["deformable-backprojection", str(out), "--batch-size", "40", "--n-threads",
                 "1", "--downsample", "2", "--pipeline-control", str(control)]) == 1
    _one_line_error(capsys, str(out / "backprojection" / "map_half1.mrc"), "no space left")
    assert (control / "RELION_JOB_EXIT_FAILURE").exists()
    assert list((out / "backprojection").iterdir()) == []


def test_a_damaged_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    _, job = trained
    damaged = tmp_path / "checkpoint_final.pth"
    data = (job / "forward_deformations" / "checkpoints" / "checkpoint_final.pth").read_bytes()
    damaged.write_bytes(data[:len(data) // 3])
    assert main(["deformable-backprojection", str(job), "--checkpoint-file", str(damaged)]) == 1
    _one_line_error(capsys, str(damaged), "truncated")
