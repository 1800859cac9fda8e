"""Deformation decoder: (consensus Gaussian positions, latent code) -> displacements in Å.

Architecture (per Gaussian ``i`` and particle ``p``)::

    h0 = ELU(W_pos · PE(x_i / half_box) + W_z · z_p + b)           # first layer, split
    h_{l+1} = h_l + ELU(W_l · h_l + b_l)      l = 0 .. n_linear_layers - 1   (residual)
    d_pi = half_box · (W_out · h_L + b_out)                         # W_out, b_out start at 0

``half_box = box_size * voxel_size / 2`` (Å), the same normalisation as the positional encoding
(:mod:`dynamight_core.positional_encoding`): the network works in box-normalised units and the
output is scaled back to Å.

Speed: the first layer is the linear map of ``[PE(x_i), z_p]``; it is evaluated as
``W_pos·PE(x)`` once per forward (``(n_g, width)``) plus ``W_z·z`` once per particle
(``(b, width)``), broadcast-added to ``(b, n_g, width)``. The ``(b, n_g, 6 n_freqs + d)``
concatenation is never built. Gaussians outside the optional ``movable_mask`` are not evaluated
at all and get exactly zero displacement.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange
from torch import nn

from dynamight_core.positional_encoding import (
    encoding_dim,
    normalise_positions,
    positional_encoding,
)

logger = logging.getLogger(__name__)


class DeformationDecoder(nn.Module):
    """Maps consensus positions ``(n_g, 3)`` Å and latents ``(b, d)`` to displacements
    ``(b, n_g, 3)`` Å. A freshly built decoder returns exactly zero displacement.

    ``movable_mask`` (optional ``(n_g,)`` bool): only these Gaussians may move. It is a buffer
    (saved in the ``state_dict``); loading a state_dict that holds one adopts it, so
    ``DeformationDecoder(**config).load_state_dict(sd)`` round-trips with or without a mask.
    """

    def __init__(
        self,
        box_size: int,
        voxel_size: float,
        latent_dim: int,
        n_neurons: int = 32,
        n_linear_layers: int = 2,
        n_freqs: int = 10,
        movable_mask: torch.Tensor | None = None,  # (n_g,) bool
    ) -> None:
        super().__init__()
        if latent_dim < 1 or n_neurons < 1 or n_linear_layers < 0 or n_freqs < 1:
            raise ValueError("latent_dim, n_neurons, n_freqs must be >= 1, n_linear_layers >= 0")
        self.box_size = int(box_size)
        self.voxel_size = float(voxel_size)
        self.latent_dim = int(latent_dim)
        self.n_neurons = int(n_neurons)
        self.n_linear_layers = int(n_linear_layers)
        self.n_freqs = int(n_freqs)

        self.position_layer = nn.Linear(encoding_dim(self.n_freqs), self.n_neurons)  # W_pos, b
        self.latent_layer = nn.Linear(self.latent_dim, self.n_neurons, bias=False)  # W_z
        self.hidden_layers = nn.ModuleList(
            nn.Linear(self.n_neurons, self.n_neurons) for _ in range(self.n_linear_layers)
        )
        self.activation = nn.ELU()
        self.output_layer = nn.Linear(self.n_neurons, 3)
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)
        self.register_buffer("movable_mask", None)
        self.set_movable_mask(movable_mask)

    @property
    def half_box_angstrom(self) -> float:
        """Half the box length in Å: the unit of the network's inputs and outputs."""
        return self.box_size * self.voxel_size / 2.0

    @property
    def config(self) -> dict[str, Any]:
        """Plain constructor arguments (the movable mask travels in the state_dict)."""
        return {
            "box_size": self.box_size,
            "voxel_size": self.voxel_size,
            "latent_dim": self.latent_dim,
            "n_neurons": self.n_neurons,
            "n_linear_layers": self.n_linear_layers,
            "n_freqs": self.n_freqs,
        }

    def set_movable_mask(self, movable_mask: torch.Tensor | None) -> None:
        """Set (``(n_g,)`` bool) or clear (``None``) the mask of Gaussians allowed to move."""
        if movable_mask is None:
            self.movable_mask = None
            return
        mask = torch.as_tensor(movable_mask).to(torch.bool)
        if mask.ndim != 1:
            raise ValueError(f"movable_mask must be (n_g,), got shape {tuple(mask.shape)}")
        device = self.output_layer.weight.device
        self.movable_mask = mask.to(device)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # adopt a saved mask whatever its size (config does not know n_g)
        key = prefix + "movable_mask"
        if key in state_dict:
            self.set_movable_mask(state_dict[key].detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _mlp(
        self,
        positions_angstrom: torch.Tensor,  # (m, 3) Å
        z: torch.Tensor,  # (b, d)
    ) -> torch.Tensor:  # (b, m, 3) box-normalised displacement
        x = normalise_positions(positions_angstrom, self.box_size, self.voxel_size)
        position_term = self.position_layer(positional_encoding(x, self.n_freqs))  # (m, w)
        latent_term = self.latent_layer(z)  # (b, w)
        h = self.activation(
            rearrange(position_term, "m w -> 1 m w") + rearrange(latent_term, "b w -> b 1 w")
        )  # (b, m, w)
        for layer in self.hidden_layers:
            h = h + self.activation(layer(h))
        return self.output_layer(h)

    def forward(
        self,
        positions_angstrom: torch.Tensor,  # (n_g, 3) consensus xyz Å, relative to box centre
        z: torch.Tensor,  # (b, latent_dim)
    ) -> torch.Tensor:  # (b, n_g, 3) displacements, Å
        """Displacements in Å of every Gaussian for every latent code."""
        if positions_angstrom.ndim != 2 or positions_angstrom.shape[-1] != 3:
            raise ValueError(f"positions must be (n_g, 3), got {tuple(positions_angstrom.shape)}")
        if z.ndim != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must be (b, {self.latent_dim}), got {tuple(z.shape)}")
        dtype = self.output_layer.weight.dtype
        positions_angstrom = positions_angstrom.to(dtype)
        z = z.to(dtype)
        n_g = positions_angstrom.shape[0]
        if self.movable_mask is None:
            return self._mlp(positions_angstrom, z) * self.half_box_angstrom
        if self.movable_mask.shape[0] != n_g:
            raise ValueError(f"movable_mask has {self.movable_mask.shape[0]} entries, "
                             f"positions have {n_g}")
        moving = self._mlp(positions_angstrom[self.movable_mask], z) * self.half_box_angstrom
        displacements = moving.new_zeros(z.shape[0], n_g, 3)
        displacements[:, self.movable_mask] = moving
        return displacements


__all__ = ["DeformationDecoder"]
