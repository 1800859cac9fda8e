"""Shared synthetic inputs of the inverse-deformation tests: a Gaussian cloud, latent codes
and a known smooth deformation (a hinge swing plus a twist)."""

from __future__ import annotations

import math

import torch

BOX, PX = 32, 4.0  # a 128 Å box


def cloud(n: int, seed: int = 0) -> torch.Tensor:  # (n, 3) Å, uniform in an ellipsoid
    g = torch.Generator().manual_seed(seed)
    p = torch.empty(0, 3)
    while p.shape[0] < n:
        cand = torch.rand(4 * n, 3, generator=g) * 2 - 1
        p = torch.cat([p, cand[(cand**2).sum(-1) <= 1]])
    return p[:n] * torch.tensor([40.0, 20.0, 16.0])


def axis_rotation(axis: tuple[float, float, float], angle: torch.Tensor) -> torch.Tensor:
    x, y, z = axis
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    s, c = torch.sin(angle)[..., None, None], torch.cos(angle)[..., None, None]
    return torch.eye(3) + s * k + (1 - c) * (k @ k)


def soft_hinge(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (b, n, 3) Å
    """Known smooth deformation with latent-dependent amplitude: the part at x > 0 swings about
    the z axis by up to ±25° (z[:, 0]; smooth hinge of width 6 Å at x = 0), and the body
    twists about the x axis by up to ±20° at x = ±40 Å (z[:, 1])."""
    swing = axis_rotation((0.0, 0.0, 1.0),
                           z[:, :1] * math.radians(25.0) * torch.sigmoid(c[:, 0] / 6.0))
    p = torch.einsum("bnij,nj->bni", swing, c)
    twist = axis_rotation((1.0, 0.0, 0.0), z[:, 1:2] * math.radians(20.0) * c[:, 0] / 40.0)
    return torch.einsum("bnij,bnj->bni", twist, p) - c


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1


__all__ = ["BOX", "PX", "axis_rotation", "cloud", "latents", "soft_hinge"]
