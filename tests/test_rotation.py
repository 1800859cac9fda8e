"""RELION Euler angles <-> matrices (dynamight_core.rotation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dynamight_core.rotation import (
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
    rotations_for_fourier_slice,
)


def _angles(n: int, seed: int) -> torch.Tensor:
    """``(n, 3)`` rot, tilt, psi in degrees with tilt away from the gimbal lock."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([
        rng.uniform(-180.0, 180.0, n), rng.uniform(1.0, 179.0, n), rng.uniform(-180.0, 180.0, n),
    ], axis=-1))


def test_euler_to_matrix_equals_scipy_zyz_transposed():
    angles = _angles(200, seed=0)
    ours = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    scipy = Rotation.from_euler("ZYZ", angles.numpy(), degrees=True).as_matrix().transpose(0, 2, 1)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), scipy, atol=1e-12)


def test_euler_to_matrix_is_relion_product():
    """A = Rz(psi) Ry(tilt) Rz(rot), Rz = [[c, s, 0], [-s, c, 0], [0, 0, 1]] (RELION's signs)."""
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    rot, tilt, psi = 23.0, 61.0, -114.0
    ours = euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi)).numpy()
    np.testing.assert_allclose(ours, rz(psi) @ ry(tilt) @ rz(rot), atol=1e-12)
    # a pure rot of +90°: the map's +x axis lands on the image's -y axis
    a = euler_to_matrix(torch.tensor(90.0), torch.tensor(0.0), torch.tensor(0.0)).numpy()
    np.testing.assert_allclose(a @ [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], atol=1e-12)


def test_euler_to_matrix_broadcasts():
    out = euler_to_matrix(torch.zeros(4, 1), torch.tensor(30.0), torch.zeros(1, 5))
    assert out.shape == (4, 5, 3, 3)


def test_matrix_to_euler_round_trip_regular():
    angles = _angles(500, seed=1)
    rot, tilt, psi = matrix_to_euler(euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))
    # angles differ only by 360° wraps: compare as angles
    for got, want in ((rot, angles[:, 0]), (tilt, angles[:, 1]), (psi, angles[:, 2])):
        diff = torch.remainder(got - want + 180.0, 360.0) - 180.0
        assert diff.abs().max() < 1e-8
    assert ((tilt >= 0) & (tilt <= 180)).all()


@pytest.mark.parametrize(("tilt", "atol"), [
    (0.0, 1e-12), (180.0, 1e-12), (1e-9, 1e-9), (180.0 - 1e-9, 1e-9),
    # inside matrix_to_euler's lock threshold (sin tilt < 1e-6) rot is dropped: error ~ sin tilt
    (5e-5, 5e-6), (1e-3, 1e-9),
])
def test_matrix_to_euler_round_trip_gimbal_lock(tilt, atol):
    """At tilt 0 / 180 only rot ± psi is defined: the matrix must still round-trip."""
    rot = torch.tensor([-170.0, -30.0, 0.0, 45.0, 120.0], dtype=torch.float64)
    psi = torch.tensor([10.0, 75.0, -90.0, 179.0, -5.0], dtype=torch.float64)
    a = euler_to_matrix(rot, torch.full_like(rot, tilt), psi)
    back = euler_to_matrix(*matrix_to_euler(a))
    torch.testing.assert_close(back, a, atol=atol, rtol=0)


def test_matrix_to_euler_round_trip_random_matrices():
    a = random_rotations(1000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-9, rtol=0)


def test_random_rotations_orthonormal_det_one_and_uniform():
    a = random_rotations(20000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (20000, 3, 3) and a.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64).expand_as(a)
    torch.testing.assert_close(a @ a.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(a), torch.ones(20000, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # Haar measure: E[A] = 0 and the viewing direction A[2, :] is uniform on the sphere
    assert a.mean(0).abs().max() < 0.02
    cos_tilt = a[:, 2, 2]
    hist = torch.histc(cos_tilt.float(), bins=10, min=-1, max=1)
    assert (hist / 2000 - 1).abs().max() < 0.1


def test_random_rotations_reproducible():
    a = random_rotations(5, generator=torch.Generator().manual_seed(7))
    b = random_rotations(5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rotations_for_fourier_slice_is_transpose_float32():
    a = random_rotations(4, generator=torch.Generator().manual_seed(1))
    out = rotations_for_fourier_slice(a)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.transpose(-1, -2).float())
