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
