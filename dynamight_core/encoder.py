"""Image encoder of the VAE: particle image -> (mu, logvar) of the latent posterior.

A plain MLP on real-space pixels: optionally only the pixels inside a circle of radius
``mask_radius_px`` around the image centre ``(box // 2, box // 2)`` are used (the corners hold
only noise), each image is standardised (zero mean, unit variance over the used pixels) when
``normalize_input`` is set, then ``n_layers`` of ``Linear -> ELU`` of width ``n_neurons`` and two
linear heads for ``mu`` and ``logvar`` (natural log of the variance).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange
from torch import nn

logger = logging.getLogger(__name__)


def circular_pixel_mask(box_size: int, radius_px: float | None) -> torch.Tensor:  # (box, box)
    """Bool mask of pixels within ``radius_px`` of pixel ``(box // 2, box // 2)``; all pixels
    when ``radius_px`` is None."""
    if radius_px is None:
        return torch.ones(box_size, box_size, dtype=torch.bool)
    coords = torch.arange(box_size, dtype=torch.float32) - box_size // 2
    r2 = coords[:, None] ** 2 + coords[None, :] ** 2
    return r2 <= float(radius_px) ** 2


class ImageEncoder(nn.Module):
    """MLP encoder: images ``(b, box, box)`` -> ``mu (b, d)``, ``logvar (b, d)``."""

    def __init__(
        self,
        box_size: int,
        latent_dim: int,
        n_neurons: int = 256,
        n_layers: int = 3,
        mask_radius_px: float | None = None,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        if latent_dim < 1 or n_neurons < 1 or n_layers < 1:
            raise ValueError("latent_dim, n_neurons and n_layers must be >= 1")
        self.box_size = int(box_size)
        self.latent_dim = int(latent_dim)
        self.n_neurons = int(n_neurons)
        self.n_layers = int(n_layers)
        self.mask_radius_px = None if mask_radius_px is None else float(mask_radius_px)
        self.normalize_input = bool(normalize_input)

        mask = circular_pixel_mask(self.box_size, self.mask_radius_px)
        self.register_buffer("pixel_index", torch.nonzero(mask.flatten()).squeeze(-1),
                             persistent=False)
        n_in = int(mask.sum())
        if n_in == 0:
            raise ValueError(f"mask_radius_px={mask_radius_px} selects no pixel")
        self.input_norm = (nn.LayerNorm(n_in, elementwise_affine=False)
                           if self.normalize_input else nn.Identity())
        layers: list[nn.Module] = []
        width_in = n_in
        for _ in range(self.n_layers):
            layers += [nn.Linear(width_in, self.n_neurons), nn.ELU()]
            width_in = self.n_neurons
        self.body = nn.Sequential(*layers)
        self.mu_head = nn.Linear(self.n_neurons, self.latent_dim)
        self.logvar_head = nn.Linear(self.n_neurons, self.latent_dim)

    @property
    def n_inputs(self) -> int:
        """Number of pixels fed to the network."""
        return int(self.pixel_index.shape[0])

    @property
    def config(self) -> dict[str, Any]:
        """Plain constructor arguments, for checkpoints (``ImageEncoder(**config)``)."""
        return {
            "box_size": self.box_size,
            "latent_dim": self.latent_dim,
            "n_neurons": self.n_neurons,
            "n_layers": self.n_layers,
            "mask_radius_px": self.mask_radius_px,
            "normalize_input": self.normalize_input,
        }

    def forward(
        self,
        images: torch.Tensor,  # (b, box, box) real space
    ) -> tuple[torch.Tensor, torch.Tensor]:  # mu (b, d), logvar (b, d)
        if images.shape[-2:] != (self.box_size, self.box_size):
            raise ValueError(f"images must be (b, {self.box_size}, {self.box_size}), "
                             f"got {tuple(images.shape)}")
        x = rearrange(images.to(self.mu_head.weight.dtype), "b h w -> b (h w)")
        x = self.input_norm(x[:, self.pixel_index])
        h = self.body(x)
        return self.mu_head(h), self.logvar_head(h)


def reparameterize(
    mu: torch.Tensor,  # (b, d)
    logvar: torch.Tensor,  # (b, d)
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (b, d)
    """Sample ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, 1)`` (differentiable in mu,
    logvar). ``generator`` must live on ``mu``'s device."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(
    mu: torch.Tensor,  # (b, d)
    logvar: torch.Tensor,  # (b, d)
) -> torch.Tensor:  # (b,)
    """KL(N(mu, exp(logvar)) || N(0, 1)) per particle, summed over latent dimensions (nats)."""
    return -0.5 * torch.sum(1.0 + logvar - mu**2 - torch.exp(logvar), dim=-1)


__all__ = ["ImageEncoder", "circular_pixel_mask", "kl_divergence", "reparameterize"]
