from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest
import torch

from dynamight_core.batch_prefetch import chunked_order, prefetch_batches
from dynamight_core.deformation_model import make_batch
from dynamight_core.particles import CTFParams, ImageSource, ParticleSet
from dynamight_core.rotation import random_rotations
from relion_external import InputError, MrcStackImageSource, image_stack


@pytest.fixture
def stack(fixtures_dir):
    return fixtures_dir / "relion31_sim" / "particles.mrcs"


def _write_stack(path, data):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
    return path


def _source(entries, **kwargs):
    names = [f"{i + 1:06d}@{p.name}" for p, i in entries]
    return MrcStackImageSource(entries, star_path="particles.star", image_names=names, **kwargs)


def test_memory_mapped_read_matches_mrcfile(stack):
    expected = mrcfile.read(stack)
    source = _source([(stack, i) for i in range(40)], box_size=32)
    assert isinstance(source, ImageSource) and len(source) == 40
    indices = np.array([39, 0, 5, 5, 17])
    images = source.read(indices)
    assert images.dtype == torch.float32 and images.shape == (5, 32, 32)
    np.testing.assert_array_equal(images.numpy(), expected[indices])
    assert source.read(np.array([], dtype=np.int64)).shape == (0, 32, 32)


def test_several_stacks_lru_preload_and_pickle(stack, tmp_path):
    expected = mrcfile.read(stack)
    other = _write_stack(tmp_path / "other.mrcs", (expected[:3] * 100).astype(np.int16))
    entries = [(stack, 10), (other, 2), (stack, 0), (other, 0)]
    want = np.stack([expected[10], (expected[2] * 100).astype(np.int16),
                     expected[0], (expected[0] * 100).astype(np.int16)]).astype(np.float32)
    source = _source(entries, box_size=32, max_open_files=1)
    np.testing.assert_array_equal(source.read(np.arange(4)).numpy(), want)
    np.testing.assert_array_equal(source.read(np.array([3, 0])).numpy(), want[[3, 0]])
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read(np.arange(4)).numpy(), want)
    preloaded = _source(entries, box_size=32, preload=True)
    read_only = np.array([1, 1, 2])
    read_only.flags.writeable = False
    np.testing.assert_array_equal(preloaded.read(read_only).numpy(), want[[1, 1, 2]])
    np.testing.assert_array_equal(source.read(read_only).numpy(), want[[1, 1, 2]])
    source.close()
    clone.close()


def _assert_error(entries, box_size=32, *words):
    with pytest.raises(InputError) as info:
        _source(entries, box_size=box_size)
    message = str(info.value)
    assert "particles.star" in message and "rlnImageName" in message
    for word in words:
        assert word in message
    return message


def test_missing_stack(tmp_path):
    _assert_error([(tmp_path / "gone.mrcs", 0)], 32, "gone.mrcs", "does not exist")


def test_index_beyond_stack(stack):
    _assert_error([(stack, 0), (stack, 40)], 32, "000041@particles.mrcs", "only 40 images")


def test_negative_index(stack):
    _assert_error([(stack, -1)], 32, "no image number 0")


def test_wrong_box(stack):
    _assert_error([(stack, 0)], 64, "rlnImageSize", "32 x 32")


def test_non_square(tmp_path):
    path = _write_stack(tmp_path / "rect.mrcs", np.zeros((3, 32, 30), dtype=np.float32))
    _assert_error([(path, 0)], 32, "30 x 32")


def test_truncated_stack(stack, tmp_path):
    path = tmp_path / "short.mrcs"
    path.write_bytes(stack.read_bytes()[: 1024 + 10 * 32 * 32 * 4 + 7])
    _assert_error([(path, 0)], 32, "truncated", "only 10")


# -- many stacks, read strategies, pixel types, preload memory check ----------------------------

def _many_stacks(folder, n_stacks=2000, per_stack=10, box=8, dtype=np.float32):
    """``n_stacks`` stacks of ``per_stack`` images whose pixels encode (stack, pixel)."""
    header = _header(folder / "header.mrcs", box, per_stack, dtype)
    entries, images = [], []
    for s in range(n_stacks):
        data = (np.arange(per_stack * box * box, dtype=np.float64).reshape(per_stack, box, box)
                % 997 + 1000 * s).astype(dtype)
        path = folder / f"mic_{s:05d}.mrcs"
        path.write_bytes(header + data.tobytes())  # mrcfile.new is slow for 2,000 files
        entries += [(path, i) for i in range(per_stack)]
        images.append(data.astype(np.float32))
    return entries, np.concatenate(images)


def _header(path, box, n, dtype):
    """The 1,024-byte header of an MRC stack of ``n`` ``box``² images of ``dtype``."""
    with mrcfile.new_mmap(path, shape=(n, box, box), overwrite=True,
                          mrc_mode=12 if np.dtype(dtype) == np.float16 else 2) as mrc:
        mrc.set_image_stack()
        header = mrc.header.tobytes()
    path.unlink()
    return header


def test_many_stacks_give_the_same_batches_whatever_the_strategy(tmp_path):
    """20,000 particles in 2,000 stacks read in random training order: the same images with
    few or many open files, one or several reader threads, preloaded, and through the
    prefetching batch iterator in either epoch order (its batches equal make_batch's)."""
    entries, expected = _many_stacks(tmp_path)
    order = np.random.default_rng(0).permutation(len(entries))
    batches = [order[s:s + 100] for s in range(0, len(order), 100)]
    sources = {
        "default": _source(entries, box_size=8),
        "8 open files": _source(entries, box_size=8, max_open_files=8),
        "4 reader threads": _source(entries, box_size=8, read_threads=4, max_open_files=16),
        "preloaded": _source(entries, box_size=8, preload=True),
    }
    for name, source in sources.items():
        for chunk in batches[:40]:
            got = source.read(chunk).numpy()
            assert np.array_equal(got, expected[chunk]), name
        source.close()
    particles = _particle_set(sources["8 open files"])
    generator = torch.Generator().manual_seed(3)
    stack_local = chunked_order(np.arange(len(entries)), sources["default"].group_ids(),
                                generator)
    assert sorted(stack_local.tolist()) == list(range(len(entries)))
    for epoch in (order, stack_local):
        chunks = [epoch[s:s + 100] for s in range(0, len(epoch), 100)]
        for want, got in zip([make_batch(particles, c, torch.device("cpu")) for c in chunks],
                             prefetch_batches(particles, chunks, "cpu"), strict=True):
            assert np.array_equal(got.indices, want.indices)
            assert torch.equal(got.images, want.images)
            assert torch.equal(got.images, torch.from_numpy(expected[want.indices]))
            assert torch.equal(got.rotations, want.rotations)
            assert torch.equal(got.shifts_angstrom, want.shifts_angstrom)
            assert torch.equal(got.ctf.defocus_u_angstrom, want.ctf.defocus_u_angstrom)


def _particle_set(source):
    n = len(source)
    generator = torch.Generator().manual_seed(0)
    return ParticleSet(images=source, rotations=random_rotations(n, generator=generator),
                       shifts_angstrom=torch.randn(n, 2, generator=generator),
                       ctf=CTFParams.from_values(n, defocus_u_angstrom=torch.rand(n) * 1e4,
                                                 defocus_v_angstrom=1e4),
                       half_set=torch.arange(n) % 2 + 1, pixel_size=2.0, box_size=source.box_size)


def test_float16_and_big_endian_stacks(tmp_path):
    entries16, expected16 = _many_stacks(tmp_path, n_stacks=3, per_stack=5, dtype=np.float16)
    source = _source(entries16, box_size=8)
    np.testing.assert_array_equal(source.read(np.array([14, 0, 7, 7])).numpy(),
                                  expected16[[14, 0, 7, 7]])
    data = np.arange(4 * 32 * 32, dtype=">f4").reshape(4, 32, 32)
    path = tmp_path / "big_endian.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    assert mrcfile.read(path).dtype.byteorder == ">"
    big = _source([(path, i) for i in range(4)], box_size=32)
    np.testing.assert_array_equal(big.read(np.array([3, 1])).numpy(), data[[3, 1]])


def test_preload_larger_than_the_available_memory_is_refused(stack, monkeypatch):
    monkeypatch.setattr(image_stack, "available_memory_bytes", lambda: 40 * 32 * 32 * 4)
    with pytest.raises(InputError) as info:
        _source([(stack, i) for i in range(40)], box_size=32, preload=True)
    message = str(info.value)
    assert "--preload-images" in message and "available" in message and "\n" not in message
    monkeypatch.setattr(image_stack, "available_memory_bytes", lambda: 10 * 40 * 32 * 32 * 4)
    assert len(_source([(stack, i) for i in range(40)], box_size=32, preload=True)) == 40
