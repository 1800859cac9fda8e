"""Half-set trainers: forward model at zero deformation, independence, validation hold-out,
checkpoints and exact resumption."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynamight_core.checkpoint import load_checkpoint, save_checkpoint
from dynamight_core.deformation_model import make_batch, split_validation
from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
from dynamight_core.particles import ParticleSet, TensorImageSource
from dynamight_core.simulation import (
    consensus_map, noise_sigma_for_snr, plan_simulation, simulate_images)
from dynamight_core.synthetic_structure import hinged_structure

BOX, PIXEL, N_PARTICLES, N_GAUSSIANS, BATCH = 24, 8.0, 96, 150, 16


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
    for half in (1, 2):
        config = TrainerConfig(box_size=BOX, pixel_size=PIXEL, n_gaussians=N_GAUSSIANS,
                               n_encoder_neurons=32, n_encoder_layers=2, n_warmup_epochs=1,
                               consensus_update_interval=2, seed=3, **overrides)
        train = np.flatnonzero((particles.half_set.numpy() == half) & ~validation.numpy())
        trainers[half] = HalfSetTrainer(half, config, gaussians, train, torch.device("cpu"))
        trainers[half].initialise_noise([make_batch(particles, train[:32], torch.device("cpu"))])
    return trainers


def batches(particles, order, seen=None):
    for start in range(0, len(order), BATCH):
        idx = order[start:start + BATCH]
        if seen is not None:
            seen.update(idx.tolist())
        yield make_batch(particles, idx, torch.device("cpu"))


def run_epochs(trainers, particles, n):
    return [{h: t.train_epoch(batches(particles, t.epoch_order())) for h, t in trainers.items()}
            for _ in range(n)]


def test_zero_decoder_gives_the_consensus_projection(dataset):
    particles, _ = dataset
    trainer = make_trainers(dataset, torch.zeros(N_PARTICLES, dtype=torch.bool))[1]
    batch = make_batch(particles, np.arange(8), torch.device("cpu"))
    with torch.no_grad():
        deformed = trainer.model(batch, deform=True, generator=trainer.sample_generator)
        rigid = trainer.model(batch, deform=False)
    assert torch.count_nonzero(deformed["displacements"]) == 0
    torch.testing.assert_close(deformed["model_rfft"], rigid["model_rfft"])


def test_halves_share_no_tensors(dataset):
    trainers = make_trainers(dataset, torch.zeros(N_PARTICLES, dtype=torch.bool))
    pointers = [{t.data_ptr() for t in (*tr.model.parameters(), *tr.model.buffers())}
                for tr in trainers.values()]
    assert pointers[0] and not pointers[0] & pointers[1]
    p1, p2 = (tr.model.gaussians.positions for tr in trainers.values())
    torch.testing.assert_close(p1, p2)  # same starting conformation


def test_validation_particles_never_reach_training(dataset):
    particles, _ = dataset
    validation = split_validation(particles.half_set, 0.2, seed=5)
    for half in (1, 2):  # drawn from each half
        in_half = particles.half_set == half
        assert int((validation & in_half).sum()) == round(0.2 * int(in_half.sum()))
    trainers = make_trainers(dataset, validation)
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
    straight = run_epochs(make_trainers(dataset, validation), particles, 4)

    first = make_trainers(dataset, validation)
    run_epochs(first, particles, 2)
    path = tmp_path / "002.pth"
    save_checkpoint(path, {"epoch": 2, "halves": {str(h): t.state_dict()
                                                  for h, t in first.items()}})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 2
    state = load_checkpoint(path)
    resumed = {int(h): HalfSetTrainer.from_state_dict(s, torch.device("cpu"))
               for h, s in state["halves"].items()}
    assert resumed[1].epoch == 2
    continued = run_epochs(resumed, particles, 2)
    for a, b in zip(straight[2:], continued):
        for h in (1, 2):
            for key in ("data", "mse", "kl", "reg", "regularization_weight"):
                assert b[h][key] == pytest.approx(a[h][key], rel=1e-5, abs=1e-8), (h, key)


def test_bfloat16_decoder_gives_float32_displacements_within_a_percent(dataset):
    trainer = make_trainers(dataset, torch.zeros(N_PARTICLES, dtype=torch.bool))[1]
    decoder = trainer.model.decoder
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a decoder that moves things (a fresh one returns exact zeros)
        for p in decoder.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    z = torch.randn(8, decoder.latent_dim, generator=g)
    with torch.no_grad():
        exact = trainer.model.displacements(z)
        trainer.model.decoder_dtype = torch.bfloat16
        fast = trainer.model.displacements(z)
    assert fast.dtype == torch.float32
    rel = (fast - exact).norm() / exact.norm()
    assert 0 < rel < 0.01, float(rel)
