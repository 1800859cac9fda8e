"""The RELION CTF on rfft grids (dynamight_core.ctf).

Comparison with torch-ctf 0.6.0 (``calculate_ctf_2d``), found empirically:
- torch-ctf takes the *mean* defocus ``(U + V) / 2`` and the astigmatism ``(U - V) / 2`` in
  micrometres; RELION (and we) take U and V in Å.
- Its docstring says "0 places defocus_u along the y-axis", but in 0.6.0 the same angle as
  RELION's ``rlnDefocusAngle`` (from the x axis) gives the same CTF; ``angle + 90°`` does not
  (``test_torch_ctf_astigmatism_angle_convention`` pins this down, so a change in torch-ctf shows).
- It takes ``sqrt(astigmatism)``, so ``DefocusV > DefocusU`` (negative astigmatism, which RELION
  files do contain) gives NaN; ours is finite there.
- It has no B-factor and no scale factor.
- Its wavelength constants differ from RELION's in the last digits: ~1e-3 absolute difference at
  Nyquist on a 1.5 Å/px grid.
"""

from __future__ import annotations

import math

import pytest
import torch

from dynamight_core.ctf import ctf_2d_rfft, electron_wavelength_angstrom
from dynamight_core.fourier_grids import fftfreq_grid_2d_rfft
from dynamight_core.particles import CTFParams

BOX, PIXEL = 64, 1.5


def _ctf(n: int = 1, **kwargs) -> torch.Tensor:
    params = {"defocus_u_angstrom": 15000.0, "defocus_v_angstrom": 12000.0}
    params.update(kwargs)
    return ctf_2d_rfft(CTFParams.from_values(n, **params), BOX, PIXEL)


def _k2_angstrom() -> torch.Tensor:
    k = fftfreq_grid_2d_rfft(BOX) / PIXEL
    return (k * k).sum(-1)


def test_electron_wavelength():
    lam = electron_wavelength_angstrom(torch.tensor([300.0, 200.0, 100.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([0.019687, 0.025079, 0.037014],
                                                 dtype=torch.float64), atol=2e-6, rtol=0)


def test_shape_and_batch_independence():
    u = [15000.0, 9000.0, 22000.0]
    batch = _ctf(3, defocus_u_angstrom=u, defocus_v_angstrom=[14000.0, 9500.0, 21000.0],
                 defocus_angle_degrees=[0.0, 40.0, 170.0], phase_shift_degrees=[0.0, 30.0, 0.0])
    assert batch.shape == (3, BOX, BOX // 2 + 1)
    single = _ctf(1, defocus_u_angstrom=9000.0, defocus_v_angstrom=9500.0,
                  defocus_angle_degrees=40.0, phase_shift_degrees=30.0)
    torch.testing.assert_close(batch[1], single[0])


@pytest.mark.parametrize(("q0", "scale"), [(0.1, 1.0), (0.07, 0.8), (0.0, 1.0)])
def test_value_at_k0_is_scale_times_amplitude_contrast(q0, scale):
    """γ(0) = −atan(Q0/√(1−Q0²)) so CTF(0) = scale · sin(atan(Q0/√(1−Q0²))) = scale · Q0."""
    c = _ctf(amplitude_contrast=q0, scale=scale)
    expected = scale * math.sin(math.atan(q0 / math.sqrt(1 - q0 * q0)))
    assert c[0, 0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(scale * q0, abs=1e-12)


def test_positive_at_low_frequency():
    """RELION's sign: positive (not flipped) before the first zero, for under-focus."""
    c = _ctf(defocus_u_angstrom=10000.0, defocus_v_angstrom=10000.0)[0]
    k2 = _k2_angstrom()
    lam = electron_wavelength_angstrom(torch.tensor(300.0)).item()
    # first zero of -sin(γ): π λ Δf k² ≈ π - atan(Q0 ...) -> stay well inside it
    inside = k2 < 0.5 / (lam * 10000.0)
    assert (c[inside] > 0).all()
    assert (c < 0).any()  # and it does oscillate further out


def test_friedel_symmetric():
    c = _ctf(defocus_angle_degrees=37.0)[0]
    # column kx = 0 of the rfft holds ky and -ky: rows i and box - i
    torch.testing.assert_close(c[1:, 0], c[1:, 0].flip(0))


def _relion_1d(defocus: float, k2: torch.Tensor, q0: float = 0.1, cs_mm: float = 2.7,
               phase_deg: float = 0.0) -> torch.Tensor:
    lam = electron_wavelength_angstrom(torch.tensor(300.0, dtype=torch.float64))
    cs = cs_mm * 1e7
    k2 = k2.to(torch.float64)
    gamma = (-math.pi * lam * defocus * k2 + 0.5 * math.pi * cs * lam**3 * k2 * k2
             - math.radians(phase_deg) - math.atan(q0 / math.sqrt(1 - q0 * q0)))
    return (-torch.sin(gamma)).float()


@pytest.mark.parametrize(("angle", "u_axis"), [(0.0, "x"), (90.0, "y"), (180.0, "x")])
def test_astigmatism_angle_from_x_axis(angle, u_axis):
    """Δf(θ) = (U+V)/2 + (U−V)/2 cos 2(θ − angle): DefocusU lies along the angle from x."""
    u, v = 15000.0, 12000.0
    c = _ctf(defocus_u_angstrom=u, defocus_v_angstrom=v, defocus_angle_degrees=angle)[0]
    k2 = _k2_angstrom()
    along_x, along_y = c[0, :], c[: BOX // 2 + 1, 0]  # ky = 0 row, kx = 0 column (ky >= 0)
    dx, dy = (u, v) if u_axis == "x" else (v, u)
    torch.testing.assert_close(along_x, _relion_1d(dx, k2[0, :]), atol=2e-4, rtol=0)
    torch.testing.assert_close(along_y, _relion_1d(dy, k2[: BOX // 2 + 1, 0]), atol=2e-4, rtol=0)


def test_swapping_u_v_equals_rotating_angle_by_90():
    a = _ctf(defocus_u_angstrom=12000.0, defocus_v_angstrom=15000.0, defocus_angle_degrees=20.0)
    b = _ctf(defocus_u_angstrom=15000.0, defocus_v_angstrom=12000.0, defocus_angle_degrees=110.0)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bfactor_envelope():
    base = _ctf(bfactor_angstrom2=0.0)[0]
    damped = _ctf(bfactor_angstrom2=80.0)[0]
    envelope = torch.exp(-80.0 * _k2_angstrom() / 4.0)
    torch.testing.assert_close(damped, base * envelope, atol=1e-6, rtol=1e-5)
    assert damped[0, 0] == pytest.approx(base[0, 0].item())


def test_scale_is_linear():
    torch.testing.assert_close(_ctf(scale=0.6), 0.6 * _ctf(scale=1.0), atol=1e-6, rtol=1e-6)


def test_phase_shift_90_turns_minus_sine_into_cosine():
    """With Q0 = 0, γ0 = −πλΔf k² + π/2 Cs λ³ k⁴: CTF = −sin γ0, and with a 90° phase plate
    CTF = −sin(γ0 − π/2) = cos γ0 (so it is 1 at k = 0)."""
    no_plate = _ctf(amplitude_contrast=0.0, phase_shift_degrees=0.0)[0]
    plate = _ctf(amplitude_contrast=0.0, phase_shift_degrees=90.0)[0]
    assert no_plate[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert plate[0, 0].item() == pytest.approx(1.0, abs=1e-7)
    torch.testing.assert_close(plate**2 + no_plate**2, torch.ones_like(plate), atol=1e-5, rtol=0)
    k2 = _k2_angstrom()
    lam = electron_wavelength_angstrom(torch.tensor(300.0, dtype=torch.float64))
    mean_defocus = 13500.0  # on the diagonal θ = 45° the astigmatic term vanishes (angle 0)
    gamma0 = (-math.pi * lam * mean_defocus * k2 + 0.5 * math.pi * 2.7e7 * lam**3 * k2**2).float()
    diag = torch.arange(1, BOX // 2)
    torch.testing.assert_close(plate[diag, diag], torch.cos(gamma0[diag, diag]), atol=5e-4, rtol=0)


def test_equals_torch_ctf_where_conventions_agree():
    torch_ctf = pytest.importorskip("torch_ctf")
    u = torch.tensor([15000.0, 21000.0, 8000.0])
    v = torch.tensor([12000.0, 20500.0, 7400.0])
    angle = torch.tensor([0.0, 33.0, 151.0])
    phase = torch.tensor([0.0, 20.0, 90.0])
    ours = ctf_2d_rfft(CTFParams.from_values(3, defocus_u_angstrom=u, defocus_v_angstrom=v,
                                             defocus_angle_degrees=angle,
                                             phase_shift_degrees=phase), BOX, PIXEL)
    theirs = torch_ctf.calculate_ctf_2d(
        defocus=(u + v) / 2e4, astigmatism=(u - v) / 2e4, astigmatism_angle=angle,
        voltage=300.0, spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=phase,
        pixel_size=PIXEL, image_shape=(BOX, BOX), rfft=True, fftshift=False)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs.float(), atol=2e-3, rtol=0)


def test_torch_ctf_astigmatism_angle_convention():
    """torch-ctf 0.6.0 measures the angle as RELION does (despite its docstring); +90° differs."""
    torch_ctf = pytest.importorskip("torch_ctf")
    ours = _ctf(defocus_angle_degrees=30.0)[0]

    def theirs(angle):
        return torch_ctf.calculate_ctf_2d(
            defocus=1.35, astigmatism=0.15, astigmatism_angle=angle, voltage=300.0,
            spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=0.0,
            pixel_size=PIXEL, image_shape=(BOX, BOX), rfft=True, fftshift=False).float()

    assert (ours - theirs(30.0)).abs().max() < 2e-3
    assert (ours - theirs(120.0)).abs().max() > 0.5


def test_defocus_v_greater_than_u_finite_where_torch_ctf_is_nan():
    torch_ctf = pytest.importorskip("torch_ctf")
    ours = _ctf(defocus_u_angstrom=12000.0, defocus_v_angstrom=15000.0, defocus_angle_degrees=10.0)
    assert torch.isfinite(ours).all()
    theirs = torch_ctf.calculate_ctf_2d(
        defocus=1.35, astigmatism=-0.15, astigmatism_angle=10.0, voltage=300.0,
        spherical_aberration=2.7, amplitude_contrast=0.1, phase_shift=0.0, pixel_size=PIXEL,
        image_shape=(BOX, BOX), rfft=True, fftshift=False)
    assert torch.isnan(theirs).any()  # why we do not use torch-ctf for RELION data
