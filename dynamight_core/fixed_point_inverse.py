"""Inverse deformations by fixed-point inversion of the coarse forward field: from a particle's
(deformed) frame back to the consensus frame, with nothing to train.

The forward model moves consensus Gaussian ``j`` of a particle with latent code ``z`` to
``y_j = c_j + δ_j(z)``; the inverse maps any point ``y`` of the particle's frame to the consensus
point ``x`` it came from (the trained alternative: :mod:`dynamight_core.inverse_network`).


**fixed-point** (:class:`FixedPointInverse`): the forward field ``F`` of the
particle on a coarse grid (:func:`~dynamight_core.displacement_field.
displacement_grid_from_gaussians`, the field the deformed backprojection uses) is inverted by
``x ← y − F(x)``. The start is ``x₀ = y + G(y)`` with ``G`` the coarse field of ``−δ_j`` splatted
at the deformed positions ``y_j`` (:func:`inverse_displacement_grid`; a first-order inverse that
still works where ``y`` lies outside the consensus density, where ``F`` is zero and ``x₀ = y``
would never move). At convergence ``x + F(x) = y``: the exact inverse of the map the
backprojection applies. The iteration contracts where ``|∇F| < 1`` (local rotations below
60°). Where the consensus is sparse (its surface) ``F`` is attenuated by the field's weight
floor and spurious solutions near ``x = y`` appear; each point therefore keeps its iterate of
smallest residual within half a grid spacing of ``x₀`` (:meth:`FixedPointInverse.__call__`).

Measured (CPU; tests/test_fixed_point_inverse.py, tests/test_inverse_network.py and a 1200-particle simulated run, box 32,
6 Å/px, 500 Gaussians): fixed-point on the backprojection's grid is as accurate as a network
trained for 50 epochs to within a factor 1.5 at the Gaussians (held-out mean 0.27 vs 0.18 Å,
95th percentile 0.57 vs 0.36 Å; displacements ~2-4 Å) and more accurate between them on a
synthetic deformation (0.15 vs 0.23 Å), with nothing to train; so the command defaults to it.

Coordinates: vectors ``xyz`` in Å relative to voxel ``box // 2``; grids ``[z, y, x]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .displacement_field import displacement_grid_from_gaussians, sample_displacement_grid


def inverse_displacement_grid(
    consensus: torch.Tensor,  # (n_g, 3) Å
    displacements: torch.Tensor,  # (b, n_g, 3) Å
    box_size: int,
    pixel_size: float,
    *,
    grid_size: int,
) -> torch.Tensor:  # (b, 3, g, g, g) Å, channels xyz, nodes [z, y, x]
    """Coarse field of ``−δ_j`` at the deformed positions ``y_j = c_j + δ_j`` of each particle:
    a first-order inverse read at ``y``. Per particle it is
    ``displacement_grid_from_gaussians(c + δ_p, −δ_p[None], ...)`` (same splatting and
    weight floor); computed for the whole batch at once."""
    return displacement_grid_from_gaussians(
        consensus[None] + displacements, -displacements, box_size, pixel_size,
        grid_size=grid_size)


class FixedPointInverse:
    """Inverse of the coarse forward field of a batch of particles by fixed-point iteration
    (module docstring). Build once per batch of particles, then call on any points.

    ``grid_size`` is the coarse grid of :func:`displacement_grid_from_gaussians`; use the one
    the deformed backprojection uses (``deformed_backprojection.choose_grid_size``) so that the
    inverse matches the forward map it applies.
    """

    def __init__(
        self,
        consensus: torch.Tensor,  # (n_g, 3) Å
        displacements: torch.Tensor,  # (b, n_g, 3) Å
        box_size: int,
        pixel_size: float,
        *,
        grid_size: int,
        n_iterations: int = 5,
        tolerance_angstrom: float = 1e-2,
        initial_guess: bool = True,
    ) -> None:
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        # the forward field exactly as the deformed backprojection builds it (same grid and
        # weight floor), so this is the inverse of the map it applies; half a grid spacing (Å):
        # see __call__
        self.trust_radius = 0.5 * (box_size - 1) * pixel_size / (grid_size - 1)
        self.n_iterations = int(n_iterations)
        self.tolerance = float(tolerance_angstrom)
        self.forward_grid = displacement_grid_from_gaussians(
            consensus, displacements, box_size, pixel_size, grid_size=grid_size)
        self.inverse_grid = None
        if initial_guess:
            self.inverse_grid = inverse_displacement_grid(
                consensus, displacements, box_size, pixel_size, grid_size=grid_size)
        self.iterations_used = 0  # of the last call
        self.last_update_angstrom = 0.0  # largest residual of the last iteration of the last call

    def __call__(self, points: torch.Tensor) -> torch.Tensor:  # (b, m, 3) -> (b, m, 3) Å
        """Consensus positions of ``points`` (``(b, m, 3)`` or ``(m, 3)`` for every particle).

        Safeguard: each point returns its best iterate, the one with the smallest residual
        ``|x + F(x) − y|`` (the size of the update it produces) among the iterates within half a
        grid spacing of the splatted first guess ``x₀``. Where the consensus has little density
        the coarse field is attenuated and ``x = y`` (or a point near it) becomes a spurious
        solution with a small residual; the first guess is accurate to the field's interpolation
        error, far below a grid spacing, so a true refinement never leaves that region."""
        if points.ndim == 2:
            points = points.expand(self.forward_grid.shape[0], -1, -1)
        args = (self.box_size, self.pixel_size)
        x0 = points
        if self.inverse_grid is not None:
            x0 = points + sample_displacement_grid(self.inverse_grid, points, *args)
        x, best, best_residual = x0, x0, None
        self.iterations_used, self.last_update_angstrom = 0, 0.0
        for k in range(self.n_iterations):
            new = points - sample_displacement_grid(self.forward_grid, x, *args)
            residual = (new - x).norm(dim=-1)  # = |x + F(x) - y|, the residual of x
            if self.inverse_grid is not None:
                residual = torch.where((x - x0).norm(dim=-1) <= self.trust_radius, residual,
                                       torch.full_like(residual, math.inf))
            if best_residual is None:
                best, best_residual = x, residual
            else:
                better = residual < best_residual
                best = torch.where(better[..., None], x, best)
                best_residual = torch.minimum(residual, best_residual)
            x = new
            self.iterations_used = k + 1
            # the largest update of the points still inside the trust region (0 if none; the
            # residuals are norms, so the zeros put in for the others change nothing): one
            # read-back per iteration, for the early stop
            active = torch.where(torch.isfinite(residual), residual, torch.zeros_like(residual))
            self.last_update_angstrom = float(active.max()) if active.numel() else 0.0
            if self.last_update_angstrom < self.tolerance:
                break
        return best


def fixed_point_inverse_map(consensus: torch.Tensor, displacements: torch.Tensor,  # (n_g, 3)
                            box_size: int, pixel_size: float, *, grid_size: int,
                            **options: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One particle's inverse ``(m, 3) -> (m, 3)`` Å by :class:`FixedPointInverse`."""
    solver = FixedPointInverse(consensus, displacements[None], box_size, pixel_size,
                               grid_size=grid_size, **options)
    return lambda points: solver(points[None])[0]



__all__ = [
    "FixedPointInverse",
    "fixed_point_inverse_map",
    "inverse_displacement_grid",
]
