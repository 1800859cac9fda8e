"""The latent space of a trained half set, made visible: 2D embedding, per-particle colourings,
paths and regions in the embedding, and the deformed model (map and displacement vectors) of
any latent point.

Conventions: latents ``(n, d)`` are the particles' codes (posterior means); an embedding maps
them to ``(n, 2)`` coordinates ``(x, y)`` and back (:meth:`LatentEmbedding.to_latent`).
Positions and displacements are xyz Å relative to the box centre; volumes are ``(z, y, x)``.

Embeddings:
  * PCA (default): ``coords = (z - mean) @ axes[:2].T``, so a 2D point maps back exactly onto
    the plane of the two principal directions (the other components at their mean).
  * UMAP (when ``umap-learn`` is installed): a 2D point maps back to the inverse-distance
    weighted mean latent of its nearest embedded particles.

Colourings (one value per particle; NaN where a value does not exist):
  * amount of motion: mean ``|d_i|`` (Å) over the Gaussians,
  * direction of motion: angle (degrees) of the mean displacement vector in the plane of the
    two principal directions of all particles' mean displacement vectors,
  * location of motion: the motion-weighted centre ``sum |d_i| x_i / sum |d_i|`` projected on
    the long (first principal) axis of the consensus model, Å from its centroid,
  * deformation error: the motion-weighted mean of the per-Gaussian deformation error
    ``sum |d_i| e_i / sum |d_i|`` (Å): how reliable the motion this particle shows is,
  * half-set agreement: ``|d1 - d2|`` (Å, mean over Gaussians) of a validation particle seen by
    both halves,
  * tilt (degrees, from the rotation matrix), shift ``|rlnOrigin|`` (Å), particle index and the
    local density of the embedding (particles per unit area, k-nearest-neighbour estimate).
Statistics over Gaussians may use a fixed random subset of them (``gaussian_indices``), which
keeps them fast for 10^4 Gaussians and 10^5 particles.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from .gaussian_projection import render_gaussians_3d

logger = logging.getLogger(__name__)

EMBEDDINGS = ("pca", "umap")
COLOURINGS = ("amount of motion", "direction of motion", "location of motion",
              "deformation error", "half-set agreement", "particle index", "tilt", "shift",
              "density")  # the per-particle colourings of the module docstring


# ---------------------------------------------------------------------------------------------
# embedding


def principal_axes(
    latents: np.ndarray,  # (n, d)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # mean (d,), axes (d, d) rows, std (d,)
    """Mean, principal directions (rows, by decreasing variance, each with its largest
    component positive) and the standard deviation along each."""
    latents = np.asarray(latents, dtype=np.float64)
    mean = latents.mean(axis=0)
    centred = latents - mean
    _, singular, axes = np.linalg.svd(centred, full_matrices=True)
    sign = np.sign(axes[np.arange(axes.shape[0]), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(sign == 0, 1.0, sign)[:, None]
    std = np.zeros(axes.shape[0])
    std[: singular.shape[0]] = singular / math.sqrt(max(latents.shape[0] - 1, 1))
    return mean, axes, std


@dataclass(frozen=True)
class LatentEmbedding:
    """2D coordinates of latents and the way back (see module docstring)."""

    method: str  # "pca" or "umap"
    coords: np.ndarray  # (n, 2) x, y
    latents: np.ndarray  # (n, d)
    mean: np.ndarray  # (d,)
    axes: np.ndarray  # (d, d) principal directions (rows)
    std: np.ndarray  # (d,) standard deviation along each

    @property
    def latent_dim(self) -> int:
        return int(self.latents.shape[1])

    def to_latent(self, xy: np.ndarray) -> np.ndarray:  # (m, 2) -> (m, d)
        """Latent codes of 2D points of the embedding."""
        xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        if self.method == "pca":
            k = min(2, self.latent_dim)
            return self.mean + xy[:, :k] @ self.axes[:k]
        n_neighbours = min(8, self.coords.shape[0])
        distance, index = cKDTree(self.coords).query(xy, k=n_neighbours)
        distance, index = distance.reshape(xy.shape[0], -1), index.reshape(xy.shape[0], -1)
        weight = 1.0 / np.maximum(distance, 1e-9)
        weight /= weight.sum(axis=1, keepdims=True)
        return np.einsum("mk,mkd->md", weight, self.latents[index])


def embed_latents_2d(
    latents: np.ndarray,  # (n, d)
    *,
    method: str = "pca",
    seed: int = 0,
) -> LatentEmbedding:
    """2D embedding of latents by PCA or UMAP (UMAP needs the optional ``umap-learn``)."""
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 2 or latents.shape[0] < 2:
        raise ValueError(f"need (n >= 2, d) latents, got shape {latents.shape}")
    mean, axes, std = principal_axes(latents)
    if method == "pca":
        coords = np.zeros((latents.shape[0], 2))
        k = min(2, latents.shape[1])
        coords[:, :k] = (latents - mean) @ axes[:k].T
    elif method == "umap":
        try:
            import umap  # optional dependency
        except ImportError as err:
            raise ImportError("the UMAP embedding needs umap-learn: pip install umap-learn "
                              "(or use the PCA embedding)") from err
        reducer = umap.UMAP(n_components=2, random_state=seed,
                            n_neighbors=min(15, latents.shape[0] - 1))
        coords = np.asarray(reducer.fit_transform(latents), dtype=np.float64)
    else:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {method!r}")
    return LatentEmbedding(method=method, coords=coords, latents=latents, mean=mean, axes=axes,
                           std=std)


def points_along_axis(
    mean: np.ndarray,  # (d,)
    axis: np.ndarray,  # (d,) unit direction
    std: float,
    n_points: int,
    *,
    extent: float = 2.0,
) -> np.ndarray:  # (n_points, d)
    """Latents from ``mean - extent·std·axis`` to ``mean + extent·std·axis``, evenly spaced."""
    t = np.linspace(-extent, extent, int(n_points)) * float(std)
    return np.asarray(mean)[None] + t[:, None] * np.asarray(axis)[None]


def interpolate_path(
    vertices: np.ndarray,  # (k, D) a polyline
    n_points: int,
) -> np.ndarray:  # (n_points, D)
    """``n_points`` points evenly spaced by arc length along a polyline (ends included)."""
    vertices = np.atleast_2d(np.asarray(vertices, dtype=np.float64))
    if n_points < 1:
        raise ValueError("n_points must be at least 1")
    if vertices.shape[0] == 1 or n_points == 1:
        return np.repeat(vertices[:1], n_points, axis=0)
    step = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    along = np.concatenate([[0.0], np.cumsum(step)])
    if along[-1] == 0.0:
        return np.repeat(vertices[:1], n_points, axis=0)
    targets = np.linspace(0.0, along[-1], n_points)
    return np.stack([np.interp(targets, along, vertices[:, j])
                     for j in range(vertices.shape[1])], axis=1)


def points_in_polygon_2d(
    points: np.ndarray,  # (n, 2)
    polygon: np.ndarray,  # (m, 2) vertices, closed implicitly
) -> np.ndarray:  # (n,) bool
    """Even-odd rule (crossings of a ray towards +x); points on an edge may fall either way."""
    points = np.asarray(points, dtype=np.float64)
    polygon = np.asarray(polygon, dtype=np.float64)
    if polygon.shape[0] < 3:
        raise ValueError("a polygon needs at least 3 vertices")
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0][None], polygon[:, 1][None]
    x1, y1 = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    straddles = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    crossings = straddles & (x < x_cross)
    return (crossings.sum(axis=1) % 2) == 1


def kmeans_clusters(
    latents: np.ndarray,  # (n, d)
    n_clusters: int,
    *,
    seed: int = 0,
) -> np.ndarray:  # (n,) labels 0..n_clusters-1, ordered by cluster size (largest first)
    """k-means (k-means++ start, fixed seed) of the latents."""
    from scipy.cluster.vq import kmeans2

    latents = np.asarray(latents, dtype=np.float64)
    if not 1 <= n_clusters <= latents.shape[0]:
        raise ValueError(f"n_clusters must be in 1..{latents.shape[0]}, got {n_clusters}")
    _, labels = kmeans2(latents, int(n_clusters), minit="++", seed=np.random.default_rng(seed))
    order = np.argsort(-np.bincount(labels, minlength=n_clusters), kind="stable")
    return np.argsort(order)[labels]


# ---------------------------------------------------------------------------------------------
# the deformed model of a latent point


@torch.no_grad()
def deformed_positions(
    model,  # DeformationModel: .gaussians, .displacements(z)
    z: torch.Tensor,  # (m, d)
) -> torch.Tensor:  # (m, n_g, 3) Å
    """Consensus positions plus the decoder's displacements for each latent code."""
    return model.gaussians.positions.detach()[None] + model.displacements(z)


@torch.no_grad()
def render_displaced_3d(
    model,  # DeformationModel
    displacements: torch.Tensor,  # (n_g, 3) Å
    *,
    oversampling: int,
) -> torch.Tensor:  # (box, box, box) zyx
    """The model's consensus Gaussians moved by ``displacements``, rendered as a map
    (``oversampling`` 2 is what training writes; 1 is about 10x faster at box 128 and within a
    few % of it for widths of a voxel or more)."""
    g = model.gaussians
    positions = g.positions.detach() + displacements
    return render_gaussians_3d(positions, torch.exp(g.log_sigmas.detach()), g.masses().detach(),
                               g.class_index, model.box_size, model.pixel_size, oversampling)


@torch.no_grad()
def latent_map_3d(
    model,  # DeformationModel
    z: torch.Tensor,  # (d,)
    *,
    oversampling: int,
) -> torch.Tensor:  # (box, box, box) zyx
    """The deformed Gaussian model of latent ``z`` rendered as a map."""
    device = model.gaussians.positions.device
    z = torch.as_tensor(z, dtype=torch.float32, device=device).reshape(1, -1)
    d = model.displacements(z)[0]
    return render_displaced_3d(model, d, oversampling=oversampling)


def deformation_vectors_zyx(
    positions: torch.Tensor | np.ndarray,  # (n, 3) consensus xyz Å
    displacements: torch.Tensor | np.ndarray,  # (n, 3) xyz Å
    *,
    box_size: int,
    pixel_size: float,
) -> np.ndarray:  # (n, 2, 3): start (zyx voxel index), vector (zyx voxels)
    """Arrows from the consensus Gaussians to the deformed ones, in the voxel frame of a
    ``(z, y, x)`` map of the box (napari's vectors layout)."""
    positions = np.asarray(torch.as_tensor(positions).detach().cpu(), dtype=np.float64)
    displacements = np.asarray(torch.as_tensor(displacements).detach().cpu(), dtype=np.float64)
    start = positions[:, ::-1] / pixel_size + box_size // 2
    return np.stack([start, displacements[:, ::-1] / pixel_size], axis=1)


# ---------------------------------------------------------------------------------------------
# per-particle statistics of the motion


@dataclass(frozen=True)
class MotionStatistics:
    """Per-particle reductions over the Gaussians of the displacement field (see module
    docstring)."""

    amount: np.ndarray  # (n,) mean |d| Å
    mean_vector: np.ndarray  # (n, 3) mean d, xyz Å
    centre: np.ndarray  # (n, 3) motion-weighted mean consensus position, xyz Å
    weighted_error: np.ndarray | None  # (n,) motion-weighted per-Gaussian error, Å


def gaussian_subset(n_gaussians: int, max_gaussians: int, *, seed: int = 0) -> np.ndarray:
    """All indices when ``n_gaussians <= max_gaussians``, else a fixed random subset (sorted)."""
    if n_gaussians <= max_gaussians:
        return np.arange(n_gaussians)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_gaussians, size=max_gaussians, replace=False))


def _subset_decoder(model, gaussian_indices: np.ndarray):
    """``(positions (m, 3), decode(z) -> (b, m, 3))`` for a subset of the Gaussians, without
    touching ``model`` (a movable mask is cut to the subset on a copy of the decoder)."""
    idx = torch.as_tensor(gaussian_indices, dtype=torch.long,
                          device=model.gaussians.positions.device)
    positions = model.gaussians.positions.detach()[idx]
    decoder = model.decoder
    if getattr(decoder, "movable_mask", None) is not None:
        decoder = copy.deepcopy(decoder)
        decoder.set_movable_mask(model.decoder.movable_mask[idx])
    return positions, lambda z: decoder(positions, z)


@torch.no_grad()
def motion_statistics(
    model,  # DeformationModel
    latents: torch.Tensor | np.ndarray,  # (n, d)
    *,
    gaussian_indices: np.ndarray | None = None,  # Gaussians to reduce over (default all)
    per_gaussian_error: np.ndarray | None = None,  # (n_g,) Å, for the weighted error
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,  # called with (done, total)
) -> MotionStatistics:
    """Amount, mean vector, centre and weighted error of every latent's displacement field."""
    device = model.gaussians.positions.device
    n_g = model.gaussians.n_gaussians
    if gaussian_indices is None:
        gaussian_indices = np.arange(n_g)
    positions, decode = _subset_decoder(model, gaussian_indices)
    error = None
    if per_gaussian_error is not None:
        error = torch.as_tensor(np.asarray(per_gaussian_error)[gaussian_indices],
                                dtype=positions.dtype, device=device)
    z_all = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
    n = z_all.shape[0]
    amount, mean_vector, centre = np.zeros(n), np.zeros((n, 3)), np.zeros((n, 3))
    weighted = np.full(n, np.nan) if error is not None else None
    centroid = positions.mean(dim=0)
    for start in range(0, n, batch_size):
        d = decode(z_all[start:start + batch_size].to(device))  # (b, m, 3)
        size = d.norm(dim=-1)  # (b, m)
        total = size.sum(dim=1, keepdim=True)  # (b, 1)
        safe = total.clamp_min(1e-12)
        sl = slice(start, start + d.shape[0])
        amount[sl] = size.mean(dim=1).cpu().numpy()
        mean_vector[sl] = d.mean(dim=1).cpu().numpy()
        c = (size @ positions) / safe
        centre[sl] = torch.where(total > 0, c, centroid[None]).cpu().numpy()
        if error is not None:
            w = (size @ error[:, None]) / safe
            weighted[sl] = torch.where(total > 0, w, error.mean()).squeeze(1).cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return MotionStatistics(amount=amount, mean_vector=mean_vector, centre=centre,
                            weighted_error=weighted)


@torch.no_grad()
def half_set_disagreement(
    model_1,  # DeformationModel of half 1
    model_2,  # DeformationModel of half 2
    z_1: torch.Tensor | np.ndarray,  # (n, d) latents of the same particles under half 1
    z_2: torch.Tensor | np.ndarray,  # (n, d) ... under half 2
    *,
    gaussian_indices: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:  # (n,) mean over Gaussians of |d1 - d2|, Å
    """How much the two halves disagree on each particle's displacement field."""
    n_g = model_1.gaussians.n_gaussians
    if gaussian_indices is None:
        gaussian_indices = np.arange(n_g)
    _, decode_1 = _subset_decoder(model_1, gaussian_indices)
    _, decode_2 = _subset_decoder(model_2, gaussian_indices)
    device = model_1.gaussians.positions.device
    z_1 = torch.as_tensor(np.asarray(z_1), dtype=torch.float32)
    z_2 = torch.as_tensor(np.asarray(z_2), dtype=torch.float32)
    out = np.zeros(z_1.shape[0])
    for start in range(0, z_1.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        d1, d2 = decode_1(z_1[sl].to(device)), decode_2(z_2[sl].to(device))
        out[sl] = (d1 - d2).norm(dim=-1).mean(dim=1).cpu().numpy()
    return out


def direction_of_motion_degrees(
    mean_vectors: np.ndarray,  # (n, 3) xyz Å
) -> np.ndarray:  # (n,) degrees in (-180, 180]
    """Angle of each mean displacement vector in the plane of the two principal directions of
    all of them (second moments, not centred: opposite motions get opposite angles)."""
    v = np.asarray(mean_vectors, dtype=np.float64)
    _, _, axes = np.linalg.svd(v, full_matrices=True)
    return np.degrees(np.arctan2(v @ axes[1], v @ axes[0]))


def location_of_motion_angstrom(
    centres: np.ndarray,  # (n, 3) xyz Å
    consensus_positions: torch.Tensor | np.ndarray,  # (n_g, 3) xyz Å
) -> np.ndarray:  # (n,) Å
    """Position of each motion centre along the long axis of the consensus model."""
    positions = np.asarray(torch.as_tensor(consensus_positions).detach().cpu(), dtype=np.float64)
    centroid, axes, _ = principal_axes(positions)
    return (np.asarray(centres) - centroid) @ axes[0]


def tilt_degrees(rotations: torch.Tensor | np.ndarray) -> np.ndarray:  # (n, 3, 3) -> (n,)
    """RELION tilt angle of each rotation ``A = Rz(psi) Ry(tilt) Rz(rot)``: ``A[2, 2] = cos``."""
    a = np.asarray(torch.as_tensor(rotations).detach().cpu(), dtype=np.float64)
    return np.degrees(np.arccos(np.clip(a[:, 2, 2], -1.0, 1.0)))


def shift_angstrom(shifts: torch.Tensor | np.ndarray) -> np.ndarray:  # (n, 2) -> (n,)
    """Length of each origin shift (Å)."""
    return np.linalg.norm(np.asarray(torch.as_tensor(shifts).cpu(), dtype=np.float64), axis=1)


def embedding_density(
    coords: np.ndarray,  # (n, 2)
    *,
    n_neighbours: int = 10,
) -> np.ndarray:  # (n,) particles per unit area of the embedding
    """k-nearest-neighbour density ``k / (π r_k²)`` (``k`` at most ``n - 1``)."""
    coords = np.asarray(coords, dtype=np.float64)
    k = max(1, min(n_neighbours, coords.shape[0] - 1))
    distance, _ = cKDTree(coords).query(coords, k=k + 1)
    radius = np.maximum(distance[:, -1], 1e-12)
    return k / (math.pi * radius**2)


__all__ = [
    "COLOURINGS",
    "EMBEDDINGS",
    "LatentEmbedding",
    "MotionStatistics",
    "deformation_vectors_zyx",
    "deformed_positions",
    "direction_of_motion_degrees",
    "embed_latents_2d",
    "embedding_density",
    "gaussian_subset",
    "half_set_disagreement",
    "interpolate_path",
    "kmeans_clusters",
    "latent_map_3d",
    "location_of_motion_angstrom",
    "motion_statistics",
    "points_along_axis",
    "points_in_polygon_2d",
    "principal_axes",
    "render_displaced_3d",
    "shift_angstrom",
    "tilt_degrees",
]
