"""Tracks of a time series: read from the STAR columns (or one per micrograph), clear errors
naming the file and the column, tracks kept whole in one half set and in validation, and the
simulated series move smoothly in conformation and pose."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from dynamight_core.deformation_model import split_validation
from dynamight_core.simulation import plan_tracks
from relion_external.errors import InputError
from relion_external.tracks import half_sets_by_track, read_tracks


def test_tracks_and_times_from_the_columns_or_one_track_per_micrograph():
    table = pd.DataFrame({"rlnDynaMightTrack": [3, 3, -1, 7], "rlnDynaMightTime": [1, 0, 0, 2.5],
                          "rlnMicrographName": ["a", "a", "b", "c"]})
    track, time = read_tracks("p.star", table)
    np.testing.assert_array_equal(track, [3, 3, -1, 7])
    np.testing.assert_array_equal(time, [1, 0, 0, 2.5])
    track, _ = read_tracks("p.star", table.drop(columns="rlnDynaMightTrack"))
    np.testing.assert_array_equal(track, [0, 0, 1, 2])


@pytest.mark.parametrize("table, field, problem", [
    (pd.DataFrame({"rlnDynaMightTrack": [1]}), "rlnDynaMightTime", "missing"),
    (pd.DataFrame({"rlnDynaMightTime": [1.0]}), "rlnDynaMightTrack", "missing"),
    (pd.DataFrame({"rlnDynaMightTrack": [1, 1.5], "rlnDynaMightTime": [0, 1]}),
     "rlnDynaMightTrack", "row 2 is not an integer"),
    (pd.DataFrame({"rlnDynaMightTrack": [1, 1], "rlnDynaMightTime": [0, "x"]}),
     "rlnDynaMightTime", "row 2 is not a number"),
    (pd.DataFrame({"rlnDynaMightTrack": [2, 2, 2], "rlnDynaMightTime": [0, 4, 4]}),
     "rlnDynaMightTime", "track 2 has two particles at time 4"),
])
def test_bad_track_columns_name_the_file_and_the_column(table, field, problem):
    with pytest.raises(InputError) as err:
        read_tracks("Select/job003/particles.star", table)
    assert err.value.path == "Select/job003/particles.star" and err.value.field == field
    assert problem in err.value.problem


def test_a_track_split_between_halves_moves_whole_to_its_majority(caplog):
    track = np.array([0, 0, 0, 1, 1, 2, 2, -1, -1])
    half = np.array([1, 2, 2, 1, 1, 1, 2, 1, 2])
    with caplog.at_level(logging.WARNING):
        moved = half_sets_by_track("p.star", half, track)
    np.testing.assert_array_equal(moved, [2, 2, 2, 1, 1, 1, 1, 1, 2])
    assert "2 of 3 tracks had particles in both half sets" in caplog.text
    assert "(2 particles changed half)" in caplog.text
    np.testing.assert_array_equal(half_sets_by_track("p.star", moved, track), moved)


def test_validation_holds_out_whole_tracks_from_each_half():
    tracks = np.repeat(np.arange(40), 5)
    half = torch.from_numpy(np.where(tracks % 2 == 0, 1, 2))
    held = split_validation(half, 0.1, seed=0, groups=tracks).numpy()
    for k in range(40):
        assert len(set(held[tracks == k])) == 1  # all or none of a track
    assert held.sum() == 2 * 2 * 5  # round(0.1 · 20) tracks of 5 in each half
    # untracked particles (group < 0) are held out one by one
    alone = split_validation(half, 0.1, seed=0, groups=np.full(200, -1)).numpy()
    assert alone.sum() == 20


def test_simulated_series_move_smoothly_in_conformation_and_pose():
    plan = plan_tracks(12, 30, seed=4, drift_per_frame=0.04, diffusion_per_frame=0.05,
                       rotation_degrees_per_frame=3.0)
    p = plan.plan
    assert p.motion.shape == (360,) and float(p.motion.abs().max()) <= 1.0
    np.testing.assert_array_equal(plan.track.numpy(), np.repeat(np.arange(12), 30))
    np.testing.assert_array_equal(plan.time.numpy(), np.tile(np.arange(30), 12))
    m = p.motion.reshape(12, 30)
    steps = (m[:, 1:] - m[:, :-1]).abs()
    assert float(steps.max()) < 0.04 + 5 * 0.05  # drift plus a 5σ diffusion step
    assert float(m.std(dim=1).mean()) < 0.6 * float(m.std())  # tracks stay near their course
    r = p.rotations.double()
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64)
                               .expand(360, 3, 3), atol=1e-9, rtol=0)
    rel = r.reshape(12, 30, 3, 3)
    rel = rel[:, 1:].transpose(-1, -2) @ rel[:, :-1]
    angle = torch.rad2deg(torch.arccos(((torch.diagonal(rel, dim1=-2, dim2=-1).sum(-1) - 1) / 2)
                                       .clamp(-1, 1)))
    assert float(angle.max()) <= 3.0 + 1e-6
    for k in range(12):  # one half set and one defocus per track
        rows = slice(30 * k, 30 * (k + 1))
        assert len(set(p.half_set[rows].tolist())) == 1
        assert len(set(p.ctf.defocus_u_angstrom[rows].tolist())) == 1
    assert set(p.half_set.tolist()) == {1, 2}


def test_simulated_series_with_a_reconstructed_consensus(tmp_path):
    """Batches of one half set's tracks only (64 images, 50 frames a track) must not break the
    rigid reconstruction of the consensus map."""
    import starfile

    from relion_external.cli import main
    assert main(["simulate", "--output-directory", str(tmp_path), "--tracks", "4", "--frames",
                 "50", "--box-size", "24", "--pixel-size", "8.0", "--n-gaussians", "200",
                 "--consensus", "reconstruction", "--batch-size", "64"]) == 0
    p = starfile.read(tmp_path / "particles.star")["particles"]
    assert len(p) == 200 and set(p["rlnDynaMightTrack"]) == {0, 1, 2, 3}
    truth = starfile.read(tmp_path / "ground_truth" / "motion.star")["particles"]
    np.testing.assert_array_equal(truth["rlnDynaMightTime"], np.tile(np.arange(50), 4))
