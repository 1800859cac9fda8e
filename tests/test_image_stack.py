from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest
import torch

from dynamight_core.particles import ImageSource
from relion_external import InputError, MrcStackImageSource


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
