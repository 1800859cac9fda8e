"""Moving test structures with one continuous motion coordinate, for simulation and accuracy
tests.

A structure is a set of Gaussians (atoms or blobs) split into domains, and a list of domain
motions driven by one scalar ``t`` in [-1, 1]: each :class:`DomainMotion` turns one domain about
an axis through a pivot by ``profile(t) · max_angle``. A *hinge* turns the whole domain by the
same angle; a *twist* (torsion) turns each atom by an angle proportional to its distance along
the axis from the pivot (zero at the pivot, full at ``reach`` Å), so the domain deforms
non-rigidly. Motions of one domain apply in the order given. ``t = 0`` is the reference state
(``positions``), so the single scalar describes the whole conformational landscape (the ground
truth a latent space must recover).

:func:`hinged_structure` is the small blob test structure of the unit tests; protein-like
structures at atomic density are in :mod:`dynamight_core.protein_like_structure`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROFILES = ("linear", "cubic")  # profile(t): t, or (t + t³) / 2 (monotonic, faster at the ends)


def _axis_angle_matrix(axis: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` about a unit ``axis`` (3,) by ``angle_rad`` (...)."""
    x, y, z = (axis / axis.norm()).tolist()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=angle_rad.dtype)
    s, c = torch.sin(angle_rad)[..., None, None], torch.cos(angle_rad)[..., None, None]
    return torch.eye(3, dtype=angle_rad.dtype) + s * k + (1 - c) * (k @ k)


@dataclass(frozen=True)
class DomainMotion:
    """One domain turned about ``axis`` through ``pivot`` by ``profile(t) · max_angle``."""

    domain: int
    pivot: torch.Tensor  # (3,) Å
    axis: torch.Tensor  # (3,)
    max_angle_degrees: float
    kind: str = "hinge"  # "hinge" (rigid) or "twist" (angle grows along the axis)
    reach_angstrom: float = 1.0  # twist only: distance along the axis of the full angle
    profile: str = "linear"

    def angle(self, motion: torch.Tensor) -> torch.Tensor:  # (b,) radians
        t = motion if self.profile == "linear" else 0.5 * (motion + motion**3)
        return t * math.radians(self.max_angle_degrees)

    def apply(self, points: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """``points (b, m, 3)`` of this domain moved for ``motion (b,)``."""
        axis = (self.axis / self.axis.norm()).to(points.dtype)
        rel = points - self.pivot.to(points.dtype)
        angle = self.angle(motion.to(points.dtype))  # (b,)
        if self.kind == "hinge":
            rot = _axis_angle_matrix(axis, angle)  # (b, 3, 3)
            return torch.einsum("bij,bnj->bni", rot, rel) + self.pivot
        if self.kind != "twist":
            raise ValueError(f"unknown motion kind {self.kind!r}")
        along = (rel @ axis).clamp_min(0.0) / self.reach_angstrom  # (b, m)
        theta = angle[:, None] * along  # (b, m)
        # Rodrigues per point: r cos θ + (k × r) sin θ + k (k·r)(1 - cos θ)
        cos, sin = torch.cos(theta)[..., None], torch.sin(theta)[..., None]
        k = axis.expand_as(rel)
        return (rel * cos + torch.cross(k, rel, dim=-1) * sin
                + k * (rel @ axis)[..., None] * (1 - cos)) + self.pivot


@dataclass(frozen=True)
class MovingStructure:
    """Gaussian model of a test structure; ``positions`` (n, 3) Å are the ``t = 0`` state."""

    positions: torch.Tensor  # (n, 3) Å xyz
    masses: torch.Tensor  # (n,)
    sigma_angstrom: float
    domain: torch.Tensor  # (n,) long, 0 = static core
    motions: tuple[DomainMotion, ...]
    name: str = "structure"

    def deformed_positions(self, motion: torch.Tensor) -> torch.Tensor:  # (b, n, 3)
        """Gaussian centres for motion coordinates ``motion`` (b,) in [-1, 1]."""
        motion = torch.as_tensor(motion, dtype=self.positions.dtype).reshape(-1)
        out = self.positions.expand(motion.shape[0], -1, -1).clone()
        for m in self.motions:
            sel = self.domain == m.domain
            out[:, sel] = m.apply(out[:, sel], motion)
        return out

    @property
    def moving(self) -> torch.Tensor:  # (n,) bool
        """Gaussians that some motion moves."""
        moved = torch.zeros_like(self.domain, dtype=torch.bool)
        for m in self.motions:
            moved |= self.domain == m.domain
        return moved

    @property
    def hinges(self) -> torch.Tensor:  # (n_motions, 3) Å
        return torch.stack([m.pivot for m in self.motions])

    @property
    def axes(self) -> torch.Tensor:  # (n_motions, 3)
        return torch.stack([m.axis for m in self.motions])


# the blob structure of the unit tests keeps its historical name
HingedStructure = MovingStructure


def _uniform_in_ellipsoid(n: int, radii, centre, g: torch.Generator) -> torch.Tensor:
    pts = torch.empty(0, 3)
    while pts.shape[0] < n:
        cand = torch.rand(4 * n, 3, generator=g) * 2 - 1
        pts = torch.cat([pts, cand[(cand**2).sum(-1) <= 1]])
    return pts[:n] * torch.tensor(radii) + torch.tensor(centre)


def hinged_structure(scale_angstrom: float = 1.0, n_gaussians: int = 1200, seed: int = 0,
                     max_angles_degrees: tuple[float, float] = (35.0, 25.0)) -> MovingStructure:
    """A globular body with two arms on hinges (about 120 Å across at ``scale_angstrom = 1``):
    ``t`` swings arm 1 by ``t · arm1_angle`` about its hinge and arm 2 by ``-t · arm2_angle``."""
    g = torch.Generator().manual_seed(seed)
    s = scale_angstrom
    n_body = n_gaussians // 2
    n_arm = (n_gaussians - n_body) // 2
    body = _uniform_in_ellipsoid(n_body, (24 * s, 18 * s, 16 * s), (0.0, 0.0, 0.0), g)
    arm1 = _uniform_in_ellipsoid(n_arm, (20 * s, 7 * s, 7 * s), (40 * s, 6 * s, 0.0), g)
    arm2 = _uniform_in_ellipsoid(n_gaussians - n_body - n_arm, (7 * s, 18 * s, 8 * s),
                                 (-10 * s, 33 * s, 4 * s), g)
    positions = torch.cat([body, arm1, arm2])
    domain = torch.cat([torch.zeros(n_body), torch.ones(n_arm),
                        torch.full((arm2.shape[0],), 2.0)]).long()
    motions = (
        DomainMotion(1, torch.tensor([22.0 * s, 6.0 * s, 0.0]), torch.tensor([0.0, 0.0, 1.0]),
                     max_angles_degrees[0]),
        DomainMotion(2, torch.tensor([-10.0 * s, 16.0 * s, 4.0 * s]),
                     torch.tensor([1.0, 0.0, 0.0]), -max_angles_degrees[1]),
    )
    return MovingStructure(positions=positions, masses=torch.ones(n_gaussians),
                           sigma_angstrom=3.0 * s, domain=domain, motions=motions,
                           name="hinged")


__all__ = ["PROFILES", "DomainMotion", "HingedStructure", "MovingStructure", "hinged_structure"]
