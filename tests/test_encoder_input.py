"""The encoder's view of a particle: centred and turned to a common in-plane orientation."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.encoder_input import canonical_encoder_images
from dynamight_core.fourier_grids import irfft2_centered
from dynamight_core.gaussian_projection import project_gaussians_rfft
from dynamight_core.rotation import euler_to_matrix
from dynamight_core.shift import apply_relion_origin_rfft

BOX, PX = 64, 2.0


def _project(positions, rotations, shifts=None):
    n = positions.shape[0]
    f = project_gaussians_rfft(positions, torch.tensor([3.0]), torch.ones(n),
                               torch.zeros(n, dtype=torch.long), rotations, BOX, PX)
    if shifts is not None:
        f = apply_relion_origin_rfft(f, shifts, PX, BOX)
    return irfft2_centered(f, BOX)


def _corr(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_same_view_with_different_psi_and_shift_looks_the_same():
    g = torch.Generator().manual_seed(0)
    # an elongated, off-centre cloud: any error in angle sign or shift shows
    positions = torch.randn(300, 3, generator=g) * torch.tensor([20.0, 8.0, 5.0])
    positions = positions + torch.tensor([10.0, 0.0, 0.0])
    rot = torch.tensor([30.0, 100.0, 5.0])
    tilt = torch.tensor([60.0, 20.0, 120.0])
    psi = torch.tensor([70.0, -120.0, 181.0])
    a = euler_to_matrix(rot, tilt, psi).float()
    b = euler_to_matrix(rot, tilt, torch.zeros(3)).float()
    shifts = torch.tensor([[4.0, -6.0], [0.0, 2.0], [-7.5, 3.0]])
    seen = _project(positions, a, shifts)
    canonical = canonical_encoder_images(seen, a, shifts, PX)
    reference = _project(positions, b)
    for i in range(3):
        assert _corr(seen[i], reference[i]) < 0.8  # the raw images do differ
        assert _corr(canonical[i], reference[i]) > 0.999


def test_fourier_crop_keeps_the_low_resolution_image():
    g = torch.Generator().manual_seed(1)
    positions = torch.randn(200, 3, generator=g) * 12.0
    a = euler_to_matrix(torch.tensor([10.0]), torch.tensor([40.0]), torch.tensor([0.0])).float()
    full = canonical_encoder_images(_project(positions, a), a, torch.zeros(1, 2), PX)
    small = canonical_encoder_images(_project(positions, a), a, torch.zeros(1, 2), PX, 32)
    assert small.shape == (1, 32, 32)
    # the blobs (σ 3 Å = 1.5 px) are nearly band-limited to half Nyquist: downsample compares
    down = torch.nn.functional.avg_pool2d(full[:, None], 2)[:, 0]
    assert _corr(small[0], down[0]) > 0.98


def test_encode_rejects_bare_images():
    from dynamight_core.decoder import DeformationDecoder
    from dynamight_core.deformation_model import DeformationModel
    from dynamight_core.encoder import ImageEncoder
    from dynamight_core.gaussian_model import GaussianModel

    model = DeformationModel(GaussianModel.from_config({"n_gaussians": 4, "n_classes": 1}),
                             ImageEncoder(16, 2), DeformationDecoder(16, 2.0, 2), 16, 2.0)
    with pytest.raises(TypeError, match="Batch"):
        model.encode(torch.zeros(2, 16, 16))
