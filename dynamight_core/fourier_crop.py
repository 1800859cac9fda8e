"""Particles on a smaller grid: Fourier cropping of a :class:`~.particles.ParticleSet`.

Cropping a ``box``² image's spectrum to its central ``new_box``² frequencies gives the same
particle sampled with pixels ``box / new_box`` times larger, on the same field of view: the
resolution limit becomes the new Nyquist, ``2 · pixel_size · box / new_box`` Å. Everything
else the forward model needs is in physical units and stays valid: poses, shifts (Å, RELION's
``rlnOriginX/YAngst``) and CTF parameters (Å, kV, mm); the Gaussian model's positions are in Å
and its decoder normalises them by the box length in Å (``box · pixel_size``), which cropping
keeps. So a model trained on the cropped set applies unchanged to the full-size images (the
deformed backprojection renders on the full grid).

Pixel values follow :func:`.deformed_backprojection.downsample_images`: a pixel stays a line
integral in voxel units, so a map reconstructed from cropped images keeps the density scale of
the full-size map Fourier-cropped with values kept.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .fourier_grids import (
    crop_rows,
    irfft2_centered,
    irfftn_centered_3d,
    rfft2_centered,
    rfftn_centered_3d,
)
from .particles import ParticleSet


def fourier_crop_images(images: torch.Tensor, new_box: int) -> torch.Tensor:  # (b, n, n)
    """``(b, box, box)`` images Fourier-cropped to ``(b, new_box, new_box)`` (pixel size ×
    ``box / new_box``; an even new box's Nyquist row and column dropped)."""
    box = images.shape[-1]
    if new_box == box:
        return images
    if not 2 <= new_box < box:
        raise ValueError(f"cannot crop box {box} to {new_box}")
    rows = crop_rows(box, new_box, images.device)
    ft = rfft2_centered(images)[..., rows, : new_box // 2 + 1]
    if new_box % 2 == 0:
        ft[..., new_box // 2, :] = 0
        ft[..., new_box // 2] = 0
    return irfft2_centered(ft, new_box) * (new_box / box) ** 3


class FourierCroppedImages:
    """An :class:`~.particles.ImageSource` that reads ``source`` and crops to ``new_box``."""

    def __init__(self, source, new_box: int):
        self.source, self.new_box = source, int(new_box)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> torch.Tensor:
        return fourier_crop_images(self.source.read(indices), self.new_box)


def crop_particle_set(particles: ParticleSet, new_box: int) -> ParticleSet:
    """``particles`` on a ``new_box`` grid: images cropped as they are read, pixel size ×
    ``box / new_box``, everything else as it is (physical units)."""
    if new_box == particles.box_size:
        return particles
    return replace(particles, images=FourierCroppedImages(particles.images, new_box),
                   box_size=int(new_box),
                   pixel_size=particles.pixel_size * particles.box_size / new_box)


def fourier_crop_volume(volume: torch.Tensor, new_box: int) -> torch.Tensor:  # (n, n, n)
    """A ``(box,)*3`` map Fourier-cropped to ``new_box`` with its values kept (a density map
    stays on its scale, a mask stays a mask up to ringing at sharp edges), as
    :func:`.deformed_backprojection.downsample_map` for any box."""
    box = volume.shape[-1]
    if new_box == box:
        return volume
    if not 2 <= new_box < box:
        raise ValueError(f"cannot crop box {box} to {new_box}")
    rows = crop_rows(box, new_box, volume.device)
    ft = rfftn_centered_3d(volume.to(torch.float32))[rows][:, rows][..., : new_box // 2 + 1]
    if new_box % 2 == 0:
        ft[new_box // 2] = 0
        ft[:, new_box // 2] = 0
        ft[..., new_box // 2] = 0
    return irfftn_centered_3d(ft, new_box) * (new_box / box) ** 3


def training_box(box: int, pixel_size: float, resolution_angstrom: float | None, *,
                 without_resolution: int = 256, minimum: int = 64) -> int:
    """The smallest even box whose Nyquist (``2 · pixel · box / new``) is at or beyond
    ``resolution_angstrom`` (at least ``minimum``, at most ``box``); without a resolution,
    ``without_resolution`` (or ``box`` if smaller). Even, so the crop keeps the centre pixel."""
    if resolution_angstrom is None or not np.isfinite(resolution_angstrom) \
            or resolution_angstrom <= 0:
        return min(box, without_resolution)
    new = int(np.ceil(2.0 * pixel_size * box / resolution_angstrom))
    new += new % 2
    return int(min(box, max(minimum, new)))


__all__ = ["FourierCroppedImages", "crop_particle_set", "fourier_crop_images",
           "fourier_crop_volume", "training_box"]
