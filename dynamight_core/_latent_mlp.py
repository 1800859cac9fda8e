"""The network shared by the deformation decoder and the inverse deformation network.

Positions ``xyz`` Å (box-normalised and positionally encoded) plus a latent code go through::

    h0 = ELU(W_pos · PE(p / half_box) + W_z · z + b)            # first layer, split
    h_{l+1} = h_l + ELU(W_l · h_l + b_l)                         # residual hidden layers
    out = W_out · h_L + b_out                                    # W_out, b_out start at 0

``out`` is box-normalised (multiply by :attr:`LatentConditionedMLP.half_box_angstrom` for Å).
The ``W_pos·PE(p)`` and ``W_z·z`` terms are computed separately and broadcast-added, so the
``(b, m, 6 n_freqs + d)`` concatenation is never built.

Tangents (:meth:`LatentConditionedMLP._mlp_and_tangents`): the derivatives ``∂out/∂z_k`` of
every output, carried through the layers with the primal pass (forward-mode by hand)::

    t0_k = ELU'(a0) ⊙ W_z[:, k],   t_{l+1,k} = t_{l,k} + ELU'(a_l) ⊙ (W_l t_{l,k}),
    ∂out/∂z_k = W_out t_{L,k}           with ELU'(a) = min(ELU(a), 0) + 1

They cost about one matrix product per layer and latent dimension, reuse the primal's
activations, are computed without autograd and follow the autocast precision of the pass. On a
CUDA device with Triton the whole chain runs as one kernel (:mod:`._tangent_kernel`), and with
autograd off (the codes' inference) the primal pass too (:mod:`._decoder_pass_kernel`). The plain
pass (:meth:`LatentConditionedMLP._mlp`, the training step's) runs there as one kernel forward
and one backward (:mod:`._mlp_kernel`).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from ._decoder_pass_kernel import decoder_pass, fused_decoder_pass_usable
from ._mlp_kernel import fused_mlp_usable, mlp
from ._tangent_kernel import fused_tangents_usable, latent_tangents
from .positional_encoding import encoding_dim, normalise_positions, positional_encoding


class LatentConditionedMLP(nn.Module):
    """Layers, configuration and trunk of the position + latent MLP (module docstring).
    A freshly built network outputs exactly zero."""

    def __init__(
        self,
        box_size: int,
        voxel_size: float,
        latent_dim: int,
        n_neurons: int,
        n_linear_layers: int,
        n_freqs: int,
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

    @property
    def half_box_angstrom(self) -> float:
        """Half the box length in Å: the unit of the network's inputs and outputs."""
        return self.box_size * self.voxel_size / 2.0

    @property
    def config(self) -> dict[str, Any]:
        """Plain constructor arguments."""
        return {
            "box_size": self.box_size,
            "voxel_size": self.voxel_size,
            "latent_dim": self.latent_dim,
            "n_neurons": self.n_neurons,
            "n_linear_layers": self.n_linear_layers,
            "n_freqs": self.n_freqs,
        }

    def _mlp_and_tangents(
        self,
        positions_angstrom: torch.Tensor,  # (m, 3) shared, Å
        z: torch.Tensor,  # (b, d)
        dims: torch.Tensor | None = None,  # (k,) int64: the coordinates to differentiate by
        *,
        tangent_rows: int | None = None,  # tangents of the first rows of z only (default all)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # out (b, m, 3), tangents (r, k, m, 3) detached
        """:meth:`_mlp` and its derivatives with respect to the latent coordinates ``dims``
        (all of them by default; module docstring) for the first ``tangent_rows`` codes; the
        output keeps its autograd graph, the tangents have none. With autograd off, on a GPU,
        both come from one kernel (:mod:`._decoder_pass_kernel`)."""
        x = normalise_positions(positions_angstrom, self.box_size, self.voxel_size)
        position_term = self.position_layer(positional_encoding(x, self.n_freqs))  # (m, w)
        # the coordinates' columns of W_z: a subset of coordinates is a subset of columns (an
        # exact copy, so each tangent is what the full set gives)
        weight_z = self.latent_layer.weight
        if dims is not None:
            weight_z = weight_z.index_select(1, dims)
        if fused_decoder_pass_usable(position_term, self.n_neurons):  # no autograd: one kernel
            result = decoder_pass(
                position_term, self.latent_layer(z),
                [(layer.weight, layer.bias) for layer in self.hidden_layers], weight_z,
                self.output_layer.weight, self.output_layer.bias,
                z.shape[0] if tangent_rows is None else tangent_rows)
            if result is not None:
                return result
        latent_term = rearrange(self.latent_layer(z), "b w -> b 1 w")
        h = self.activation(position_term + latent_term)  # (b, m, w)
        first, steps = h, []
        for layer in self.hidden_layers:
            step = self.activation(layer(h))
            steps.append(step)
            h = h + step
        out = self.output_layer(h)
        if tangent_rows is not None:  # leading rows of contiguous tensors: still contiguous
            first, steps = first[:tangent_rows], [step[:tangent_rows] for step in steps]
        weights = [layer.weight for layer in self.hidden_layers]
        tangents = None
        if fused_tangents_usable(first, self.n_neurons):  # one GPU kernel; None if it failed
            tangents = latent_tangents(first, steps, weight_z, weights, self.output_layer.weight)
        if tangents is None:
            tangents = self._tangents(first, steps, weights, weight_z)
        return out, tangents

    @torch.no_grad()
    def _tangents(
        self,
        first: torch.Tensor,  # (b, m, w) ELU(a0)
        steps: list[torch.Tensor],  # per hidden layer (b, m, w): ELU(W_l h_l + b_l)
        weights: list[torch.Tensor],  # per hidden layer (w, w)
        latent_weight: torch.Tensor,  # (w, d) W_z, or the columns of the coordinates wanted
    ) -> torch.Tensor:  # (b, d, m, 3)
        """The tangent recursion of the module docstring in torch, from the primal pass's
        activations, in their precision."""

        def slope(activation: torch.Tensor) -> torch.Tensor:  # ELU'(a) = min(ELU(a), 0) + 1
            return torch.clamp(activation.detach(), max=0.0).add_(1.0)

        b, m, w = first.shape
        d = latent_weight.shape[1]
        weight_z = rearrange(latent_weight, "w d -> d 1 w").to(first.dtype)
        tangent = first.new_empty(b, d, m, w)
        torch.mul(slope(first)[:, None], weight_z, out=tangent)
        for step, weight in zip(steps, weights, strict=True):
            mixed = torch.mm(tangent.view(-1, w), weight.t().to(tangent.dtype))
            tangent.addcmul_(slope(step)[:, None], mixed.view(b, d, m, w))
        return torch.mm(tangent.view(-1, w), self.output_layer.weight.t().to(
            tangent.dtype)).view(b, d, m, 3)

    def _mlp(
        self,
        positions_angstrom: torch.Tensor,  # (m, 3) shared or (b, m, 3) per latent, Å
        z: torch.Tensor,  # (b, d)
    ) -> torch.Tensor:  # (b, m, 3) box-normalised
        x = normalise_positions(positions_angstrom, self.box_size, self.voxel_size)
        position_term = self.position_layer(positional_encoding(x, self.n_freqs))  # ([b,] m, w)
        if fused_mlp_usable(position_term, self.n_neurons, self.output_layer.weight):
            out = mlp(position_term, self.latent_layer(z),  # one kernel each way (GPU)
                      [(layer.weight, layer.bias) for layer in self.hidden_layers],
                      self.output_layer.weight, self.output_layer.bias)
            if out is not None:
                return out
        latent_term = rearrange(self.latent_layer(z), "b w -> b 1 w")
        h = self.activation(position_term + latent_term)  # (b, m, w)
        for layer in self.hidden_layers:
            h = h + self.activation(layer(h))
        return self.output_layer(h)


__all__ = ["LatentConditionedMLP"]
