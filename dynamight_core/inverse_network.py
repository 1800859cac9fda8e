"""Inverse deformations by a trained network: from a particle's (deformed) frame back to the
consensus frame.

The forward model moves consensus Gaussian ``j`` of a particle with latent code ``z`` to
``y_j = c_j + δ_j(z)``. The inverse maps any point ``y`` of the particle's frame to the
consensus point ``x`` it came from. It is what brings the consensus map into a particle's frame
(:func:`~dynamight_core.volume_warp.warp_volume_to_latent`: ``V_z(y) = V(x(y, z))``). The
deformed backprojection does not need it: it pulls consensus voxels through the *forward* field
(:mod:`dynamight_core.displacement_field`).

Two ways to get ``x(y, z)``, with the same accuracy measure
(:func:`~dynamight_core.inversion_error.inversion_errors`: ``|x(φ(c_j), z) − c_j|`` in Å at the
Gaussians of held-out particles): the network here, or the fixed-point inversion of the coarse
forward field (:mod:`dynamight_core.fixed_point_inverse`, nothing to train, the default).

**network** (:class:`InverseDeformationNetwork`, trained per half set by
:class:`InverseDeformationTrainer`; layers shared with the decoder,
:mod:`dynamight_core._latent_mlp`)::

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

Coordinates: vectors ``xyz`` in Å relative to voxel ``box // 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._latent_mlp import LatentConditionedMLP
from .device import adam, load_adam_state


class InverseDeformationNetwork(LatentConditionedMLP):
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
        super().__init__(box_size, voxel_size, latent_dim, n_neurons, n_linear_layers, n_freqs)

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
        return points + self._mlp(points, z) * self.half_box_angstrom


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
        self.optimiser = adam(self.network.parameters(), self.device, lr=config.learning_rate)
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
    ) -> dict[str, torch.Tensor]:
        """One optimiser step on the given Gaussians; returns the batch means ``data`` (Å²)
        and ``smooth`` (Å²) as detached scalars on the device (read them when needed: on a
        GPU each read waits for the device). The smoothness probes sit near the first
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
        return {"data": data.detach(), "smooth": smooth.detach()}

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
        # per-step means summed on the device in float64, read once per epoch
        sums = {key: torch.zeros((), dtype=torch.float64, device=self.device)
                for key in ("data", "smooth")}
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
                sums[key] += stats[key].double() * b
            n_seen += b
        self.epoch += 1
        out = {key: float(value) / max(n_seen, 1) for key, value in sums.items()}
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
        load_adam_state(self.optimiser, state["optimiser"])
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



def network_inverse_map(network: InverseDeformationNetwork, z: torch.Tensor,  # (d,)
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """One latent code's inverse ``(m, 3) -> (m, 3)`` Å from a trained network."""
    def inverse(points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(points[None], z.reshape(1, -1).to(points.device))[0]
    return inverse



__all__ = [
    "InverseDeformationNetwork",
    "InverseDeformationTrainer",
    "InverseTrainerConfig",
    "network_inverse_map",
    "second_difference_penalty",
]
