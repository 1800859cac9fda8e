"""The built-in moving test structure and the simulator."""

from dataclasses import replace

import torch

from dynamight_core.simulation import (
    noise_sigma_for_snr,
    plan_simulation,
    render_state,
    simulate_images,
)
from dynamight_core.synthetic_structure import hinged_structure

EXACT = "donot_use_mm_for_euclid_dist"


def test_zero_motion_is_the_reference_state():
    s = hinged_structure(n_gaussians=300)
    assert torch.equal(s.deformed_positions(torch.zeros(1))[0], s.positions)


def test_arms_move_rigidly_and_body_stays():
    s = hinged_structure(n_gaussians=300)
    moved = s.deformed_positions(torch.tensor([1.0]))[0]
    body = s.domain == 0
    assert torch.equal(moved[body], s.positions[body])
    for arm in (1, 2):
        sel = s.domain == arm
        before = torch.cdist(s.positions[sel], s.positions[sel], compute_mode=EXACT)
        after = torch.cdist(moved[sel], moved[sel], compute_mode=EXACT)
        assert torch.allclose(before, after, atol=1e-3)
        assert (moved[sel] - s.positions[sel]).norm(dim=-1).max() > 10.0  # Å: a real motion
        # the hinge point is fixed by the rotation
        hinge = s.hinges[arm - 1]
        assert torch.allclose((moved[sel] - hinge).norm(dim=-1),
                              (s.positions[sel] - hinge).norm(dim=-1), atol=1e-3)


def test_noise_level_matches_requested_snr():
    s = hinged_structure(n_gaussians=300)
    plan = plan_simulation(64, seed=3)
    sigma = noise_sigma_for_snr(s, plan, 32, 4.0, snr=0.5)
    clean = next(simulate_images(s, plan, 32, 4.0, batch_size=64))[1]
    noisy = next(simulate_images(s, replace(plan, noise_sigma=sigma), 32, 4.0, batch_size=64))[1]
    measured = clean.var(dim=(-2, -1)).mean() / (noisy - clean).var()
    assert abs(float(measured) - 0.5) < 0.05


def test_state_maps_differ_in_the_arms_only():
    s = hinged_structure(n_gaussians=300)
    a, b = render_state(s, -1.0, 32, 4.0), render_state(s, 1.0, 32, 4.0)
    assert abs(float(a.sum() - b.sum())) < 1e-2 * float(a.sum())  # same mass
    assert float((a - b).abs().max()) > 0.1 * float(a.max())
