"""The explorer's actions without a window: maps along the principal latent directions, a movie
between points, subsets by polygon or by clustering, and a plot of the embedding (whose axes
give the coordinates the other actions take). Matplotlib draws on its Agg canvas only, so no
GUI toolkit is touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .._atomic import atomic_output
from .colours import COLOURINGS, colour_values, value_range
from .movie import MovieResult
from .session import OUTPUT_FOLDER, ExplorerSession
from .subsets import SubsetResult

logger = logging.getLogger(__name__)


def parse_point(text: str) -> np.ndarray:  # "x,y" -> (2,)
    """``"x,y"`` -> ``array([x, y])``; ``ValueError`` with the text otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"expected 'x,y', got {text!r}")
    try:
        return np.array([float(p) for p in parts])
    except ValueError as err:
        raise ValueError(f"expected two numbers 'x,y', got {text!r}") from err


def parse_points(text: str) -> np.ndarray:  # "x1,y1;x2,y2;..." -> (k, 2)
    """``"x1,y1;x2,y2;..."`` -> ``(k, 2)`` array."""
    return np.stack([parse_point(p) for p in str(text).split(";") if p.strip()])


@dataclass
class HeadlessOutputs:
    """What the headless actions wrote."""

    plot: Path | None = None
    maps_along_pcs: list[MovieResult] = field(default_factory=list)
    movies: list[MovieResult] = field(default_factory=list)
    subsets: list[SubsetResult] = field(default_factory=list)


def write_embedding_plot(session: ExplorerSession, path: str | PathLike, *,
                         colouring: str = "amount of motion") -> Path:
    """Scatter plot of the embedding coloured by ``colouring`` (PNG)."""
    spec = COLOURINGS[colouring]
    values = session.colouring(colouring)
    limits = value_range(values, spec)
    fig = Figure(figsize=(6.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xy = session.coords
    ax.scatter(xy[:, 0], xy[:, 1], c=colour_values(values, spec, limits), s=6, linewidths=0)
    ax.set_xlabel(f"{session.embedding.method.upper()} 1")
    ax.set_ylabel(f"{session.embedding.method.upper()} 2")
    ax.set_title(f"half set {session.half_set}: {len(xy)} particles")
    ax.grid(True, alpha=0.3)
    mappable = ScalarMappable(Normalize(*limits), spec.colormap)
    fig.colorbar(mappable, ax=ax, label=f"{spec.label} ({spec.unit})" if spec.unit
                 else spec.label)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("wrote %s (%s embedding coloured by %s)", path, session.embedding.method.upper(),
                colouring)
    return path


def run_actions(
    session: ExplorerSession,
    *,
    maps_along_pcs: int = 0,
    movie_path: np.ndarray | None = None,  # (k, 2) embedding coordinates
    n_frames: int = 10,
    subset_polygon: np.ndarray | None = None,  # (m, 2)
    subset_clusters: int = 0,
    colouring: str = "amount of motion",
    track_movie: int | None = None,
    control=None,
) -> HeadlessOutputs:
    """Run the requested actions; always writes ``latent_space/embedding_half{H}.png``."""
    out = HeadlessOutputs()
    out.plot = write_embedding_plot(
        session, session.output_directory / OUTPUT_FOLDER / f"embedding_half{session.half_set}.png",
        colouring=colouring)
    if maps_along_pcs:
        out.maps_along_pcs = session.maps_along_principal_axes(maps_along_pcs, n_frames,
                                                               control=control)
    if movie_path is not None:
        out.movies.append(session.movie(movie_path, n_frames, control=control))
    if track_movie is not None:
        out.movies.append(session.track_movie(track_movie, n_frames, control=control))
    if subset_polygon is not None:
        out.subsets.append(session.subset_in_polygon(subset_polygon))
    if subset_clusters:
        out.subsets.extend(session.subsets_by_cluster(subset_clusters))
    return out


__all__ = ["HeadlessOutputs", "parse_point", "parse_points", "run_actions",
           "write_embedding_plot"]
