"""dynamight_core.latent_analysis on tiny synthetic inputs: embedding and its inverse, paths,
polygons, clusters, colourings, and the deformed model of a latent point against direct
computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamight_core import latent_analysis as la
from dynamight_core.decoder import DeformationDecoder
from dynamight_core.deformation_model import DeformationModel
from dynamight_core.gaussian_model import GaussianModel
from dynamight_core.gaussian_projection import render_gaussians_3d
from dynamight_core.rotation import euler_to_matrix

BOX, PIXEL, LATENT = 16, 4.0, 2


def tiny_model(seed: int = 0, movable: torch.Tensor | None = None) -> DeformationModel:
    """A model whose decoder moves the Gaussians (random, non-zero output layer)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gaussians = GaussianModel(torch.randn(40, 3, generator=g) * 8.0, torch.tensor([3.0]),
                              torch.tensor([5.0]))
    decoder = DeformationDecoder(BOX, PIXEL, LATENT, n_neurons=16, n_linear_layers=1, n_freqs=3,
                                 movable_mask=movable)
    with torch.no_grad():
        decoder.output_layer.weight.normal_(0.0, 0.3, generator=g)
        decoder.output_layer.bias.normal_(0.0, 0.05, generator=g)
    return DeformationModel(gaussians, decoder, BOX, PIXEL).eval()


def test_colouring_names_match_the_display_table():
    from relion_external.latent_explorer.colours import COLOURINGS

    assert tuple(COLOURINGS) == la.COLOURINGS


def test_principal_axes_orders_by_variance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 3)) * [0.5, 3.0, 1.0] + [1.0, 2.0, 3.0]
    mean, axes, std = la.principal_axes(z)
    np.testing.assert_allclose(mean, [1, 2, 3], atol=0.2)
    np.testing.assert_allclose(np.abs(axes[0]), [0, 1, 0], atol=0.05)
    np.testing.assert_allclose(np.abs(axes[2]), [1, 0, 0], atol=0.05)
    np.testing.assert_allclose(std, [3.0, 1.0, 0.5], rtol=0.1)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_pca_embedding_maps_back_onto_its_plane(d):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, d)) * np.arange(1, d + 1)[::-1]
    e = la.embed_latents_2d(z, method="pca")
    assert e.coords.shape == (300, 2)
    np.testing.assert_allclose(e.coords.mean(axis=0), 0.0, atol=1e-12)
    back = e.to_latent(e.coords)
    k = min(2, d)
    plane = e.axes[:k]
    expected = e.mean + (z - e.mean) @ plane.T @ plane  # projection onto the top-k plane
    np.testing.assert_allclose(back, expected, atol=1e-10)
    if d <= 2:
        np.testing.assert_allclose(back, z, atol=1e-10)


def test_umap_embedding_when_installed():
    pytest.importorskip("umap", reason="umap-learn is optional")
    z = np.random.default_rng(2).normal(size=(60, 3))
    e = la.embed_latents_2d(z, method="umap", seed=0)
    assert e.coords.shape == (60, 2)
    assert e.to_latent(e.coords[:3]).shape == (3, 3)


def test_unknown_embedding_is_refused():
    with pytest.raises(ValueError, match="embedding"):
        la.embed_latents_2d(np.zeros((5, 2)), method="tsne")


def test_interpolate_path_is_even_in_arc_length():
    path = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 1.0]])  # length 4
    points = la.interpolate_path(path, 5)
    np.testing.assert_allclose(points, [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1]])
    assert la.interpolate_path(path[:1], 3).shape == (3, 2)
    np.testing.assert_allclose(la.interpolate_path(path, 2), path[[0, -1]])


def test_points_in_polygon_concave():
    # an L shape: the square [0, 2]^2 without its upper right quarter
    polygon = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], dtype=float)
    points = np.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5], [3.0, 0.5], [-1, 1]])
    np.testing.assert_array_equal(la.points_in_polygon_2d(points, polygon),
                                  [True, True, True, False, False, False])
    with pytest.raises(ValueError):
        la.points_in_polygon_2d(points, polygon[:2])


def test_kmeans_finds_blobs_largest_first():
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(size=(30, 2)) * 0.1 + [5, 5],
                        rng.normal(size=(70, 2)) * 0.1 - [5, 5]])
    labels = la.kmeans_clusters(z, 2, seed=0)
    assert (labels[30:] == 0).all() and (labels[:30] == 1).all()


def test_points_along_axis():
    z = la.points_along_axis(np.array([1.0, 1.0]), np.array([0.0, 1.0]), 0.5, 5, extent=2.0)
    np.testing.assert_allclose(z, [[1, 0], [1, 0.5], [1, 1], [1, 1.5], [1, 2]])


def test_pose_shift_and_density_colourings():
    rot = euler_to_matrix(torch.tensor([10.0, 0.0, 170.0]), torch.tensor([35.0, 90.0, 120.0]),
                          torch.tensor([-20.0, 5.0, 60.0]))
    np.testing.assert_allclose(la.tilt_degrees(rot), [35.0, 90.0, 120.0], atol=1e-4)
    np.testing.assert_allclose(la.shift_angstrom(torch.tensor([[3.0, 4.0], [0.0, 0.0]])), [5, 0])
    rng = np.random.default_rng(4)
    coords = np.concatenate([rng.normal(size=(50, 2)) * 0.1, rng.normal(size=(50, 2)) * 2 + 10])
    density = la.embedding_density(coords)
    assert density[:50].min() > density[50:].max()


def test_direction_and_location_of_motion():
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    vectors = np.outer([1.0, 2.0, -1.0, -3.0], axis)
    angle = la.direction_of_motion_degrees(vectors)
    assert abs(abs(angle[0] - angle[2]) - 180.0) < 1e-6
    np.testing.assert_allclose(angle[0], angle[1])
    positions = np.stack([np.linspace(-50, 50, 101), np.zeros(101), np.zeros(101)], axis=1)
    location = la.location_of_motion_angstrom(np.array([[20.0, 1.0, 0.0], [-10.0, 0.0, 2.0]]),
                                              positions)
    np.testing.assert_allclose(np.abs(location), [20.0, 10.0], atol=1e-9)
    assert location[0] * location[1] < 0


def test_latent_map_is_the_direct_render_of_the_deformed_gaussians():
    model = tiny_model()
    z = torch.tensor([0.7, -0.4])
    d = model.displacements(z[None])[0].detach()
    assert d.abs().max() > 0.5  # the decoder moves the Gaussians
    g = model.gaussians
    direct = render_gaussians_3d(g.positions.detach() + d, torch.exp(g.log_sigmas.detach()),
                                 g.masses().detach(), g.class_index, BOX, PIXEL, 2)
    ours = la.latent_map_3d(model, z, oversampling=2)
    torch.testing.assert_close(ours, direct)
    preview = la.latent_map_3d(model, z, oversampling=1)
    corr = np.corrcoef(preview.flatten().numpy(), direct.flatten().numpy())[0, 1]
    assert corr > 0.99
    torch.testing.assert_close(la.deformed_positions(model, z[None])[0], g.positions + d)


def test_deformation_vectors_in_voxel_zyx():
    positions = torch.tensor([[PIXEL, 0.0, 0.0], [0.0, -2 * PIXEL, 3 * PIXEL]])
    displacements = torch.tensor([[0.0, 0.0, PIXEL], [PIXEL, 0.0, 0.0]])
    v = la.deformation_vectors_zyx(positions, displacements, box_size=BOX, pixel_size=PIXEL)
    c = BOX // 2
    np.testing.assert_allclose(v[:, 0], [[c, c, c + 1], [c + 3, c - 2, c]])
    np.testing.assert_allclose(v[:, 1], [[1, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize("masked", [False, True])
def test_motion_statistics_match_brute_force(masked):
    movable = (torch.arange(40) % 3 != 0) if masked else None
    model = tiny_model(movable=movable)
    z = np.random.default_rng(5).normal(size=(7, LATENT))
    error = np.linspace(0.1, 2.0, 40)
    subset = la.gaussian_subset(40, 25, seed=1)
    assert subset.shape == (25,) and np.array_equal(la.gaussian_subset(40, 50), np.arange(40))
    stats = la.motion_statistics(model, z, gaussian_indices=subset, per_gaussian_error=error,
                                 batch_size=3)
    d = model.displacements(torch.as_tensor(z, dtype=torch.float32)).detach().numpy()[:, subset]
    x = model.gaussians.positions.detach().numpy()[subset]
    size = np.linalg.norm(d, axis=-1)
    np.testing.assert_allclose(stats.amount, size.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.mean_vector, d.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.centre, size @ x / size.sum(1, keepdims=True), rtol=1e-4)
    np.testing.assert_allclose(stats.weighted_error,
                               size @ error[subset] / size.sum(1), rtol=1e-5)
    if masked:  # the model's own decoder keeps its full mask
        assert model.decoder.movable_mask.shape == (40,)


def test_half_set_disagreement():
    m1, m2 = tiny_model(0), tiny_model(1)
    z1 = np.random.default_rng(6).normal(size=(4, LATENT))
    z2 = z1 + 0.3
    ours = la.half_set_disagreement(m1, m2, z1, z2, batch_size=3)
    d1 = m1.displacements(torch.as_tensor(z1, dtype=torch.float32)).detach()
    d2 = m2.displacements(torch.as_tensor(z2, dtype=torch.float32)).detach()
    np.testing.assert_allclose(ours, (d1 - d2).norm(dim=-1).mean(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(la.half_set_disagreement(m1, m1, z1, z1), 0.0, atol=1e-7)
