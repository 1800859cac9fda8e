"""``optimize-deformations --temporal-prior`` end to end on a simulated series: tracks whole in
one half set and in validation, the prior tying the codes of a track together, the learnt
correlation time in the checkpoint, exact resumption, and a clear error without the columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from relion_external.cli import main


def optimize(data: Path, out: Path, *extra: str) -> int:
    return main(["optimize-deformations", "--refinement-star-file", str(data / "particles.star"),
                 "--initial-model", str(data / "consensus_map.mrc"),
                 "--output-directory", str(out), "--n-gaussians", "400", "--batch-size", "32",
                 "--n-threads", "2", "--checkpoint-interval", "1", "--validation-fraction",
                 "0.2", *extra])


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("series")
    assert main(["simulate", "--output-directory", str(out), "--tracks", "20", "--frames", "12",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "0.3",
                 "--n-gaussians", "400"]) == 0
    return out


def _within_track_spread(star: Path) -> float:
    """Mean variance of the codes within a track over their variance over all particles."""
    p = starfile.read(star)["particles"]
    z = p[["rlnDynaMightLatent1", "rlnDynaMightLatent2"]].to_numpy()
    within = np.mean([z[p["rlnDynaMightTrack"] == k].var(0).sum()
                      for k in np.unique(p["rlnDynaMightTrack"])])
    return float(within / z.var(0).sum())


def test_temporal_prior_keeps_tracks_whole_and_ties_their_codes(series, tmp_path):
    assert optimize(series, tmp_path / "standard", "--n-epochs", "4") == 0
    assert optimize(series, tmp_path / "temporal", "--n-epochs", "4", "--temporal-prior") == 0
    p = starfile.read(tmp_path / "temporal" / "particles.star")["particles"]
    for _, rows in p.groupby("rlnDynaMightTrack"):
        assert rows["rlnDynaMightHalfSet"].nunique() == 1
        assert rows["rlnDynaMightValidation"].nunique() == 1
    assert p["rlnDynaMightValidation"].sum() == 2 * 2 * 12  # round(0.2 · 10) tracks per half
    state = torch.load(tmp_path / "temporal" / "forward_deformations" / "checkpoints" /
                       "checkpoint_final.pth", weights_only=True)
    for half in ("1", "2"):
        temporal = state["halves"][half]["temporal"]
        assert temporal["correlation_time"] > 0
        assert temporal["track"].shape == state["halves"][half]["latents"].shape[:1]
    assert "temporal" not in torch.load(tmp_path / "standard" / "forward_deformations" /
                                        "checkpoints" / "checkpoint_final.pth",
                                        weights_only=True)["halves"]["1"]
    # outputs to look at: the trajectories, and a movie of one track through time
    assert (tmp_path / "temporal" / "track_latents.png").stat().st_size > 10_000
    assert not (tmp_path / "standard" / "track_latents.png").exists()
    first = p[p["rlnDynaMightHalfSet"] == 1]
    k = int(first["rlnDynaMightTrack"].iloc[0])
    assert main(["explore-latent-space", str(tmp_path / "temporal"), "--half-set", "1",
                 "--track-movie", str(k), "--n-frames", "4"]) == 0
    movie = tmp_path / "temporal" / "latent_space" / "movies" / f"track_{k}"
    assert sorted(f.name for f in movie.glob("frame_*.mrc")) == [
        f"frame_{i:03d}.mrc" for i in range(4)]
    assert (movie / "movie.gif").is_file()
    other = int(p.loc[p["rlnDynaMightHalfSet"] == 2, "rlnDynaMightTrack"].iloc[0])
    assert main(["explore-latent-space", str(tmp_path / "temporal"), "--half-set", "1",
                 "--track-movie", str(other)]) != 0
    # the codes of one track move together under the prior, far less without it
    tied = _within_track_spread(tmp_path / "temporal" / "particles.star")
    free = _within_track_spread(tmp_path / "standard" / "particles.star")
    assert tied < 0.7 * free, (tied, free)  # measured 0.11 against 0.27


def test_temporal_training_resumes_exactly(series, tmp_path):
    assert optimize(series, tmp_path / "straight", "--n-epochs", "3", "--temporal-prior") == 0
    assert optimize(series, tmp_path / "resumed", "--n-epochs", "1", "--temporal-prior") == 0
    assert optimize(series, tmp_path / "resumed", "--n-epochs", "3", "--temporal-prior") == 0
    straight, resumed = ((tmp_path / run / "forward_deformations" / "loss_log.txt")
                         .read_text().splitlines() for run in ("straight", "resumed"))
    assert len(resumed) == 3
    for a, b in zip(straight, resumed):
        va, vb = (np.array(line.split()[3::2], dtype=float) for line in (a, b))
        np.testing.assert_allclose(vb, va, rtol=1e-5, atol=1e-8)


def test_temporal_prior_without_the_columns_is_a_clear_input_error(tmp_path, capsys):
    data = tmp_path / "plain"
    assert main(["simulate", "--output-directory", str(data), "--n-particles", "40",
                 "--box-size", "24", "--pixel-size", "8.0", "--n-gaussians", "200"]) == 0
    capsys.readouterr()
    assert optimize(data, tmp_path / "job", "--n-epochs", "1", "--temporal-prior") != 0
    err = capsys.readouterr().err
    assert "particles.star: rlnDynaMightTime: missing" in err
    assert "Traceback" not in err
