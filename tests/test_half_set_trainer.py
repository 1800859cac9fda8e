"""Half-set trainers: the training objective term by term against independent computations,
which parameters train in which phase, the latent codes, the anchored consensus update,
independence of the halves by value, validation hold-out, checkpoints and exact resumption."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynamight_core.checkpoint import load_checkpoint, save_checkpoint
from dynamight_core.deformation_model import make_batch, negative_log_likelihood, split_validation
from dynamight_core.fourier_grids import irfft2_centered, rfft2_centered
from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.gaussian_projection import render_gaussians_3d
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
from dynamight_core.latent_inference import likelihood_pixel_weights
from dynamight_core.map_projection import project_map, simulate_particle_images
from dynamight_core.particles import ParticleSet, TensorImageSource
from dynamight_core.regularization import (
    build_neighbour_graph,
    distance_preservation_loss,
    mean_neighbour_distance,
)
from dynamight_core.shift import apply_relion_origin_rfft
from dynamight_core.simulation import (
    consensus_map,
    noise_sigma_for_snr,
    plan_simulation,
    simulate_images,
)
from dynamight_core.synthetic_structure import hinged_structure

BOX, PIXEL, N_PARTICLES, N_GAUSSIANS, BATCH = 24, 8.0, 96, 150, 16
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset():
    structure = hinged_structure(n_gaussians=200, seed=1)
    plan = plan_simulation(N_PARTICLES, seed=1)
    plan = replace(plan, noise_sigma=noise_sigma_for_snr(structure, plan, BOX, PIXEL, 1.0))
    images = torch.cat([im for _, im in simulate_images(structure, plan, BOX, PIXEL, seed=1)])
    particles = ParticleSet(images=TensorImageSource(images), rotations=plan.rotations.float(),
                            shifts_angstrom=plan.shifts_angstrom.float(), ctf=plan.ctf,
                            half_set=plan.half_set, pixel_size=PIXEL, box_size=BOX)
    gaussians, _ = init_gaussians_from_map(consensus_map(structure, BOX, PIXEL), PIXEL,
                                           N_GAUSSIANS, generator=torch.Generator().manual_seed(0))
    return particles, gaussians


def make_trainers(dataset, validation, **overrides):
    particles, gaussians = dataset
    trainers = {}
    settings = {"n_warmup_epochs": 1, "consensus_update_interval": 2, "seed": 3}
    settings.update(overrides)
    for half in (1, 2):
        config = TrainerConfig(box_size=BOX, pixel_size=PIXEL, n_gaussians=N_GAUSSIANS,
                               **settings)
        members = particles.half_set.numpy() == half
        train = np.flatnonzero(members & ~validation.numpy())
        held = np.flatnonzero(members & validation.numpy())
        trainers[half] = HalfSetTrainer(half, config, gaussians, train, CPU,
                                        validation_indices=held)
        trainers[half].initialise_noise([make_batch(particles, train[:32], CPU)])
    return trainers


def no_validation():
    return torch.zeros(N_PARTICLES, dtype=torch.bool)


def batches(particles, order, seen=None):
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        if seen is not None:
            seen.update(idx.tolist())
        yield make_batch(particles, idx, CPU)


def run_epochs(trainers, particles, n):
    return [{h: t.train_epoch(batches(particles, t.epoch_order())) for h, t in trainers.items()}
            for _ in range(n)]


def moving_decoder(trainer, seed=3, scale=0.3):
    """Give the decoder random weights, so that it moves things (a fresh one returns zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.decoder.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


# -- the forward model and the objective, term by term -------------------------------------------


def test_zero_decoder_gives_the_consensus_projection(dataset):
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation())[1]
    batch = make_batch(particles, np.arange(8), CPU)
    with torch.no_grad():
        deformed = trainer.model(batch, torch.randn(8, 2))
        rigid = trainer.model(batch)
    assert torch.count_nonzero(deformed["displacements"]) == 0
    torch.testing.assert_close(deformed["model_rfft"], rigid["model_rfft"])


def test_model_images_are_projections_of_the_rendered_map_with_ctf_and_shift(dataset):
    """The training model's image (Gaussians splatted in 2D, × CTF, moved by -rlnOrigin)
    against an independent path: the Gaussians rendered as a 3D map, projected by
    torch-fourier-slice, × CTF, shifted (the path checked against relion_project)."""
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation())[1]
    g = trainer.model.gaussians
    idx = np.arange(12)
    batch = make_batch(particles, idx, CPU)
    with torch.no_grad():
        model = torch.fft.fftshift(torch.fft.irfft2(trainer.model(batch)["model_rfft"],
                                                    s=(BOX, BOX)), dim=(-2, -1))
        volume = render_gaussians_3d(g.positions, torch.exp(g.log_sigmas), g.masses(),
                                     g.class_index, BOX, PIXEL)
        reference = simulate_particle_images(volume, particles.rotations[idx],
                                             particles.shifts_angstrom[idx],
                                             particles.ctf.subset(idx), PIXEL)
    for m, r in zip(model, reference):
        corr = float((m * r).sum() / (m.norm() * r.norm()))
        assert corr > 0.99, corr
        assert float(m.norm() / r.norm()) == pytest.approx(1.0, abs=0.05)
    # the same projection without the CTF, or shifted the other way, is clearly different
    with torch.no_grad():
        f = rfft2_centered(project_map(volume, particles.rotations[idx]))
        no_ctf = irfft2_centered(apply_relion_origin_rfft(
            f, particles.shifts_angstrom[idx], PIXEL, BOX), BOX)
        reversed_shift = simulate_particle_images(volume, particles.rotations[idx],
                                                  -particles.shifts_angstrom[idx],
                                                  particles.ctf.subset(idx), PIXEL)
    for other in (no_ctf, reversed_shift):
        corr = (model * other).sum((-2, -1)) / (model.norm(dim=(-2, -1))
                                                * other.norm(dim=(-2, -1)))
        assert float(corr.median()) < 0.9


def test_data_term_is_the_gaussian_log_likelihood_of_the_full_spectrum(dataset):
    """negative_log_likelihood against a direct formula on the full (not half) 2D FFT:
    ½ Σ_k |FFT(model - image)_k|² / σ²(shell(k)) over shells 0..box/2."""
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation())[1]
    batch = make_batch(particles, np.arange(6), CPU)
    with torch.no_grad():
        out = trainer.model(batch)
        nll, _ = negative_log_likelihood(out["model_rfft"], out["image_rfft"],
                                         trainer.noise_weights, trainer.noise_norm)
    power = trainer.noise.noise_power().numpy()
    model = np.fft.fftshift(np.fft.irfft2(out["model_rfft"].numpy(), s=(BOX, BOX)),
                            axes=(-2, -1))  # the model image in real space, centred
    diff = np.fft.fft2(np.fft.ifftshift(model - batch.images.numpy(), axes=(-2, -1)))
    k = np.fft.fftfreq(BOX) * BOX
    shell = np.floor(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2) + 0.5).astype(int)
    inside = shell <= BOX // 2
    floor = 1e-3 * power[: BOX // 2 + 1].max()
    sigma2 = np.maximum(power, floor)[np.minimum(shell, len(power) - 1)]
    direct = 0.5 * (np.abs(diff) ** 2 / sigma2 * inside).sum(axis=(-2, -1))
    np.testing.assert_allclose(nll.numpy(), direct, rtol=1e-3)


def test_pixel_weights_of_the_inference_are_the_likelihoods(dataset):
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation())[1]
    batch = make_batch(particles, np.arange(4), CPU)
    with torch.no_grad():
        out = trainer.model(batch)
        nll, _ = negative_log_likelihood(out["model_rfft"], out["image_rfft"],
                                         trainer.noise_weights, trainer.noise_norm)
        diff = out["model_rfft"] - out["image_rfft"]
        direct = 0.5 * (trainer.pixel_weights * diff.abs() ** 2).sum((-2, -1))
    torch.testing.assert_close(nll, direct, rtol=1e-4, atol=0)
    torch.testing.assert_close(trainer.pixel_weights,
                               likelihood_pixel_weights(trainer.noise_weights,
                                                        trainer.noise_norm))


def test_inferred_codes_minimise_likelihood_plus_prior(dataset):
    """After inference, E(z) = NLL(z) / beta + ½|z|² is at a minimum: no small step lowers
    it."""
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation(), inference_steps=20)[1]
    moving_decoder(trainer, scale=0.15)
    batch = make_batch(particles, np.arange(8), CPU)
    with torch.no_grad():
        z, _ = trainer.infer(batch, 20, store=False)

        def energy(codes):
            out = trainer.model(batch, codes)
            diff = out["model_rfft"] - out["image_rfft"]
            nll = 0.5 * (trainer.pixel_weights * diff.abs() ** 2).sum((-2, -1))
            return nll / trainer.config.beta + 0.5 * (codes**2).sum(-1)

        e0 = energy(z)
        for direction in ([1, 0], [0, 1], [1, 1], [1, -1]):
            step = 0.05 * torch.tensor(direction, dtype=torch.float32)
            assert bool((energy(z + step) >= e0 - 1e-3 * e0.abs()).all())
            assert bool((energy(z - step) >= e0 - 1e-3 * e0.abs()).all())
        # and the prior matters: far from 0 the energy is higher even where the image is flat
        assert bool((energy(z) < energy(z + 3.0)).all())


def test_regulariser_is_part_of_the_training_objective(dataset):
    """Same data, same seeds: with the regulariser on, the learnt deformations keep the
    neighbour distances of the consensus better than with it off (factor 0)."""
    particles, _ = dataset
    validation = no_validation()
    results = {}
    for factor in (0.0, 3.0):
        trainers = make_trainers(dataset, validation, regularization_factor=factor,
                                 n_warmup_epochs=0, consensus_update_interval=0,
                                 learning_rate=3e-3)
        t = trainers[1]
        run_epochs({1: t}, particles, 3)
        assert (t.regularization_weight > 0) == (factor > 0)
        codes = t.stored_latents(t.train_indices)
        with torch.no_grad():
            deformed = t.model.gaussians.positions[None] + t.model.displacements(codes)
            results[factor] = float(distance_preservation_loss(deformed, t._edges,
                                                               t._rest_lengths).mean())
    assert results[3.0] < 0.5 * results[0.0], results


@pytest.mark.parametrize("rule", ["gradient-ratio", "signal-ratio"])
def test_lambda_terms_are_running_averages_over_epochs(dataset, monkeypatch, rule):
    """With ``lambda_smoothing`` w, each epoch's λ is ``factor sqrt(s) / r`` of the running
    averages ``(s, r) <- w (s, r) + (1 - w) (new terms)`` of the terms each epoch's first batch
    gives (recorded here as the trainer computes them); without it, of the new terms alone."""
    import dynamight_core.half_set_trainer as module

    particles, _ = dataset
    for w in (0.0, 0.6):
        recorded = []
        for name in ("gradient_ratio_terms", "signal_ratio_terms"):
            original = getattr(module, name)

            def record(*args, _original=original, _recorded=recorded, **kwargs):
                _recorded.append(_original(*args, **kwargs))
                return _recorded[-1]

            monkeypatch.setattr(module, name, record)
        t = make_trainers(dataset, no_validation(), lambda_smoothing=w, regularization_rule=rule,
                          regularization_factor=2.0, n_warmup_epochs=0)[1]
        average = None
        for _ in range(3):
            t.train_epoch(batches(particles, t.epoch_order()))
            assert len(recorded) == 1, "one estimate per epoch"
            new = recorded.pop()
            assert new[1] > 0
            average = new if average is None else tuple(
                w * a + (1 - w) * b for a, b in zip(average, new, strict=True))
            expected = 2.0 * max(average[0], 0.0) ** 0.5 / average[1]
            assert t.regularization_weight == pytest.approx(expected, rel=1e-12)
        monkeypatch.undo()


# -- which parameters train when ------------------------------------------------------------


def test_warmup_trains_gaussians_only_and_joint_epochs_the_decoder_too(dataset):
    particles, _ = dataset
    t = make_trainers(dataset, no_validation(), consensus_update_interval=0)[1]
    g, decoder = t.model.gaussians, t.model.decoder

    def snapshot():
        return ({k: v.detach().clone() for k, v in g.state_dict().items()},
                {k: v.detach().clone() for k, v in decoder.state_dict().items()},
                t.latents.clone())

    g0, d0, z0 = snapshot()
    t.train_epoch(batches(particles, t.epoch_order()))  # warm-up
    g1, d1, z1 = snapshot()
    assert all(torch.equal(d0[k], d1[k]) for k in d0)  # decoder untouched
    assert torch.equal(z0, z1)  # no codes
    for name in ("positions", "log_sigmas", "amplitudes"):
        assert not torch.equal(g0[name], g1[name]), name
    t.train_epoch(batches(particles, t.epoch_order()))  # joint (no consensus update here)
    g2, d2, z2 = snapshot()
    for name in ("positions", "log_sigmas", "amplitudes"):
        assert not torch.equal(g1[name], g2[name]), name
    assert not torch.equal(z1, z2)
    changed = [k for k in d1 if not torch.equal(d1[k], d2[k])]
    assert "output_layer.weight" in changed and "latent_layer.weight" in changed, changed


def test_codes_are_stored_for_known_particles_and_inferred_for_others(dataset):
    particles, _ = dataset
    validation = split_validation(particles.half_set, 0.2, seed=5)
    trainers = make_trainers(dataset, validation, n_warmup_epochs=0)
    run_epochs(trainers, particles, 3)
    t1, t2 = trainers[1], trainers[2]
    own = np.flatnonzero(particles.half_set.numpy() == 1)
    other = np.flatnonzero(particles.half_set.numpy() == 2)[:8]
    np.testing.assert_array_equal(t1.known_indices, own)  # training + own validation
    assert float(t1.latents.abs().sum()) > 0  # the codes moved away from the prior mean
    batch = make_batch(particles, own[:8], CPU)
    torch.testing.assert_close(t1.latents_for(batch), t1.stored_latents(own[:8]))
    before = t1.latents.clone()
    foreign = make_batch(particles, other, CPU)
    inferred = t1.latents_for(foreign)
    assert torch.equal(before, t1.latents)  # nothing stored for the other half's particles
    assert torch.isfinite(inferred).all() and float(inferred.abs().sum()) > 0
    with pytest.raises(KeyError):
        t1.stored_latents(other)
    assert not torch.allclose(t2.latents_for(foreign), inferred)  # half 2 has its own codes


def test_final_codes_are_kept_apart_from_the_training_state(dataset):
    particles, _ = dataset
    trainers = make_trainers(dataset, no_validation(), n_warmup_epochs=0)
    run_epochs(trainers, particles, 2)
    t = trainers[1]
    own = t.known_indices
    training_codes = t.latents.clone()
    t.finalise_latents(batches(particles, own))
    assert torch.equal(t.latents, training_codes)  # training could continue exactly
    final = t.stored_latents(own)
    assert not torch.equal(final, training_codes)  # refined under the final model
    torch.testing.assert_close(t.latents_for(make_batch(particles, own[:5], CPU)), final[:5])
    restored = HalfSetTrainer.from_state_dict(t.state_dict(), CPU)
    torch.testing.assert_close(restored.stored_latents(own), final)
    t.train_epoch(batches(particles, t.epoch_order()))  # the model changes: finals dropped
    assert t.final_latents is None


def test_neighbour_graph_keeps_the_starting_models_edges_with_the_consensus_rest_lengths(
        dataset):
    """The consensus drifts during training; each epoch the regulariser's edges stay those of
    the starting model (a rebuilt graph would gain edges across a moving interface, whose
    length the motion changes), and its rest lengths are the current consensus's."""
    particles, _ = dataset
    t = make_trainers(dataset, no_validation(), n_warmup_epochs=0,
                      consensus_update_interval=0)[1]
    initial_edges, _ = build_neighbour_graph(t.initial_positions)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a drift that changes which pairs are within the cutoff
        t.model.gaussians.positions.add_(
            0.3 * mean_neighbour_distance(t.initial_positions)
            * torch.randn(t.initial_positions.shape, generator=generator))
    rebuilt, _ = build_neighbour_graph(t.model.gaussians.positions.detach())
    assert rebuilt.shape != initial_edges.shape or not torch.equal(rebuilt, initial_edges)
    consensus = t.model.gaussians.positions.detach().clone()
    t.train_epoch(batches(particles, t.epoch_order()))
    assert torch.equal(t._edges, initial_edges)
    lengths = (consensus[initial_edges[:, 0]] - consensus[initial_edges[:, 1]]).norm(dim=-1)
    torch.testing.assert_close(t._rest_lengths, lengths)


def test_consensus_update_is_anchored_to_the_initial_model(dataset):
    """The consensus drifted by s from the common initial model; particles whose deformed
    models lie closest to the *initial* model (d = -s) pull it back, not those closest to the
    current consensus (d = 0)."""
    t = make_trainers(dataset, no_validation(), consensus_update_fraction=0.25)[1]
    s = torch.tensor([1.5, -0.5, 0.25])
    with torch.no_grad():
        t.model.gaussians.positions.add_(s)
    # decoder stand-in: code c moves every Gaussian by -c · s
    t.model.displacements = lambda z: -z[:, :1, None] * s
    codes = torch.zeros(40, 2)
    codes[:10, 0] = 1.0  # these particles show the initial model
    codes[10:20, 0] = 0.5
    moved = t.update_consensus(codes)
    torch.testing.assert_close(t.model.gaussians.positions, t.initial_positions)
    assert moved == pytest.approx(float(s.norm()), rel=1e-5)


# -- independence of the halves, validation, checkpoints --------------------------------------


def test_halves_share_no_tensors_and_learn_different_models(dataset):
    particles, _ = dataset
    trainers = make_trainers(dataset, no_validation(), n_warmup_epochs=0)
    pointers = [{t.data_ptr() for t in (*tr.model.parameters(), *tr.model.buffers(),
                                        tr.latents)}
                for tr in trainers.values()]
    assert pointers[0] and not pointers[0] & pointers[1]
    p1, p2 = (tr.model.gaussians.positions for tr in trainers.values())
    torch.testing.assert_close(p1, p2)  # same starting conformation
    run_epochs(trainers, particles, 2)
    for (name, a), (_, b) in zip(trainers[1].model.decoder.named_parameters(),
                                 trainers[2].model.decoder.named_parameters()):
        assert not torch.allclose(a, b), name  # trained on different particles


def test_validation_particles_never_reach_training(dataset):
    particles, _ = dataset
    validation = split_validation(particles.half_set, 0.2, seed=5)
    for half in (1, 2):  # drawn from each half
        in_half = particles.half_set == half
        assert int((validation & in_half).sum()) == round(0.2 * int(in_half.sum()))
    trainers = make_trainers(dataset, validation)
    for half, t in trainers.items():  # each half trains on its own non-validation particles
        assert set(t.train_indices.tolist()) == set(np.flatnonzero(
            (particles.half_set.numpy() == half) & ~validation.numpy()).tolist())
    seen: set[int] = set()
    for _ in range(2):
        for t in trainers.values():
            t.train_epoch(batches(particles, t.epoch_order(), seen))
    held = set(np.flatnonzero(validation.numpy()).tolist())
    assert seen and not seen & held
    assert seen | held == set(range(N_PARTICLES))


def test_resumed_training_matches_uninterrupted(dataset, tmp_path):
    particles, _ = dataset
    validation = split_validation(particles.half_set, 0.1, seed=0)
    # with λ's running average, which the checkpoint must carry on
    straight = run_epochs(make_trainers(dataset, validation, lambda_smoothing=0.5), particles, 4)

    first = make_trainers(dataset, validation, lambda_smoothing=0.5)
    run_epochs(first, particles, 2)
    path = tmp_path / "002.pth"
    save_checkpoint(path, {"epoch": 2, "halves": {str(h): t.state_dict()
                                                  for h, t in first.items()}})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 2
    state = load_checkpoint(path)
    resumed = {int(h): HalfSetTrainer.from_state_dict(s, CPU)
               for h, s in state["halves"].items()}
    for h in (1, 2):  # each half gets its own state back, by value
        assert resumed[h].half == h and resumed[h].epoch == 2
        for (name, a), (_, b) in zip(first[h].model.state_dict().items(),
                                     resumed[h].model.state_dict().items()):
            assert torch.equal(a, b), (h, name)
        assert torch.equal(first[h].latents, resumed[h].latents)
        np.testing.assert_array_equal(first[h].train_indices, resumed[h].train_indices)
    assert not torch.equal(resumed[1].model.decoder.output_layer.weight,
                           resumed[2].model.decoder.output_layer.weight)
    continued = run_epochs(resumed, particles, 2)
    for a, b in zip(straight[2:], continued):
        for h in (1, 2):
            for key in ("data", "mse", "kl", "reg", "regularization_weight"):
                assert b[h][key] == pytest.approx(a[h][key], rel=1e-5, abs=1e-8), (h, key)


def test_checkpoint_state_holds_nothing_redundant_and_version_2_still_loads(dataset):
    particles, _ = dataset
    validation = split_validation(particles.half_set, 0.2, seed=1)
    t = make_trainers(dataset, validation, n_warmup_epochs=0)[1]
    run_epochs({1: t}, particles, 1)
    state = t.state_dict()
    assert "latent_precision" not in state and "train_indices" not in state
    assert state["known_indices"].dtype == torch.int32 and state["is_training"].dtype == torch.bool
    assert state["gaussians"]["class_index"].dtype == torch.int16
    n, d = t.latents.shape
    version_2 = {**state, "known_indices": torch.from_numpy(t.known_indices),
                 "train_indices": torch.from_numpy(t.train_indices),
                 "latent_precision": torch.eye(d).repeat(n, 1, 1),
                 "gaussians": {**state["gaussians"],
                               "class_index": t.model.gaussians.class_index.clone()}}
    del version_2["is_training"]
    for saved in (state, version_2):
        restored = HalfSetTrainer.from_state_dict(saved, CPU)
        np.testing.assert_array_equal(restored.train_indices, t.train_indices)
        np.testing.assert_array_equal(restored.known_indices, t.known_indices)
        assert restored.known_indices.dtype == np.int64
        g = restored.model.gaussians.class_index
        assert g.dtype == torch.long and torch.equal(g, t.model.gaussians.class_index)
        assert torch.equal(restored.latents, t.latents)


def test_checkpoint_of_the_encoder_version_is_refused_clearly(dataset):
    t = make_trainers(dataset, no_validation())[1]
    state = t.state_dict()
    del state["latents"]
    with pytest.raises(ValueError, match="earlier version"):
        HalfSetTrainer.from_state_dict(state, CPU)


def test_bfloat16_decoder_gives_float32_displacements_within_a_percent(dataset):
    trainer = make_trainers(dataset, no_validation())[1]
    decoder = trainer.model.decoder
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # hidden layers as initialised, an output layer that moves things
        decoder.output_layer.weight.copy_(
            0.3 * torch.randn(decoder.output_layer.weight.shape, generator=g))
    z = torch.randn(8, decoder.latent_dim, generator=g)
    with torch.no_grad():
        exact = trainer.model.displacements(z)
        trainer.model.decoder_dtype = torch.bfloat16
        fast = trainer.model.displacements(z)
        # an explicit precision overrides the training one
        forced = trainer.model.displacements(z, torch.float32)
    assert fast.dtype == torch.float32
    assert float(exact.abs().max()) > 1.0  # Å: a real deformation
    rel = (fast - exact).norm() / exact.norm()
    assert 0 < rel < 0.01, float(rel)
    torch.testing.assert_close(forced, exact)


def test_model_images_use_the_batch_images_spectrum(dataset):
    particles, _ = dataset
    trainer = make_trainers(dataset, no_validation())[1]
    batch = make_batch(particles, np.arange(3), CPU)
    torch.testing.assert_close(trainer.model(batch)["image_rfft"], rfft2_centered(batch.images))
