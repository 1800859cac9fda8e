"""What the encoder sees: each particle image recentred, low-passed and turned to a common
in-plane orientation.

The latent code should describe the conformation, not the pose. The pose is known from the
consensus refinement, so the nuisance the encoder would otherwise have to learn away is removed
first: the image is moved by +rlnOrigin (centred), optionally Fourier-cropped to ``encoder_box``
pixels (a low-pass at ``encoder_box / box`` of Nyquist) and rotated in the plane by -psi, so that it
is the projection along ``Ry(tilt) Rz(rot)``: a particle with ``A = Rz(psi) Ry(tilt) Rz(rot)``
projects a map point ``r`` to ``Rz2(psi) (B r)[:2]`` with ``B = Ry(tilt) Rz(rot)``, so the
canonical image at ``q`` is the image at ``Rz2(psi) q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fourier_grids import irfft2_centered, rfft2_centered
from .shift import recentre_relion_images_rfft


def fourier_crop_rfft(images_rfft: torch.Tensor, box_size: int, new_box: int) -> torch.Tensor:
    """Unshifted rfft ``(b, box, box//2+1)`` -> ``(b, new_box, new_box//2+1)`` (even sizes)."""
    half = new_box // 2
    rows = torch.cat([torch.arange(half), torch.arange(box_size - half, box_size)])
    return images_rfft[..., rows.to(images_rfft.device), : half + 1]


def canonical_encoder_images(
    images: torch.Tensor,  # (b, box, box) real space
    rotations: torch.Tensor,  # (b, 3, 3) RELION A
    shifts_angstrom: torch.Tensor,  # (b, 2)
    pixel_size: float,
    encoder_box: int | None = None,
) -> torch.Tensor:  # (b, encoder_box, encoder_box)
    """Centred, (cropped,) in-plane-derotated images (module docstring)."""
    box = images.shape[-1]
    encoder_box = box if encoder_box is None else int(encoder_box)
    f = recentre_relion_images_rfft(rfft2_centered(images), shifts_angstrom, pixel_size, box)
    if encoder_box < box:
        f = fourier_crop_rfft(f, box, encoder_box)
    small = irfft2_centered(f, encoder_box)
    # in-plane rotation: canonical(q) = image(Rz2(psi) q); Rz2(psi) = A[:2, :2] B[:2, :2]^-1,
    # read off A: A[0, 2] = -cos(psi) sin(tilt), A[1, 2] = sin(psi) sin(tilt)
    a = rotations.to(small.dtype)
    psi = torch.atan2(a[:, 1, 2], -a[:, 0, 2])
    lock = a[:, 2, 2].abs() > 1 - 1e-6  # tilt 0 / 180: psi undefined, all in-plane is rot
    psi = torch.where(lock, torch.zeros_like(psi), psi)
    c, s = torch.cos(psi), torch.sin(psi)
    n = encoder_box
    idx = torch.arange(n, dtype=small.dtype, device=small.device) - n // 2
    qy, qx = torch.meshgrid(idx, idx, indexing="ij")
    x_in = c[:, None, None] * qx + s[:, None, None] * qy
    y_in = -s[:, None, None] * qx + c[:, None, None] * qy
    grid = torch.stack([(2 * (x_in + n // 2) + 1) / n - 1, (2 * (y_in + n // 2) + 1) / n - 1], -1)
    return F.grid_sample(small[:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


__all__ = ["canonical_encoder_images", "fourier_crop_rfft"]
