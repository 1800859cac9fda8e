"""Projection of maps into particle images (dynamight_core.map_projection), against RELION.

``relion31_sim/clean.mrcs`` was written by ``relion_project --ctf`` (RELION 3.1.3) from
``map.mrc`` with the poses, origins and CTFs of ``clean.star`` (astigmatism, 30° phase shift on
every 4th particle, B = 40 Å² on every 5th); ``particles.mrcs`` is the same plus white noise of
standard deviation 0.5.
"""

from __future__ import annotations

import pytest
import torch
from relion_tools import (
    amplitude_ratio,
    correlation,
    make_relion_dataset,
    read_map,
    read_relion_particles,
    requires_relion,
)

from dynamight_core.map_projection import project_map, simulate_particle_images
from dynamight_core.rotation import random_rotations


@pytest.fixture(scope="module")
def sim_dir(fixtures_dir):
    return fixtures_dir / "relion31_sim"


def _simulate_like(star, map_path):
    particles = read_relion_particles(star)
    volume, voxel = read_map(map_path)
    assert voxel == pytest.approx(particles.pixel_size)
    sim = simulate_particle_images(volume, particles.rotations, particles.shifts_angstrom,
                                   particles.ctf, particles.pixel_size)
    return sim, particles.images


def test_simulation_matches_relion_project_fixture(sim_dir):
    sim, relion = _simulate_like(sim_dir / "clean.star", sim_dir / "map.mrc")
    assert sim.shape == relion.shape == (40, 32, 32)
    corr = correlation(sim, relion)
    ratio = amplitude_ratio(sim, relion)
    # measured: min correlation 0.99996, amplitude ratio 0.997 .. 1.001
    assert corr.min() >= 0.999, corr.min()
    assert (ratio - 1).abs().max() <= 0.02, ratio


def test_noisy_fixture_residual_is_the_white_noise(sim_dir):
    """particles.mrcs − our simulation is RELION's white noise: std 0.5, uncorrelated."""
    sim, noisy = _simulate_like(sim_dir / "particles.star", sim_dir / "map.mrc")
    residual = noisy - sim
    assert residual.std().item() == pytest.approx(0.5, rel=0.04)  # measured 0.492
    assert correlation(residual.flatten(), sim.flatten(), dims=(-1,)).abs() < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_point_lands_at_a_times_r(seed):
    """A map blob at r (xyz Å from the box centre) projects to image position (A r)[:2]."""
    box, pixel, sigma = 32, 2.0, 1.5  # sigma in voxels
    r = torch.tensor([6.0, -4.0, 8.0], dtype=torch.float64)  # Å
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    rv = r / pixel
    vol = torch.exp(-((x - rv[0]) ** 2 + (y - rv[1]) ** 2 + (z - rv[2]) ** 2) / (2 * sigma**2))
    a = random_rotations(4, generator=torch.Generator().manual_seed(seed))
    images = project_map(vol, a).to(torch.float64)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    mass = images.sum((-2, -1))
    centroid = torch.stack([(images * xx).sum((-2, -1)), (images * yy).sum((-2, -1))], -1)
    centroid = centroid / mass[:, None]
    torch.testing.assert_close(centroid, (a @ rv)[:, :2], atol=0.05, rtol=0)


def test_projection_of_a_gaussian_blob_is_the_analytic_2d_gaussian():
    """Line integral of a 3D Gaussian (σ voxels, at r) is a 2D Gaussian of the same mass at
    (A r)[:2]. Random orientations only: torch-fourier-slice (like RELION's projector) divides the
    padded map by the trilinear kernel's sinc² before slicing, which is exact on average over
    orientations but not at grid-aligned ones (identity: +5 % mass for a blob 5 voxels off centre,
    measured); the k = 0 sample is never attenuated, so mass is slightly over-estimated."""
    box, sigma = 24, 1.5
    r = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)  # voxels, xyz
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.exp(-((x - r[0]) ** 2 + (y - r[1]) ** 2 + (z - r[2]) ** 2) / (2 * sigma**2))
    a = random_rotations(8, generator=torch.Generator().manual_seed(0))
    images = project_map(vol, a).to(torch.float64)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    p = (a @ r)[:, :, None, None]
    analytic = vol.sum() / (2 * torch.pi * sigma**2) * torch.exp(
        -((xx - p[:, 0]) ** 2 + (yy - p[:, 1]) ** 2) / (2 * sigma**2))
    peak_error = (images - analytic).abs().amax((-2, -1)) / analytic.amax((-2, -1))
    assert peak_error.max() < 0.01, peak_error  # measured 0.0037
    mass_error = images.sum((-2, -1)) / vol.sum() - 1
    assert mass_error.abs().max() < 0.015, mass_error  # measured 0.0077


@pytest.fixture(scope="module")
def fresh_relion_dataset(tmp_path_factory, sim_dir):
    tmp = tmp_path_factory.mktemp("relion_project")
    return make_relion_dataset(tmp, sim_dir / "map.mrc", n=64, seed=11, name="fresh")


@pytest.mark.relion
@requires_relion
def test_simulation_matches_fresh_relion_project(fresh_relion_dataset, sim_dir):
    """Random poses, origins ±5 Å, DefocusU > V and V > U, phase shifts and B-factors."""
    ds = fresh_relion_dataset
    particles = read_relion_particles(ds.particles_star, load_images=False)
    assert (particles.ctf.defocus_v_angstrom > particles.ctf.defocus_u_angstrom).any()
    assert (particles.ctf.phase_shift_degrees > 0).any()
    assert (particles.shifts_angstrom.abs() > 1.0).any()
    sim, relion = _simulate_like(ds.particles_star, sim_dir / "map.mrc")
    corr = correlation(sim, relion)
    ratio = amplitude_ratio(sim, relion)
    assert corr.min() >= 0.99, corr.min()
    assert (ratio - 1).abs().max() <= 0.02, ratio
