"""The napari window of the explorer (the only module that imports napari or Qt, lazily).

Two viewers: the latent space (2D: the particles as points, a marker at the shown latent point,
a shapes layer to draw paths and polygons on, and a dock widget to choose the colouring) and
the map (3D: the density of the latent point as an iso-surface, the deformation as arrows, and
the last movie as a time series). Every action is a method of :class:`LatentExplorer` that the
mouse and shape callbacks call and tests call directly; the work is done by the
:class:`~.session.ExplorerSession`.

Points are drawn at napari coordinates ``(row, col) = (-y, x)`` of the embedding, so the plot
has x to the right and y up.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import numpy as np

from .._atomic import atomic_output
from .colours import COLOURINGS, colour_values, value_range
from .session import ExplorerSession, LatentPoint

logger = logging.getLogger(__name__)

DRAG_PIXELS = 4.0  # a press-release that moves further than this is a pan, not a click
MAP_VIEW_ANGLES = (0.0, 30.0, 120.0)  # napari camera (rx, ry, rz) degrees of the first view
RENDERINGS = ("attenuated_mip", "iso", "mip")
"""Volume renderings offered. ``attenuated_mip`` (default) draws a 128³ map in 0.2-0.9 s with
software OpenGL (Xvfb, ssh -X, VNC without a GPU; measured with Mesa llvmpipe); ``iso`` is the
crispest but takes about 30 s there (instant on a GPU)."""


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _to_layer(xy: np.ndarray) -> np.ndarray:  # (m, 2) x, y -> (m, 2) row, col
    xy = np.atleast_2d(xy)
    return np.stack([-xy[:, 1], xy[:, 0]], axis=1)


def _from_layer(rc: np.ndarray) -> np.ndarray:  # (m, 2) row, col -> (m, 2) x, y
    rc = np.atleast_2d(rc)[:, -2:]
    return np.stack([rc[:, 1], -rc[:, 0]], axis=1)


class LatentExplorer:
    """The layers, widgets and callbacks of the two viewers over one session."""

    def __init__(self, session: ExplorerSession, latent_viewer, map_viewer, *,
                 colour_by: str = "amount of motion", n_frames: int = 10,
                 rendering: str = "attenuated_mip") -> None:
        self.session = session
        self.latent_viewer = latent_viewer
        self.map_viewer = map_viewer
        self.n_frames = int(n_frames)
        self.last_point: LatentPoint | None = None
        self.last_result = None  # SubsetResult or MovieResult of the last shape
        coords = session.coords
        span = float(np.ptp(coords, axis=0).max()) or 1.0
        self.points_layer = latent_viewer.add_points(
            _to_layer(coords), name="particles", size=span / 60.0, border_width=0,
            face_color=np.ones((coords.shape[0], 4)))
        self.marker_layer = latent_viewer.add_points(
            _to_layer(np.zeros((1, 2))), name="latent point", size=span / 25.0, symbol="cross",
            face_color="white", border_width=0)
        self.shapes_layer = latent_viewer.add_shapes(
            name="draw: path = movie, polygon = subset", ndim=2, edge_width=span / 200.0,
            edge_color="yellow", face_color=[1.0, 1.0, 0.0, 0.15])
        self._n_shapes_done = 0
        self.shapes_layer.events.data.connect(self._on_shapes_data)
        latent_viewer.layers.selection.active = self.points_layer
        latent_viewer.mouse_drag_callbacks.append(self._on_mouse)
        latent_viewer.reset_view()

        box, px = session.box_size, session.pixel_size
        self.threshold, self.maximum = session.display_levels()
        self.rendering = rendering
        self.map_layer = map_viewer.add_image(
            np.zeros((box, box, box), dtype=np.float32), name="density", scale=(px, px, px),
            colormap="gray", **self._volume_style())
        self.vectors_layer = map_viewer.add_vectors(
            np.zeros((1, 2, 3)), name="deformation (colour: error)", scale=(px, px, px),
            edge_width=0.4, length=1.0, vector_style="arrow")
        self.movie_layer = None
        map_viewer.dims.ndisplay = 3
        self.widget = self._make_widget(colour_by)
        latent_viewer.window.add_dock_widget(self.widget, name="DynaMight", area="right")
        self.set_colouring(colour_by)

    # -- actions (called by the callbacks and by tests) -----------------------------------------

    def set_colouring(self, name: str) -> None:
        """Colour the points by the colouring ``name``."""
        spec = COLOURINGS[name]
        values = self.session.colouring(name)
        low, high = value_range(values, spec)
        self.points_layer.face_color = colour_values(values, spec, (low, high))
        unit = f" {spec.unit}" if spec.unit else ""
        missing = int(np.isnan(values).sum())
        note = f"; {missing} without a value (grey)" if missing else ""
        self._range_label.setText(f"{spec.colormap}: {low:.3g} to {high:.3g}{unit}{note}")
        if self._combo.currentText() != name:
            self._combo.setCurrentText(name)

    def show_point(self, xy: np.ndarray) -> LatentPoint:
        """Show the map and the arrows of the embedding point ``xy (2,)``."""
        point = self.session.point(np.asarray(xy, dtype=np.float64))
        self.marker_layer.data = _to_layer(point.xy[None])
        self.map_layer.data = point.volume.numpy()
        self.map_layer.visible = True
        self.vectors_layer.data = point.vectors_zyx
        error = point.vector_error
        spec = COLOURINGS["deformation error"]
        limits = (0.0, float(np.nanmax(error))) if np.isfinite(error).any() else None
        self.vectors_layer.edge_color = colour_values(error, spec, limits)
        if self.movie_layer is not None:
            self.movie_layer.visible = False
        if self.last_point is None:
            self.map_viewer.reset_view()
            _camera(self.map_viewer).angles = MAP_VIEW_ANGLES
        self.last_point = point
        z = ", ".join(f"{v:.3g}" for v in point.latent)
        self._status(f"latent point ({point.xy[0]:.3g}, {point.xy[1]:.3g}) = z ({z}): "
                     f"map in {point.seconds:.2f} s")
        return point

    def process_shape(self, index: int):
        """A path becomes a movie, a polygon (or rectangle) a subset STAR file."""
        kind = self.shapes_layer.shape_type[index]
        xy = _from_layer(np.asarray(self.shapes_layer.data[index]))
        if kind == "path":
            result = self.make_movie(xy)
        elif kind in ("polygon", "rectangle"):
            result = self.write_subset(xy)
        else:
            self._status(f"a {kind} does nothing: draw a path (movie) or a polygon (subset)")
            return None
        self.last_result = result
        return result

    def make_movie(self, path_xy: np.ndarray):
        """Maps along the path, written to disk and shown as a time series."""
        self._status(f"making a movie of {self.n_frames} maps ...")
        result = self.session.movie(path_xy, self.n_frames)
        volumes = result.volumes
        px = self.session.pixel_size
        if self.movie_layer is None:
            self.movie_layer = self.map_viewer.add_image(
                volumes, name="movie", scale=(1.0, px, px, px), colormap="bop orange",
                **self._volume_style())
        else:
            self.movie_layer.data = volumes
        self.movie_layer.visible = True
        self.map_layer.visible = False
        self._status(f"movie: {len(result.maps)} maps in {result.folder}, {result.gif.name}")
        return result

    def write_subset(self, polygon_xy: np.ndarray):
        """The particles inside the polygon, written as the next ``subset_N.star``."""
        try:
            result = self.session.subset_in_polygon(polygon_xy)
        except ValueError as err:
            self._status(str(err))
            return None
        self._status(f"{result.path}: {result.n_particles} particles "
                     f"({result.n_half1} / {result.n_half2} in half sets 1 / 2)")
        return result

    def reset_views(self) -> None:
        """Fit both views to their contents; the map seen obliquely."""
        self.latent_viewer.reset_view()
        self.map_viewer.reset_view()
        _camera(self.map_viewer).angles = MAP_VIEW_ANGLES

    def grab(self, *, canvas_only: bool) -> np.ndarray:  # (h, w1 + w2, 4) uint8
        """Both viewers side by side (latent space left, map right): their canvases, or the
        whole windows with layer lists and the dock widget. The windows must be shown (hidden
        ones render nothing)."""
        pictures = [v.screenshot(canvas_only=canvas_only, flash=False)
                    for v in (self.latent_viewer, self.map_viewer)]
        height = max(p.shape[0] for p in pictures)
        padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in pictures]
        return np.concatenate(padded, axis=1)

    def _volume_style(self) -> dict:
        style = {"rendering": self.rendering, "contrast_limits": (0.0, self.maximum)}
        if self.rendering == "iso":
            style["iso_threshold"] = self.threshold
        if self.rendering == "attenuated_mip":
            style["attenuation"] = 0.5
        return style

    # -- callbacks ------------------------------------------------------------------------------

    def _on_mouse(self, viewer, event):
        """Left click (no drag, no modifier) outside drawing modes: show that latent point."""
        if event.button != 1 or event.modifiers:
            return
        active = viewer.layers.selection.active
        if active is not None and str(getattr(active, "mode", "pan_zoom")) != "pan_zoom":
            return
        start_position = np.asarray(event.position)
        start_pixel = np.asarray(event.pos, dtype=np.float64)

        def dragged() -> bool:
            return bool(np.hypot(*(np.asarray(event.pos) - start_pixel)) > DRAG_PIXELS)

        yield
        while event.type == "mouse_move":
            if dragged():
                return
            yield
        if not dragged():
            self.show_point(_from_layer(start_position)[0])

    def _on_shapes_data(self, event) -> None:
        action = str(getattr(event, "action", ""))
        n = len(self.shapes_layer.data)
        if action == "added":
            for index in range(self._n_shapes_done, n):
                self.process_shape(index)
        if action in ("added", "removed", "changed"):
            self._n_shapes_done = n

    # -- widget ---------------------------------------------------------------------------------

    def _make_widget(self, colour_by: str):
        from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QSpinBox, QWidget

        widget = QWidget()
        form = QFormLayout(widget)
        s = self.session
        form.addRow(QLabel(f"half set {s.half_set}: {len(s.indices)} particles, "
                           f"latent dimension {s.latent_dim}, {s.embedding.method.upper()}"))
        self._combo = QComboBox()
        self._combo.addItems(list(COLOURINGS))
        self._combo.setCurrentText(colour_by)
        self._combo.currentTextChanged.connect(self.set_colouring)
        form.addRow("colour by", self._combo)
        self._range_label = QLabel("")
        form.addRow(self._range_label)
        frames = QSpinBox()
        frames.setRange(2, 100)
        frames.setValue(self.n_frames)
        frames.valueChanged.connect(lambda v: setattr(self, "n_frames", int(v)))
        form.addRow("maps per movie", frames)
        arrows = QDoubleSpinBox()
        arrows.setRange(0.0, 100.0)
        arrows.setSingleStep(0.5)
        arrows.setValue(1.0)
        arrows.valueChanged.connect(lambda v: setattr(self.vectors_layer, "length", float(v)))
        form.addRow("arrow length ×", arrows)
        help_text = QLabel("Click: map of that latent point.\n"
                           "Shapes layer, path tool: movie along the path.\n"
                           "Shapes layer, polygon tool: subset STAR file.")
        form.addRow(help_text)
        self._status_label = QLabel("")
        self._status_label.setWordWrap(True)
        form.addRow(self._status_label)
        return widget

    def _status(self, text: str) -> None:
        logger.info("%s", text)
        self._status_label.setText(text)
        self.latent_viewer.status = text


def _viewers(session: ExplorerSession, *,
             sizes: tuple[tuple[int, int], tuple[int, int]] | None = None):
    """The two viewers, shown (``sizes``: width, height of the latent and the map window)."""
    import napari

    name = f"{session.output_directory} half set {session.half_set}"
    latent_viewer = napari.Viewer(title=f"DynaMight latent space: {name}")
    map_viewer = napari.Viewer(title=f"DynaMight map of the latent point: {name}", ndisplay=3)
    if sizes is not None:
        for viewer, size in zip((latent_viewer, map_viewer), sizes):
            viewer.window.resize(*size)
    return latent_viewer, map_viewer


def launch(session: ExplorerSession, *, colour_by: str = "amount of motion", n_frames: int = 10,
           point: np.ndarray | None = None, rendering: str = "attenuated_mip") -> None:
    """Open the two viewers and run until they are closed."""
    import napari

    latent_viewer, map_viewer = _viewers(session)
    explorer = LatentExplorer(session, latent_viewer, map_viewer, colour_by=colour_by,
                              n_frames=n_frames, rendering=rendering)
    explorer.show_point(_centre(session) if point is None else point)
    napari.run()


def save_screenshot(session: ExplorerSession, path: str | PathLike, *,
                    colour_by: str = "amount of motion", point: np.ndarray | None = None,
                    sizes: tuple[tuple[int, int], tuple[int, int]] = ((1200, 720), (900, 720)),
                    canvas_only: bool = False,
                    rendering: str = "attenuated_mip") -> Path:
    """Picture of both windows (latent space, map of ``point``) as PNG; needs a display
    (``xvfb-run`` will do)."""
    from PIL import Image

    latent_viewer, map_viewer = _viewers(session, sizes=sizes)
    try:
        explorer = LatentExplorer(session, latent_viewer, map_viewer, colour_by=colour_by,
                                  rendering=rendering)
        _process_events()
        explorer.show_point(_centre(session) if point is None else point)
        explorer.reset_views()
        _process_events()
        picture = explorer.grab(canvas_only=canvas_only)
    finally:
        latent_viewer.close()
        map_viewer.close()
    path = Path(path)
    with atomic_output(path) as tmp:  # the temporary name keeps the suffix: PIL's format
        Image.fromarray(picture).save(tmp)
    logger.info("wrote %s (%d x %d)", path, picture.shape[1], picture.shape[0])
    return path


def _process_events() -> None:
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()


def _centre(session: ExplorerSession) -> np.ndarray:
    """The embedding point of the mean latent code."""
    return np.median(session.coords, axis=0)


__all__ = ["RENDERINGS", "LatentExplorer", "launch", "save_screenshot"]
