"""Geometric regularisation of the deformations: distance preservation, repulsion, and the
gradient-norm rule that balances them against the data term.

Rules (all distances in Å, positions xyz relative to the box centre):

- **Neighbour scale** ``s`` (:func:`mean_neighbour_distance`): for each consensus Gaussian the
  mean distance to its ``k = 2`` nearest other Gaussians, averaged over all Gaussians.
- **Neighbour graph** (:func:`build_neighbour_graph`): an undirected edge ``(i, j)``, ``i < j``,
  for every pair with ``|x_i - x_j| <= factor * s``, ``factor = 1.5`` by default (scipy
  ``cKDTree.query_pairs``). Each edge remembers its consensus (rest) length. On a simple cubic
  lattice of spacing ``a`` (``s = a``) the default gives the 6 face neighbours plus the 12
  edge diagonals (``sqrt(2) a < 1.5 a``); ``factor < sqrt(2)`` gives the 6 face neighbours only.
  The trainer chooses the edges once, on the starting model, and takes their rest lengths from
  the current consensus at every epoch (:func:`rest_lengths`).
- **Distance preservation** (:func:`distance_preservation_loss`): per particle, the mean over
  edges of the squared relative length change ``((l - l0) / l0)**2`` (dimensionless; with
  ``relative=False`` the squared absolute change in Å²). Zero for any rigid motion.
- **Repulsion** (:func:`repulsion_loss`): per particle, ``sum over candidate pairs of
  relu(1 - d / min_distance)**2``, divided by the number of Gaussians (dimensionless, zero when
  every pair is at least ``min_distance`` apart). Candidate pairs come from a ``cKDTree`` radius
  query on positions the caller supplies (the consensus, once per epoch) with a search radius
  larger than ``min_distance`` (default ``2 * min_distance``) so that pairs which approach each
  other during the epoch are still seen (:func:`repulsion_candidate_pairs`).
- **Balance** (:func:`gradient_norm_ratio_lambda`): ``lambda = factor * ||grad data|| /
  ||grad reg||`` over the decoder parameters, recomputed once per epoch by the trainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)


def _as_numpy_positions(positions: torch.Tensor | np.ndarray) -> np.ndarray:  # (n, 3) float64
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    array = np.asarray(positions, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"positions must be (n, 3), got shape {array.shape}")
    return array


def _pairs_to_tensor(pairs: np.ndarray) -> torch.Tensor:  # (P, 2) long, rows sorted
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return torch.from_numpy(np.ascontiguousarray(pairs[order]))


def mean_neighbour_distance(positions: torch.Tensor | np.ndarray, k: int = 2) -> float:
    """Mean over points of the mean distance (Å) to their ``k`` nearest other points."""
    points = _as_numpy_positions(positions)
    if points.shape[0] <= k:
        raise ValueError(f"need more than {k} points, got {points.shape[0]}")
    distances, _ = cKDTree(points).query(points, k=k + 1)  # column 0 is the point itself
    return float(distances[:, 1:].mean())


def build_neighbour_graph(
    positions: torch.Tensor | np.ndarray,  # (n, 3) consensus xyz, Å
    factor: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:  # edges (E, 2) long with i < j, rest_lengths (E,) Å
    """Edges between Gaussians closer than ``factor`` times the mean distance to the two
    nearest neighbours (see module docstring), and their rest lengths (float32, Å)."""
    points = _as_numpy_positions(positions)
    cutoff = factor * mean_neighbour_distance(points, k=2)
    edges = _pairs_to_tensor(cKDTree(points).query_pairs(cutoff, output_type="ndarray"))
    logger.debug("neighbour graph: cutoff %.3f Å, %d edges on %d points (%.2f per point)",
                 cutoff, edges.shape[0], points.shape[0], 2 * edges.shape[0] / points.shape[0])
    return edges, rest_lengths(torch.from_numpy(points), edges)


def rest_lengths(
    positions: torch.Tensor,  # (n, 3) Å
    edges: torch.Tensor,  # (E, 2) long, on positions' device
) -> torch.Tensor:  # (E,) float32 Å, no autograd
    """The lengths of ``edges`` in ``positions``: the rest lengths of a graph whose edges were
    chosen on other positions (the trainer keeps the starting model's edges)."""
    with torch.no_grad():
        return (positions[edges[:, 0]] - positions[edges[:, 1]]).norm(dim=-1).to(torch.float32)


def _edge_lengths(
    deformed: torch.Tensor,  # (b, n, 3)
    pairs: torch.Tensor,  # (E, 2) long
) -> torch.Tensor:  # (b, E)
    ends = torch.index_select(deformed, 1, pairs.to(deformed.device).reshape(-1))
    ends = ends.view(deformed.shape[0], -1, 2, 3)
    # index_select's gradient is a scatter-add; plain indexing's (index_put with accumulate)
    # sorts the indices on a GPU: 7.5 of 112 ms per training step there
    difference = ends[:, :, 0] - ends[:, :, 1]
    # tiny offset (1e-12 Å²) keeps the gradient finite if two points coincide
    return torch.sqrt((difference**2).sum(dim=-1) + 1e-12)


def distance_preservation_loss(
    deformed: torch.Tensor,  # (b, n, 3) deformed positions, Å
    edges: torch.Tensor,  # (E, 2) long
    rest_lengths: torch.Tensor,  # (E,) Å
    *,
    relative: bool = True,
) -> torch.Tensor:  # (b,)
    """Mean over edges of the squared change of edge length, per particle: relative
    ``((l - l0) / l0)**2`` (dimensionless) or, with ``relative=False``, absolute (Å²)."""
    if edges.shape[0] == 0:
        return deformed.new_zeros(deformed.shape[0])
    lengths = _edge_lengths(deformed, edges)
    rest = rest_lengths.to(device=deformed.device, dtype=deformed.dtype)
    change = lengths - rest
    if relative:
        change = change / rest.clamp_min(torch.finfo(rest.dtype).eps)
    return (change**2).mean(dim=-1)


def repulsion_candidate_pairs(
    positions: torch.Tensor | np.ndarray,  # (n, 3) xyz, Å (the consensus, once per epoch)
    min_distance: float,
    search_radius: float | None = None,
) -> torch.Tensor:  # (P, 2) long with i < j
    """All pairs within ``search_radius`` (Å, default ``2 * min_distance``) of each other."""
    radius = 2.0 * min_distance if search_radius is None else search_radius
    if radius < min_distance:
        raise ValueError(f"search_radius {radius} must be >= min_distance {min_distance}")
    points = _as_numpy_positions(positions)
    return _pairs_to_tensor(cKDTree(points).query_pairs(radius, output_type="ndarray"))


def repulsion_loss(
    deformed: torch.Tensor,  # (b, n, 3) deformed positions, Å
    min_distance: float,  # Å
    pairs: torch.Tensor,  # (P, 2) long candidate pairs (edges or repulsion_candidate_pairs)
) -> torch.Tensor:  # (b,)
    """Per particle ``sum_pairs relu(1 - d / min_distance)**2 / n`` (dimensionless); zero when
    all candidate pairs are at least ``min_distance`` apart."""
    if pairs.shape[0] == 0:
        return deformed.new_zeros(deformed.shape[0])
    distances = _edge_lengths(deformed, pairs)
    overlap = torch.relu(1.0 - distances / min_distance)
    return (overlap**2).sum(dim=-1) / deformed.shape[1]


def _gradient_norm(loss: torch.Tensor, params: list[torch.Tensor],
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    if reduce is not None:  # the gradient is a sum over processes: add them, then the norm
        grads = (torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                 if loss.requires_grad else [None] * len(params))
        flat = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).reshape(-1)
                          for g, p in zip(grads, params, strict=True)])
        return float(reduce(flat).pow(2).sum().sqrt())
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().pow(2).sum() for g in grads if g is not None]
    if not squares:
        return 0.0
    return float(torch.stack(squares).sum().sqrt())


def lambda_from_terms(signal_squared: float, reg_norm: float, factor: float,
                      fallback: float | None = None) -> float:
    """``factor * sqrt(max(signal_squared, 0)) / reg_norm``: λ from the squared size of the
    data gradient (or of its signal part) and the regulariser gradient's norm. When the
    regulariser gradient vanishes (e.g. a zero-initialised decoder sits at its minimum) or a term
    is not finite, ``fallback`` (default ``factor``)."""
    if not np.isfinite(signal_squared) or not np.isfinite(reg_norm) or reg_norm <= 0.0:
        value = factor if fallback is None else fallback
        logger.debug("lambda: |grad reg| = %g, using fallback %g", reg_norm, value)
        return float(value)
    return float(factor * math.sqrt(max(signal_squared, 0.0)) / reg_norm)


def smoothed_lambda(average: tuple[float, float] | None, terms: tuple[float, float],
                    weight: float, factor: float) -> tuple[float, tuple[float, float] | None]:
    """λ from an epoch's ``terms`` (:func:`lambda_from_terms`) and the running average of the
    terms over the epochs: ``weight × average + (1 − weight) × terms`` (``terms`` alone without
    an average or at weight 0), from which λ is then taken. Terms that are no estimate (not
    finite, or no regulariser gradient: λ falls back to ``factor``) leave the average as it
    is. Returns (λ, the new average)."""
    if not all(map(math.isfinite, terms)) or terms[1] <= 0:
        return lambda_from_terms(*terms, factor), average
    if weight > 0 and average is not None:
        terms = tuple(weight * old + (1.0 - weight) * new
                      for old, new in zip(average, terms, strict=True))
    return lambda_from_terms(*terms, factor), terms


def gradient_ratio_terms(
    data_loss: torch.Tensor,  # scalar
    reg_loss: torch.Tensor,  # scalar
    params: Iterable[torch.Tensor],  # decoder parameters
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """``(||d data / d params||², ||d reg / d params||)`` (L2 over all params), the terms of
    :func:`gradient_norm_ratio_lambda`."""
    param_list = [p for p in params if p.requires_grad]
    if not param_list:
        raise ValueError("no parameter requires grad")
    return (_gradient_norm(data_loss, param_list, reduce) ** 2,
            _gradient_norm(reg_loss, param_list, reduce))


def gradient_norm_ratio_lambda(
    data_loss: torch.Tensor,  # scalar
    reg_loss: torch.Tensor,  # scalar
    params: Iterable[torch.Tensor],  # decoder parameters
    factor: float,
    fallback: float | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``lambda = factor * ||d data / d params|| / ||d reg / d params||`` (L2 over all params).

    Uses ``torch.autograd.grad(..., retain_graph=True)``: the graphs survive for the caller's
    backward and no ``.grad`` is touched. When the regulariser gradient vanishes (e.g. a
    zero-initialised decoder sits at its minimum) ``fallback`` (default ``factor``) is returned.
    With ``reduce`` (data parallel: each process holds part of the batch's terms), each term's
    flattened gradient is passed through ``reduce`` (an all-reduce sum) before its norm.
    """
    return lambda_from_terms(*gradient_ratio_terms(data_loss, reg_loss, params, reduce),
                             factor, fallback)


def signal_ratio_terms(
    nll: torch.Tensor,  # (b,) per-particle data terms of one batch (or of a share of it)
    reg_loss: torch.Tensor,  # scalar
    params: Iterable[torch.Tensor],
    *,
    offset: int = 0,
    total: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """``(g1 · g2, ||d reg / d params||)``, the terms of :func:`signal_ratio_lambda` (a batch
    of one particle: ``||g||²`` instead of ``g1 · g2``)."""
    param_list = [p for p in params if p.requires_grad]
    n = nll.shape[0]
    total = n if total is None else int(total)
    half = total // 2
    if half == 0:
        return gradient_ratio_terms(nll.mean(), reg_loss, param_list, reduce)
    grads = []
    for start, stop in ((0, half), (half, 2 * half)):  # this share's rows of each half
        lo, hi = min(max(start - offset, 0), n), min(max(stop - offset, 0), n)
        part = nll[lo:hi]
        term = part.mean() if (lo, hi) == (start, stop) and total == n else part.sum() / half
        g = torch.autograd.grad(term, param_list, retain_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if gi is None else gi.detach()).reshape(-1)
                          for gi, p in zip(g, param_list, strict=True)])
        grads.append(flat if reduce is None else reduce(flat))
    return float(torch.dot(grads[0], grads[1])), _gradient_norm(reg_loss, param_list, reduce)


def signal_ratio_lambda(
    nll: torch.Tensor,  # (b,) per-particle data terms of one batch (or of a share of it)
    reg_loss: torch.Tensor,  # scalar
    params: Iterable[torch.Tensor],
    factor: float,
    *,
    offset: int = 0,
    total: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``lambda = factor * sqrt(max(g1 · g2, 0)) / ||d reg / d params||``, ``g1`` and ``g2``
    the gradients of the mean data term of the two halves of the batch: ``g1 · g2`` estimates
    the squared norm of the data gradient's expectation (the signal), without the particle
    noise that dominates ``||g||`` at low SNR. Falls back to ``factor`` as
    :func:`gradient_norm_ratio_lambda` does. Data parallel: ``nll`` holds rows ``offset ..``
    of a batch of ``total``, and ``reduce`` sums each half's gradient (and the regulariser's)
    over the processes, so every process gets the value one process would."""
    return lambda_from_terms(*signal_ratio_terms(nll, reg_loss, params, offset=offset,
                                                 total=total, reduce=reduce), factor)


__all__ = [
    "build_neighbour_graph",
    "distance_preservation_loss",
    "gradient_norm_ratio_lambda",
    "gradient_ratio_terms",
    "lambda_from_terms",
    "mean_neighbour_distance",
    "repulsion_candidate_pairs",
    "repulsion_loss",
    "rest_lengths",
    "signal_ratio_lambda",
    "signal_ratio_terms",
    "smoothed_lambda",
]
