"""The decoder's start from the leading motion modes (dynamight_core.motion_modes).

Truth: the generalised eigenproblem on a closed-form covariance; simulated particles of the
hinged test structure with a known motion coordinate (the codes a started decoder gives must
follow it, before any training); the same particles without motion (no mode may stand out of
the noise: the phase-randomised gradients calibrate it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynamight_core.deformation_model import make_batch
from dynamight_core.fourier_grids import irfft2_centered
from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
from dynamight_core.motion_modes import (
    cluster_basis,
    default_cluster_count,
    leading_modes,
    noise_edge,
    significant_modes,
)
from dynamight_core.particles import ParticleSet, TensorImageSource
from dynamight_core.quality_scores import knn_r2
from dynamight_core.simulation import (
    consensus_map,
    noise_sigma_for_snr,
    plan_simulation,
    simulate_images,
)
from dynamight_core.synthetic_structure import hinged_structure

BOX, PIXEL, N_PARTICLES, N_GAUSSIANS, SNR = 32, 6.0, 800, 300, 0.05
CPU = torch.device("cpu")


def _dataset(moving: bool):
    structure = hinged_structure(n_gaussians=400, seed=2)
    plan = plan_simulation(N_PARTICLES, seed=2,
                           motion_values=None if moving else torch.zeros(1))
    moving_plan = plan_simulation(N_PARTICLES, seed=2)
    sigma = noise_sigma_for_snr(structure, moving_plan, BOX, PIXEL, SNR)
    plan = replace(plan, noise_sigma=sigma)
    images = torch.cat([im for _, im in simulate_images(structure, plan, BOX, PIXEL, seed=2)])
    particles = ParticleSet(images=TensorImageSource(images), rotations=plan.rotations.float(),
                            shifts_angstrom=plan.shifts_angstrom.float(), ctf=plan.ctf,
                            half_set=plan.half_set, pixel_size=PIXEL, box_size=BOX)
    gaussians, _ = init_gaussians_from_map(consensus_map(structure, BOX, PIXEL), PIXEL,
                                           N_GAUSSIANS, generator=torch.Generator().manual_seed(0))
    return particles, gaussians, moving_plan.motion.numpy()


def _started_trainer(particles, gaussians):
    config = TrainerConfig(box_size=BOX, pixel_size=PIXEL, n_gaussians=N_GAUSSIANS,
                           latent_dim=2, decoder_start="motion-modes", seed=1)
    train = np.flatnonzero(particles.half_set.numpy() == 1)
    trainer = HalfSetTrainer(1, config, gaussians, train, CPU)
    trainer.initialise_noise([make_batch(particles, train[:200], CPU)])

    def passes():
        return (make_batch(particles, train[s:s + 100], CPU) for s in range(0, len(train), 100))

    assert trainer.needs_decoder_start
    summary = trainer.start_decoder_from_modes(passes(), passes())
    return trainer, train, summary


@pytest.fixture(scope="module")
def moving():
    return _dataset(True)


def test_leading_modes_solve_the_generalised_eigenproblem():
    g = torch.Generator().manual_seed(0)
    dim = 18
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    noise = a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    signal = noise + 4.0 * torch.outer(noise @ u, noise @ u) / (u @ noise @ u)
    count = 1000.0
    mean = torch.randn(dim, generator=g, dtype=torch.float64)  # centring removes it
    sums = {"data_outer": (signal + torch.outer(mean, mean)) * count,
            "noise_outer": noise * count, "data_sum": mean * count,
            "noise_sum": torch.zeros(dim, dtype=torch.float64)}
    vectors, values = leading_modes(sums, count, 2)
    # C u = (1 + 4) C_noise u: the leading generalised eigenvalue is 5, the rest 1
    assert values[0].item() == pytest.approx(5.0, rel=1e-5)
    assert values[1].item() == pytest.approx(1.0, abs=1e-5)
    cosine = torch.nn.functional.cosine_similarity(vectors[:, 0], u, dim=0).abs()
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)


def test_a_further_mode_starts_a_latent_dimension_only_above_the_noise():
    edge = 2.0
    # the leading mode always; further ones only above 1.1 times the edge
    assert significant_modes([1.5, 1.9], edge) == [True, False]
    assert significant_modes([5.0, 2.3, 2.1, 3.0], edge) == [True, True, False, True]
    assert significant_modes([5.0, 2.3], edge, factor=1.2) == [True, False]


def test_cluster_basis_rows_are_soft_assignments_of_the_movable_gaussians():
    positions = torch.randn(200, 3, generator=torch.Generator().manual_seed(1)) * 20
    movable = positions[:, 0] > 0
    basis, centres = cluster_basis(positions, 12, movable, torch.Generator().manual_seed(2))
    assert basis.shape == (200, 12) and centres.shape == (12, 3)
    assert torch.allclose(basis[movable].sum(1), torch.ones(int(movable.sum())), atol=1e-5)
    assert (basis[~movable] == 0).all()
    assert (centres[:, 0] > 0).all()  # centres of the movable Gaussians only
    assert default_cluster_count(2700) == 50
    assert default_cluster_count(100) == 16 and default_cluster_count(10**6) == 200


def test_started_decoder_gives_codes_that_follow_the_motion_before_any_training(moving):
    particles, gaussians, motion = moving
    trainer, train, summary = _started_trainer(particles, gaussians)
    print(summary)
    # the leading mode stands out of the noise; the decoder reproduces the modes
    assert summary["eigenvalues"][0] > 2 * summary["noise_edge"][0]
    assert summary["fit_error"][0] < 0.2
    # the stored codes start at the posterior means along the modes
    codes = trainer.stored_latents(train).numpy()
    # a dimension whose mode is within the noise starts nowhere: codes and decoder output 0
    started = significant_modes(summary["eigenvalues"], summary["noise_edge"][0])
    assert summary["started"] == [float(k) for k in started]
    with torch.no_grad():
        unit = torch.eye(2)
        moved = trainer.model.displacements(unit).norm(dim=-1).mean(dim=-1)  # (2,) Å
    assert started == [True, True]  # both stand out here (5.98 for an edge of 2.81)
    assert (moved > 0.1).all() and (np.abs(codes).max(0) > 0.1).all()
    r2 = knn_r2(codes, motion[train])
    print("kNN R² of the motion from the started codes", r2)
    assert r2 > 0.6


def test_without_motion_or_model_error_no_mode_stands_out_of_the_noise(moving):
    """Images that are the Gaussian model's own projections plus white noise: the
    phase-randomised gradients must then account for the whole covariance, so the leading
    eigenvalue stays below the edge of two noise covariances' ratio (:func:`noise_edge`).
    Model error (a consensus that does not match the particles in every view) is not noise and
    does stand out: with the simulated structure's images and no motion the leading eigenvalue
    is about 8 here (10 with the motion); on the benchmark's larger datasets, where the Gaussian
    model fits better, 2.0 without motion for an edge of 1.95, 2.2-5.7 with it."""
    particles, gaussians, _ = moving
    config = TrainerConfig(box_size=BOX, pixel_size=PIXEL, n_gaussians=N_GAUSSIANS,
                           latent_dim=2, decoder_start="motion-modes", seed=1)
    everyone = np.arange(len(particles))
    model = HalfSetTrainer(1, config, gaussians, everyone, CPU).model
    with torch.no_grad():
        clean = torch.cat([irfft2_centered(model.render(
            model.gaussians.positions, make_batch(particles, everyone[s:s + 100], CPU)), BOX)
            for s in range(0, len(everyone), 100)])
    noisy = clean + clean.std() * 4.0 * torch.randn(clean.shape,
                                                    generator=torch.Generator().manual_seed(4))
    exact = replace(particles, images=TensorImageSource(noisy))
    trainer, train, summary = _started_trainer(exact, gaussians)
    print(summary)
    edge = noise_edge(3 * int(summary["clusters"][0]), len(train))
    assert summary["noise_edge"][0] == pytest.approx(edge, abs=1e-3)
    assert summary["eigenvalues"][0] < edge
    # the second mode (noise) starts no latent dimension: its codes and decoder output are 0
    assert summary["started"] == [1.0, 0.0]
    assert (trainer.stored_latents(train)[:, 1] == 0).all()
    with torch.no_grad():
        moved = trainer.model.displacements(torch.eye(2)).norm(dim=-1).mean(dim=-1)
    # (fitted to zero as well as the decoder fits the modes: relative error 0.33 after the
    # 400 fit steps of this small set; measured 0.19 Å against 1.36 Å along the first)
    assert moved[1] < 0.25 * moved[0]
    # and no data ever reaches its code: training keeps it at 0, a checkpoint keeps it unused
    assert trainer.active_dims.tolist() == [True, False]
    # its Jacobian is not rendered: a step gives the codes of the full Jacobian, masked (to
    # float32 rounding: the sums over 2 h w pixels are blocked differently for 1 and 2 rows,
    # measured up to 4e-5 relative; over several steps a rounding can flip a damped step's
    # acceptance, so one step; a wrong or missing row would differ at order 1)
    batch = make_batch(exact, train[:50], CPU)
    reduced = trainer.infer(batch, 1, store=False)
    trainer._jacobian_dims = None
    full = trainer.infer(batch, 1, store=False)
    trainer.active_dims = trainer.active_dims  # the reduced Jacobian again
    torch.testing.assert_close(reduced[0], full[0], rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(reduced[1], full[1], rtol=2e-4, atol=1e-4)
    trainer.train_epoch([make_batch(exact, train[s:s + 100], CPU)
                         for s in range(0, len(train), 100)])
    assert (trainer.stored_latents(train)[:, 1] == 0).all()
    assert (trainer.stored_latents(train)[:, 0] != 0).any()
    restored = HalfSetTrainer.from_state_dict(trainer.state_dict(), CPU)
    assert restored.active_dims.tolist() == [True, False]
    assert restored._jacobian_dims.tolist() == [0]  # no render for the unused one
