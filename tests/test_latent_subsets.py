"""The explorer without a window: subset STAR files (round trip with optics, image names, all
columns and half sets), movies (maps and GIF), an opened session on a small trained run, and the
headless command with napari and Qt unimportable."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dynamight_core import latent_analysis as la
from relion_external.cli import main
from relion_external.latent_explorer import (
    ExplorerSession,
    open_session,
    projection_frames,
    run_actions,
    write_subset,
    write_volume_series,
)
from relion_external.latent_explorer.subsets import next_subset_path
from relion_external.star_io import RelionParticles, read_particles_star

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")


def trained_run(tmp_path_factory) -> Path:
    """A small optimize-deformations output directory, made once per test session (shared
    with tests/test_latent_viewer.py)."""
    root = tmp_path_factory.getbasetemp() / "latent_run"
    out = root / "job"
    if (out / "particles.star").is_file():
        return out
    data = root / "sim"
    assert main(["simulate", "--output-directory", str(data), "--n-particles", "240",
                 "--box-size", "32", "--pixel-size", "6.0", "--snr", "2.0",
                 "--n-gaussians", "300"]) == 0
    assert main(["optimize-deformations", "--refinement-star-file",
                 str(data / "particles.star"), "--initial-model",
                 str(data / "consensus_map.mrc"), "--output-directory", str(out),
                 "--n-gaussians", "300", "--batch-size", "32", "--n-threads", "1",
                 "--n-epochs", "3", "--n-warmup-epochs", "1", "--n-map-fit-steps", "30"]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def session(run_dir) -> ExplorerSession:
    return open_session(run_dir, 1)


def fake_star(n: int = 10) -> RelionParticles:
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["og1", "og2"],
                           "rlnImagePixelSize": [1.5, 1.5], "rlnImageSize": [64, 64]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job007/mics/m{i % 3:02d}.mrcs" for i in range(n)],
        "rlnAngleTilt": np.linspace(0.0, 90.0, n),
        "rlnOpticsGroup": [1 + i % 2 for i in range(n)],
        "rlnRandomSubset": [1 + (i // 2) % 2 for i in range(n)],
        "rlnSomethingUnknown": [f"x{i}" for i in range(n)],
    })
    return RelionParticles(path=None, optics=optics, particles=particles)


def test_subset_round_trip_keeps_optics_names_columns_and_half_sets(tmp_path):
    star = fake_star()
    rows = np.array([7, 2, 4, 2])
    result = write_subset(tmp_path / "subsets", star, rows)
    assert result.path == tmp_path / "subsets" / "subset_1.star"
    back = read_particles_star(result.path)
    pd.testing.assert_frame_equal(back.optics, star.optics, check_dtype=False)
    expected = star.particles.iloc[[2, 4, 7]].reset_index(drop=True)
    assert list(back.particles.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(back.particles, expected, check_dtype=False)
    assert (result.n_particles, result.n_half1, result.n_half2) == (3, 1, 2)
    assert next_subset_path(tmp_path / "subsets").name == "subset_2.star"
    assert write_subset(tmp_path / "subsets", star, [0]).path.name == "subset_2.star"


def test_subset_adds_half_sets_when_the_input_had_none(tmp_path):
    star = fake_star()
    star.particles = star.particles.drop(columns="rlnRandomSubset")
    half_set = np.array([2, 1] * 5)
    result = write_subset(tmp_path, star, [0, 1, 4], half_set=half_set)
    back = read_particles_star(result.path)
    np.testing.assert_array_equal(back.particles["rlnRandomSubset"], [2, 1, 2])
    with pytest.raises(ValueError, match="no particles"):
        write_subset(tmp_path, star, [])


def test_movie_writes_maps_and_gif(tmp_path):
    volumes = torch.zeros(4, 8, 8, 8)
    for t in range(4):
        volumes[t, 4, 4, 2 + t] = 1.0  # a moving point
    frames = projection_frames(volumes)
    assert frames.shape == (4, 8, 24, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])
    result = write_volume_series(tmp_path / "movie", volumes, 2.5, np.zeros((4, 2)))
    assert [p.name for p in result.maps] == [f"frame_{i:03d}.mrc" for i in range(4)]
    with mrcfile.open(result.maps[2]) as mrc:
        np.testing.assert_array_equal(mrc.data, volumes[2].numpy())
        assert float(mrc.voxel_size.x) == pytest.approx(2.5)
    with Image.open(result.gif) as gif:
        assert gif.n_frames == 2 * 4 - 2  # forth and back
        assert gif.size[1] >= 192


def test_session_colourings_and_points(session):
    n = len(session.indices)
    assert np.all(session.run.half_set[session.indices] == 1)
    for name in la.COLOURINGS:
        values = session.colouring(name)
        assert values.shape == (n,), name
        if name != "half-set agreement":
            assert np.isfinite(values).all(), name
    agreement = session.colouring("half-set agreement")
    held = session.run.validation.numpy()[session.indices]
    assert np.isfinite(agreement[held]).all() and np.isnan(agreement[~held]).all()
    xy = session.coords[3]
    point = session.point(xy)
    z, _ = session.latent_of(xy[None])
    np.testing.assert_allclose(point.latent, z[0])
    np.testing.assert_allclose(z[0], session.latents[3], atol=1e-9)  # PCA of d = 2 is exact
    direct = la.latent_map_3d(session.model, torch.as_tensor(z[0], dtype=torch.float32),
                              oversampling=session.preview_oversampling)
    torch.testing.assert_close(point.volume, direct)
    assert point.vectors_zyx.shape == (session.model.gaussians.n_gaussians, 2, 3)
    assert np.isfinite(point.vector_error).all()


def test_session_subset_in_polygon_round_trip(session):
    xy = session.coords
    x0, y0 = np.median(xy, axis=0)
    polygon = np.array([[x0, y0], [xy[:, 0].max() + 1, y0], [xy[:, 0].max() + 1,
                        xy[:, 1].max() + 1], [x0, xy[:, 1].max() + 1]])
    inside = session.indices[(xy[:, 0] > x0) & (xy[:, 1] > y0)]
    result = session.subset_in_polygon(polygon)
    assert result.path.parent == session.output_directory / "subsets"
    back = read_particles_star(result.path)
    ours = read_particles_star(session.output_directory / "particles.star")
    pd.testing.assert_frame_equal(back.optics, ours.optics)
    expected = ours.particles.iloc[np.sort(inside)].reset_index(drop=True)
    pd.testing.assert_frame_equal(back.particles, expected)
    np.testing.assert_array_equal(back.particles["rlnRandomSubset"], 1)


def test_session_movie_and_maps_along_pcs(session):
    xy = session.coords
    path = np.stack([xy.min(axis=0), xy.max(axis=0)])
    movie = session.movie(path, 3)
    assert movie.folder.parent == session.output_directory / "latent_space" / "movies"
    assert len(movie.maps) == 3 and movie.gif.is_file()
    assert movie.volumes.shape == (3, session.box_size, session.box_size, session.box_size)
    axes = session.maps_along_principal_axes(1, 3)
    assert [len(a.maps) for a in axes] == [3]
    assert axes[0].folder.name == "half1_pc1"


def test_validation_view_sees_both_halves(run_dir):
    s = open_session(run_dir, 0)
    np.testing.assert_array_equal(s.indices, np.flatnonzero(s.run.validation.numpy()))
    assert s.other_latents.shape == s.latents.shape
    assert s.embedding.latent_dim == 2 * s.latent_dim
    agreement = s.colouring("half-set agreement")
    assert np.isfinite(agreement).all() and (agreement > 0).all()
    point = s.point(s.coords[0])
    assert point.vector_error.shape == (s.model.gaussians.n_gaussians,)
    clusters = s.subsets_by_cluster(2)
    assert sum(c.n_particles for c in clusters) == len(s.indices)


def test_headless_actions(session):
    out = run_actions(session, n_frames=2, subset_clusters=2)
    assert out.plot.is_file() and out.plot.name == "embedding_half1.png"
    assert len(out.subsets) == 2 and not out.movies


def test_headless_command_imports_no_gui(run_dir):
    """The CLI and its headless actions with napari and Qt made unimportable."""
    code = f"""
import sys
for name in {GUI_MODULES!r}:
    sys.modules[name] = None  # import fails
from relion_external.cli import main
rc = main(["explore-latent-space", {str(run_dir)!r}, "--half-set", "2", "--headless",
           "--movie-from=-1,0", "--movie-to", "1,0", "--n-frames", "2",
           "--subset-polygon=-100,-100;100,-100;100,100;-100,100"])
loaded = [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in {GUI_MODULES!r}]
assert rc == 0 and not loaded, (rc, loaded)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "subset_" in done.stdout and "particles (" in done.stdout
    movies = sorted((run_dir / "latent_space" / "movies").glob("movie_*/movie.gif"))
    assert movies


def test_command_without_display_writes_the_headless_outputs(run_dir, tmp_path, monkeypatch,
                                                             capsys):
    """As RELION-5 runs "Do visualization?" (never with --headless) on a node without a display:
    the embedding plot and maps along 2 principal directions instead of the window, a note in
    run.out, and the job Succeeded."""
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    job = tmp_path / "relion_job"
    job.mkdir()
    folder = run_dir / "latent_space"
    for old in [folder / "embedding_half2.png", *folder.glob("maps_along_pcs/half2_pc*/*.mrc")]:
        old.unlink(missing_ok=True)
    assert main(["explore-latent-space", str(run_dir), "--half-set", "2", "--n-frames", "2",
                 "--pipeline-control", str(job)]) == 0
    assert sorted(p.name for p in job.glob("RELION_JOB_EXIT_*")) == ["RELION_JOB_EXIT_SUCCESS"]
    out = capsys.readouterr().out
    assert "note: no display (DISPLAY is not set), so no napari window" in out
    assert (folder / "embedding_half2.png").stat().st_size > 0
    for pc in (1, 2):
        assert len(list((folder / "maps_along_pcs" / f"half2_pc{pc}").glob("*.mrc"))) == 2


def test_screenshot_without_display_says_what_to_do(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["explore-latent-space", str(run_dir), "--screenshot", "x.png"]) == 1
    assert "xvfb-run" in capsys.readouterr().err


def test_command_rejects_bad_coordinates(run_dir, capsys):
    assert main(["explore-latent-space", str(run_dir), "--subset-polygon", "1,2;3"]) == 1
    assert "--subset-polygon" in capsys.readouterr().err


def test_disk_full_is_a_one_line_error_and_leaves_no_partial_file(run_dir, tmp_path, capsys,
                                                                  monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = run_dir / "latent_space"
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["explore-latent-space", str(run_dir), "--half-set", "2", "--headless"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(folder / "embedding_half2.png") in err and "no space left" in err
    assert sorted(p.name for p in folder.iterdir()) == before
