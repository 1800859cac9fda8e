"""Sinusoidal positional encoding of 3D positions (the decoder's input features).

Positions enter in *box-normalised* coordinates: a position ``r`` in Ångström (xyz, relative to
the box centre) is divided by half the box length, ``box_size * voxel_size / 2``, so that points
inside the box lie in ``[-1, 1]`` (:func:`normalise_positions`). Frequency ``k`` (``k = 0 ..
n_freqs - 1``) is ``2**k * pi``: the coarsest band has one period across the whole box.

Feature layout along the last axis: ``[sin(f_0 x), sin(f_0 y), sin(f_0 z), sin(f_1 x), ...,
cos(f_0 x), cos(f_0 y), cos(f_0 z), ...]``, i.e. ``(sin|cos, freq, xyz)`` flattened.
"""

from __future__ import annotations

import logging
import math

import torch
from einops import rearrange

logger = logging.getLogger(__name__)


def normalise_positions(
    positions_angstrom: torch.Tensor,  # (..., 3) xyz Å relative to the box centre
    box_size: int,
    voxel_size: float,
) -> torch.Tensor:  # (..., 3) in [-1, 1] inside the box
    """Å relative to the box centre -> box-normalised coordinates (divide by half the box, Å)."""
    return positions_angstrom / (box_size * voxel_size / 2.0)


def encoding_dim(n_freqs: int) -> int:
    """Number of features :func:`positional_encoding` returns for 3D input: ``3 * 2 * n_freqs``."""
    return 3 * 2 * n_freqs


def positional_encoding(
    x: torch.Tensor,  # (..., 3) box-normalised xyz, nominally in [-1, 1]
    n_freqs: int = 10,
) -> torch.Tensor:  # (..., 3 * 2 * n_freqs), values in [-1, 1]
    """sin/cos features of ``x`` at frequencies ``2**k * pi``, ``k = 0 .. n_freqs - 1``."""
    if x.shape[-1] != 3:
        raise ValueError(f"positions must have a trailing axis of 3 (xyz), got {tuple(x.shape)}")
    if n_freqs < 1:
        raise ValueError(f"n_freqs must be >= 1, got {n_freqs}")
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)  # (f,)
    angles = x[..., None, :] * freqs[:, None]  # (..., f, 3)
    features = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-3)  # (..., 2, f, 3)
    return rearrange(features, "... trig f xyz -> ... (trig f xyz)")


__all__ = ["encoding_dim", "normalise_positions", "positional_encoding"]
