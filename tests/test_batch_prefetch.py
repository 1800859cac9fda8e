from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dynamight_core.batch_prefetch import chunked_order, prefetch_batches
from dynamight_core.deformation_model import make_batch
from dynamight_core.particles import CTFParams, ParticleSet, TensorImageSource
from dynamight_core.rotation import random_rotations


class _CountingSource(TensorImageSource):
    """In-memory images that fail on particle ``fail_at`` and count the reads."""

    def __init__(self, images, fail_at=None):
        super().__init__(images)
        self.fail_at, self.reads = fail_at, 0

    def read(self, indices):
        self.reads += 1
        if self.fail_at is not None and self.fail_at in np.asarray(indices):
            raise OSError(f"cannot read particle {self.fail_at}")
        return super().read(indices)


def _particles(n=50, box=8, fail_at=None):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, box, box, generator=generator)
    return ParticleSet(images=_CountingSource(images, fail_at),
                       rotations=random_rotations(n, generator=generator),
                       shifts_angstrom=torch.randn(n, 2, generator=generator),
                       ctf=CTFParams.from_values(n, defocus_u_angstrom=torch.rand(n) * 1e4,
                                                 defocus_v_angstrom=1e4),
                       half_set=torch.arange(n) % 2 + 1, pixel_size=2.0, box_size=box)


def _chunks(n, size, seed=0):
    order = np.random.default_rng(seed).permutation(n)
    return [order[s:s + size] for s in range(0, n, size)]


def _assert_same(got, want):
    assert np.array_equal(got.indices, want.indices)
    for name in ("images", "rotations", "shifts_angstrom"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("defocus_u_angstrom", "defocus_v_angstrom", "scale"):
        assert torch.equal(getattr(got.ctf, name), getattr(want.ctf, name)), name


@pytest.mark.parametrize("depth", [1, 3])
def test_batches_are_those_of_make_batch_in_order(depth):
    particles = _particles()
    chunks = _chunks(50, 7)
    got = list(prefetch_batches(particles, chunks, "cpu", depth=depth))
    assert len(got) == len(chunks)
    for batch, chunk in zip(got, chunks):
        _assert_same(batch, make_batch(particles, chunk, torch.device("cpu")))


def test_reader_error_is_raised_at_its_batch_and_the_thread_ends():
    particles = _particles(fail_at=30)
    chunks = [np.arange(s, s + 10) for s in range(0, 50, 10)]
    seen = []
    with pytest.raises(OSError, match="particle 30"):
        for batch in prefetch_batches(particles, chunks, "cpu"):
            seen.append(int(batch.indices[0]))
    assert seen == [0, 10, 20]
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_stopping_early_and_before_each_stop_the_reader():
    particles = _particles(n=1000)
    chunks = [np.arange(s, s + 10) for s in range(0, 1000, 10)]
    batches = prefetch_batches(particles, chunks, "cpu", depth=2)
    next(batches)
    batches.close()
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())
    assert particles.images.reads <= 1 + 2 + 2  # the one used, the queue, one in hand

    calls = []

    def abort_on_third():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("abort")

    with pytest.raises(KeyboardInterrupt):
        list(prefetch_batches(particles, chunks, "cpu", before_each=abort_on_third))
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_chunked_order_visits_every_particle_once_from_few_groups_per_batch():
    groups = np.repeat(np.arange(200), 10)  # 200 stacks of 10
    indices = np.flatnonzero(np.arange(2000) % 3 != 0)  # e.g. one half's training particles
    order = chunked_order(indices, groups, torch.Generator().manual_seed(1), groups_per_block=4)
    assert sorted(order.tolist()) == indices.tolist()
    again = chunked_order(indices, groups, torch.Generator().manual_seed(1), groups_per_block=4)
    assert np.array_equal(order, again)
    per_batch = [len(np.unique(groups[order[s:s + 20]])) for s in range(0, len(order), 20)]
    assert max(per_batch) <= 8  # a block of 4 groups, or the end of one and the next
    other = chunked_order(indices, groups, torch.Generator().manual_seed(2), groups_per_block=4)
    assert not np.array_equal(order, other)


@pytest.mark.gpu
def test_pinned_batches_on_the_gpu_equal_make_batch():
    particles = _particles()
    device = torch.device("cuda")
    chunks = _chunks(50, 16)
    for batch, chunk in zip(prefetch_batches(particles, chunks, device), chunks, strict=True):
        want = make_batch(particles, chunk, device)
        assert batch.images.device.type == "cuda"
        _assert_same(batch, want)
