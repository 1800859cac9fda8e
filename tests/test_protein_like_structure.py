"""The protein-like benchmark structures: atomic density, sizes that fit the box, the motions
they claim (hinges rigid, twists non-rigid, 8-15 Å), and a reference state at t = 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.synthetic_structure import DomainMotion

EXACT = "donot_use_mm_for_euclid_dist"


@pytest.fixture(scope="module", params=PRESETS)
def structure(request):
    return protein_like_structure(request.param)


def test_atomic_density_and_size(structure):
    p = structure.positions.numpy()
    n_residues = int(structure.name.split("(")[1].split()[0])
    assert 300 <= n_residues <= 360  # several hundred residues
    assert 6.0 <= p.shape[0] / n_residues <= 8.5  # heavy atoms per residue
    tree = cKDTree(p)
    nearest = tree.query(p, k=2)[0][:, 1]
    assert float(np.median(nearest)) == pytest.approx(1.4, abs=0.15)  # bond lengths
    assert (nearest < 0.9).mean() < 0.05  # hardly any overlapping atoms
    # protein-like packing: heavy atoms within 6 Å of an atom, per Å³ (interior ~0.06)
    counts = np.array([len(x) for x in tree.query_ball_point(p, 6.0)])
    assert 0.035 < np.median(counts) / (4 / 3 * np.pi * 6.0**3) < 0.08
    # centred, and inside a 96 Å box with room for 6 Å shifts at every motion value
    assert float(structure.positions.mean(0).norm()) < 3.0
    for t in (-1.0, 0.0, 1.0):
        assert float(structure.deformed_positions(torch.tensor([t]))[0].norm(dim=1).max()) < 42


def test_reference_state_and_static_core(structure):
    moved = structure.deformed_positions(torch.tensor([0.0, 0.7, -1.0]))
    torch.testing.assert_close(moved[0], structure.positions, atol=1e-5, rtol=0)
    static = ~structure.moving
    assert int(static.sum()) > 0.4 * static.shape[0]
    assert torch.equal(moved[1:, static], structure.positions[static].expand(2, -1, -1))


def test_moving_domains_travel_8_to_15_angstrom(structure):
    ends = structure.deformed_positions(torch.tensor([-1.0, 1.0]))
    travel = (ends[1] - ends[0]).norm(dim=-1)
    for motion in structure.motions:
        sel = structure.domain == motion.domain
        assert 7.0 < float(travel[sel].quantile(0.9)) < 18.0, motion
        assert float(travel[sel].max()) > 10.0


def test_hinges_are_rigid_and_twists_are_not(structure):
    moved = structure.deformed_positions(torch.tensor([1.0]))[0]
    for motion in structure.motions:
        sel = structure.domain == motion.domain
        before = torch.cdist(structure.positions[sel], structure.positions[sel],
                             compute_mode=EXACT)
        after = torch.cdist(moved[sel], moved[sel], compute_mode=EXACT)
        if motion.kind == "hinge":
            assert torch.allclose(before, after, atol=1e-3)
        else:
            assert float((before - after).abs().max()) > 1.0


def test_twist_angle_grows_along_the_axis():
    motion = DomainMotion(1, torch.zeros(3), torch.tensor([1.0, 0.0, 0.0]), 30.0, kind="twist",
                          reach_angstrom=10.0)
    points = torch.tensor([[[0.0, 2.0, 0.0], [5.0, 2.0, 0.0], [10.0, 2.0, 0.0]]])
    out = motion.apply(points, torch.tensor([1.0]))[0]
    angles = torch.rad2deg(torch.atan2(out[:, 2], out[:, 1]))
    torch.testing.assert_close(angles, torch.tensor([0.0, 15.0, 30.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 0], points[0, :, 0])  # no motion along the axis


def test_presets_are_deterministic_and_distinct():
    a, b = protein_like_structure("clamp"), protein_like_structure("clamp")
    assert torch.equal(a.positions, b.positions)
    c = protein_like_structure("twist-hinge")
    assert c.positions.shape != a.positions.shape or not torch.equal(c.positions, a.positions)
    with pytest.raises(ValueError, match="unknown preset"):
        protein_like_structure("adenylate-kinase")
