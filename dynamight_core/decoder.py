"""Deformation decoder: (consensus Gaussian positions, latent code) -> displacements in Å.

Architecture (per Gaussian ``i`` and particle ``p``)::

    h0 = ELU(W_pos · PE(x_i / half_box) + W_z · z_p + b)           # first layer, split
    h_{l+1} = h_l + ELU(W_l · h_l + b_l)      l = 0 .. n_linear_layers - 1   (residual)
    f(x_i, z_p) = W_out · h_L + b_out                               # W_out, b_out start at 0
    d_pi = half_box · (f(x_i, z_p) - f(x_i, 0))                     # anchored: d(z = 0) = 0

``half_box = box_size * voxel_size / 2`` (Å), the same normalisation as the positional encoding
(:mod:`dynamight_core.positional_encoding`): the network works in box-normalised units and the
output is scaled back to Å.

Speed: the first layer is the linear map of ``[PE(x_i), z_p]``; it is evaluated as
``W_pos·PE(x)`` once per forward (``(n_g, width)``) plus ``W_z·z`` once per particle
(``(b, width)``), broadcast-added to ``(b, n_g, width)``. The ``(b, n_g, 6 n_freqs + d)``
concatenation is never built; ``f(x, 0)`` is one extra row. Gaussians outside the optional
``movable_mask`` are not evaluated at all and get exactly zero displacement.

The anchor fixes the frame of the model: the consensus positions are the conformation at
``z = 0``, the centre of the latent distribution (the prior mean), so the consensus can train
with the decoder without the two trading a common offset, and both halves' consensus models
describe the same (central) conformation.
"""

from __future__ import annotations

import logging

import torch

from ._latent_mlp import LatentConditionedMLP

logger = logging.getLogger(__name__)


def _with_anchor_row(z: torch.Tensor) -> torch.Tensor:  # (b + 1, d)
    """The codes and ``z = 0`` below them: the anchor ``f(x, 0)`` is one more row of the same
    pass (one set of launches for both, the positional encoding computed once), not a second
    pass of its own."""
    return torch.cat([z, z.new_zeros(1, z.shape[-1])])


class DeformationDecoder(LatentConditionedMLP):
    """Maps consensus positions ``(n_g, 3)`` Å and latents ``(b, d)`` to displacements
    ``(b, n_g, 3)`` Å, anchored so that the code ``z = 0`` (the prior mean) never moves anything:
    the network's output minus its output at ``z = 0``. The consensus positions are therefore the
    conformation at the centre of the latent distribution, in both halves alike. A freshly built
    decoder returns exactly zero displacement.

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
        super().__init__(box_size, voxel_size, latent_dim, n_neurons, n_linear_layers, n_freqs)
        self.register_buffer("movable_mask", None)
        # the mask's indices: indexing with the boolean mask itself reads its count back from a
        # GPU at every call (and again in the backward pass); not saved, moves with the module
        self.register_buffer("_movable_index", None, persistent=False)
        self.set_movable_mask(movable_mask)

    def set_movable_mask(self, movable_mask: torch.Tensor | None) -> None:
        """Set (``(n_g,)`` bool) or clear (``None``) the mask of Gaussians allowed to move."""
        if movable_mask is None:
            self.movable_mask = self._movable_index = None
            return
        mask = torch.as_tensor(movable_mask).to(torch.bool)
        if mask.ndim != 1:
            raise ValueError(f"movable_mask must be (n_g,), got shape {tuple(mask.shape)}")
        device = self.output_layer.weight.device
        self.movable_mask = mask.to(device)
        self._movable_index = mask.nonzero()[:, 0].to(device)

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
            return self._anchored(positions_angstrom, z) * self.half_box_angstrom
        if self.movable_mask.shape[0] != n_g:
            raise ValueError(f"movable_mask has {self.movable_mask.shape[0]} entries, "
                             f"positions have {n_g}")
        index = self._movable_index
        moving = self._anchored(positions_angstrom.index_select(0, index), z)
        return moving.new_zeros(z.shape[0], n_g, 3).index_copy(1, index,
                                                               moving * self.half_box_angstrom)

    def _anchored(self, positions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = self._mlp(positions, _with_anchor_row(z))
        return out[:-1] - out[-1:]

    def _anchored_and_tangents(self, positions: torch.Tensor, z: torch.Tensor,
                               dims: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, tangents = self._mlp_and_tangents(positions, _with_anchor_row(z), dims,
                                               tangent_rows=z.shape[0])
        return out[:-1] - out[-1:], tangents

    def forward_with_tangents(
        self,
        positions_angstrom: torch.Tensor,  # (n_g, 3)
        z: torch.Tensor,  # (b, latent_dim)
        dims: torch.Tensor | None = None,  # (k,) int64 latent coordinates; default all
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (b, n_g, 3) Å, (b, k, n_g, 3) Å per unit
        """:meth:`forward` and the derivatives of every displacement with respect to each
        latent coordinate in ``dims`` (no autograd graph on the derivatives; see
        ``_latent_mlp``)."""
        dtype = self.output_layer.weight.dtype
        positions_angstrom = positions_angstrom.to(dtype)
        z = z.to(dtype)
        scale = self.half_box_angstrom
        if self.movable_mask is None:
            out, tangents = self._anchored_and_tangents(positions_angstrom, z, dims)
            return out * scale, tangents * scale
        index = self._movable_index
        out, tangents = self._anchored_and_tangents(positions_angstrom.index_select(0, index), z,
                                                    dims)
        n_g = positions_angstrom.shape[0]
        displacements = out.new_zeros(z.shape[0], n_g, 3).index_copy(1, index, out * scale)
        full = tangents.new_zeros(z.shape[0], tangents.shape[1], n_g, 3).index_copy_(
            2, index, tangents * scale)
        return displacements, full


__all__ = ["DeformationDecoder"]
