"""One trained DynaMight run seen through the latent space of a half set: what the napari
viewer and the headless actions both work on (no Qt here).

``--half-set 1`` or ``2``: that half's particles (validation ones included) at the latent codes
of that half's model, taken from ``OUTPUT_DIR/particles.star`` when it belongs to the final
checkpoint, otherwise from the checkpoint. ``--half-set 0``: the validation particles (trained
by neither half) seen through both halves: each is embedded by its two codes ``(z1, z2)`` side
by side; maps show half 1's model at ``z1`` and the arrows are coloured by
``|d1(z1) - d2(z2)|`` per Gaussian.

Outputs go to ``OUTPUT_DIR/latent_space/`` (maps, movies, plots) and
``OUTPUT_DIR/subsets/subset_N.star``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from dynamight_core import latent_analysis as la
from dynamight_core.deformation_model import deformation_error
from dynamight_core.gaussian_model import automatic_threshold

from ..errors import InputError
from ..forward_run import FORWARD_CHECKPOINTS, ForwardRun, load_forward_run
from ..star_io import RelionParticles, read_particles_star
from .movie import MovieResult, next_movie_folder, write_volume_series
from .subsets import SubsetResult, write_subset

logger = logging.getLogger(__name__)

OUTPUT_FOLDER = "latent_space"
SUBSET_FOLDER = "subsets"
LATENT_COLUMN = "rlnDynaMightLatent{}"
ERROR_COLUMN = "rlnDynaMightDeformationError"


@dataclass(frozen=True)
class LatentPoint:
    """The deformed model at one point of the embedding."""

    xy: np.ndarray  # (2,) embedding coordinates
    latent: np.ndarray  # (d,) code of the model's half
    volume: torch.Tensor  # (box, box, box) zyx, on the CPU
    vectors_zyx: np.ndarray  # (n_g, 2, 3) start, vector in voxels (zyx)
    vector_error: np.ndarray  # (n_g,) Å, colours the arrows (NaN: unknown)
    seconds: float  # time taken


class TrackNotFound(LookupError):
    """``--track-movie`` of a track the view does not hold (or data that are no time series)."""


class ExplorerSession:
    """The particles of one view, their latents and embedding, and the actions on them."""

    def __init__(
        self,
        run: ForwardRun,
        half_set: int,
        *,
        star: RelionParticles,
        indices: np.ndarray,  # (n,) 0-based particle rows shown
        latents: np.ndarray,  # (n, d) under the model half
        other_latents: np.ndarray | None = None,  # (n, d) under half 2 (half_set 0 only)
        embedding: str = "pca",
        per_gaussian_error: np.ndarray | None = None,  # (n_g,) Å, NaN when unknown
        star_has_current_errors: bool = False,  # star's rlnDynaMightDeformationError is ours
        max_gaussians: int = 2000,
        preview_oversampling: int = 1,
        seed: int = 0,
    ) -> None:
        self.run = run
        self.half_set = int(half_set)
        self.model_half = 1 if self.half_set == 0 else self.half_set
        self.model = run.models[self.model_half]
        self.star = star
        self.indices = np.asarray(indices, dtype=np.int64)
        self.latents = np.asarray(latents, dtype=np.float64)
        self.other_latents = (None if other_latents is None
                              else np.asarray(other_latents, dtype=np.float64))
        embedded = (self.latents if self.other_latents is None
                    else np.concatenate([self.latents, self.other_latents], axis=1))
        self.embedding = la.embed_latents_2d(embedded, method=embedding, seed=seed)
        n_g = self.model.gaussians.n_gaussians
        self.per_gaussian_error = (np.full(n_g, np.nan) if per_gaussian_error is None
                                   else np.asarray(per_gaussian_error, dtype=np.float64))
        self.gaussian_indices = la.gaussian_subset(n_g, max_gaussians, seed=seed)
        self.preview_oversampling = int(preview_oversampling)
        self.star_has_current_errors = bool(star_has_current_errors)
        self._colourings: dict[str, np.ndarray] = {}
        self._motion: la.MotionStatistics | None = None

    # -- geometry ------------------------------------------------------------------------------

    @property
    def output_directory(self) -> Path:
        return self.run.output_directory

    @property
    def latent_dim(self) -> int:
        return int(self.latents.shape[1])

    @property
    def box_size(self) -> int:
        return self.model.box_size

    @property
    def pixel_size(self) -> float:
        return self.model.pixel_size

    @property
    def coords(self) -> np.ndarray:  # (n, 2)
        return self.embedding.coords

    def split_latent(self, embedded: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(m, D)`` embedded codes -> codes of the model half ``(m, d)`` and, for half set 0,
        of half 2 ``(m, d)``."""
        embedded = np.atleast_2d(embedded)
        if self.other_latents is None:
            return embedded, None
        return embedded[:, : self.latent_dim], embedded[:, self.latent_dim:]

    def latent_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes ``(m, d)`` (and half 2's for half set 0) of 2D points ``(m, 2)``."""
        return self.split_latent(self.embedding.to_latent(xy))

    # -- colourings ----------------------------------------------------------------------------

    def motion(self, progress: Callable[[int, int], None] | None = None) -> la.MotionStatistics:
        """Per-particle motion statistics under the model half (computed once)."""
        if self._motion is None:
            t0 = time.perf_counter()
            self._motion = la.motion_statistics(
                self.model, self.latents, gaussian_indices=self.gaussian_indices,
                per_gaussian_error=self.per_gaussian_error, batch_size=64, progress=progress)
            logger.info("motion statistics of %d particles over %d Gaussians: %.1f s",
                        self.latents.shape[0], self.gaussian_indices.shape[0],
                        time.perf_counter() - t0)
        return self._motion

    def colouring(self, name: str) -> np.ndarray:  # (n,)
        """Values of the colouring ``name`` (see :data:`colours.COLOURINGS`), one per point."""
        if name not in self._colourings:
            self._colourings[name] = self._compute_colouring(name)
        return self._colourings[name]

    def _compute_colouring(self, name: str) -> np.ndarray:
        rows = torch.from_numpy(self.indices)
        if name == "amount of motion":
            return self.motion().amount
        if name == "direction of motion":
            return la.direction_of_motion_degrees(self.motion().mean_vector)
        if name == "location of motion":
            return la.location_of_motion_angstrom(self.motion().centre,
                                                  self.model.gaussians.positions)
        if name == "deformation error":
            return self.motion().weighted_error
        if name == "half-set agreement":
            return self._half_set_agreement()
        if name == "particle index":
            return self.indices.astype(np.float64)
        if name == "tilt":
            return la.tilt_degrees(self.run.particles.rotations[rows])
        if name == "shift":
            return la.shift_angstrom(self.run.particles.shifts_angstrom[rows])
        if name == "density":
            return la.embedding_density(self.coords)
        raise KeyError(f"unknown colouring {name!r}")

    def _half_set_agreement(self) -> np.ndarray:
        """``|d1 - d2|`` (Å) of the validation particles among the points, NaN elsewhere."""
        out = np.full(self.indices.shape[0], np.nan)
        if self.other_latents is not None:
            return la.half_set_disagreement(
                self.run.models[1], self.run.models[2], self.latents, self.other_latents,
                gaussian_indices=self.gaussian_indices)
        held = self.run.validation.numpy()[self.indices]
        if not held.any():
            return out
        if self.star_has_current_errors and ERROR_COLUMN in self.star.particles.columns:
            values = self.star.particles[ERROR_COLUMN].to_numpy(dtype=np.float64)[self.indices]
            out[held] = np.where(values[held] >= 0, values[held], np.nan)
            return out
        rows = self.indices[held]
        z1 = latent_codes(self.run, 1, rows)
        z2 = latent_codes(self.run, 2, rows)
        out[held] = la.half_set_disagreement(self.run.models[1], self.run.models[2], z1, z2,
                                             gaussian_indices=self.gaussian_indices)
        return out

    # -- maps ----------------------------------------------------------------------------------

    @torch.no_grad()
    def point(self, xy: np.ndarray, *, oversampling: int | None = None) -> LatentPoint:
        """Map, arrows and arrow colours of the 2D point ``xy``."""
        t0 = time.perf_counter()
        xy = np.asarray(xy, dtype=np.float64).reshape(2)
        z, z_other = self.latent_of(xy[None])
        device = self.model.gaussians.positions.device
        d = self.model.displacements(torch.as_tensor(z, dtype=torch.float32, device=device))[0]
        volume = la.render_displaced_3d(
            self.model, d, oversampling=oversampling or self.preview_oversampling).cpu()
        if z_other is not None:
            d2 = self.run.models[2].displacements(
                torch.as_tensor(z_other, dtype=torch.float32, device=device))[0]
            error = (d - d2).norm(dim=-1).cpu().numpy()
        else:
            error = self.per_gaussian_error
        vectors = la.deformation_vectors_zyx(self.model.gaussians.positions, d,
                                             box_size=self.box_size, pixel_size=self.pixel_size)
        return LatentPoint(xy=xy, latent=z[0], volume=volume, vectors_zyx=vectors,
                           vector_error=np.asarray(error, dtype=np.float64),
                           seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def maps(self, latents: np.ndarray, *, oversampling: int = 2,
             control=None) -> torch.Tensor:  # (m, d) -> (m, box, box, box)
        """Maps of the model half at the codes ``latents`` (full quality by default)."""
        volumes = []
        for z in np.atleast_2d(latents):
            if control is not None:
                control.check_abort()
            volumes.append(la.latent_map_3d(self.model, torch.as_tensor(z, dtype=torch.float32),
                                            oversampling=oversampling).cpu())
        return torch.stack(volumes)

    def display_levels(self) -> tuple[float, float]:
        """Contour level (Otsu's threshold) and maximum of the consensus map, for display."""
        consensus = la.render_displaced_3d(
            self.model, torch.zeros_like(self.model.gaussians.positions),
            oversampling=self.preview_oversampling)
        maximum = max(float(consensus.max()), 1e-12)
        try:
            return automatic_threshold(consensus), maximum
        except ValueError:
            return maximum / 2, maximum

    # -- outputs -------------------------------------------------------------------------------

    def movie(self, path_xy: np.ndarray, n_frames: int, *, control=None) -> MovieResult:
        """Maps at ``n_frames`` points evenly spaced along the 2D polyline ``path_xy (k, 2)``,
        written as ``latent_space/movies/movie_NNN/frame_*.mrc`` and ``movie.gif``."""
        xy = la.interpolate_path(np.asarray(path_xy, dtype=np.float64), n_frames)
        z, _ = self.latent_of(xy)
        volumes = self.maps(z, control=control)
        folder = next_movie_folder(self.output_directory / OUTPUT_FOLDER / "movies")
        return write_volume_series(folder, volumes, self.pixel_size, z)

    def track_movie(self, track: int, n_frames: int, *, control=None) -> MovieResult:
        """A time series' molecule through time: maps at the codes of the particles of
        ``track`` (``rlnDynaMightTrack``) shown in this view, in the order of
        ``rlnDynaMightTime``, ``n_frames`` of them evenly spaced in that order (all when the
        track has fewer), written as ``latent_space/movies/track_K/frame_*.mrc`` and
        ``movie.gif``. Raises :class:`TrackNotFound` when this view holds no particle of the
        track."""
        table = self.star.particles
        if "rlnDynaMightTrack" not in table.columns or "rlnDynaMightTime" not in table.columns:
            raise TrackNotFound("the particles have no rlnDynaMightTrack / rlnDynaMightTime "
                                "columns (not a time series)")
        tracks = table["rlnDynaMightTrack"].to_numpy()[self.indices]
        rows = np.flatnonzero(tracks == int(track))
        if rows.size == 0:
            raise TrackNotFound(f"no particle of track {int(track)} in half set "
                                f"{self.half_set}")
        times = table["rlnDynaMightTime"].to_numpy(dtype=np.float64)[self.indices[rows]]
        rows = rows[np.argsort(times, kind="stable")]
        pick = np.unique(np.round(np.linspace(0, rows.size - 1, min(n_frames, rows.size)))
                         .astype(int))
        z = self.latents[rows[pick]]
        volumes = self.maps(z, control=control)
        folder = self.output_directory / OUTPUT_FOLDER / "movies" / f"track_{int(track)}"
        return write_volume_series(folder, volumes, self.pixel_size, z)

    def maps_along_principal_axes(self, n_axes: int, n_frames: int, *, extent: float = 2.0,
                                  control=None) -> list[MovieResult]:
        """For each of the first ``n_axes`` principal directions of the embedded codes, maps from
        ``-extent`` to ``+extent`` standard deviations about the mean, written to
        ``latent_space/maps_along_pcs/half{H}_pc{K}/``."""
        e = self.embedding
        results = []
        for k in range(min(int(n_axes), e.latent_dim)):
            embedded = la.points_along_axis(e.mean, e.axes[k], e.std[k], n_frames, extent=extent)
            z, _ = self.split_latent(embedded)
            volumes = self.maps(z, control=control)
            folder = (self.output_directory / OUTPUT_FOLDER / "maps_along_pcs"
                      / f"half{self.half_set}_pc{k + 1}")
            results.append(write_volume_series(folder, volumes, self.pixel_size, z))
        return results

    def subset_in_polygon(self, polygon_xy: np.ndarray) -> SubsetResult:
        """Write the particles inside the 2D polygon to ``subsets/subset_N.star``."""
        inside = la.points_in_polygon_2d(self.coords, np.asarray(polygon_xy, dtype=np.float64))
        return self.write_subset(self.indices[inside])

    def subsets_by_cluster(self, n_clusters: int, *, seed: int = 0) -> list[SubsetResult]:
        """k-means of the embedded codes; one ``subset_N.star`` per cluster, largest first."""
        labels = la.kmeans_clusters(self.embedding.latents, n_clusters, seed=seed)
        return [self.write_subset(self.indices[labels == k]) for k in range(int(n_clusters))
                if (labels == k).any()]

    def write_subset(self, rows: np.ndarray) -> SubsetResult:
        return write_subset(self.output_directory / SUBSET_FOLDER, self.star, rows,
                            half_set=self.run.half_set)


# ---------------------------------------------------------------------------------------------
# opening a run


def latent_codes(run: ForwardRun, half: int, rows: np.ndarray, *, batch_size: int = 256,
           control=None) -> np.ndarray:  # (m, d)
    """Latent codes of the particles ``rows`` under ``half``'s model
    (:meth:`ForwardRun.latents`)."""
    d = run.models[half].decoder.latent_dim
    out = np.zeros((len(rows), d))
    done = 0
    for batch in run.batches(np.asarray(rows), batch_size, control):
        out[done:done + len(batch)] = run.latents(half, batch).cpu().numpy()
        done += len(batch)
    return out


def _particles_table(run: ForwardRun) -> RelionParticles:
    """``OUTPUT_DIR/particles.star`` (input columns plus DynaMight's) when it matches the run,
    else the particles STAR file the run was trained on."""
    ours = run.output_directory / "particles.star"
    if ours.is_file():
        star = read_particles_star(ours)
        if len(star.particles) == len(run.particles):
            return star
        logger.warning("%s has %d particles, the run %d: using %s", ours, len(star.particles),
                       len(run.particles), run.star.path)
    return run.star


def _stored_latents(run: ForwardRun, star: RelionParticles, rows: np.ndarray,
                    latent_dim: int) -> np.ndarray | None:
    """The codes in ``particles.star`` if they were written for this run's final checkpoint."""
    columns = [LATENT_COLUMN.format(k + 1) for k in range(latent_dim)]
    final = run.output_directory / FORWARD_CHECKPOINTS / "checkpoint_final.pth"
    if (star.path is None or star.path.name != "particles.star"
            or not all(c in star.particles.columns for c in columns)
            or not final.is_file() or run.checkpoint_path.resolve() != final.resolve()
            or star.path.stat().st_mtime < final.stat().st_mtime):
        return None
    values = star.particles[columns].to_numpy(dtype=np.float64)[rows]
    return values if np.isfinite(values).all() else None


def open_session(
    output_directory: str | PathLike,
    half_set: int,
    *,
    checkpoint_file: str | PathLike | None = None,
    device: torch.device | str = "cpu",
    embedding: str = "pca",
    max_error_particles: int = 128,
    control=None,
    **session_options,
) -> ExplorerSession:
    """Load the run of ``output_directory`` and prepare the view of ``half_set`` (0, 1, 2)."""
    if half_set not in (0, 1, 2):
        raise InputError(None, "--half-set", f"must be 0, 1 or 2, got {half_set}",
                         "Use 1 or 2 for a half set, 0 for the validation particles.")
    run = load_forward_run(output_directory, checkpoint_file=checkpoint_file, device=device)
    star = _particles_table(run)
    latent_dim = run.models[1].decoder.latent_dim
    validation = np.flatnonzero(run.validation.numpy())
    rows = validation if half_set == 0 else run.members(half_set)
    if rows.size < 2:
        raise InputError(run.checkpoint_path, "--half-set",
                         f"half set {half_set} has {rows.size} particle(s), too few to explore",
                         "Choose another half set (0 needs a validation fraction > 0).")
    other, stored = None, False
    if half_set == 0:
        logger.info("encoding the %d validation particles with both halves", rows.size)
        latents = latent_codes(run, 1, rows, control=control)
        other = latent_codes(run, 2, rows, control=control)
    else:
        latents = _stored_latents(run, star, rows, latent_dim)
        if latents is None:
            logger.info("latent codes of the %d particles of half %d from %s", rows.size, half_set,
                        run.checkpoint_path.name)
            latents = latent_codes(run, half_set, rows, control=control)
        else:
            stored = True
            logger.info("latent codes of the %d particles of half %d from %s", rows.size,
                        half_set, star.path)
    per_gaussian = None
    if validation.size:
        chosen = validation
        if validation.size > max_error_particles:
            rng = np.random.default_rng(0)
            chosen = np.sort(rng.choice(validation, max_error_particles, replace=False))
        _, _, per_gaussian = deformation_error(run.models[1], run.models[2],
                                               lambda batch: run.latents(1, batch),
                                               lambda batch: run.latents(2, batch),
                                               run.batches(chosen, 64, control))
        logger.info("per-Gaussian deformation error from %d validation particles: mean %.3f Å, "
                    "max %.3f Å", chosen.size, float(per_gaussian.mean()),
                    float(per_gaussian.max()))
    session = ExplorerSession(run, half_set, star=star, indices=rows, latents=latents,
                              other_latents=other, embedding=embedding,
                              per_gaussian_error=per_gaussian, star_has_current_errors=stored,
                              **session_options)
    logger.info("half set %d: %d particles, latent dimension %d, %s embedding", half_set,
                rows.size, latent_dim, embedding.upper())
    return session


__all__ = [
    "OUTPUT_FOLDER",
    "SUBSET_FOLDER",
    "ExplorerSession",
    "LatentPoint",
    "TrackNotFound",
    "latent_codes",
    "open_session",
]
