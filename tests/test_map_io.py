from __future__ import annotations

import shutil
import subprocess
import warnings

import mrcfile
import numpy as np
import pytest
import torch

from relion_external import InputError, map_io, read_map, write_map
from relion_external.errors import OutputError


def _write_raw(path, data, voxel_size=3.0):
    with warnings.catch_warnings():  # mrcfile warns about NaN data, which we want here
        warnings.simplefilter("ignore", RuntimeWarning)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(np.asarray(data, dtype=np.float32))
            mrc.voxel_size = voxel_size


def _assert_error(path, field):
    with pytest.raises(InputError) as info:
        read_map(path)
    assert path.name in str(info.value) and field in str(info.value)
    return info.value


@pytest.mark.parametrize("name", ["map.mrc", "half1.mrc"])
def test_read_relion_map(fixtures_dir, name):
    path = fixtures_dir / "relion31_sim" / name
    volume, voxel_size = read_map(path)
    assert volume.dtype == torch.float32 and volume.shape == (32, 32, 32)
    assert voxel_size == pytest.approx(3.0)
    np.testing.assert_array_equal(volume.numpy(), mrcfile.read(path))


def test_write_round_trip(tmp_path):
    volume = torch.randn(8, 8, 8)
    path = tmp_path / "out.mrc"
    write_map(path, volume, 1.25)
    back, voxel_size = read_map(path)
    assert voxel_size == pytest.approx(1.25)
    torch.testing.assert_close(back, volume)
    with mrcfile.open(path, permissive=False) as mrc:
        assert mrc.header.mode == 2
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
    write_map(path, np.zeros((8, 8, 8)), 2.0)  # overwrites in place
    assert read_map(path)[1] == pytest.approx(2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mrc"]


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "map.mrc"
    write_map(path, torch.ones(4, 4, 4), 1.0)

    def failing_new(name, *args, **kwargs):
        name.write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(map_io.mrcfile, "new", failing_new)
    with pytest.raises(OutputError, match="map.mrc: write: cannot be written"):
        write_map(path, torch.zeros(4, 4, 4), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]
    assert float(read_map(path)[0].mean()) == 1.0


@pytest.mark.relion
def test_relion_reads_written_map(tmp_path):
    if shutil.which("relion_image_handler") is None:
        pytest.skip("RELION (relion_image_handler) not installed")
    write_map(tmp_path / "m.mrc", torch.ones(16, 16, 16), 1.5)
    out = subprocess.run(["relion_image_handler", "--i", "m.mrc", "--stats"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "16 x 16 x 16 x 1" in out and "angpix = 1.5" in out


def test_missing_map(tmp_path):
    _assert_error(tmp_path / "nothere.mrc", "map file")


def test_not_cubic(tmp_path):
    path = tmp_path / "flat.mrc"
    _write_raw(path, np.zeros((30, 32, 32)))
    _assert_error(path, "nx/ny/nz")


def test_zero_voxel_size(tmp_path):
    path = tmp_path / "novoxel.mrc"
    _write_raw(path, np.zeros((8, 8, 8)), voxel_size=0.0)
    _assert_error(path, "voxel size")


def test_nan_values(tmp_path):
    path = tmp_path / "nan.mrc"
    data = np.zeros((8, 8, 8))
    data[1, 2, 3] = np.nan
    _write_raw(path, data)
    assert "1 voxels" in str(_assert_error(path, "map data"))


def test_not_mrc(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_text("not a map" * 200)
    _assert_error(path, "MRC header")
