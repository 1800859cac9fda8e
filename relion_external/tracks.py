"""Tracks of a time series in a particles STAR file (liquid-phase EM movies: the same molecule
imaged frame after frame), for ``optimize-deformations --temporal-prior``.

Columns (this project's, documented in the README):

- ``rlnDynaMightTrack`` (integer): the molecule a particle belongs to; negative = not tracked
  (the standard prior). Without it, but with ``rlnDynaMightTime``, each ``rlnMicrographName``
  (one movie per track) is a track.
- ``rlnDynaMightTime`` (number): the particle's time in its track (frame index or seconds: only
  differences matter, and the learnt correlation time is in the same unit).

All particles of a track must be in the same half set, or temporal information would pass
between the halves through the prior: a track split by ``rlnRandomSubset`` is moved, whole, to
the half set that holds most of its particles (ties: half 1), with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dynamight_core.temporal_prior import TrackLayout

from .errors import InputError

logger = logging.getLogger(__name__)

TRACK, TIME = "rlnDynaMightTrack", "rlnDynaMightTime"


def read_tracks(star_path: str | Path, particles: pd.DataFrame
                ) -> tuple[np.ndarray, np.ndarray]:  # track (n,) int64, time (n,) float64
    """Track and time of every row of ``particles`` (module docstring); raises
    :class:`InputError` naming the file and the column when they are missing or not numbers,
    or when a track has two particles at the same time."""
    star_path = Path(star_path)
    if TIME not in particles.columns:
        raise InputError(star_path, TIME, "missing: --temporal-prior needs the time of every "
                         "particle in its track", f"Add {TIME} (and {TRACK}, or one "
                         "rlnMicrographName per track), or leave out --temporal-prior.")
    time = pd.to_numeric(particles[TIME], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(time)):
        row = int(np.flatnonzero(~np.isfinite(time))[0]) + 1
        raise InputError(star_path, TIME, f"row {row} is not a number",
                         "Give every particle a numeric time.")
    if TRACK in particles.columns:
        raw = pd.to_numeric(particles[TRACK], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            row = int(np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)))[0]) + 1
            raise InputError(star_path, TRACK, f"row {row} is not an integer",
                             "Track identifiers are integers (negative: not tracked).")
        track = raw.astype(np.int64)
    elif "rlnMicrographName" in particles.columns:
        track = pd.factorize(particles["rlnMicrographName"])[0].astype(np.int64)
        logger.info("%s: no %s column: one track per rlnMicrographName (%d tracks)",
                    star_path, TRACK, int(track.max()) + 1)
    else:
        raise InputError(star_path, TRACK, "missing (and no rlnMicrographName to take tracks "
                         "from)", f"Add {TRACK}, or leave out --temporal-prior.")
    try:  # the core's own check, at input time: one frame of a track at each time
        TrackLayout.from_tracks(track, time)
    except ValueError as err:
        raise InputError(star_path, TIME, str(err), "Each frame of a track once.") from err
    return track, time


def half_sets_by_track(star_path: str | Path, half_set: np.ndarray,
                       track: np.ndarray) -> np.ndarray:
    """``half_set`` with every track whole in one half (module docstring)."""
    half_set = np.asarray(half_set, dtype=np.int64).copy()
    tracked = track >= 0
    if not np.any(tracked):
        return half_set
    labels, inverse = np.unique(track[tracked], return_inverse=True)
    ones = np.bincount(inverse, weights=(half_set[tracked] == 1), minlength=labels.shape[0])
    total = np.bincount(inverse, minlength=labels.shape[0])
    split = (ones > 0) & (ones < total)
    if np.any(split):
        before = half_set.copy()
        target = np.where(2 * ones >= total, 1, 2)
        moved = tracked.copy()
        moved[tracked] = split[inverse]
        half_set[moved] = target[inverse][split[inverse]]
        logger.warning("%s: %d of %d tracks had particles in both half sets; each was moved "
                       "whole to the half set holding most of it (%d particles changed half), "
                       "so no temporal information passes between the halves", star_path,
                       int(split.sum()), labels.shape[0], int((half_set != before).sum()))
    return half_set


__all__ = ["TIME", "TRACK", "half_sets_by_track", "read_tracks"]
