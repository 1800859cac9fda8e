"""The napari window of explore-latent-space (pytest-qt, napari's make_napari_viewer, a display
from pytest-xvfb): a click shows the map of that latent point, a polygon writes a subset STAR
file, a path makes a movie, the colouring can be switched, and screenshots show something.

Skipped, with the reason, without napari, pytest-qt, a display or working Qt libraries
(``pip install -e ".[dev,gui-test]"`` plus Xvfb and Qt's system libraries: scripts/test.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from test_latent_subsets import trained_run

from dynamight_core import latent_analysis as la
from relion_external.cli import main
from relion_external.latent_explorer import open_session
from relion_external.latent_explorer.colours import COLOURINGS, colour_values
from relion_external.latent_explorer.movie import MovieResult
from relion_external.latent_explorer.subsets import SubsetResult
from relion_external.latent_explorer.viewer import LatentExplorer, _to_layer
from relion_external.star_io import read_particles_star

pytest.importorskip("napari", reason="napari is not installed (pip install -e '.[gui-test]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (pip install -e '.[gui-test]')")
if not os.environ.get("DISPLAY"):
    pytest.skip("no display: install Xvfb (pytest-xvfb starts it) or run under xvfb-run",
                allow_module_level=True)
_probe = subprocess.run(
    [sys.executable, "-c", "from qtpy.QtWidgets import QApplication; QApplication([])"],
    check=False, capture_output=True, text=True, timeout=120)
if _probe.returncode != 0:
    pytest.skip("Qt cannot start on this display (missing system libraries?): "
                + _probe.stderr.strip()[-300:], allow_module_level=True)
interactions = pytest.importorskip("napari.utils.interactions")


class _Event:
    """A mouse event as napari hands it to drag callbacks (napari swaps ``__wrapped__`` for
    the release event)."""

    def __init__(self, type, position, pos=(50.0, 50.0)):
        self.__wrapped__ = _Plain(type=type, button=1, modifiers=(), position=tuple(position),
                                  pos=np.asarray(pos, dtype=float),
                                  is_dragging=type == "mouse_move")

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)


class _Plain:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def click(viewer, position) -> None:
    interactions.mouse_press_callbacks(viewer, _Event("mouse_press", position))
    interactions.mouse_release_callbacks(viewer, _Event("mouse_release", position))


@pytest.fixture
def explorer(make_napari_viewer, tmp_path_factory) -> LatentExplorer:
    session = open_session(trained_run(tmp_path_factory), 1)
    latent_viewer = make_napari_viewer(show=True)
    map_viewer = make_napari_viewer(show=True)
    return LatentExplorer(session, latent_viewer, map_viewer, n_frames=3)


def test_click_shows_the_map_of_that_latent_point(explorer):
    e = explorer
    assert not e.map_layer.data.any()
    xy = e.session.coords[5]
    t0 = time.perf_counter()
    click(e.latent_viewer, _to_layer(xy[None])[0])
    seconds = time.perf_counter() - t0
    expected = e.session.point(xy)
    np.testing.assert_allclose(e.map_layer.data, expected.volume.numpy())
    np.testing.assert_allclose(e.vectors_layer.data, expected.vectors_zyx)
    np.testing.assert_allclose(e.marker_layer.data[0], _to_layer(xy[None])[0])
    assert e.vectors_layer.edge_color.shape == (expected.vectors_zyx.shape[0], 4)
    assert seconds < 2.0
    # a press that drags is a pan: nothing new is shown
    before = e.map_layer.data.copy()
    position = _to_layer(e.session.coords[0:1])[0]
    far = (80.0, 80.0)  # canvas pixels away from the press
    interactions.mouse_press_callbacks(e.latent_viewer, _Event("mouse_press", position))
    interactions.mouse_move_callbacks(e.latent_viewer, _Event("mouse_move", position, far))
    interactions.mouse_release_callbacks(e.latent_viewer, _Event("mouse_release", position, far))
    np.testing.assert_array_equal(e.map_layer.data, before)


def test_polygon_writes_a_subset(explorer):
    e = explorer
    xy = e.session.coords
    low, high = np.percentile(xy, [20, 80], axis=0)
    polygon = np.array([[low[0], low[1]], [high[0], low[1]], [high[0], high[1]],
                        [low[0], high[1]]])
    e.shapes_layer.add_polygons([_to_layer(polygon)])
    result = e.last_result
    assert isinstance(result, SubsetResult)
    inside = np.sort(e.session.indices[la.points_in_polygon_2d(xy, polygon)])
    assert result.n_particles == inside.size > 0
    back = read_particles_star(result.path)
    ours = read_particles_star(e.session.output_directory / "particles.star")
    assert back.optics.equals(ours.optics)
    assert back.particles.equals(ours.particles.iloc[inside].reset_index(drop=True))
    assert str(result.path) in e._status_label.text()


def test_path_makes_a_movie(explorer):
    e = explorer
    xy = e.session.coords
    e.shapes_layer.add_paths([_to_layer(np.stack([xy.min(axis=0), xy.max(axis=0)]))])
    result = e.last_result
    assert isinstance(result, MovieResult)
    assert len(result.maps) == 3 and all(p.is_file() for p in result.maps)
    assert result.gif.is_file()
    box = e.session.box_size
    assert e.movie_layer.data.shape == (3, box, box, box) and e.movie_layer.visible


def test_colouring_can_be_switched(explorer):
    e = explorer
    e._combo.setCurrentText("tilt")
    expected = colour_values(e.session.colouring("tilt"), COLOURINGS["tilt"])
    np.testing.assert_allclose(e.points_layer.face_color, expected, atol=1e-6)
    assert "degrees" in e._range_label.text()


def test_screenshot_shows_points_and_map(explorer):
    e = explorer
    e.show_point(e.session.coords[0])
    e.reset_views()
    latent = e.latent_viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    e.points_layer.visible = False
    empty = e.latent_viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    e.points_layer.visible = True
    assert latent.std() > 5.0
    changed = np.abs(latent.astype(int) - empty.astype(int)).max(axis=-1) > 30
    assert changed.sum() > 100  # the points are drawn
    picture = e.grab(canvas_only=True)
    assert picture.shape[1] > latent.shape[1]
    map_part = picture[:, latent.shape[1]:, :3]
    assert map_part.std() > 3.0


def test_screenshot_command(tmp_path_factory, tmp_path, qtbot):
    png = tmp_path / "explorer.png"
    run_dir = trained_run(tmp_path_factory)
    assert main(["explore-latent-space", str(run_dir), "--half-set", "1",
                 "--screenshot", str(png)]) == 0
    from PIL import Image

    with Image.open(png) as image:
        picture = np.asarray(image)[..., :3]
    assert picture.shape[1] > picture.shape[0] and picture.std() > 10.0
