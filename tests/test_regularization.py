"""Tests for dynamight_core.regularization on lattices and toy losses."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.spatial.transform import Rotation

from dynamight_core.regularization import (
    build_neighbour_graph,
    distance_preservation_loss,
    gradient_norm_ratio_lambda,
    mean_neighbour_distance,
    repulsion_candidate_pairs,
    repulsion_loss,
    signal_ratio_lambda,
)

SPACING = 2.0  # Å
N_SIDE = 4


def cubic_lattice() -> torch.Tensor:  # (64, 3) Å
    axis = torch.arange(N_SIDE, dtype=torch.float64) * SPACING
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    return grid.reshape(-1, 3)


def pairs_closer_than(points: torch.Tensor, cutoff: float) -> set[tuple[int, int]]:
    distances = torch.cdist(points, points)
    return {(i, j) for i, j in itertools.combinations(range(points.shape[0]), 2)
            if float(distances[i, j]) <= cutoff}


def as_set(edges: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in edges}


def test_mean_neighbour_distance_on_lattice() -> None:
    assert mean_neighbour_distance(cubic_lattice()) == pytest.approx(SPACING)


def test_lattice_graph_has_exactly_the_six_neighbour_edges_below_sqrt2() -> None:
    points = cubic_lattice()
    edges, rest = build_neighbour_graph(points, factor=1.2)
    assert edges.dtype == torch.long and edges.shape == (3 * N_SIDE**2 * (N_SIDE - 1), 2)
    assert as_set(edges) == pairs_closer_than(points, SPACING * 1.01)
    assert bool((edges[:, 0] < edges[:, 1]).all())
    assert torch.allclose(rest, torch.full_like(rest, SPACING))
    degree = torch.bincount(edges.flatten(), minlength=points.shape[0])
    assert int(degree.max()) == 6  # interior points


def test_default_factor_also_links_edge_diagonals_on_lattice() -> None:
    points = cubic_lattice()
    edges, rest = build_neighbour_graph(points)  # cutoff 1.5 a > sqrt(2) a
    n_face = 3 * N_SIDE**2 * (N_SIDE - 1)
    n_diagonal = 3 * N_SIDE * 2 * (N_SIDE - 1) ** 2
    assert edges.shape[0] == n_face + n_diagonal
    assert as_set(edges) == pairs_closer_than(points, 1.5 * SPACING)
    assert float(rest.max()) == pytest.approx(SPACING * 2**0.5, rel=1e-6)


def test_distance_loss_zero_for_rigid_motion_positive_for_stretch() -> None:
    points = cubic_lattice().to(torch.float32)
    edges, rest = build_neighbour_graph(points)
    rotation = torch.as_tensor(Rotation.random(random_state=3).as_matrix(), dtype=torch.float32)
    moved = points @ rotation.T + torch.tensor([3.0, -7.0, 1.5])
    deformed = torch.stack([points, moved])  # (2, n, 3)
    loss = distance_preservation_loss(deformed, edges, rest)
    assert loss.shape == (2,)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-10)

    stretch = 0.1
    stretched = (points * (1 + stretch))[None]
    assert float(distance_preservation_loss(stretched, edges, rest)[0]) == pytest.approx(
        stretch**2, rel=1e-4)
    absolute = distance_preservation_loss(stretched, edges, rest, relative=False)
    assert float(absolute[0]) == pytest.approx(float((stretch * rest) .pow(2).mean()), rel=1e-4)


def test_repulsion_zero_when_far_apart_positive_when_close() -> None:
    points = cubic_lattice().to(torch.float32)
    min_distance = 0.8 * SPACING
    pairs = repulsion_candidate_pairs(points, min_distance)  # search radius 2 * min_distance
    assert as_set(pairs) == pairs_closer_than(points.double(), 2 * min_distance)
    assert torch.equal(repulsion_loss(points[None], min_distance, pairs), torch.zeros(1))

    squeezed = points.clone()
    squeezed[1] = squeezed[0] + torch.tensor([0.0, 0.0, 0.5 * min_distance])  # 1 was a neighbour
    squeezed = squeezed[None].requires_grad_(True)
    loss = repulsion_loss(squeezed, min_distance, pairs)
    assert float(loss.detach()[0]) == pytest.approx(0.5**2 / points.shape[0], rel=1e-5)
    loss.sum().backward()
    # gradient descent pushes the pair apart along z
    assert float(squeezed.grad[0, 1, 2]) < 0 < float(squeezed.grad[0, 0, 2])


def test_lambda_from_gradient_norms_on_toy_quadratic() -> None:
    p = torch.tensor([1.0, 2.0, -2.0], requires_grad=True)
    q = torch.tensor([0.5], requires_grad=True)
    c = torch.tensor([0.0, 1.0, 0.0])
    data_loss = 3.0 * (p**2).sum() + (q**2).sum()  # grad (6p, 2q)
    reg_loss = 0.5 * ((p - c) ** 2).sum()  # grad (p - c, 0)
    with torch.no_grad():
        expected_data = torch.cat([6 * p, 2 * q]).norm()
        expected_reg = (p - c).norm()
    value = gradient_norm_ratio_lambda(data_loss, reg_loss, [p, q], factor=0.5)
    assert value == pytest.approx(float(0.5 * expected_data / expected_reg), rel=1e-6)
    # graphs are retained and .grad untouched: the caller can still backpropagate
    assert p.grad is None
    (data_loss + value * reg_loss).backward()
    assert p.grad is not None


def test_lambda_falls_back_when_regulariser_has_no_gradient() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    data_loss = (p**2).sum()
    reg_loss = (p.detach() ** 2).sum()  # constant w.r.t. p
    assert gradient_norm_ratio_lambda(data_loss, reg_loss, [p], factor=2.0) == 2.0
    assert gradient_norm_ratio_lambda(data_loss, reg_loss, [p], factor=2.0, fallback=0.0) == 0.0


def test_signal_ratio_lambda_keeps_the_common_gradient_and_drops_the_noise() -> None:
    """Halves of a batch with the same data term: the signal rule equals the norm rule.
    Per-particle terms that pull the parameters in independent random directions (pure
    noise, no common direction): its λ is far below the norm rule's."""
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    reg = 0.5 * (p**2).sum()
    same = torch.stack([((p - 1.0) ** 2).sum()] * 8)
    assert signal_ratio_lambda(same, reg, [p], 0.3) == pytest.approx(
        gradient_norm_ratio_lambda(same.mean(), reg, [p], 0.3), rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    # n particles, d parameters: |noise gradient| ~ sqrt(d / n), while the signal estimate of
    # pure noise is ~ sqrt(2) d^(1/4) / sqrt(n), a fraction sqrt(2) d^(-1/4) of it (0.17 here)
    w = torch.randn(400, 5000, generator=generator)
    q = torch.zeros(5000, requires_grad=True)
    noise = w @ q  # per-particle gradients: the rows of w (mean 0)
    reg_q = 0.5 * ((q - 1.0) ** 2).sum()
    by_norm = gradient_norm_ratio_lambda(noise.mean(), reg_q, [q], 1.0)
    by_signal = signal_ratio_lambda(noise, reg_q, [q], 1.0)
    assert by_signal < 0.35 * by_norm
