"""One half set's deformation model on the Gaussian pseudo-atomic model: the forward model and
its loss.

Forward model of a particle image (all in the centred rfft layout, ``(b, box, box // 2 + 1)``)::

    z (b, d) -> DeformationDecoder(consensus positions, z) -> displacements d (b, n_g, 3) Å
    deformed = consensus + d -> project_gaussians_rfft(deformed, sigmas, masses, A)
             -> × CTF -> apply_relion_origin_rfft (image = projection moved by -rlnOrigin)

The latent code ``z`` of a particle is not read off the image by an encoder network but inferred
through this forward model (:mod:`dynamight_core.latent_inference`); the trainer keeps each
particle's posterior mean.

Loss per particle (what the trainer minimises, averaged over a batch)::

    nll  = ½ N_pix · norm · weighted_fourier_loss(model, image, w)     (Gaussian log-likelihood)
    loss = nll(z ~ q(z | image)) + λ · (distance preservation + repulsion)

``w`` are the normalised radial noise weights of :class:`RadialNoiseEstimate` (mean 1) and
``norm`` the mean of ``1 / σ²(shell)`` over the pixels within Nyquist, so ``norm · w = 1 / σ²``
and ``nll`` is the negative log-likelihood of the image under coloured Gaussian noise (up to a
constant), in nats. The KL term of the evidence lower bound does not depend on the decoder once
``q`` is the inferred posterior; it shapes ``q`` itself (the prior term of the inference).

Deformation error on held-out (validation) particles: both halves' models are applied to the
same images, each with the codes it infers for them; ``|d1 - d2|`` (Å) per particle and
Gaussian, Gaussian ``i`` of both halves descending from the same Gaussian of the common initial
model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from .ctf import ctf_2d_rfft
from .decoder import DeformationDecoder
from .fourier_grids import rfft2_centered
from .gaussian_model import GaussianModel
from .gaussian_projection import project_gaussians_rfft
from .noise_model import RadialNoiseEstimate, rfft_multiplicity
from .particles import CTFParams, ParticleSet
from .shift import relion_origin_phase_rfft

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """A batch of particles on the training device, addressed by particle index."""

    indices: np.ndarray  # (b,) 0-based particle indices
    images: torch.Tensor  # (b, box, box) real space
    rotations: torch.Tensor  # (b, 3, 3) RELION A
    shifts_angstrom: torch.Tensor  # (b, 2)
    ctf: CTFParams
    # data parallel (:mod:`.distributed`): this batch is rows ``offset ..`` of a batch of
    # ``total`` particles split between processes (0 / None: the whole batch)
    offset: int = 0
    total: int | None = None
    # tensors derived from the batch, computed once (a training step renders it several times:
    # the codes' model and Jacobian, then the posterior draw); not copied by ``replace``
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def derived(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, called the first time ``key`` is asked for on this batch only (for
        tensors that follow from the batch's data alone: nothing with a gradient)."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = compute()
        return value

    def images_rfft(self) -> torch.Tensor:  # (b, box, box // 2 + 1) complex
        """:func:`.fourier_grids.rfft2_centered` of the images, computed once per batch."""
        return self.derived("images_rfft", lambda: rfft2_centered(self.images))

    @property
    def global_size(self) -> int:
        """Particles in the whole batch this one is a share of."""
        return len(self) if self.total is None else int(self.total)


def make_batch(particles: ParticleSet, indices: np.ndarray, device: torch.device) -> Batch:
    """Read the images of ``indices`` and move everything the forward model needs to ``device``."""
    return batch_to(host_batch(particles, indices), torch.device(device))


def host_batch(particles: ParticleSet, indices: np.ndarray, *, pin_memory: bool = False) -> Batch:
    """The batch of ``indices`` in host memory (what :func:`make_batch` reads before moving it
    to its device), in page-locked memory with ``pin_memory``."""
    indices = np.asarray(indices, dtype=np.int64)
    idx = torch.from_numpy(indices)
    batch = Batch(indices=indices, images=particles.images.read(indices),
                  rotations=particles.rotations[idx], shifts_angstrom=particles.shifts_angstrom[idx],
                  ctf=particles.ctf.subset(indices))
    return _pinned(batch) if pin_memory else batch


def batch_to(batch: Batch, device: torch.device, *, non_blocking: bool = False) -> Batch:
    """``batch`` with every tensor on ``device`` (``non_blocking`` copies from pinned memory)."""
    return Batch(indices=batch.indices,
                 images=batch.images.to(device, non_blocking=non_blocking),
                 rotations=batch.rotations.to(device, non_blocking=non_blocking),
                 shifts_angstrom=batch.shifts_angstrom.to(device, non_blocking=non_blocking),
                 ctf=_ctf_map(batch.ctf, lambda t: t.to(device, non_blocking=non_blocking)))


def _pinned(batch: Batch) -> Batch:
    return Batch(indices=batch.indices, images=batch.images.pin_memory(),
                 rotations=batch.rotations.pin_memory(),
                 shifts_angstrom=batch.shifts_angstrom.pin_memory(),
                 ctf=_ctf_map(batch.ctf, torch.Tensor.pin_memory))


def _ctf_map(ctf: CTFParams, function: Callable[[torch.Tensor], torch.Tensor]) -> CTFParams:
    return CTFParams(**{f.name: function(getattr(ctf, f.name)) for f in fields(ctf)})


def split_validation(half_set: torch.Tensor, fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> torch.Tensor:
    """Bool ``(n,)`` mask of held-out particles: ``round(fraction · n_half)`` drawn at random
    (CPU generator seeded with ``seed``) from each half set separately. With ``groups`` (n,)
    (e.g. tracks of a time series; ``< 0``: a particle on its own), whole groups are held out,
    ``round(fraction · n_groups)`` of each half's groups, so no group is split between training
    and validation."""
    half_set = torch.as_tensor(half_set).cpu()
    mask = torch.zeros(half_set.shape[0], dtype=torch.bool)
    generator = torch.Generator().manual_seed(int(seed))
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        # particles on their own become groups of one
        alone = groups < 0
        groups = np.where(alone, groups.max(initial=0) + 1 + np.arange(groups.shape[0]), groups)
    for half in (1, 2):
        members = torch.nonzero(half_set == half).squeeze(-1)
        if groups is None:
            n_held = round(fraction * members.shape[0])
            if n_held:
                chosen = members[torch.randperm(members.shape[0], generator=generator)[:n_held]]
                mask[chosen] = True
            continue
        labels = np.unique(groups[members.numpy()])
        n_held = round(fraction * labels.shape[0])
        if n_held:
            chosen = labels[torch.randperm(labels.shape[0], generator=generator)[:n_held].numpy()]
            mask[members[torch.from_numpy(np.isin(groups[members.numpy()], chosen))]] = True
    return mask


def noise_normalisation(estimate: RadialNoiseEstimate, min_relative_power: float = 1e-3) -> float:
    """Mean of ``1 / σ²(shell)`` over the full-spectrum pixels within Nyquist (the factor that
    turns the normalised weights of ``estimate.weights()`` back into ``1 / σ²``); 1 without
    data."""
    power = estimate.noise_power()
    inside = torch.arange(estimate.n_shells, device=power.device) <= estimate.box // 2
    has_data = (estimate.count > 0) & inside
    if not bool(has_data.any()) or float(power[has_data].max()) <= 0.0:
        return 1.0
    power = torch.where(has_data, power, power[has_data].mean())
    power = power.clamp_min(min_relative_power * power[has_data].max())
    pixel_factor = estimate.multiplicity * estimate.within_nyquist
    return float(((1.0 / power)[estimate.shell_index] * pixel_factor).sum() / pixel_factor.sum())


class DeformationModel(nn.Module):
    """Gaussian consensus model and deformation decoder of one half set."""

    def __init__(self, gaussians: GaussianModel, decoder: DeformationDecoder, box_size: int,
                 pixel_size: float) -> None:
        super().__init__()
        self.gaussians = gaussians
        self.decoder = decoder
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self.decoder_dtype = torch.float32

    @property
    def latent_dim(self) -> int:
        return self.decoder.latent_dim

    def displacements(self, z: torch.Tensor, dtype: torch.dtype | None = None
                      ) -> torch.Tensor:  # (b, n_g, 3) Å
        """Displacement of every consensus Gaussian for latent codes ``z (b, d)``; computed in
        ``dtype`` (default ``decoder_dtype``; bfloat16 by autocast: weights, gradients and the
        result stay float32)."""
        dtype = self.decoder_dtype if dtype is None else dtype
        positions = self.gaussians.positions.detach()
        if dtype == torch.float32:
            return self.decoder(positions, z)
        with torch.autocast(device_type=z.device.type, dtype=dtype):
            displacements = self.decoder(positions, z)
        return displacements.float()

    def render(
        self,
        positions: torch.Tensor,  # (n_g, 3) or (b, n_g, 3) Å
        batch: Batch,
    ) -> torch.Tensor:  # (b, box, box // 2 + 1) complex particle-image model
        """Project the (deformed) Gaussians, apply each particle's CTF and origin shift."""
        ctf, origin = self._image_factors(batch)
        return self._project(positions, batch.rotations) * ctf * origin

    def _project(self, positions: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        g = self.gaussians
        return project_gaussians_rfft(positions, torch.exp(g.log_sigmas), g.masses(),
                                      g.class_index, rotations, self.box_size, self.pixel_size)

    def _image_factors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each particle's CTF and origin-shift phase, ``(b, box, box // 2 + 1)`` each (once
        per batch and image geometry)."""
        return batch.derived(
            ("image_factors", self.box_size, self.pixel_size),
            lambda: (ctf_2d_rfft(batch.ctf, self.box_size, self.pixel_size),
                     relion_origin_phase_rfft(batch.shifts_angstrom, self.pixel_size,
                                              self.box_size)))

    def displacements_and_tangents(self, z: torch.Tensor, dtype: torch.dtype | None = None,
                                   dims: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`displacements` ``(b, n_g, 3)`` (with autograd) and their derivatives with
        respect to the latent coordinates ``dims`` (default all) ``(b, k, n_g, 3)`` Å per unit
        (without), float32."""
        dtype = self.decoder_dtype if dtype is None else dtype
        positions = self.gaussians.positions.detach()
        if dtype == torch.float32:
            return self.decoder.forward_with_tangents(positions, z, dims)
        with torch.autocast(device_type=z.device.type, dtype=dtype):
            displacements, tangents = self.decoder.forward_with_tangents(positions, z, dims)
        return displacements.float(), tangents.float()

    def image_jacobian(
        self,
        deformed: torch.Tensor,  # (b, n_g, 3) Å, the deformed positions at z
        tangents: torch.Tensor,  # (b, d, n_g, 3) ∂deformed/∂z
        model: torch.Tensor,  # (b, box, box // 2 + 1) render(deformed)
        batch: Batch,
        step_angstrom: float = 0.05,
    ) -> torch.Tensor:  # (b, d, box, box // 2 + 1) ∂model/∂z
        """Derivatives of the model images with respect to the latent coordinates: one extra
        render per coordinate, the Gaussians moved along the tangent by at most
        ``step_angstrom`` (forward difference; the decoder's part is exact). On a GPU the ``d``
        renders are one batched projection (a tenth of the kernel launches of ``d`` calls); on
        a CPU one at a time (the batched one measured 20 % slower at box 128: cache)."""
        b, d = tangents.shape[:2]
        largest = tangents.norm(dim=-1).amax(dim=-1).clamp_min(1e-12)  # (b, d)
        h = step_angstrom / largest
        ctf, origin = (factor[:, None] for factor in self._image_factors(batch))
        per_call = d if deformed.is_cuda else 1
        columns = []
        for k in range(0, d, per_call):
            n = min(per_call, d - k)
            moved = deformed[:, None] + h[:, k:k + n, None, None] * tangents[:, k:k + n]
            projection = self._project(moved.flatten(0, 1),
                                       batch.rotations.repeat_interleave(n, dim=0))
            moved_images = projection.view(b, n, *projection.shape[1:]) * ctf * origin
            columns.append((moved_images - model[:, None]) / h[:, k:k + n, None, None])
        return torch.cat(columns, dim=1)

    @torch.no_grad()
    def linearise(self, batch: Batch, z: torch.Tensor, dims: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # model (b, h, w), ∂model/∂z_dims
        """Model images of ``batch`` at the codes ``z`` and their Jacobian (latent inference,
        :mod:`dynamight_core.latent_inference`) along the coordinates ``dims`` ((k,) int64,
        default all: ``(b, k, h, w)``; a coordinate not asked for costs no render)."""
        d, tangents = self.displacements_and_tangents(z, dims=dims)
        deformed = self.gaussians.positions.detach()[None] + d
        model = self.render(deformed, batch)
        return model, self.image_jacobian(deformed, tangents, model, batch)

    def forward(
        self,
        batch: Batch,
        z: torch.Tensor | None = None,  # (b, d)
        *,
        tangents: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Model images of a batch: deformed by the codes ``z``, or the consensus projection
        (zero displacement) without them. Returns ``model_rfft``, ``image_rfft`` and, with
        ``z``, ``displacements`` and ``deformed`` (and with ``tangents`` their derivatives
        ``(b, d, n_g, 3)`` with respect to ``z``, without autograd)."""
        out: dict[str, torch.Tensor] = {"image_rfft": batch.images_rfft()}
        if z is not None:
            if tangents:
                d, out["tangents"] = self.displacements_and_tangents(z)
            else:
                d = self.displacements(z)
            deformed = self.gaussians.positions[None] + d
            out.update(displacements=d, deformed=deformed)
            out["model_rfft"] = self.render(deformed, batch)
        else:
            out["model_rfft"] = self.render(self.gaussians.positions, batch)
        return out


def negative_log_likelihood(
    model_rfft: torch.Tensor,  # (b, box, box // 2 + 1)
    image_rfft: torch.Tensor,  # (b, box, box // 2 + 1)
    weights: torch.Tensor,  # (box, box // 2 + 1) normalised noise weights
    norm: float,  # noise_normalisation(...)
) -> tuple[torch.Tensor, torch.Tensor]:  # nll (b,) nats, weighted mse (b,)
    """Gaussian negative log-likelihood (see module docstring) and the weighted MSE it scales."""
    box = model_rfft.shape[-2]
    inside = weights > 0
    diff = model_rfft - image_rfft
    pixel_factor = _multiplicity(box, weights.device, weights.dtype) * inside
    n_pixels = pixel_factor.sum()
    mse = ((diff.real**2 + diff.imag**2) * weights * pixel_factor).sum((-2, -1)) / n_pixels
    # the scale stays on the device (no host synchronisation), in float64 as a Python number
    # would be, so the result is the same to the last bit
    return n_pixels.double() * 0.5 * norm * mse, mse


@functools.lru_cache(maxsize=16)
def _multiplicity(box: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return rfft_multiplicity(box).to(device=device, dtype=dtype)


@torch.no_grad()
def deformation_error(
    model_1: DeformationModel,
    model_2: DeformationModel,
    latents_1: Callable[[Batch], torch.Tensor],  # batch -> (b, d) codes under half 1
    latents_2: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],  # the validation particles
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply both halves to the same images: per-particle mean ``|d1 - d2|`` (Å), its indices,
    and the per-Gaussian mean over particles (Å)."""
    per_particle, indices, per_gaussian, count = [], [], None, 0
    for batch in batches:
        d1 = model_1.displacements(latents_1(batch))
        d2 = model_2.displacements(latents_2(batch))
        err = (d1 - d2).norm(dim=-1)  # (b, n_g)
        per_particle.append(err.mean(dim=1).cpu().numpy())
        indices.append(batch.indices)
        total = err.sum(dim=0).cpu().numpy()
        per_gaussian = total if per_gaussian is None else per_gaussian + total
        count += len(batch)
    if not count:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0)
    return (np.concatenate(per_particle), np.concatenate(indices),
            per_gaussian / count)


__all__ = [
    "Batch",
    "DeformationModel",
    "deformation_error",
    "make_batch",
    "negative_log_likelihood",
    "noise_normalisation",
    "split_validation",
]
