"""Scores against a known truth (benchmarks and the demo) on cases with known answers, and the
FSC-weighted consensus average."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamight_core.fsc import fsc_weighted_average
from dynamight_core.protein_like_structure import protein_like_structure
from dynamight_core.quality_scores import fsc_area, gap_closed, knn_r2, region_masks
from dynamight_core.synthetic_structure import hinged_structure


def test_knn_r2_of_a_perfect_and_of_a_useless_code():
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 2000)
    curve = np.stack([np.cos(2 * t), np.sin(2 * t)], axis=1)  # a bent 1D manifold in 2D
    assert knn_r2(curve, t) > 0.99
    assert abs(knn_r2(rng.normal(size=(2000, 2)), t)) < 0.05
    # noise of known size: R² ≈ var(t) / (var(t) + var(noise)) for a linear code
    noisy = t + rng.normal(0, 0.3, t.shape)
    expected = (1 / 3) / (1 / 3 + 0.09)
    assert knn_r2(noisy[:, None], t) == pytest.approx(expected, abs=0.04)


def test_knn_r2_is_cross_validated():
    # a code that is pure noise but unique per particle must not predict itself
    rng = np.random.default_rng(1)
    t = rng.uniform(-1, 1, 500)
    assert knn_r2(rng.normal(size=(500, 3)), t, k=1) < 0.1


def test_knn_r2_of_too_few_particles_says_so():
    """Fewer particles than two per fold (a half set without validation particles, say) is a
    clear error, not a failed reshape."""
    for n in (0, 9):
        with pytest.raises(ValueError, match="need at least 10 particles"):
            knn_r2(np.zeros((n, 2)), np.zeros(n))


def test_gap_closed():
    assert gap_closed(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert gap_closed(0.6, 0.6, 1.0) == 0.0
    assert np.isnan(gap_closed(0.8, 0.9, 0.9))


def test_fsc_area_is_the_mean_over_shells():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, 16, generator=g)
    assert fsc_area(a, a) == pytest.approx(1.0)
    mask = torch.zeros(16, 16, 16)
    mask[4:12, 4:12, 4:12] = 1
    assert fsc_area(a, 2 * a, mask) == pytest.approx(1.0)
    assert fsc_area(a, torch.randn(16, 16, 16, generator=g)) == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize("structure, box, pixel", [
    (hinged_structure(n_gaussians=600), 32, 4.0),
    (protein_like_structure("clamp"), 64, 1.5),
])
def test_region_masks_cover_the_moving_and_the_static_parts(structure, box, pixel):
    moving, static = region_masks(structure, box, pixel)
    assert float(moving.max()) == pytest.approx(1.0) and float(static.max()) > 0.9
    assert float((moving * static).max()) < 0.25  # hardly overlapping
    idx = torch.round(structure.positions / pixel + box // 2).long().clamp(0, box - 1)
    on_moving = moving[idx[:, 2], idx[:, 1], idx[:, 0]]
    on_static = static[idx[:, 2], idx[:, 1], idx[:, 0]]
    movers = structure.moving
    assert float(on_moving[movers].mean()) > 0.95
    assert float(on_moving[~movers].mean()) < 0.6
    assert float(on_static[~movers].mean()) > 0.4 and float(on_static[movers].mean()) < 0.05


def test_fsc_weighted_average_keeps_signal_and_damps_noise():
    g = torch.Generator().manual_seed(2)
    signal = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 32, 32, 32, generator=g), 5,
                                            stride=1, padding=2)[0, 0]
    half1 = signal + 0.3 * torch.randn(32, 32, 32, generator=g)
    half2 = signal + 0.3 * torch.randn(32, 32, 32, generator=g)
    average = 0.5 * (half1 + half2)
    weighted = fsc_weighted_average(half1, half2)

    def correlation(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert correlation(weighted, signal) > correlation(average, signal) + 0.02
    # each shell is the average's, scaled by sqrt(2 FSC / (1 + FSC)) (the mean kept)
    ratio = (torch.fft.rfftn(weighted) / torch.fft.rfftn(average)).abs()
    assert float(ratio[0, 0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(ratio.max()) <= 1.0 + 1e-4 and float(ratio[16, 16, 16]) < 0.5
