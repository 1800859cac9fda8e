"""Scores against a known truth, for benchmarks and tests: what a user would want to know about
a run on data whose answer is known.

- **Regions** (:func:`region_masks`): the moving region is where the moving domains of a
  :class:`~dynamight_core.synthetic_structure.MovingStructure` lie in the reference state (their
  atoms rendered, thresholded, extended and softened); the static region is the rest of the
  structure. Scores in each are FSCs of the masked maps.
- **FSC area** (:func:`fsc_area`): mean FSC over shells ``1 .. box // 2`` (up to Nyquist).
- **Gap closed** (:func:`gap_closed`): ``(area_deformed - area_rigid) / (area_upper -
  area_rigid)``, where the upper bound is a rigid reconstruction of the same particles imaged
  without motion: 0 = no better than the consensus, 1 = as good as if nothing had moved.
- **kNN R²** (:func:`knn_r2`): how well the latent codes predict the true motion coordinate:
  ``k``-nearest-neighbour regression in latent space, ``n_folds``-fold cross-validated (each
  particle predicted from neighbours of the other folds), ``R² = 1 - SSE / SST``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from .fsc import fsc
from .gaussian_projection import render_gaussians_3d
from .simulation import soft_mask
from .synthetic_structure import MovingStructure


def region_masks(structure: MovingStructure, box: int, pixel_size: float,
                 extend_px: int = 2, soft_edge_px: int = 3
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # moving, static (box,)*3 in [0, 1]
    """Soft masks of the moving domains and of the static rest, in the reference state."""
    moving = structure.moving
    sigma = torch.tensor([max(structure.sigma_angstrom, pixel_size)])
    masks = []
    for select in (moving, ~moving):
        density = render_gaussians_3d(
            structure.positions[select], sigma, structure.masses[select],
            torch.zeros(int(select.sum()), dtype=torch.long), box, pixel_size)
        masks.append(soft_mask(density, 0.1 * float(density.max()), extend_px, soft_edge_px))
    moving_mask, static_mask = masks
    return moving_mask, static_mask * (1.0 - moving_mask)


def fsc_area(map1: torch.Tensor, map2: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean FSC over shells 1..Nyquist of two maps (both multiplied by ``mask`` if given)."""
    if mask is not None:
        map1, map2 = map1 * mask, map2 * mask
    return float(fsc(map1, map2)[1:].mean())


def gap_closed(area_deformed: float, area_rigid: float, area_upper: float) -> float:
    """Fraction of the gap between the rigid and the motion-free FSC area that is closed."""
    gap = area_upper - area_rigid
    if gap <= 0:
        return float("nan")
    return (area_deformed - area_rigid) / gap


def knn_r2(latents: np.ndarray, truth: np.ndarray, k: int = 20, n_folds: int = 5,
           seed: int = 0) -> float:
    """Cross-validated k-nearest-neighbour R² of ``truth (n,)`` from ``latents (n, d)``."""
    truth = np.asarray(truth, dtype=np.float64)
    predicted = knn_predict(latents, truth, k, n_folds, seed)
    sst = ((truth - truth.mean()) ** 2).sum()
    return float(1.0 - ((truth - predicted) ** 2).sum() / sst) if sst > 0 else float("nan")


def knn_predict(latents: np.ndarray, truth: np.ndarray, k: int = 20, n_folds: int = 5,
                seed: int = 0) -> np.ndarray:  # (n,)
    """Cross-validated k-nearest-neighbour prediction of ``truth (n,)`` from ``latents (n, d)``:
    each particle's value is the mean of its ``k`` nearest neighbours' in the other folds."""
    truth = np.asarray(truth, dtype=np.float64)
    n = truth.shape[0]
    if n < n_folds * 2:  # before the reshape, whose error would not say this
        raise ValueError(f"need at least {2 * n_folds} particles, got {n}")
    latents = np.asarray(latents, dtype=np.float64).reshape(n, -1)
    folds = np.random.default_rng(seed).permutation(n) % n_folds
    predicted = np.empty(n)
    for f in range(n_folds):
        train, test = folds != f, folds == f
        kk = min(k, int(train.sum()))
        _, idx = cKDTree(latents[train]).query(latents[test], k=kk)
        predicted[test] = truth[train][np.asarray(idx).reshape(int(test.sum()), kk)].mean(1)
    return predicted


__all__ = ["fsc_area", "gap_closed", "knn_predict", "knn_r2", "region_masks"]
