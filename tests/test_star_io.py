from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import starfile

from relion_external import InputError, RelionParticles, read_particles_star, write_particles_star


@pytest.fixture
def particles_star(fixtures_dir):
    return fixtures_dir / "relion31_sim" / "particles.star"


def _assert_error(path, field):
    with pytest.raises(InputError) as info:
        read_particles_star(path)
    assert path.name in str(info.value) and field in str(info.value)
    return info.value


def test_read_real_file(particles_star):
    star = read_particles_star(particles_star)
    assert star.path == particles_star
    assert len(star.particles) == 40 and len(star.optics) == 1
    assert star.optics["rlnImagePixelSize"].iloc[0] == 3.0
    assert star.particles["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    assert star.other_blocks == {}


def test_round_trip_real_file(particles_star, tmp_path):
    star = read_particles_star(particles_star)
    out = tmp_path / "out.star"
    write_particles_star(out, star)
    back = read_particles_star(out)
    assert list(back.particles.columns) == list(star.particles.columns)
    assert list(back.optics.columns) == list(star.optics.columns)
    pd.testing.assert_frame_equal(back.particles, star.particles)
    pd.testing.assert_frame_equal(back.optics, star.optics)
    text = out.read_text()
    assert text.index("data_optics") < text.index("data_particles")
    assert [p.name for p in tmp_path.iterdir()] == ["out.star"]  # no temporary file left


def test_round_trip_unknown_columns_blocks_and_exact_floats(particles_star, tmp_path):
    star = read_particles_star(particles_star)
    particles = star.particles.copy()
    particles["rlnUnknownLabel"] = "has space"
    particles.insert(0, "rlnLatent1", np.linspace(-1e-9, 3e7, len(particles)) / 7.0)
    particles["rlnGroupName"] = "01"
    optics = star.optics.copy()
    optics["rlnOpticsGroupName"] = "007"
    general = {"rlnVersion": 3.1, "rlnNote": "x"}
    table = pd.DataFrame({"rlnSpectralIndex": [0, 1], "rlnSsnrMap": [0.5, 1e-12]})
    out = tmp_path / "custom.star"
    write_particles_star(out, RelionParticles(None, optics, particles,
                                              {"general": general, "model": table}))
    back = read_particles_star(out)
    pd.testing.assert_frame_equal(back.particles, particles, check_exact=True)
    pd.testing.assert_frame_equal(back.optics, optics, check_exact=True)
    assert back.other_blocks["general"] == general
    pd.testing.assert_frame_equal(back.other_blocks["model"], table, check_exact=True)


def test_write_tuple(particles_star, tmp_path):
    star = read_particles_star(particles_star)
    write_particles_star(tmp_path / "t.star", (star.optics, star.particles))
    pd.testing.assert_frame_equal(read_particles_star(tmp_path / "t.star").particles,
                                  star.particles)


@pytest.mark.relion
def test_relion_reads_written_file(particles_star, tmp_path):
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION (relion_star_handler) not installed")
    star = read_particles_star(particles_star)
    star.particles["rlnUnknownLabel"] = 1.5e-7
    write_particles_star(tmp_path / "ours.star", star)
    subprocess.run(["relion_star_handler", "--i", "ours.star", "--o", "relion.star"],
                   cwd=tmp_path, check=True, capture_output=True)
    relion = starfile.read(tmp_path / "relion.star", always_dict=True)
    assert list(relion) == ["optics", "particles"]
    pd.testing.assert_frame_equal(relion["optics"], star.optics)
    assert len(relion["particles"]) == 40
    np.testing.assert_allclose(relion["particles"]["rlnDefocusU"], star.particles["rlnDefocusU"])


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "absent.star", "particles STAR file")


def test_relion30_file_is_rejected(particles_star, tmp_path):
    star = read_particles_star(particles_star)
    old = star.particles.assign(rlnVoltage=300.0, rlnSphericalAberration=2.7,
                                rlnAmplitudeContrast=0.1).drop(columns="rlnOpticsGroup")
    path = tmp_path / "old.star"
    starfile.write({"": old}, path)
    err = _assert_error(path, "data_optics")
    assert "3.1" in str(err) and "relion_convert_star" in str(err)


def test_missing_particles_block(particles_star, tmp_path):
    star = read_particles_star(particles_star)
    path = tmp_path / "optics_only.star"
    starfile.write({"optics": star.optics}, path)
    _assert_error(path, "data_particles")


TRICKY_STAR = """
# version 30001

data_general

_rlnVersion    3.1
_rlnNote   'two words'
_rlnCount 7

# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnImagePixelSize #3
opticsGroup1 1 1.5
"opticsGroup 2" 2 1.5


data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnClassNumber #4
_rlnGroupName #5
_rlnUnknownLabel #6

000001@Extract/a.mrcs  mic1.mrc  1.5e4  1  01  nan
# a comment line
000002@Extract/a.mrcs  "mic 2.mrc"  18482.0  2  02  x
000003@Extract/b.mrcs  mic3.mrc  -3  1  03  y

data_empty

loop_
_rlnA #1
_rlnB #2

"""


@pytest.mark.parametrize("source", ["tricky", "fixture", "written"])
def test_fast_reader_reads_what_starfile_reads(source, particles_star, tmp_path):
    from relion_external.star_io import STRING_COLUMNS, read_star_blocks
    path = tmp_path / "in.star"
    if source == "tricky":
        path.write_text(TRICKY_STAR)
    elif source == "fixture":
        path = particles_star
    else:
        star = read_particles_star(particles_star)
        star.particles["rlnNote"] = ["a b", ""] * 20
        star.particles["rlnCount"] = np.arange(40)
        write_particles_star(path, star)
    ours = read_star_blocks(path, STRING_COLUMNS)
    theirs = starfile.read(path, always_dict=True, parse_as_string=list(STRING_COLUMNS))
    assert list(ours) == list(theirs)
    for name, block in theirs.items():
        if isinstance(block, pd.DataFrame):
            pd.testing.assert_frame_equal(ours[name], block, check_exact=True)
        else:
            assert ours[name] == block


def test_many_rows_round_trip_quickly(tmp_path):
    """10^5 particles with 20 columns written and read back exactly, in well under a second
    each on 2 cores (benchmarks/bench_data.py measures 10^6 rows of a RELION-like file; the
    loose bound guards against a per-value Python path creeping back)."""
    import time
    n = 100_000
    rng = np.random.default_rng(0)
    particles = pd.DataFrame({f"rlnValue{i}": rng.standard_normal(n) for i in range(17)})
    particles["rlnImageName"] = [f"{i % 100 + 1:06d}@Extract/mic_{i // 100:06d}.mrcs"
                                 for i in range(n)]
    particles["rlnOpticsGroup"] = 1
    particles["rlnRandomSubset"] = rng.integers(1, 3, n)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.5]})
    path = tmp_path / "big.star"
    t0 = time.perf_counter()
    write_particles_star(path, (optics, particles))
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = read_particles_star(path)
    read = time.perf_counter() - t0
    pd.testing.assert_frame_equal(back.particles, particles, check_exact=True)
    assert written < 10 and read < 10, (written, read)
