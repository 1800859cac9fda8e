from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamight_core.deformed_backprojection import downsample_images, downsample_map
from dynamight_core.fourier_crop import crop_particle_set, fourier_crop_images, training_box
from dynamight_core.map_projection import simulate_particle_images
from dynamight_core.particles import CTFParams, ParticleSet, TensorImageSource
from dynamight_core.rotation import random_rotations


def _blobs(box: int, pixel_size: float) -> torch.Tensor:
    """A smooth volume (a few Gaussian blobs of 6 Å), nothing near Nyquist."""
    axis = (torch.arange(box) - box // 2) * pixel_size
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros(box, box, box)
    for cx, cy, cz in [(0, 0, 0), (20, -10, 5), (-15, 18, -12), (8, 25, 20)]:
        volume += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 6.0**2))
    return volume


def test_cropped_particles_are_the_particles_simulated_on_the_coarse_grid():
    """Projection, CTF and shift of the full-size images, cropped, equal those computed on the
    coarse grid (map Fourier-cropped, pixel size x 2) with the same poses, CTFs and shifts in
    physical units: cropping keeps them valid."""
    box, pixel_size, n = 64, 2.0, 12
    generator = torch.Generator().manual_seed(0)
    volume = _blobs(box, pixel_size)
    rotations = random_rotations(n, generator=generator).float()
    shifts = 6.0 * torch.randn(n, 2, generator=generator)
    ctf = CTFParams.from_values(n, defocus_u_angstrom=5000 + 3000 * torch.rand(n),
                                defocus_v_angstrom=4800.0, defocus_angle_degrees=30.0)
    full = simulate_particle_images(volume, rotations, shifts, ctf, pixel_size)
    particles = ParticleSet(images=TensorImageSource(full), rotations=rotations,
                            shifts_angstrom=shifts, ctf=ctf, half_set=torch.ones(n).long(),
                            pixel_size=pixel_size, box_size=box)
    cropped = crop_particle_set(particles, 32)
    assert (cropped.box_size, cropped.pixel_size) == (32, 4.0)
    assert cropped.shifts_angstrom is particles.shifts_angstrom and cropped.ctf is particles.ctf
    coarse = simulate_particle_images(downsample_map(volume, 2), rotations, shifts, ctf, 4.0)
    got = cropped.images.read(np.arange(n))
    assert got.shape == (n, 32, 32)
    error = (got - coarse).norm() / coarse.norm()
    assert error < 0.02, float(error)


def test_crop_by_an_integer_factor_is_the_backprojection_downsampling():
    images = torch.randn(5, 48, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fourier_crop_images(images, 24), downsample_images(images, 2))
    assert fourier_crop_images(images, 48) is images
    assert fourier_crop_images(images, 36).shape == (5, 36, 36)  # any smaller box
    with pytest.raises(ValueError):
        fourier_crop_images(images, 64)


@pytest.mark.parametrize(("box", "pixel", "resolution", "expected"), [
    (512, 0.7, 3.0, 240),  # Nyquist 2 · 0.7 · 512 / 240 = 2.99 Å
    (512, 0.7, 6.0, 120),
    (512, 0.7, 1.2, 512),  # the full box only reaches 1.4 Å
    (256, 1.0, 20.0, 64),  # never below 64
    (512, 0.7, None, 256),  # no consensus resolution: at most 256
    (128, 1.0, None, 128),
])
def test_training_box_reaches_the_consensus_resolution(box, pixel, resolution, expected):
    new = training_box(box, pixel, resolution)
    assert new == expected and new % 2 == 0
    if resolution is not None and new < box:
        assert 2 * pixel * box / new <= resolution
