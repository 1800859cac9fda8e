from __future__ import annotations

import logging
import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from relion_external import (
    InputError,
    check_map_matches,
    load_particle_set,
    read_map,
    read_particles_star,
    write_particles_star,
)


@pytest.fixture
def project(fixtures_dir, tmp_path):
    """A copy of the simulated RELION particles (STAR + stack) in ``tmp_path / 'project'``."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("particles.star", "particles.mrcs"):
        shutil.copyfile(fixtures_dir / "relion31_sim" / name, folder / name)
    return folder


def _edit(star_path, *, particles=None, optics=None):
    """Rewrite a STAR file with ``particles(table) -> table`` / ``optics(table) -> table``."""
    star = read_particles_star(star_path)
    if particles is not None:
        star.particles = particles(star.particles.copy())
    if optics is not None:
        star.optics = optics(star.optics.copy())
    write_particles_star(star_path, star)


def _set(table, rows, column, value):
    table.loc[rows, column] = value
    return table


def _two_optics_groups(optics, **changes):
    return pd.concat([optics, optics.assign(rlnOpticsGroup=2, **changes)], ignore_index=True)


def _listing(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _expect_error(project, field, *words, star_name="particles.star", **kwargs):
    before = _listing(project)
    kwargs.setdefault("project_dir", project)
    with pytest.raises(InputError) as info:
        load_particle_set(project / star_name, **kwargs)
    message = str(info.value)
    assert star_name in message and field in message, message
    for word in words:
        assert word in message, message
    assert _listing(project) == before  # nothing written
    return message


def test_values_converted(project, fixtures_dir):
    particles, star = load_particle_set(project / "particles.star", project_dir=project)
    table = star.particles
    assert len(particles) == 40 and particles.box_size == 32 and particles.pixel_size == 3.0
    for row in (0, 7, 33):
        rot, tilt, psi = table.loc[row, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]]
        expected = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T
        np.testing.assert_allclose(particles.rotations[row].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(particles.shifts_angstrom.numpy(),
                               table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                               rtol=1e-6)
    ctf = particles.ctf
    np.testing.assert_allclose(ctf.defocus_u_angstrom.numpy(), table["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(ctf.defocus_angle_degrees.numpy(), table["rlnDefocusAngle"],
                               rtol=1e-6)
    np.testing.assert_allclose(ctf.phase_shift_degrees.numpy(), table["rlnPhaseShift"])
    np.testing.assert_allclose(ctf.bfactor_angstrom2.numpy(), table["rlnCtfBfactor"])
    assert ctf.phase_shift_degrees[0] == 30.0 and ctf.bfactor_angstrom2[0] == 40.0
    for values, want in ((ctf.voltage_kv, 300.0), (ctf.spherical_aberration_mm, 2.7),
                         (ctf.amplitude_contrast, 0.1), (ctf.scale, 1.0)):
        torch.testing.assert_close(values, torch.full((40,), want))
    np.testing.assert_array_equal(particles.half_set.numpy(), table["rlnRandomSubset"])
    assert particles.half_set.dtype == torch.int64
    indices = np.array([5, 0, 39])
    np.testing.assert_array_equal(particles.images.read(indices).numpy(),
                                  mrcfile.read(project / "particles.mrcs")[indices])


def test_ctf_per_particle_overrides_optics_and_defaults(project):
    def particles(table):
        table = table.drop(columns=["rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"])
        table["rlnVoltage"] = np.where(np.arange(40) % 2 == 0, 200.0, 300.0)
        return _set(table, table.index[-10:], "rlnOpticsGroup", 2)

    _edit(project / "particles.star", particles=particles,
          optics=lambda t: _two_optics_groups(t, rlnSphericalAberration=0.01))
    ctf = load_particle_set(project / "particles.star", project_dir=project)[0].ctf
    assert ctf.voltage_kv[0] == 200.0 and ctf.voltage_kv[1] == 300.0
    assert ctf.spherical_aberration_mm[0] == pytest.approx(2.7)
    assert ctf.spherical_aberration_mm[-1] == pytest.approx(0.01)
    assert float(ctf.phase_shift_degrees.abs().sum()) == 0.0
    assert float(ctf.bfactor_angstrom2.abs().sum()) == 0.0
    torch.testing.assert_close(ctf.scale, torch.ones(40))


def test_pixel_origins_of_old_files(project):
    reference = load_particle_set(project / "particles.star", project_dir=project)[0]

    def particles(table):
        table["rlnOriginX"] = table.pop("rlnOriginXAngst") / 3.0
        table["rlnOriginY"] = table.pop("rlnOriginYAngst") / 3.0
        return table

    _edit(project / "particles.star", particles=particles)
    particles = load_particle_set(project / "particles.star", project_dir=project)[0]
    torch.testing.assert_close(particles.shifts_angstrom, reference.shifts_angstrom)


def test_stack_paths_relative_to_project_then_star_folder(project, monkeypatch):
    job = project / "Refine3D" / "job001"
    job.mkdir(parents=True)
    (project / "Extract").mkdir()
    shutil.move(project / "particles.mrcs", project / "Extract" / "particles.mrcs")
    star = read_particles_star(project / "particles.star")
    star.particles["rlnImageName"] = star.particles["rlnImageName"].str.replace(
        "@", "@Extract/")
    write_particles_star(job / "run_data.star", star)
    monkeypatch.chdir(project)  # RELION runs jobs from the project directory
    particles, _ = load_particle_set("Refine3D/job001/run_data.star")
    assert particles.images.read(np.array([1])).shape == (1, 32, 32)
    # next to the STAR file when not found in the project directory
    shutil.move(project / "Extract", job / "Extract")
    load_particle_set(job / "run_data.star", project_dir=project / "elsewhere")
    shutil.rmtree(job / "Extract")
    message = _expect_error(project, "rlnImageName", "not found", str(project / "elsewhere"),
                            str(job), star_name="Refine3D/job001/run_data.star",
                            project_dir=project / "elsewhere")
    assert "000001@Extract/particles.mrcs" in message


def test_preload(project):
    streamed = load_particle_set(project / "particles.star", project_dir=project)[0]
    preloaded = load_particle_set(project / "particles.star", project_dir=project,
                                  preload=True)[0]
    torch.testing.assert_close(preloaded.images.read(np.arange(40)),
                               streamed.images.read(np.arange(40)))


def test_random_split(project, caplog):
    _edit(project / "particles.star", particles=lambda t: t.drop(columns="rlnRandomSubset"))
    _expect_error(project, "rlnRandomSubset", "--random-half-sets", "3D auto-refine")
    with caplog.at_level(logging.WARNING, logger="relion_external"):
        first = load_particle_set(project / "particles.star", project_dir=project,
                                  random_split=True, seed=3)[0].half_set
    assert "rlnRandomSubset" in caplog.text
    again = load_particle_set(project / "particles.star", project_dir=project,
                              random_split=True, seed=3)[0].half_set
    torch.testing.assert_close(first, again)
    assert int((first == 1).sum()) == 20 and int((first == 2).sum()) == 20


def test_existing_half_sets_win_over_random_split(project):
    particles, star = load_particle_set(project / "particles.star", project_dir=project,
                                        random_split=True)
    np.testing.assert_array_equal(particles.half_set.numpy(), star.particles["rlnRandomSubset"])


def test_missing_columns_are_listed(project):
    _edit(project / "particles.star",
          particles=lambda t: t.drop(columns=["rlnAngleTilt", "rlnDefocusU"]))
    _expect_error(project, "rlnAngleTilt", "rlnDefocusU")


def test_missing_optics_value(project):
    _edit(project / "particles.star", optics=lambda t: t.drop(columns="rlnVoltage"))
    _expect_error(project, "rlnVoltage")


def test_missing_stack(project):
    (project / "particles.mrcs").unlink()
    _expect_error(project, "rlnImageName", "not found", "particles.mrcs")


def test_short_stack(project):
    data = mrcfile.read(project / "particles.mrcs")
    with mrcfile.new(project / "particles.mrcs", overwrite=True) as mrc:
        mrc.set_data(data[:30])
    _expect_error(project, "rlnImageName", "000031@particles.mrcs", "only 30 images",
                  "9 more")


def test_truncated_stack(project):
    path = project / "particles.mrcs"
    path.write_bytes(path.read_bytes()[:-100])
    _expect_error(project, "rlnImageName", "truncated")


@pytest.mark.parametrize("name", ["0@particles.mrcs", "41@particles.mrcs", "particles.mrcs",
                                  "x@particles.mrcs"])
def test_bad_image_number(project, name):
    _edit(project / "particles.star", particles=lambda t: _set(t, 4, "rlnImageName", name))
    _expect_error(project, "rlnImageName", name, "5")


@pytest.mark.parametrize("column", ["rlnImagePixelSize", "rlnImageSize"])
def test_optics_groups_must_share_pixel_and_box_size(project, column):
    _edit(project / "particles.star", particles=lambda t: _set(t, 3, "rlnOpticsGroup", 2),
          optics=lambda t: _two_optics_groups(t, **{column: t[column] * 2}))
    _expect_error(project, column, "differ")


def test_unknown_optics_group(project):
    _edit(project / "particles.star", particles=lambda t: t.assign(rlnOpticsGroup=5))
    _expect_error(project, "rlnOpticsGroup", "not in data_optics")


def test_non_square_images(project):
    with mrcfile.new(project / "particles.mrcs", overwrite=True) as mrc:
        mrc.set_data(np.zeros((40, 32, 30), dtype=np.float32))
    _expect_error(project, "rlnImageName", "30 x 32", "rlnImageSize")


@pytest.mark.parametrize(("column", "value"), [("rlnDefocusU", np.nan),
                                               ("rlnAngleRot", np.inf),
                                               ("rlnOriginYAngst", -np.inf),
                                               ("rlnRandomSubset", np.nan)])
def test_non_finite_values_name_rows(project, column, value):
    _edit(project / "particles.star",
          particles=lambda t: _set(t.astype({column: float}), [2, 6], column, value))
    _expect_error(project, column, "rows 3, 7")


def test_non_finite_optics_value(project):
    _edit(project / "particles.star", optics=lambda t: t.assign(rlnAmplitudeContrast=np.nan))
    _expect_error(project, "rlnAmplitudeContrast", "data_optics")


def test_bad_random_subset_values(project):
    _edit(project / "particles.star",
          particles=lambda t: _set(t, np.arange(40) % 3 == 0, "rlnRandomSubset", 3))
    _expect_error(project, "rlnRandomSubset", "1 or 2, found 3 in rows 1, 4,")


def test_ctf_premultiplied_is_rejected(project):
    _edit(project / "particles.star", optics=lambda t: t.assign(rlnCtfDataAreCtfPremultiplied=1))
    _expect_error(project, "rlnCtfDataAreCtfPremultiplied", "not supported")


def test_relion30_star_is_rejected(project):
    star = read_particles_star(project / "particles.star")
    old = star.particles.assign(rlnVoltage=300.0, rlnSphericalAberration=2.7,
                                rlnAmplitudeContrast=0.1, rlnDetectorPixelSize=3.0)
    starfile.write(old, project / "old.star")
    _expect_error(project, "data_optics", "RELION 3.0", star_name="old.star")


def test_empty_particles(project):
    _edit(project / "particles.star", particles=lambda t: t.iloc[:0])
    _expect_error(project, "data_particles", "no particles")


def test_check_map_matches(project, fixtures_dir):
    particles, _ = load_particle_set(project / "particles.star", project_dir=project)
    map_path = fixtures_dir / "relion31_sim" / "map.mrc"
    volume, voxel_size = read_map(map_path)
    check_map_matches(map_path, voxel_size, volume.shape[0], particles)
    check_map_matches(map_path, voxel_size * 1.0005, volume.shape[0], particles)
    with pytest.raises(InputError) as info:
        check_map_matches(map_path, 3.1, 32, particles, star_path=project / "particles.star")
    message = str(info.value)
    assert all(w in message for w in ("map.mrc", "rlnImagePixelSize", "3.1000", "3.0000",
                                      "particles.star"))
    with pytest.raises(InputError) as info:
        check_map_matches(map_path, 3.0, 64, particles)
    assert all(w in str(info.value) for w in ("map.mrc", "rlnImageSize", "64", "32"))
