"""Rigid CTF-weighted reconstruction by Fourier-slice insertion.

Each particle contributes ``CTF · FT(image)`` (recentred by its origin) to a padded 3D Fourier
volume and ``CTF²`` to a weight volume; the map is ``data / weight`` with a small floor, back
to real space and cropped. Samples are inserted on the image's own grid at coordinates scaled by
the padding factor (as RELION does). No sinc² gridding correction is applied: dividing by the
trilinearly inserted weights already normalises the interpolation kernel, and measured against
the true map and against ``relion_reconstruct`` the uncorrected result is closer (tests). The two sums are explicit, so an all-reduce over
workers completes them (:meth:`FourierAccumulator.merge`).
"""

from __future__ import annotations

import torch

from ._slice_insertion import (
    insert_slices_rfft_3d,
    inserted_samples,
    slice_coordinates_rfft,
    symmetrise_x0_plane,
)
from .ctf import ctf_2d_rfft
from .fourier_grids import rfft2_centered
from .particles import CTFParams
from .shift import recentre_relion_images_rfft


class FourierAccumulator:
    """Running sums of CTF-weighted slices (``data``) and CTF² (``weight``) for one map."""

    def __init__(self, box_size: int, pixel_size: float, pad_factor: int = 2,
                 device: torch.device | str = "cpu"):
        self.box_size = box_size
        self.pixel_size = pixel_size
        self.padded_size = int(box_size * pad_factor)
        p = self.padded_size
        self.data = torch.zeros((p, p, p // 2 + 1), dtype=torch.complex64, device=device)
        self.weight = torch.zeros((p, p, p // 2 + 1), dtype=torch.float32, device=device)
        self.n_particles = 0

    def add(
        self,
        images: torch.Tensor,  # (b, box, box) real space
        rotations: torch.Tensor,  # (b, 3, 3) RELION A
        shifts_angstrom: torch.Tensor,  # (b, 2)
        ctf: CTFParams,  # b particles
    ) -> None:
        device = self.data.device
        box = self.box_size
        f = rfft2_centered(images.to(device, torch.float32))
        f = recentre_relion_images_rfft(f, shifts_angstrom.to(device), self.pixel_size, box)
        c = ctf_2d_rfft(ctf.to(device), box, self.pixel_size)
        coords, index = slice_coordinates_rfft(box, self.padded_size, rotations.to(device))
        insert_slices_rfft_3d(self.data, self.weight, inserted_samples(f * c, index),
                              inserted_samples(c * c, index), coords)
        self.n_particles += images.shape[0]

    def merge(self, other: FourierAccumulator) -> None:
        """Add another accumulator's sums (what an all-reduce would do)."""
        self.data += other.data.to(self.data.device)
        self.weight += other.weight.to(self.weight.device)
        self.n_particles += other.n_particles

    def reconstruct(self, weight_floor_fraction: float = 1e-3) -> torch.Tensor:  # (box,)*3
        """``data / max(weight, floor)``, floor = fraction × mean weight inside Nyquist."""
        p, box = self.padded_size, self.box_size
        data = symmetrise_x0_plane(self.data, conjugate=True)
        weight = symmetrise_x0_plane(self.weight, conjugate=False)
        inside = weight > 0
        floor = weight_floor_fraction * weight[inside].mean() if inside.any() else 1.0
        ft = data / torch.clamp(weight, min=float(floor))
        vol = torch.fft.irfftn(ft, s=(p, p, p), dim=(-3, -2, -1))
        vol = torch.fft.fftshift(vol, dim=(-3, -2, -1))
        start = (p - box) // 2
        return vol[start:start + box, start:start + box, start:start + box].contiguous()
