"""No read-backs from the device inside the batch loops (issue 11).

On a GPU every ``float(t)``, ``t.item()``, ``bool(t)``, ``nonzero`` or indexing with a boolean
mask waits for the device to drain, so the host cannot queue the next batch's work. These tests
count those operations (``benchmarks/count_host_syncs.py``'s dispatch mode) in a training epoch of
one batch and of three, with a movable mask (the ``--mask-file`` case), in the held-out
evaluation and the code lookup of the backprojection (known and new particles), and in the
deformed and rigid backprojection of a batch: a later batch must add none. Per-epoch reads (λ, the noise
spectrum) are in both epochs and cancel; Adam's reads of its step counters are host tensors on a
GPU too and are left out. Run on the CPU: the operations are the same on both devices.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from count_host_syncs import _Counter

from dynamight_core.deformation_model import make_batch
from dynamight_core.deformed_backprojection import DeformedBackprojector
from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
from dynamight_core.particles import CTFParams, ParticleSet, TensorImageSource
from dynamight_core.reconstruction import FourierAccumulator
from dynamight_core.rotation import random_rotations
from dynamight_core.simulation import consensus_map, plan_simulation, simulate_images
from dynamight_core.synthetic_structure import hinged_structure

BOX, PIXEL, BATCH = 24, 8.0, 16
CPU = torch.device("cpu")


def _reads(run) -> collections.Counter:
    counter = _Counter()
    with counter:
        run()
    return collections.Counter({site: n for site, n in counter.sites.items()
                                if site[1] != "torch (optimiser)"})


def test_training_evaluation_and_code_batches_read_nothing_back():
    structure = hinged_structure(n_gaussians=200, seed=1)
    plan = plan_simulation(4 * BATCH, seed=1)
    images = torch.cat([im for _, im in simulate_images(structure, plan, BOX, PIXEL, seed=1)])
    particles = ParticleSet(images=TensorImageSource(images), rotations=plan.rotations.float(),
                            shifts_angstrom=plan.shifts_angstrom.float(), ctf=plan.ctf,
                            half_set=plan.half_set, pixel_size=PIXEL, box_size=BOX)
    gaussians, _ = init_gaussians_from_map(consensus_map(structure, BOX, PIXEL), PIXEL, 150,
                                           generator=torch.Generator().manual_seed(0))
    movable = torch.arange(150) % 3 != 0
    config = TrainerConfig(box_size=BOX, pixel_size=PIXEL, n_gaussians=150, latent_dim=2,
                           regularization_rule="signal-ratio", lambda_smoothing=0.5)
    # particles 0-47 train, 48-55 are held out, 56-63 are new to the trainer
    trainer = HalfSetTrainer(1, config, gaussians, np.arange(3 * BATCH), CPU,
                             movable_mask=movable,
                             validation_indices=np.arange(3 * BATCH, 3 * BATCH + BATCH // 2))

    def batches(order):
        return (make_batch(particles, order[i:i + BATCH], CPU)
                for i in range(0, len(order), BATCH))

    trainer.initialise_noise(batches(np.arange(BATCH)))
    training = lambda n: lambda: trainer.train_epoch(batches(trainer.epoch_order()[:n * BATCH]))
    # held-out evaluation, and the codes the backprojection asks for: known particles, a
    # mixed batch (held-out and new ones), and the same again and again
    mixed = np.arange(3 * BATCH, 4 * BATCH)
    codes = lambda n: lambda: [trainer.latents_for(b) for b in batches(np.tile(mixed, n))]
    held_out = lambda n: lambda: trainer.evaluate(batches(np.tile(mixed[:BATCH // 2], n)))
    for work in (training, codes, held_out):
        work(2)()  # caches filled (the mask's indices, the geometry's constants)
        one, three = _reads(work(1)), _reads(work(3))
        assert three - one == collections.Counter(), f"per-batch reads: {three - one}"
    assert sum(_reads(training(1)).values()) > 0, "the counter saw no per-epoch read either"


def test_a_backprojection_batch_reads_nothing_back():
    generator = torch.Generator().manual_seed(0)
    b = 4
    ctf = CTFParams.from_values(b, defocus_u_angstrom=1e4, defocus_v_angstrom=1.2e4)
    images = torch.randn(b, BOX, BOX, generator=generator)
    rotations = random_rotations(b, generator).float()
    shifts = torch.randn(b, 2, generator=generator)
    field = torch.randn(b, 3, 5, 5, 5, generator=generator)
    deformed, rigid = DeformedBackprojector(BOX, PIXEL), FourierAccumulator(BOX, PIXEL)
    for _ in range(2):  # the first fills the caches
        reads = _reads(lambda: (deformed.add(images, rotations, shifts, ctf, field),
                                rigid.add(images, rotations, shifts, ctf)))
    assert reads == collections.Counter(), f"per-batch reads: {reads}"
