"""The leading motion modes of a half set, from the particles' gradients at the consensus: a
data-driven start for the deformation decoder.

Why: at the SNR of real particles the decoder and the latent codes bootstrap each other slowly
from a decoder that outputs nothing (codes cannot follow a motion the decoder does not yet
show, and the decoder learns only from codes that carry it). Measured on the ``twist-hinge``
benchmark at SNR 0.02 (2,700 training particles per half): 28 epochs of training reached a kNN
R² of 0.25, while the leading mode below, found in two seconds before any training, gives 0.50
(0.75 at SNR 0.05, and 0.75 for ``clamp`` at SNR 0.02).

How (a linear analysis in the spirit of 3D variability analysis, done on the Gaussian model):

1. A smooth basis of displacements: ``n_clusters`` centres from k-means of the (movable)
   Gaussians, each Gaussian softly assigned to the centres (``B``, ``(n_g, K)``, rows summing
   to 1; a coefficient vector ``v (K, 3)`` moves the Gaussians by ``B v``).
2. For each particle the gradient of its negative log-likelihood with respect to the
   coefficients at zero displacement, ``g_i = Bᵀ ∂NLL_i/∂x``: up to noise, the displacement
   that particle's image asks for, seen through its view and CTF. Centred over particles (the
   mean is the consensus' own error, common to all), their covariance ``C`` holds the motion
   and the noise; the same gradients with each residual's Fourier phases randomised
   (``C_noise``) hold the noise alone.
3. The generalised eigenvectors of ``C v = λ C_noise v`` with the largest ``λ`` are the modes.
   Rigid-body motions of the whole model are not projected out, although pose and shift errors
   of real data would show up there: on the benchmark that removed much of what the leading
   mode holds (twist-hinge, SNR 0.02: kNN R² 0.27 with the six rigid motions projected out,
   0.42 with the three translations, 0.52 with neither; clamp, SNR 0.02: 0.70 and 0.76), as a
   domain's motion moves the whole model's centre and orientation too.
4. Each mode's amplitude: per particle the least-squares coefficient along it (one render per
   mode); the spread of the coefficients over particles minus their noise variance is the
   motion's variance along the mode, and the mode is scaled to one standard deviation per unit
   code.

:func:`fit_decoder_to_modes` then trains the decoder, on codes drawn from the prior, to output
``Σ_k z_k · mode_k``; latent inference does the rest (its first Gauss-Newton step through a
decoder that is linear in ``z`` is the per-particle least-squares estimate along the modes,
shrunk by the prior).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from .deformation_model import Batch, DeformationModel
from .device import adam
from .distributed import Group

logger = logging.getLogger(__name__)


def default_cluster_count(n_particles: int) -> int:
    """Clusters of the displacement basis for ``n_particles`` training particles (about 50
    particles per cluster, 16 to 200): the covariance has ``3 K`` dimensions, so its noise
    eigenvalues stay near 1 (Marchenko-Pastur edge ``(1 + sqrt(3 K / n))²``). On the
    benchmark's 2,700 particles per half, 50 clusters gave R² 0.51, 25 gave 0.42 and 200 gave
    0.17 (``twist-hinge``, SNR 0.02)."""
    return int(min(200, max(16, round(n_particles / 54))))


@torch.no_grad()
def cluster_basis(positions: torch.Tensor,  # (n_g, 3) Å
                  n_clusters: int,
                  movable: torch.Tensor | None = None,  # (n_g,) bool
                  generator: torch.Generator | None = None,
                  n_iterations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (n_g, K), centres (K, 3))``: k-means centres of the movable Gaussians and each
    movable Gaussian's soft assignment to them (Gaussian kernel of the median distance from a
    Gaussian to its nearest centre, rows summing to 1; rows of fixed Gaussians are 0)."""
    device = positions.device
    points = positions if movable is None else positions[movable]
    k = max(1, min(int(n_clusters), points.shape[0]))
    pick = torch.randperm(points.shape[0], generator=generator, device=device)[:k]
    centres = points[pick].clone()
    for _ in range(n_iterations):
        label = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, label, points)
        counts = torch.zeros(k, device=device, dtype=points.dtype).index_add_(
            0, label, torch.ones_like(points[:, 0]))
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    distances = torch.cdist(points, centres)
    width = distances.min(dim=1).values.median().clamp_min(1e-3)
    weights = torch.softmax(-0.5 * (distances / width) ** 2, dim=1)
    basis = positions.new_zeros(positions.shape[0], k)
    if movable is None:
        basis = weights
    else:
        basis[movable] = weights
    return basis, centres


def noise_edge(dimensions: int, n_particles: int) -> float:
    """Largest generalised eigenvalue expected from noise alone: the upper edge of the Wachter
    distribution of ``C C_noise⁻¹`` when both are sample covariances of ``n_particles`` draws
    in ``dimensions`` (``((1 + sqrt(1 - (1 - y)²)) / (1 - y))²``, ``y = dimensions / n``).
    Measured: 2.39 for an edge of 2.61 (images of the model itself plus white noise, 400
    particles, 42 dimensions); 1.99-2.01 for an edge of 1.95 (the benchmark's datasets without
    motion, 2,700 particles, 144 dimensions)."""
    y = min(dimensions / max(n_particles, 1), 0.99)
    return float(((1 + math.sqrt(1 - (1 - y) ** 2)) / (1 - y)) ** 2)


MODE_SIGNIFICANCE = 1.1
"""A mode after the leading one starts a latent dimension only if its eigenvalue exceeds
``MODE_SIGNIFICANCE`` times :func:`noise_edge` (noise alone reaches 1.03 times the edge on the
benchmark's datasets without motion)."""


def significant_modes(eigenvalues: list[float], edge: float,
                      factor: float = MODE_SIGNIFICANCE) -> list[bool]:
    """Which modes start a latent dimension: the leading one always (the start needs a
    direction; a dataset without motion then learns a small one), every further one only if
    its eigenvalue is above ``factor`` times ``edge``."""
    return [k == 0 or value > factor * edge for k, value in enumerate(eigenvalues)]


def _batch_phases(batch: Batch, box: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:  # (len(batch), box, box // 2 + 1)
    """Random phases for the rows of ``batch``, drawn for the whole batch (data parallel:
    every share takes its rows, so the draws are those of one process)."""
    phase = torch.rand((batch.global_size, box, box // 2 + 1), generator=generator,
                       device=device) * (2 * math.pi)
    return phase[batch.offset:batch.offset + len(batch)]


def coefficient_gradients(model: DeformationModel, batch: Batch, pixel_weights: torch.Tensor,
                          basis: torch.Tensor, phases: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:  # (b, 3 K) twice
    """Per particle the gradient of ``½ Σ W |model - image|²`` with respect to the basis
    coefficients at zero displacement, and the same with the residual's phases replaced by
    ``phases`` (random, ``(b, box, box // 2 + 1)``)."""
    positions = model.gaussians.positions.detach()
    expanded = positions[None].expand(len(batch), -1, -1).clone().requires_grad_(True)
    rendered = model.render(expanded, batch)
    image_rfft = batch.images_rfft()
    with torch.no_grad():
        residual = image_rfft - rendered
        noise_image = rendered + residual * torch.polar(torch.ones_like(phases), phases)
    out = []
    for image in (image_rfft, noise_image):
        diff = rendered - image
        loss = 0.5 * (pixel_weights * (diff.real**2 + diff.imag**2)).sum()
        (gradient,) = torch.autograd.grad(loss, expanded, retain_graph=True)
        out.append(torch.einsum("bgc,gk->bkc", gradient, basis).reshape(len(batch), -1))
    return out[0].detach(), out[1].detach()


@torch.no_grad()
def leading_modes(sums: dict[str, torch.Tensor], count: float, n_modes: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised eigenvectors ``(3 K, n_modes)`` of the centred covariances (module
    docstring, step 3) and their eigenvalues (noise alone: up to :func:`noise_edge`)."""
    def covariance(key: str) -> torch.Tensor:
        mean = sums[key + "_sum"] / count
        return sums[key + "_outer"] / count - torch.outer(mean, mean)

    signal, noise = covariance("data"), covariance("noise")
    eye = torch.eye(noise.shape[0], dtype=noise.dtype, device=noise.device)
    lower = torch.linalg.cholesky(noise + 1e-6 * noise.diagonal().mean() * eye)
    inverse = torch.linalg.inv(lower)
    values, vectors = torch.linalg.eigh(inverse @ signal @ inverse.T)
    order = torch.argsort(values, descending=True)[:n_modes]
    return inverse.T @ vectors[:, order], values[order]


@torch.no_grad()
def mode_coefficients(model: DeformationModel, batch: Batch, pixel_weights: torch.Tensor,
                      fields: torch.Tensor,  # (m, n_g, 3) Å per unit
                      step_angstrom: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle and mode the least-squares coefficient of the residual along the mode's
    image derivative and its noise variance ``1 / (Jᴴ W J)``: ``(b, m)`` twice."""
    positions = model.gaussians.positions.detach()
    rendered = model.render(positions, batch)
    residual = batch.images_rfft() - rendered
    coefficients, variances = [], []
    for field in fields:
        h = step_angstrom / field.norm(dim=-1).amax().clamp_min(1e-12)
        derivative = (model.render(positions + h * field, batch) - rendered) / h
        information = (pixel_weights * (derivative.real**2 + derivative.imag**2)).sum((-2, -1))
        projection = (pixel_weights * (derivative.real * residual.real
                                       + derivative.imag * residual.imag)).sum((-2, -1))
        information = information.clamp_min(1e-12)
        coefficients.append(projection / information)
        variances.append(1.0 / information)
    return torch.stack(coefficients, dim=1), torch.stack(variances, dim=1)


def motion_modes(model: DeformationModel, batches: Iterable[Batch],
                 second_pass: Iterable[Batch], pixel_weights: torch.Tensor, n_modes: int,
                 n_clusters: int, movable: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, group: Group | None = None,
                 is_training: Callable[[np.ndarray], np.ndarray] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, list[float]], list[tuple]]:
    """The ``n_modes`` leading motion modes (module docstring) as displacement fields
    ``(n_modes, n_g, 3)`` Å per unit code, a summary (eigenvalues, amplitudes in Å RMS) and
    the particles' coefficients along them.

    ``batches``: the training particles (the covariances); ``second_pass``: any particles,
    whose least-squares coefficients along the modes (in code units) and their noise
    variances are returned as ``(indices, coefficients (b, m), variances (b, m))`` per batch;
    the amplitudes come from those for which ``is_training(indices)`` holds (default all).
    Data parallel: both passes are this process's shares and the sums are added over
    ``group``."""
    group = group or Group()
    positions = model.gaussians.positions.detach()
    basis, _ = cluster_basis(positions, n_clusters, movable, generator)
    k = basis.shape[1]
    dim = 3 * k
    dtype = torch.float64
    sums = {key: torch.zeros(dim, dim, dtype=dtype, device=positions.device)
            for key in ("data_outer", "noise_outer")}
    sums.update({key: torch.zeros(dim, dtype=dtype, device=positions.device)
                 for key in ("data_sum", "noise_sum")})
    count = torch.zeros((), dtype=dtype, device=positions.device)
    for batch in batches:
        phases = _batch_phases(batch, model.box_size, generator, positions.device)
        if not len(batch):
            continue
        data, noise = (g.to(dtype) for g in coefficient_gradients(
            model, batch, pixel_weights, basis, phases))
        sums["data_outer"] += data.T @ data
        sums["noise_outer"] += noise.T @ noise
        sums["data_sum"] += data.sum(dim=0)
        sums["noise_sum"] += noise.sum(dim=0)
        count += len(batch)
    for tensor in (*sums.values(), count):
        group.all_reduce(tensor)
    vectors, values = leading_modes(sums, float(count), n_modes)
    fields = torch.einsum("gk,kcm->mgc", basis.to(dtype),
                          vectors.reshape(k, 3, -1)).to(positions.dtype)
    rms = fields.norm(dim=-1).pow(2).mean(dim=-1).sqrt().clamp_min(1e-12)
    fields = fields / rms[:, None, None]
    # amplitudes: spread of the training particles' coefficients minus their noise
    coefficients = []
    moments = torch.zeros(4, fields.shape[0], dtype=dtype, device=positions.device)
    for batch in second_pass:
        if not len(batch):
            continue
        a, var = (x.to(dtype) for x in mode_coefficients(model, batch, pixel_weights, fields))
        coefficients.append((batch.indices, a, var))
        use = torch.ones(len(batch), dtype=torch.bool, device=a.device)
        if is_training is not None:
            use = torch.from_numpy(np.asarray(is_training(batch.indices))).to(a.device)
        a_used, var_used = a[use], var[use]
        moments += torch.stack([a_used.sum(0), (a_used**2).sum(0), var_used.sum(0),
                                use.sum().to(dtype).expand(a.shape[1])])
    group.all_reduce(moments)
    n = moments[3].clamp_min(1.0)
    mean, second, noise_variance = moments[0] / n, moments[1] / n, moments[2] / n
    spread = (second - mean**2).clamp_min(0.0)
    variance = torch.maximum(spread - noise_variance, 0.01 * spread)
    amplitude = variance.sqrt().clamp_min(1e-6)  # Å RMS per unit code
    coefficients = [(indices, a / amplitude, var / amplitude**2)
                    for indices, a, var in coefficients]
    summary = {"eigenvalues": [round(float(v), 3) for v in values],
               "noise_edge": [round(noise_edge(dim, int(count)), 3)],
               "amplitude_angstrom": [round(float(a), 3) for a in amplitude],
               "clusters": [float(k)]}
    return fields * amplitude.to(fields.dtype)[:, None, None], summary, coefficients


def fit_decoder_to_modes(model: DeformationModel, fields: torch.Tensor,  # (d, n_g, 3) Å
                         generator: torch.Generator | None = None, n_steps: int = 2000,
                         n_codes: int = 16, n_gaussians: int = 256,
                         learning_rate: float = 3e-3) -> float:
    """Train ``model.decoder`` (own Adam optimiser, Gaussians fixed) so that code ``z`` moves
    the Gaussians by ``Σ_k z_k fields_k``, on ``n_codes`` codes drawn from the prior and
    ``n_gaussians`` random movable Gaussians per step; returns the final relative RMS error
    over all movable Gaussians and 256 fresh codes. (The decoder is a function of each
    Gaussian's position alone, so a few hundred per step fit it as well as all of them:
    measured on the twist-hinge benchmark, 2,000 steps of 256 Gaussians and 16 codes reached
    a relative error of 0.20, 300 steps of all 2,000 Gaussians and 32 codes 0.48, in the same
    time.)"""
    decoder = model.decoder
    positions = model.gaussians.positions.detach()
    if decoder.movable_mask is not None:
        positions, fields = positions[decoder.movable_mask], fields[:, decoder.movable_mask]
    device = positions.device
    scale = decoder.half_box_angstrom
    optimiser = adam(decoder.parameters(), device, lr=learning_rate)
    n_g = positions.shape[0]
    with torch.enable_grad():
        for _ in range(n_steps):
            z = torch.randn(n_codes, fields.shape[0], generator=generator, device=device)
            pick = torch.randint(n_g, (min(n_gaussians, n_g),), generator=generator,
                                 device=device)
            output = decoder._anchored(positions[pick], z) * scale
            target = torch.einsum("bk,kgc->bgc", z, fields[:, pick])
            loss = (output - target).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        z = torch.randn(256, fields.shape[0], generator=generator, device=device)
        target = torch.einsum("bk,kgc->bgc", z, fields)
        error = (decoder._anchored(positions, z) * scale - target).pow(2).mean()
        return float((error / target.pow(2).mean().clamp_min(1e-12)).sqrt())


__all__ = ["cluster_basis", "coefficient_gradients", "default_cluster_count",
           "fit_decoder_to_modes", "leading_modes", "mode_coefficients", "motion_modes", "noise_edge",
           "significant_modes"]
