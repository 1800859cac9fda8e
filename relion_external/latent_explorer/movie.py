"""A series of maps along a latent path, written as MRC files and as an animated GIF.

Each GIF frame shows the three orthogonal projections of one map (sums along z, y and x, side
by side), on one grey scale for the whole series, so what changes between frames is the
motion. Frames are made with matplotlib's colour maps and written by Pillow (a matplotlib
dependency).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from .._atomic import atomic_output, make_folder
from ..map_io import write_map

logger = logging.getLogger(__name__)

_MOVIE_NAME = re.compile(r"^movie_(\d+)$")


@dataclass(frozen=True)
class MovieResult:
    """The files of one volume series."""

    folder: Path
    maps: list[Path]  # frame_000.mrc, ...
    gif: Path
    latents: np.ndarray  # (n_frames, d) latent code of each frame
    volumes: np.ndarray = field(repr=False)  # (n_frames, z, y, x) the maps written


def next_movie_folder(parent: str | PathLike) -> Path:
    """``parent/movie_NNN`` with ``NNN`` one more than the largest there (from 001)."""
    parent = Path(parent)
    taken = [int(m.group(1)) for p in parent.glob("movie_*") if (m := _MOVIE_NAME.match(p.name))]
    return parent / f"movie_{max(taken, default=0) + 1:03d}"


def projection_frames(
    volumes: torch.Tensor | np.ndarray,  # (t, z, y, x)
    *,
    colormap: str = "gray",
) -> np.ndarray:  # (t, h, 3 * w) uint8 RGB
    """Orthogonal projections of each volume side by side (sums along z, y, x), on one
    intensity scale from ``min(0, minimum)`` to the maximum of the whole series."""
    v = np.asarray(torch.as_tensor(volumes).detach().cpu(), dtype=np.float32)
    if v.ndim != 4:
        raise ValueError(f"volumes must be (t, z, y, x), got shape {v.shape}")
    rows = [np.concatenate([v[i].sum(axis=0), v[i].sum(axis=1), v[i].sum(axis=2)], axis=1)
            for i in range(v.shape[0])]
    frames = np.stack(rows)[:, ::-1]  # y up
    low, high = min(float(frames.min()), 0.0), float(frames.max())
    t = np.clip((frames - low) / max(high - low, 1e-12), 0.0, 1.0)
    return (colormaps[colormap](t)[..., :3] * 255).astype(np.uint8)


def write_gif(path: str | PathLike, frames: np.ndarray, *, fps: float = 8.0,
              min_height: int = 192) -> Path:
    """Animated GIF of ``frames (t, h, w, 3)`` uint8, looping forth and back, scaled up
    (nearest neighbour) to at least ``min_height`` pixels."""
    path = Path(path)
    scale = max(1, int(np.ceil(min_height / frames.shape[1])))
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale),
                                        Image.Resampling.NEAREST) for f in frames]
    images = images + images[-2:0:-1]  # forth and back
    with atomic_output(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=round(1000.0 / fps))
    return path


def write_volume_series(
    folder: str | PathLike,
    volumes: torch.Tensor | np.ndarray,  # (t, z, y, x)
    pixel_size: float,
    latents: np.ndarray,  # (t, d)
) -> MovieResult:
    """``folder/frame_NNN.mrc`` for each volume and ``folder/movie.gif``."""
    folder = make_folder(folder)
    maps = []
    for i, volume in enumerate(volumes):
        maps.append(folder / f"frame_{i:03d}.mrc")
        write_map(maps[-1], volume, pixel_size)
    gif = write_gif(folder / "movie.gif", projection_frames(volumes))
    logger.info("wrote %d maps %s/frame_*.mrc and %s", len(maps), folder, gif)
    return MovieResult(folder=folder, maps=maps, gif=gif, latents=np.asarray(latents),
                       volumes=np.asarray(torch.as_tensor(volumes).cpu(), dtype=np.float32))


__all__ = ["MovieResult", "next_movie_folder", "projection_frames", "write_gif",
           "write_volume_series"]
