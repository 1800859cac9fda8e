"""Inverse deformations: from a particle's (deformed) frame back to the consensus frame.

The forward model moves consensus Gaussian ``j`` of a particle with latent code ``z`` to
``y_j = c_j + δ_j(z)``. The inverse maps any point ``y`` of the particle's frame to the
consensus point ``x`` it came from. It is what brings the consensus map into a particle's frame
(:func:`warp_volume_to_latent`: ``V_z(y) = V(x(y, z))``). The deformed backprojection does not
need it: it pulls consensus voxels through the *forward* field
(:mod:`dynamight_core.displacement_field`).

Two ways to get ``x(y, z)``, with the same accuracy measure (:func:`inversion_errors`:
``|x(φ(c_j), z) − c_j|`` in Å at the Gaussians of held-out particles):

**network** (:class:`InverseDeformationNetwork`, trained per half set by
:class:`InverseDeformationTrainer`)::

    h0 = ELU(W_pos · PE(y / half_box) + W_z · z + b)            # PE: same encoding as the decoder
    h_{l+1} = h_l + ELU(W_l · h_l + b_l)                         # residual hidden layers
    x = y + half_box · (W_out · h_L + b_out)                     # W_out, b_out start at 0: x = y

Loss per step: ``mean_j |x(y_j, z) − c_j|²`` (Å²) over the Gaussians drawn for the step, plus
``smoothness_weight`` × a second-difference penalty on the residual ``r(y) = x(y) − y`` at
random points near the deformed model::

    p = y_j + ε·n,  u random unit vector,  s = smoothness step (Å)
    smooth = mean |r(p + s u) − 2 r(p) + r(p − s u)|²            (Å²)

Why this term: the data term pins the network only at the Gaussian centres, while a warp
evaluates it at every voxel in between, and with 10 encoding frequencies (the finest has a
period of 1/512 of the box) nothing stops it from wiggling there. A second difference vanishes
for any affine residual, so rigid rotations and translations of domains — the motions the
forward model is regularised towards — are not biased; a first-difference (Jacobian) penalty
would pull every rotation towards a translation, and a neighbour-difference term on the
Gaussians would again only constrain the Gaussian centres. Finite differences need one forward
pass on 3 × the sample points and no double back-propagation.

**fixed-point** (:class:`FixedPointInverse`, nothing to train): the forward field ``F`` of the
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

Measured (CPU; tests/test_inverse_deformation.py and a 1200-particle simulated run, box 32,
6 Å/px, 500 Gaussians): fixed-point on the backprojection's grid is as accurate as a network
trained for 50 epochs to within a factor 1.5 at the Gaussians (held-out mean 0.27 vs 0.18 Å,
95th percentile 0.57 vs 0.36 Å; displacements ~2-4 Å) and more accurate between them on a
synthetic deformation (0.15 vs 0.23 Å), with nothing to train; so the command defaults to it.

Coordinates: vectors ``xyz`` in Å relative to voxel ``box // 2``; volumes ``[z, y, x]``.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .displacement_field import displacement_grid_from_gaussians, sample_displacement_grid
from .positional_encoding import encoding_dim, normalise_positions, positional_encoding

logger = logging.getLogger(__name__)

METHODS = ("network", "fixed-point")
CHECKPOINT_FORMAT = "dynamight-relion inverse deformations"
CHECKPOINT_VERSION = 1


# -- the network --------------------------------------------------------------------------------
class InverseDeformationNetwork(nn.Module):
    """``x(y, z)``: deformed positions ``(b, m, 3)`` Å and latents ``(b, d)`` -> consensus
    positions ``(b, m, 3)`` Å (module docstring). A fresh network is the identity."""

    def __init__(
        self,
        box_size: int,
        voxel_size: float,
        latent_dim: int,
        n_neurons: int = 64,
        n_linear_layers: int = 2,
        n_freqs: int = 10,
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
        self.position_layer = nn.Linear(encoding_dim(self.n_freqs), self.n_neurons)
        self.latent_layer = nn.Linear(self.latent_dim, self.n_neurons, bias=False)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(self.n_neurons, self.n_neurons) for _ in range(self.n_linear_layers))
        self.activation = nn.ELU()
        self.output_layer = nn.Linear(self.n_neurons, 3)
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)

    @property
    def half_box_angstrom(self) -> float:
        return self.box_size * self.voxel_size / 2.0

    @property
    def config(self) -> dict[str, Any]:
        return {"box_size": self.box_size, "voxel_size": self.voxel_size,
                "latent_dim": self.latent_dim, "n_neurons": self.n_neurons,
                "n_linear_layers": self.n_linear_layers, "n_freqs": self.n_freqs}

    def forward(
        self,
        points: torch.Tensor,  # (b, m, 3) xyz Å in the particles' frames
        z: torch.Tensor,  # (b, latent_dim)
    ) -> torch.Tensor:  # (b, m, 3) xyz Å in the consensus frame
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must be (b, m, 3), got {tuple(points.shape)}")
        if z.ndim != 2 or z.shape != (points.shape[0], self.latent_dim):
            raise ValueError(f"z must be ({points.shape[0]}, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        dtype = self.output_layer.weight.dtype
        points, z = points.to(dtype), z.to(dtype)
        y = normalise_positions(points, self.box_size, self.voxel_size)
        h = self.activation(self.position_layer(positional_encoding(y, self.n_freqs))
                            + rearrange(self.latent_layer(z), "b w -> b 1 w"))  # (b, m, w)
        for layer in self.hidden_layers:
            h = h + self.activation(layer(h))
        return points + self.output_layer(h) * self.half_box_angstrom


def second_difference_penalty(
    network: InverseDeformationNetwork,
    points: torch.Tensor,  # (b, m, 3) Å, where to measure
    z: torch.Tensor,  # (b, d)
    step_angstrom: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # () Å²
    """``mean |r(p + s u) − 2 r(p) + r(p − s u)|²`` with ``r(p) = x(p) − p`` along a random unit
    direction ``u`` per point (module docstring). Zero for any affine residual."""
    u = torch.randn(points.shape, generator=generator, device=points.device,
                    dtype=points.dtype)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12) * step_angstrom
    m = points.shape[1]
    probe = torch.cat([points - u, points, points + u], dim=1)  # (b, 3m, 3)
    r = network(probe, z) - probe
    second = r[:, :m] - 2.0 * r[:, m:2 * m] + r[:, 2 * m:]
    return (second**2).sum(-1).mean()


# -- training -----------------------------------------------------------------------------------
@dataclass
class InverseTrainerConfig:
    """Plain settings of one half set's inverse training (stored in checkpoints as a dict)."""

    box_size: int
    pixel_size: float
    latent_dim: int
    n_neurons: int = 64
    n_linear_layers: int = 2
    n_freqs: int = 10
    learning_rate: float = 3e-3
    points_per_particle: int = 1024  # Gaussians drawn per step (shared by the batch); 0: all
    smoothness_weight: float = 0.1
    smoothness_points_per_particle: int = 128
    smoothness_step_angstrom: float = 0.0  # 0: 2 × pixel size
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def step_angstrom(self) -> float:
        return self.smoothness_step_angstrom or 2.0 * self.pixel_size


class InverseDeformationTrainer:
    """Training of one half set's inverse network; one independent object per half set.

    Owns its network, Adam optimiser and two generators (``shuffle`` on the CPU for the data
    order, ``sample`` on the device for the Gaussians drawn per step and the smoothness probes);
    network initialisation is seeded from ``config.seed`` and the half. Restoring
    :meth:`state_dict` continues exactly.

    Data: the latent codes of the half's training particles (``train_indices``), the half's
    consensus Gaussians and a function giving the forward displacements of chosen Gaussians for
    chosen codes (:meth:`train_epoch`). Each step draws ``points_per_particle`` Gaussians,
    shared by the batch, so the forward decoder runs only on those.
    """

    def __init__(self, half: int, config: InverseTrainerConfig, train_indices: np.ndarray,
                 device: torch.device | str) -> None:
        self.half = int(half)
        self.config = config
        self.device = torch.device(device)
        self.train_indices = np.sort(np.asarray(train_indices, dtype=np.int64))
        seed = config.seed * 1000 + 500 + self.half
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = InverseDeformationNetwork(config.box_size, config.pixel_size,
                                                config.latent_dim, config.n_neurons,
                                                config.n_linear_layers, config.n_freqs)
        self.network = network.to(self.device)
        self.optimiser = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.epoch = 0

    def epoch_order(self) -> torch.Tensor:  # (n_train,) long
        """This epoch's order of the training particles: positions into ``train_indices``."""
        return torch.randperm(self.train_indices.shape[0], generator=self.shuffle_generator)

    def draw_gaussians(self, n_gaussians: int) -> torch.Tensor:  # (k,) long, on the device
        """The Gaussians one step trains on (shared by the batch): ``points_per_particle``
        drawn without replacement, or all of them."""
        k = self.config.points_per_particle
        if k <= 0 or k >= n_gaussians:
            return torch.arange(n_gaussians, device=self.device)
        perm = torch.randperm(n_gaussians, generator=self.sample_generator, device=self.device)
        return perm[:k]

    def train_step(
        self,
        consensus: torch.Tensor,  # (k, 3) Å, the step's consensus Gaussians
        displacements: torch.Tensor,  # (b, k, 3) Å, their displacements for each latent
        z: torch.Tensor,  # (b, d)
    ) -> dict[str, float]:
        """One optimiser step on the given Gaussians; returns the batch means ``data`` (Å²)
        and ``smooth`` (Å²). The smoothness probes sit near the first
        ``smoothness_points_per_particle`` of them (random when drawn by
        :meth:`draw_gaussians`)."""
        cfg = self.config
        self.network.train()
        c = consensus.detach().to(self.device)[None]  # (1, k, 3)
        y = c + displacements.detach().to(self.device)  # (b, k, 3)
        z = z.detach().to(self.device)
        data = ((self.network(y, z) - c)**2).sum(-1).mean()
        loss = data
        smooth = torch.zeros((), device=self.device)
        if cfg.smoothness_weight > 0 and cfg.smoothness_points_per_particle > 0:
            near = y[:, :cfg.smoothness_points_per_particle]
            near = near + cfg.step_angstrom * torch.randn(
                near.shape, generator=self.sample_generator, device=self.device)
            smooth = second_difference_penalty(self.network, near, z, cfg.step_angstrom,
                                               self.sample_generator)
            loss = loss + cfg.smoothness_weight * smooth
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return {"data": float(data.detach()), "smooth": float(smooth.detach())}

    def train_epoch(
        self,
        latents: torch.Tensor,  # (n_train, d), row i = particle train_indices[i]
        consensus: torch.Tensor,  # (n_g, 3) Å
        displace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch_size: int,
        *,
        check_abort: Callable[[], None] | None = None,
    ) -> dict[str, float]:
        """One pass over the training particles in :meth:`epoch_order`, ``batch_size`` per
        step. ``displace(gaussians (k,) long, z (b, d)) -> (b, k, 3)`` Å gives the forward
        displacements of the drawn Gaussians (the forward decoder, evaluated only there).
        ``check_abort`` is called before every step. Returns per-particle means of ``data`` and
        ``smooth`` (Å²), ``rms`` (Å) and ``n_particles``."""
        if latents.shape[0] != self.train_indices.shape[0]:
            raise ValueError(f"latents has {latents.shape[0]} rows, the half trains on "
                             f"{self.train_indices.shape[0]} particles")
        order = self.epoch_order().to(latents.device)
        consensus = consensus.detach().to(self.device)
        sums = {"data": 0.0, "smooth": 0.0}
        n_seen = 0
        for start in range(0, order.shape[0], batch_size):
            if check_abort is not None:
                check_abort()
            z = latents[order[start:start + batch_size]].to(self.device)
            gaussians = self.draw_gaussians(consensus.shape[0])
            with torch.no_grad():
                displacements = displace(gaussians, z)
            stats = self.train_step(consensus[gaussians], displacements, z)
            b = int(z.shape[0])
            for key in sums:
                sums[key] += stats[key] * b
            n_seen += b
        self.epoch += 1
        out = {key: value / max(n_seen, 1) for key, value in sums.items()}
        out["rms"] = math.sqrt(out["data"])
        out["n_particles"] = float(n_seen)
        return out

    @torch.no_grad()
    def invert(self, points: torch.Tensor, z: torch.Tensor, chunk: int = 1 << 16,
               ) -> torch.Tensor:  # (b, m, 3) Å
        """The network's inverse of ``points (b, m, 3)`` for latents ``z (b, d)``, in chunks of
        at most ``chunk`` points."""
        self.network.eval()
        return _chunked(lambda p, zz: self.network(p, zz), points.to(self.device),
                        z.to(self.device), chunk)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors, numbers and plain dicts only (loadable with ``weights_only=True``)."""
        return {"half": self.half, "epoch": self.epoch, "config": self.config.to_dict(),
                "network": self.network.state_dict(), "optimiser": self.optimiser.state_dict(),
                "train_indices": torch.from_numpy(self.train_indices),
                "shuffle_rng": self.shuffle_generator.get_state(),
                "sample_rng": self.sample_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.network.load_state_dict(state["network"])
        self.network.to(self.device)
        self.optimiser.load_state_dict(state["optimiser"])
        self.train_indices = state["train_indices"].numpy().astype(np.int64)
        self.shuffle_generator.set_state(state["shuffle_rng"])
        self.sample_generator.set_state(state["sample_rng"].to(torch.uint8).cpu())

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str,
                        ) -> InverseDeformationTrainer:
        trainer = cls(int(state["half"]), InverseTrainerConfig(**state["config"]),
                      state["train_indices"].numpy(), device)
        trainer.load_state_dict(state)
        return trainer


def _chunked(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], points: torch.Tensor,
             z: torch.Tensor, chunk: int) -> torch.Tensor:
    b, m, _ = points.shape
    per = max(1, chunk // max(b, 1))
    return torch.cat([fn(points[:, s:s + per], z) for s in range(0, m, per)], dim=1)


# -- fixed-point inversion of the coarse forward field -------------------------------------------
def inverse_displacement_grid(
    consensus: torch.Tensor,  # (n_g, 3) Å
    displacements: torch.Tensor,  # (b, n_g, 3) Å
    box_size: int,
    pixel_size: float,
    *,
    grid_size: int,
    min_weight_fraction: float = 0.1,
) -> torch.Tensor:  # (b, 3, g, g, g) Å, channels xyz, nodes [z, y, x]
    """Coarse field of ``−δ_j`` at the deformed positions ``y_j = c_j + δ_j`` of each particle:
    a first-order inverse read at ``y``. Per particle it equals
    ``displacement_grid_from_gaussians(c + δ_p, −δ_p[None], ...)`` (same splatting and
    weight floor, ``min_weight_fraction`` × the median weight of the particle's occupied nodes);
    computed for the whole batch at once."""
    if grid_size < 2:
        raise ValueError("grid_size must be >= 2")
    b, n_g, _ = displacements.shape
    g = int(grid_size)
    deformed = consensus[None] + displacements  # (b, n_g, 3)
    voxel = deformed / pixel_size + box_size // 2
    node = (voxel * (2.0 / (box_size - 1))) * 0.5 * (g - 1)  # == (normalised + 1) / 2 * (g - 1)
    node = node.clamp(0.0, g - 1 - 1e-4)
    base = node.floor().long()
    frac = node - base
    offset = (torch.arange(b, device=displacements.device) * g**3)[:, None]  # (b, 1)
    field = displacements.new_zeros(3, b * g**3)
    weight = displacements.new_zeros(b * g**3)
    values = rearrange(-displacements, "b n c -> c (b n)")
    for corner in range(8):
        w = torch.ones_like(frac[..., 0])
        idx = offset.expand(b, n_g).clone()
        for axis, stride in zip(range(3), (1, g, g * g)):
            o = (corner >> axis) & 1
            w = w * (frac[..., axis] if o else 1.0 - frac[..., axis])
            idx = idx + (base[..., axis] + o).clamp(max=g - 1) * stride
        idx, w = idx.reshape(-1), w.reshape(-1)
        weight.index_add_(0, idx, w)
        field.index_add_(1, idx, values * w)
    weight = weight.reshape(b, g**3)
    occupied = torch.where(weight > 1e-6, weight, torch.full_like(weight, float("nan")))
    median = occupied.nanmedian(dim=1).values  # (b,)
    floor = torch.where(torch.isnan(median), torch.ones_like(median),
                        min_weight_fraction * median)
    field = rearrange(field, "c (b n) -> b c n", b=b) / torch.maximum(weight, floor[:, None])[
        :, None]
    return field.reshape(b, 3, g, g, g)


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
        min_weight_fraction: float = 0.5,
    ) -> None:
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        # half a grid spacing (Å): see __call__
        self.trust_radius = 0.5 * (box_size - 1) * pixel_size / (grid_size - 1)
        self.n_iterations = int(n_iterations)
        self.tolerance = float(tolerance_angstrom)
        self.forward_grid = displacement_grid_from_gaussians(
            consensus, displacements, box_size, pixel_size, grid_size=grid_size,
            min_weight_fraction=min_weight_fraction)
        self.inverse_grid = None
        if initial_guess:
            self.inverse_grid = inverse_displacement_grid(
                consensus, displacements, box_size, pixel_size, grid_size=grid_size,
                min_weight_fraction=min_weight_fraction)
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
            active = residual[torch.isfinite(residual)]  # points still inside the trust region
            self.last_update_angstrom = float(active.max()) if active.numel() else 0.0
            if self.last_update_angstrom < self.tolerance:
                break
        return best


# -- accuracy -----------------------------------------------------------------------------------
def inversion_errors(
    inverse: Callable[[torch.Tensor], torch.Tensor],  # (b, n_g, 3) deformed -> consensus Å
    consensus: torch.Tensor,  # (n_g, 3) Å
    displacements: torch.Tensor,  # (b, n_g, 3) Å
) -> torch.Tensor:  # (b, n_g) Å
    """``|x(c_j + δ_j) − c_j|`` for every particle and Gaussian (Å)."""
    with torch.no_grad():
        return (inverse(consensus[None] + displacements) - consensus[None]).norm(dim=-1)


class ErrorSummary:
    """Streaming mean, maximum and percentiles of non-negative errors (Å): memory does not grow
    with the number of values. Percentiles come from a histogram with geometric bins from 1e-4
    to 1e3 Å (2.3 % wide), read at the bin's geometric centre."""

    _edges = np.geomspace(1e-4, 1e3, 701)

    def __init__(self) -> None:
        self.counts = np.zeros(self._edges.shape[0] + 1, dtype=np.int64)
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def add(self, errors: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(torch.as_tensor(errors).detach().cpu().double().reshape(-1))
        if values.size == 0:
            return
        self.counts += np.bincount(np.searchsorted(self._edges, values, side="right"),
                                   minlength=self.counts.shape[0])
        self.total += float(values.sum())
        self.n += int(values.size)
        self.max = max(self.max, float(values.max()))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def percentile(self, q: float) -> float:
        if not self.n:
            return float("nan")
        rank = q / 100.0 * self.n
        b = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        if b == 0:
            return float(self._edges[0])
        if b >= self._edges.shape[0]:
            return self.max
        return min(float(np.sqrt(self._edges[b - 1] * self._edges[b])), self.max)

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "p95": self.percentile(95.0), "max": self.max,
                "n": float(self.n)}


# -- consumer: the consensus map in a particle's frame --------------------------------------------
def voxel_positions_angstrom(box_size: int, pixel_size: float,
                             device: torch.device | str = "cpu") -> torch.Tensor:
    """``(box, box, box, 3)`` xyz Å of every voxel ``[z, y, x]``, relative to voxel ``box//2``."""
    r = (torch.arange(box_size, device=device, dtype=torch.float32) - box_size // 2) * pixel_size
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def sample_volume(
    volume: torch.Tensor,  # (box, box, box) [z, y, x]
    points: torch.Tensor,  # (m, 3) xyz Å
    pixel_size: float,
) -> torch.Tensor:  # (m,)
    """Trilinear value of ``volume`` at ``points`` (zero outside the box)."""
    box = volume.shape[-1]
    coords = (points / pixel_size + box // 2) * (2.0 / (box - 1)) - 1.0
    out = F.grid_sample(volume[None, None], coords.to(volume.dtype).reshape(1, -1, 1, 1, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(-1)


def warp_volume_to_latent(
    volume: torch.Tensor,  # (box, box, box) [z, y, x], the consensus map
    inverse: Callable[[torch.Tensor], torch.Tensor],  # (m, 3) Å particle frame -> consensus frame
    pixel_size: float,
    *,
    mask: torch.Tensor | None = None,  # (box, box, box) bool: voxels to warp (others unchanged)
    chunk: int = 1 << 16,
) -> torch.Tensor:  # (box, box, box)
    """The consensus map seen in one particle's frame: ``V_z(y) = V(x(y, z))`` at every voxel
    ``y`` (inside ``mask``; the other voxels keep their consensus value). ``inverse`` is one
    particle's inverse, e.g. :func:`network_inverse_map` or :func:`fixed_point_inverse_map`."""
    box = volume.shape[-1]
    if volume.shape != (box, box, box):
        raise ValueError(f"volume must be a cube, got {tuple(volume.shape)}")
    points = voxel_positions_angstrom(box, pixel_size, volume.device).reshape(-1, 3)
    flat = volume.reshape(-1).clone()
    selected = (torch.arange(flat.shape[0], device=volume.device) if mask is None
                else torch.nonzero(mask.reshape(-1).to(volume.device)).squeeze(-1))
    with torch.no_grad():
        for start in range(0, selected.shape[0], chunk):
            idx = selected[start:start + chunk]
            flat[idx] = sample_volume(volume, inverse(points[idx]), pixel_size).to(flat.dtype)
    return flat.reshape(box, box, box)


def network_inverse_map(network: InverseDeformationNetwork, z: torch.Tensor,  # (d,)
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One latent code's inverse ``(m, 3) -> (m, 3)`` Å from a trained network."""
    def inverse(points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(points[None], z.reshape(1, -1).to(points.device))[0]
    return inverse


def fixed_point_inverse_map(consensus: torch.Tensor, displacements: torch.Tensor,  # (n_g, 3)
                            box_size: int, pixel_size: float, *, grid_size: int,
                            **options: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One particle's inverse ``(m, 3) -> (m, 3)`` Å by :class:`FixedPointInverse`."""
    solver = FixedPointInverse(consensus, displacements[None], box_size, pixel_size,
                               grid_size=grid_size, **options)
    return lambda points: solver(points[None])[0]


# -- checkpoints ----------------------------------------------------------------------------------
def save_inverse_checkpoint(path: str | PathLike, state: dict) -> None:
    """Write ``state`` (plain data: tensors, numbers, strings, lists, dicts) atomically, tagged
    with :data:`CHECKPOINT_FORMAT`; loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_inverse_checkpoint(path: str | PathLike) -> dict:
    """Read an inverse checkpoint (``weights_only=True``, CPU tensors); checks the format tag."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if int(state.get("version", -1)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: version {state['version']} is newer than "
                         f"{CHECKPOINT_VERSION}")
    return state


def networks_from_checkpoint(state: dict, device: torch.device | str = "cpu",
                             ) -> dict[int, InverseDeformationNetwork]:
    """Both halves' trained networks (eval mode) from a loaded inverse checkpoint; empty when
    it holds none (method ``fixed-point``)."""
    networks = {}
    for half, half_state in state.get("halves", {}).items():
        if "network" not in half_state:
            continue
        config = InverseTrainerConfig(**half_state["config"])
        net = InverseDeformationNetwork(config.box_size, config.pixel_size, config.latent_dim,
                                        config.n_neurons, config.n_linear_layers,
                                        config.n_freqs)
        net.load_state_dict(half_state["network"])
        networks[int(half)] = net.to(device).eval()
    return networks


__all__ = [
    "CHECKPOINT_FORMAT",
    "METHODS",
    "ErrorSummary",
    "FixedPointInverse",
    "InverseDeformationNetwork",
    "InverseDeformationTrainer",
    "InverseTrainerConfig",
    "fixed_point_inverse_map",
    "inverse_displacement_grid",
    "inversion_errors",
    "load_inverse_checkpoint",
    "network_inverse_map",
    "networks_from_checkpoint",
    "sample_volume",
    "save_inverse_checkpoint",
    "second_difference_penalty",
    "voxel_positions_angstrom",
    "warp_volume_to_latent",
]
