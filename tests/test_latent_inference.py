"""Latent inference through the forward model, pinned against closed forms: the Gauss-Newton
step on a linear renderer is the exact posterior, the weights are the likelihood's, the prior is
N(0, I), the KL is the Gaussian closed form and posterior draws have the posterior's moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamight_core.latent_inference import (
    finite_difference_linearisation,
    gauss_newton_system,
    infer_latents,
    likelihood_pixel_weights,
    posterior_kl,
    sample_posterior,
)
from dynamight_core.noise_model import RadialNoiseEstimate


def infer(render, z0, image, weights, n_steps, **kwargs):
    return infer_latents(finite_difference_linearisation(render), z0, image, weights, n_steps,
                         **kwargs)

BOX, D, B = 8, 2, 5


def _linear_problem(seed=0, beta=1.0, prior_mean=None, prior_precision=None):
    """render(z) = a + Σ_k z_k basis_k (complex rfft images) and its exact MAP / precision
    under the prior N(prior_mean, I / prior_precision) (default N(0, I))."""
    m = np.zeros((B, D)) if prior_mean is None else prior_mean.double().numpy()
    pp = np.ones(B) if prior_precision is None else prior_precision.double().numpy()
    g = torch.Generator().manual_seed(seed)
    shape = (BOX, BOX // 2 + 1)
    a = torch.complex(torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g))
    basis = torch.complex(torch.randn(B, D, *shape, generator=g),
                          torch.randn(B, D, *shape, generator=g))
    image = torch.complex(torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g))
    weights = torch.rand(*shape, generator=g) + 0.5

    def render(z):
        return a + (z[:, :, None, None] * basis).sum(1)

    # independent closed form in float64 numpy:
    # minimise Σ W |a + Bz - y|² / (2 beta) + p |z - m|² / 2
    mean, precision = [], []
    w = weights.double().numpy().ravel()
    for p in range(B):
        # real-valued least squares on [Re; Im] stacked
        cols = basis[p].reshape(D, -1).to(torch.complex128).numpy()
        jac = np.concatenate([cols.real, cols.imag], axis=1).T  # (2 n_pix, D)
        res = (image[p] - a[p]).reshape(-1).to(torch.complex128).numpy()
        r = np.concatenate([res.real, res.imag])
        ww = np.concatenate([w, w])
        h = jac.T @ (ww[:, None] * jac) / beta + pp[p] * np.eye(D)
        mean.append(np.linalg.solve(h, jac.T @ (ww * r) / beta + pp[p] * m[p]))
        precision.append(h)
    return render, image, weights, np.array(mean), np.array(precision)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_one_step_on_a_linear_renderer_is_the_exact_posterior(beta):
    render, image, weights, mean, precision = _linear_problem(beta=beta)
    z0 = torch.full((B, D), 0.3)
    z, h = infer(render, z0, image, weights, 1, beta=beta, max_step=1e9)
    np.testing.assert_allclose(z.numpy(), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(h.numpy(), precision, rtol=1e-3, atol=1e-3)


def test_a_per_particle_prior_gives_the_exact_posterior_of_that_prior():
    g = torch.Generator().manual_seed(7)
    prior_mean = torch.randn(B, D, generator=g)
    prior_precision = torch.rand(B, generator=g) * 5 + 0.2
    render, image, weights, mean, precision = _linear_problem(
        seed=3, beta=0.5, prior_mean=prior_mean, prior_precision=prior_precision)
    z, h = infer(render, torch.zeros(B, D), image, weights, 1, beta=0.5, max_step=1e9,
                 prior=(prior_mean, prior_precision))
    np.testing.assert_allclose(z.numpy(), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(h.numpy(), precision, rtol=1e-3, atol=1e-3)
    # where the image says nothing, the code is the prior mean and H the prior precision
    z, h = infer(render, torch.zeros(B, D), image, torch.zeros_like(weights), 1,
                 max_step=1e9, prior=(prior_mean, prior_precision))
    torch.testing.assert_close(z, prior_mean)
    torch.testing.assert_close(h, prior_precision[:, None, None] * torch.eye(D))


def test_a_dimension_not_in_use_sees_no_data_and_the_others_the_reduced_problem():
    render, image, weights, _, _ = _linear_problem(seed=4, beta=0.5)
    active = torch.tensor([True, False])
    z, h = infer(render, torch.full((B, D), 0.4), image, weights, 3, beta=0.5, max_step=1e9,
                 active=active)
    # the same particles with the renderer of the first dimension alone
    reduced, h1 = infer(lambda u: render(torch.cat([u, torch.zeros_like(u)], 1)),
                        torch.full((B, 1), 0.4), image, weights, 3, beta=0.5, max_step=1e9)
    torch.testing.assert_close(z[:, :1], reduced, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h[:, :1, :1], h1, rtol=1e-4, atol=1e-4)
    # the unused dimension: prior mean and prior precision, uncoupled
    torch.testing.assert_close(z[:, 1], torch.zeros(B), rtol=0, atol=1e-6)
    torch.testing.assert_close(h[:, 1], torch.eye(D)[1].expand(B, D))


def test_a_jacobian_along_the_dimensions_in_use_only_gives_the_same_system():
    """``dims``: the jacobian's rows are those dimensions; the system is the masked one."""
    generator = torch.Generator().manual_seed(5)
    b, d, h, w = 4, 3, 6, 4

    def complex_normal(*shape: int) -> torch.Tensor:
        return torch.complex(torch.randn(*shape, generator=generator),
                             torch.randn(*shape, generator=generator))

    model, image = complex_normal(b, h, w), complex_normal(b, h, w)
    jacobian = complex_normal(b, d, h, w)
    z, weights = torch.randn(b, d, generator=generator), torch.rand(h, w, generator=generator)
    active = torch.tensor([True, False, True])
    descent, precision = gauss_newton_system(model, jacobian, z, image, weights, 0.3,
                                             active=active)
    dims = torch.tensor([0, 2])
    reduced = gauss_newton_system(model, jacobian[:, dims], z, image, weights, 0.3, dims=dims)
    torch.testing.assert_close(reduced[0], descent)
    torch.testing.assert_close(reduced[1], precision)
    assert torch.equal(reduced[1][:, 1], torch.eye(d)[1].expand(b, d))


def test_later_steps_stay_at_the_optimum_and_steps_are_capped():
    render, image, weights, mean, _ = _linear_problem(seed=1)
    z, _ = infer(render, torch.zeros(B, D), image, weights, 3, max_step=1e9)
    np.testing.assert_allclose(z.numpy(), mean, rtol=1e-3, atol=1e-4)
    capped, _ = infer(render, torch.zeros(B, D), image, weights, 1, max_step=0.01)
    assert float(capped.norm(dim=-1).max()) == pytest.approx(0.01, rel=1e-4)


def test_the_prior_pulls_codes_to_zero_when_the_image_says_nothing():
    render, image, _, _, _ = _linear_problem(seed=2)
    z, h = infer(render, torch.full((B, D), 0.7), image,
                         torch.zeros(BOX, BOX // 2 + 1), 1)
    torch.testing.assert_close(z, torch.zeros(B, D))
    torch.testing.assert_close(h, torch.eye(D).expand(B, D, D))


def test_pixel_weights_are_inverse_noise_power_times_multiplicity():
    box = 16
    estimate = RadialNoiseEstimate(box)
    g = torch.Generator().manual_seed(0)
    # noise whose power falls with frequency
    noise = torch.fft.rfft2(torch.randn(400, box, box, generator=g))
    shells = estimate.shell_index
    noise = noise / (1.0 + shells)
    estimate.accumulate(noise)
    from dynamight_core.deformation_model import noise_normalisation
    w = likelihood_pixel_weights(estimate.weights(), noise_normalisation(estimate))
    power = estimate.noise_power()
    # direct: 1 / sigma²(shell) inside Nyquist, doubled for the columns that stand for two
    # pixels of the full spectrum, zero outside
    expected = torch.zeros(box, box // 2 + 1, dtype=torch.float64)
    for i in range(box):
        for j in range(box // 2 + 1):
            s = int(shells[i, j])
            if s <= box // 2:
                expected[i, j] = (1.0 if j in (0, box // 2) else 2.0) / float(power[s])
    torch.testing.assert_close(w.double(), expected, rtol=2e-3, atol=0.0)


def test_kl_matches_the_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(6, 3, generator=g, dtype=torch.float64)
    a = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    precision = a @ a.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=torch.float64)
    q = torch.distributions.MultivariateNormal(mean, precision_matrix=precision)
    p = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64),
                                               torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(posterior_kl(mean, precision),
                               torch.distributions.kl_divergence(q, p))
    assert float(posterior_kl(torch.zeros(1, 3), torch.eye(3)[None])) == pytest.approx(0, abs=1e-6)
    # against a per-particle prior N(m, I / p)
    m = torch.randn(6, 3, generator=g, dtype=torch.float64)
    pp = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    prior = torch.distributions.MultivariateNormal(
        m, covariance_matrix=torch.eye(3, dtype=torch.float64) / pp[:, None, None])
    torch.testing.assert_close(posterior_kl(mean, precision, (m, pp)),
                               torch.distributions.kl_divergence(q, prior))


def test_posterior_draws_have_the_posterior_moments():
    mean = torch.tensor([[1.0, -2.0]])
    precision = torch.tensor([[[4.0, 1.5], [1.5, 2.0]]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_posterior(mean.expand(1000, 2), precision.expand(1000, 2, 2), g)
                       for _ in range(40)])
    torch.testing.assert_close(draws.mean(0), mean[0], atol=0.02, rtol=0)
    covariance = torch.cov(draws.T)
    torch.testing.assert_close(covariance, torch.linalg.inv(precision[0]), atol=0.02, rtol=0)


def test_a_step_that_raises_the_energy_is_not_taken():
    """A strongly non-linear renderer: the first full step overshoots; the code never ends up
    with a higher energy than it started with, and damped steps get down to the minimum."""
    target = torch.tensor([[1.2, -0.4]])
    shape = (BOX, BOX // 2 + 1)
    g = torch.Generator().manual_seed(3)
    basis = torch.complex(torch.randn(D, *shape, generator=g), torch.randn(D, *shape,
                                                                            generator=g))

    def render(z):  # image depends on sin(3 z): many local minima, steep
        return (torch.sin(3 * z)[:, :, None, None] * basis).sum(1)

    image = render(target)
    weights = torch.full(shape, 50.0)

    def energy(z):
        diff = render(z) - image
        return 0.5 * (weights * diff.abs() ** 2).sum((-2, -1)) + 0.5 * (z**2).sum(-1)

    start = torch.tensor([[0.9, -0.2]])
    previous = energy(start)
    for n in range(1, 8):
        z, _ = infer(render, start, image, weights, n)
        assert float(energy(z)) <= float(previous) + 1e-6
        previous = energy(z)
    assert float((z - target).norm()) < 0.05
