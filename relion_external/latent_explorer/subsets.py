"""Particle subsets chosen in the latent space, written as particles STAR files for RELION.

A subset file holds the optics table and the selected rows of the particles table with every
column (original image names, poses, CTF, the DynaMight columns), in the original order. The
gold-standard half sets travel in ``rlnRandomSubset``: kept as they are, or added from the half
sets the deformations were trained with when the input had none.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from .._atomic import make_folder
from ..star_io import RelionParticles, write_particles_star

logger = logging.getLogger(__name__)

_SUBSET_NAME = re.compile(r"^subset_(\d+)\.star$")


@dataclass(frozen=True)
class SubsetResult:
    """A written subset: its file and how many particles of each half it holds."""

    path: Path
    n_particles: int
    n_half1: int
    n_half2: int


def next_subset_path(folder: str | PathLike) -> Path:
    """``folder/subset_N.star`` with ``N`` one more than the largest there (from 1)."""
    folder = Path(folder)
    taken = [int(m.group(1)) for p in folder.glob("subset_*.star")
             if (m := _SUBSET_NAME.match(p.name))]
    return folder / f"subset_{max(taken, default=0) + 1}.star"


def write_subset(
    folder: str | PathLike,
    star: RelionParticles,
    indices: np.ndarray,  # (m,) 0-based rows of star.particles
    *,
    half_set: np.ndarray | None = None,  # (n,) 1 or 2 for every row (used if no rlnRandomSubset)
) -> SubsetResult:
    """Write the rows ``indices`` of ``star`` to the next ``folder/subset_N.star`` and log its
    size; an empty selection writes nothing and raises ``ValueError``."""
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    if indices.size == 0:
        raise ValueError("the selection holds no particles: nothing written")
    table = star.particles
    if indices[-1] >= len(table) or indices[0] < 0:
        raise IndexError(f"particle index out of range 0..{len(table) - 1}")
    subset = table.iloc[indices].reset_index(drop=True).copy()
    if "rlnRandomSubset" not in subset.columns and half_set is not None:
        subset["rlnRandomSubset"] = np.asarray(half_set, dtype=int)[indices]
    folder = make_folder(folder)
    path = next_subset_path(folder)
    write_particles_star(path, (star.optics, subset))
    halves = (subset["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in subset.columns
              else np.zeros(len(subset), dtype=int))
    result = SubsetResult(path=path, n_particles=len(subset), n_half1=int((halves == 1).sum()),
                          n_half2=int((halves == 2).sum()))
    logger.info("wrote %s: %d particles (%d of half 1, %d of half 2)", path, result.n_particles,
                result.n_half1, result.n_half2)
    if result.n_half1 == 0 or result.n_half2 == 0:
        logger.warning("%s holds particles of one half set only: a gold-standard refinement of "
                       "it needs particles of both halves", path)
    return result


__all__ = ["SubsetResult", "next_subset_path", "write_subset"]
