"""A built-in test structure with one continuous motion, for simulation and accuracy tests.

A globular body with two arms on hinges. The motion coordinate ``t`` in [-1, 1] swings arm 1
by ``t · arm1_angle`` about its hinge and arm 2 by ``-t · arm2_angle`` about its own, so one scalar
describes the whole conformational landscape (the ground truth a latent space must recover).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _axis_angle_matrix(axis: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` about a unit ``axis`` (3,) by ``angle_rad`` (...)."""
    x, y, z = axis / axis.norm()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=angle_rad.dtype)
    s, c = torch.sin(angle_rad)[..., None, None], torch.cos(angle_rad)[..., None, None]
    return torch.eye(3, dtype=angle_rad.dtype) + s * k + (1 - c) * (k @ k)


@dataclass(frozen=True)
class HingedStructure:
    """Gaussian model of the test structure; ``positions`` (n, 3) Å are the ``t = 0`` state."""

    positions: torch.Tensor  # (n, 3) Å xyz
    masses: torch.Tensor  # (n,)
    sigma_angstrom: float
    domain: torch.Tensor  # (n,) 0 body, 1 arm 1, 2 arm 2
    hinges: torch.Tensor  # (2, 3) Å
    axes: torch.Tensor  # (2, 3)
    max_angles_degrees: tuple[float, float]

    def deformed_positions(self, motion: torch.Tensor) -> torch.Tensor:  # (b, n, 3)
        """Gaussian centres for motion coordinates ``motion`` (b,) in [-1, 1]."""
        motion = torch.as_tensor(motion, dtype=self.positions.dtype).reshape(-1)
        out = self.positions.expand(motion.shape[0], -1, -1).clone()
        for arm, sign in ((1, 1.0), (2, -1.0)):
            sel = self.domain == arm
            angle = sign * motion * math.radians(self.max_angles_degrees[arm - 1])
            rot = _axis_angle_matrix(self.axes[arm - 1], angle)  # (b, 3, 3)
            rel = self.positions[sel] - self.hinges[arm - 1]
            out[:, sel] = torch.einsum("bij,nj->bni", rot, rel) + self.hinges[arm - 1]
        return out


def _uniform_in_ellipsoid(n: int, radii, centre, g: torch.Generator) -> torch.Tensor:
    pts = torch.empty(0, 3)
    while pts.shape[0] < n:
        cand = torch.rand(4 * n, 3, generator=g) * 2 - 1
        pts = torch.cat([pts, cand[(cand**2).sum(-1) <= 1]])
    return pts[:n] * torch.tensor(radii) + torch.tensor(centre)


def hinged_structure(scale_angstrom: float = 1.0, n_gaussians: int = 1200, seed: int = 0,
                     max_angles_degrees: tuple[float, float] = (35.0, 25.0)) -> HingedStructure:
    """The default test structure (about 120 Å across at ``scale_angstrom = 1``)."""
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
    return HingedStructure(
        positions=positions,
        masses=torch.ones(n_gaussians),
        sigma_angstrom=3.0 * s,
        domain=domain,
        hinges=torch.tensor([[22.0 * s, 6.0 * s, 0.0], [-10.0 * s, 16.0 * s, 4.0 * s]]),
        axes=torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
        max_angles_degrees=max_angles_degrees,
    )
