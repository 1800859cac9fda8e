"""Latent codes inferred through the forward model: a Gauss-Newton (Laplace) posterior per
particle.

Why not an image encoder: at the signal-to-noise ratio of real particles (0.01-0.1) a network
that maps pixels to a latent code has to learn, from a few thousand noisy images, a different
filter for every viewing direction. Measured on the ``clamp`` benchmark (SNR 0.05, 2,700
training particles per half): even a linear read-out of the true motion trained *with* the
truth predicts held-out particles with R² ≈ 0.01, and the VAE encoder memorised its training
particles (R² 0.84 after 13 epochs with a small KL weight) while its codes for held-out particles
stayed at R² ≈ 0. The forward model already knows the view, so the code is inferred through it
(as an auto-decoder, like cryoSPARC's 3D Flex): each particle's code minimises::

    E(z) = NLL(image | render(z)) / beta + ½ |z|²          (prior N(0, I); beta: KL weight)

by Gauss-Newton steps ``z <- z + H⁻¹ (Jᴴ W r / beta - z)`` with ``H = Re(Jᴴ W J) / beta + I``,
``r = image - render(z)``, ``J = ∂render/∂z`` and ``W`` the noise weights of the likelihood
(``1 / σ²`` per Fourier pixel, Hermitian multiplicity included, 0 beyond Nyquist). The
Jacobian comes from the caller's linearisation (for the deformation model: the decoder's
forward-mode derivatives, then one extra render per latent dimension; no backward pass).
``N(z, H⁻¹)`` is the posterior (Laplace approximation): the VAE's ``q(z | x)``, which is what
minimising ``NLL + beta · KL`` over a Gaussian ``q`` gives for a model linear in ``z`` around
the optimum. Steps are damped where the model is not linear enough
(Levenberg-Marquardt: a step that raises ``E`` is refused and the next one shortened) and never
longer than ``max_step`` in latent units.

Every function also takes a per-particle isotropic prior ``N(m, I / p)`` instead of ``N(0, I)``
(``prior_mean`` m (b, d), ``prior_precision`` p (b,)): ``½ |z|²`` becomes ``½ p |z - m|²``, the
descent direction ``Jᴴ W r / beta - p (z - m)`` and ``H = Re(Jᴴ W J) / beta + p I``. The temporal
prior of tracked particles (:mod:`.temporal_prior`) is such a prior, conditioned on the codes of
each particle's neighbours in time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noise_model import rfft_multiplicity


def likelihood_pixel_weights(
    noise_weights: torch.Tensor,  # (box, box // 2 + 1) normalised, 0 beyond Nyquist
    noise_norm: float,
) -> torch.Tensor:  # (box, box // 2 + 1)
    """``1 / σ²`` per rfft pixel times its Hermitian multiplicity (0 beyond Nyquist): the
    Gaussian negative log-likelihood is ``½ Σ W |model - image|²``."""
    box = noise_weights.shape[-2]
    multiplicity = rfft_multiplicity(box).to(device=noise_weights.device,
                                             dtype=noise_weights.dtype)
    return multiplicity * (noise_weights > 0) * noise_weights * noise_norm


Prior = tuple[torch.Tensor, torch.Tensor] | None
"""``(prior_mean (b, d), prior_precision (b,))`` of ``N(m, I / p)``; ``None`` is ``N(0, I)``."""


def _prior_terms(z: torch.Tensor, prior: Prior) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z - m, p[:, None])`` of the prior (``(z, 1)`` for ``N(0, I)``)."""
    if prior is None:
        return z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
    mean, precision = prior
    return z - mean, precision.reshape(-1, 1).to(z.dtype)


def _energy(model: torch.Tensor, image_rfft: torch.Tensor, pixel_weights: torch.Tensor,
            z: torch.Tensor, beta: float, prior: Prior = None) -> torch.Tensor:  # (b,)
    diff = model - image_rfft
    offset, p = _prior_terms(z, prior)
    return (0.5 / beta * (pixel_weights * (diff.real**2 + diff.imag**2)).sum((-2, -1))
            + 0.5 * (p * offset**2).sum(-1))


Linearisation = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``z (b, d) -> (model (b, h, w) complex, jacobian (b, d, h, w) complex)`` at ``z``."""


def finite_difference_linearisation(render: Callable[[torch.Tensor], torch.Tensor],
                                    fd_step: float = 1e-2) -> Linearisation:
    """Linearise a plain renderer ``z -> model`` by forward differences (``d + 1`` renders)."""

    def linearise(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = render(z)
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        jacobian = torch.stack([(render(z + fd_step * eye[k]) - model) / fd_step
                                for k in range(z.shape[-1])], dim=1)
        return model, jacobian

    return linearise


@torch.no_grad()
def gauss_newton_system(
    model: torch.Tensor,  # (b, h, w) complex, the model images at z
    jacobian: torch.Tensor,  # (b, d, h, w) complex, ∂model/∂z
    z: torch.Tensor,  # (b, d)
    image_rfft: torch.Tensor,  # (b, h, w) complex
    pixel_weights: torch.Tensor,  # (h, w) likelihood_pixel_weights
    beta: float = 1.0,
    prior: Prior = None,
    active: torch.Tensor | None = None,  # (d,) bool: dimensions in use (default all)
    dims: torch.Tensor | None = None,  # (k,) int64: the dimensions the jacobian's rows are
) -> tuple[torch.Tensor, torch.Tensor]:  # -grad E (b, d), precision H (b, d, d)
    """The Gauss-Newton system of ``E`` at ``z`` (module docstring): the descent direction
    ``Jᴴ W r / beta - p (z - m)`` and ``H = Re(Jᴴ W J) / beta + p I`` (``m = 0, p = 1``
    without a ``prior``). A dimension not ``active`` sees no data: the prior alone, so its
    code goes to the prior mean and its posterior is the prior. With ``dims`` the jacobian
    holds the derivatives along those dimensions only ``(b, k, h, w)``, and every other one
    sees no data (as if not ``active``)."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    offset, p = _prior_terms(z, prior)
    # Re Σ W conj(a) b as products of real matrices over the pixels: with sqrt(W) folded into
    # each side, Jᴴ W r and Re(Jᴴ W J) are one batched matrix product each (no (b, d, d, h, w)
    # temporaries: about 3 GB of memory traffic per step at 6 dimensions and box 256)
    root = pixel_weights.clamp_min(0.0).sqrt()
    b, d = jacobian.shape[:2]
    weighted = torch.view_as_real(jacobian * root).reshape(b, d, -1)  # (b, d, 2 h w)
    residual = torch.view_as_real((image_rfft - model) * root).reshape(b, -1, 1)
    data = torch.bmm(weighted, residual)[..., 0] / beta
    precision = torch.bmm(weighted, weighted.transpose(1, 2)) / beta
    if dims is not None:  # rows and columns of the dimensions in dims; zeros elsewhere
        n = z.shape[-1]
        data = data.new_zeros(b, n).index_copy_(1, dims, data)
        precision = precision.new_zeros(b, n, n).index_copy_(
            1, dims, precision.new_zeros(b, d, n).index_copy_(2, dims, precision))
    elif active is not None:
        use = active.to(device=z.device, dtype=z.dtype)
        data = data * use
        precision = precision * (use[:, None] * use[None, :])
    descent = data - p * offset
    return descent, 0.5 * (precision + precision.transpose(-1, -2)) + p[..., None] * eye


def gauss_newton_step(
    z: torch.Tensor,  # (b, d)
    descent: torch.Tensor,  # (b, d)
    precision: torch.Tensor,  # (b, d, d)
    max_step: float = 1.0,
    damping: torch.Tensor | None = None,  # (b,) Levenberg-Marquardt λ
) -> torch.Tensor:  # (b, d)
    """``z + (H + λ diag H)⁻¹ descent``, the step shortened to at most ``max_step``."""
    system = precision
    if damping is not None:
        system = system + damping[:, None, None] * torch.diag_embed(
            torch.diagonal(precision, dim1=-2, dim2=-1))
    # H is positive definite by construction; the _ex forms skip the error check, which on a
    # GPU reads a flag back to the host (a synchronisation per batch)
    step = torch.linalg.solve_ex(system, descent[..., None])[0][..., 0]
    length = step.norm(dim=-1, keepdim=True)
    return z + step * torch.clamp(max_step / length.clamp_min(1e-12), max=1.0)


@torch.no_grad()
def infer_latents(
    linearise: Linearisation,
    z0: torch.Tensor,  # (b, d) starting codes
    image_rfft: torch.Tensor,  # (b, h, w) complex
    pixel_weights: torch.Tensor,  # (h, w)
    n_steps: int,
    *,
    beta: float = 1.0,
    max_step: float = 1.0,
    prior: Prior = None,
    active: torch.Tensor | None = None,
    dims: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # mean (b, d), precision (b, d, d)
    """``n_steps`` (≥ 1) damped Gauss-Newton steps from ``z0`` (Levenberg-Marquardt: a step
    that does not lower ``E`` is not taken and the next one is damped, ``H + λ diag H``):
    the posterior mean and the precision ``H`` at it. One linearisation per step, plus one at
    the start. ``active``, ``dims``: as in :func:`gauss_newton_system` (with ``dims``,
    ``linearise`` returns the jacobian along those dimensions)."""
    z = z0
    model, jacobian = linearise(z)
    energy = _energy(model, image_rfft, pixel_weights, z, beta, prior)
    damping = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for _ in range(max(1, int(n_steps))):
        descent, precision = gauss_newton_system(model, jacobian, z, image_rfft, pixel_weights,
                                                 beta, prior, active, dims)
        trial = gauss_newton_step(z, descent, precision, max_step, damping)
        trial_model, trial_jacobian = linearise(trial)
        trial_energy = _energy(trial_model, image_rfft, pixel_weights, trial, beta, prior)
        better = trial_energy <= energy
        z = torch.where(better[:, None], trial, z)
        model = torch.where(better[:, None, None], trial_model, model)
        jacobian = torch.where(better[:, None, None, None], trial_jacobian, jacobian)
        energy = torch.where(better, trial_energy, energy)
        damping = torch.where(better, 0.1 * damping, torch.clamp(10.0 * damping, min=0.1))
    _, precision = gauss_newton_system(model, jacobian, z, image_rfft, pixel_weights, beta,
                                       prior, active, dims)
    return z, precision


def sample_posterior(
    mean: torch.Tensor,  # (b, d)
    precision: torch.Tensor,  # (b, d, d)
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,  # (b, d) standard normal draws to use instead
) -> torch.Tensor:  # (b, d)
    """A draw from ``N(mean, precision⁻¹)`` (``generator`` on ``mean``'s device)."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device,
                            dtype=mean.dtype)
    lower = torch.linalg.cholesky_ex(precision)[0]  # precision = L Lᵀ, cov. = L⁻ᵀ L⁻¹
    return mean + torch.linalg.solve_triangular(lower.transpose(-1, -2), noise[..., None],
                                                upper=True)[..., 0]


def posterior_kl(
    mean: torch.Tensor,  # (b, d)
    precision: torch.Tensor,  # (b, d, d)
    prior: Prior = None,
) -> torch.Tensor:  # (b,) nats
    """``KL(N(mean, precision⁻¹) || N(m, I / p))`` (the prior ``N(0, I)`` by default)."""
    d = mean.shape[-1]
    offset, p = _prior_terms(mean, prior)
    p = p[:, 0]
    covariance = torch.linalg.inv_ex(precision)[0]  # no error check: no GPU read-back
    trace = torch.diagonal(covariance, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * (p * trace + p * (offset**2).sum(-1) - d + torch.logdet(precision)
                  - d * torch.log(p))


__all__ = ["Linearisation", "Prior", "finite_difference_linearisation", "gauss_newton_step",
           "gauss_newton_system", "infer_latents", "likelihood_pixel_weights", "posterior_kl",
           "sample_posterior"]
