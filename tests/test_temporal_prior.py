"""The temporal prior of tracked particles against the Gaussian process it stands for: the
prior of one code given its neighbours equals the conditional of the joint Ornstein-Uhlenbeck
covariance exp(-|t_i - t_j| / τ), and the fitted correlation time recovers the one that drew
the codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamight_core.temporal_prior import TemporalPrior, TrackLayout


def _shuffled_tracks(seed=0):
    """Three tracks (irregular times) and two untracked rows, in random row order."""
    rng = np.random.default_rng(seed)
    track = np.array([0] * 6 + [1] * 4 + [2] * 1 + [-1] * 2)
    time = np.concatenate([np.cumsum(rng.uniform(0.5, 3.0, 6)), np.cumsum(rng.uniform(1, 2, 4)),
                           [5.0], [0.0, 0.0]])
    perm = rng.permutation(track.shape[0])
    return track[perm], time[perm]


def test_layout_links_each_frame_to_its_neighbours_in_time():
    track, time = _shuffled_tracks()
    layout = TrackLayout.from_tracks(track, time)
    for r in range(len(track)):
        same = np.flatnonzero((track == track[r]) & (track >= 0))
        earlier = same[time[same] < time[r]]
        later = same[time[same] > time[r]]
        prev = earlier[np.argmax(time[earlier])] if earlier.size else -1
        nxt = later[np.argmin(time[later])] if later.size else -1
        assert layout.previous[r] == prev and layout.next[r] == nxt
        assert layout.dt_previous[r] == pytest.approx(time[r] - time[prev] if prev >= 0 else 0)
    assert layout.n_pairs == 5 + 3
    with pytest.raises(ValueError, match="track 4 has two particles at time 2"):
        TrackLayout.from_tracks(np.array([4, 4, 4]), np.array([1.0, 2.0, 2.0]))


@pytest.mark.parametrize("tau", [0.7, 4.0])
def test_conditional_prior_is_the_conditional_of_the_joint_process(tau):
    track, time = _shuffled_tracks(seed=1)
    prior = TemporalPrior(TrackLayout.from_tracks(track, time), correlation_time=tau)
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(len(track), 3, generator=g, dtype=torch.float64)
    mean, precision = prior.conditional(torch.arange(len(track)), codes)
    # independent truth: the joint covariance of each track, conditioned by matrix algebra
    for r in range(len(track)):
        if track[r] < 0:
            assert float(precision[r]) == 1.0 and float(mean[r].abs().max()) == 0.0
            continue
        rows = np.flatnonzero(track == track[r])
        t = time[rows]
        inv = np.linalg.inv(np.exp(-np.abs(t[:, None] - t[None]) / tau))
        k = int(np.flatnonzero(rows == r)[0])
        others = [j for j in range(len(rows)) if j != k]
        expected_precision = inv[k, k]
        expected_mean = -(inv[k, others] @ codes[rows[others]].numpy()) / inv[k, k]
        assert float(precision[r]) == pytest.approx(expected_precision, rel=1e-6)
        np.testing.assert_allclose(mean[r].numpy(), expected_mean, rtol=1e-6, atol=1e-9)


def _ou_tracks(true_tau, n_tracks, n_frames, d, rng):
    tracks, times, codes = [], [], []
    for k in range(n_tracks):
        t = np.cumsum(rng.choice([1.0, 2.0], n_frames))  # some frames missing
        z = np.empty((n_frames, d))
        z[0] = rng.standard_normal(d)
        for i in range(1, n_frames):
            a = np.exp(-(t[i] - t[i - 1]) / true_tau)
            z[i] = a * z[i - 1] + np.sqrt(1 - a * a) * rng.standard_normal(d)
        tracks.append(np.full(n_frames, k))
        times.append(t)
        codes.append(z)
    return np.concatenate(tracks), np.concatenate(times), np.concatenate(codes)


def test_fit_recovers_the_correlation_time_that_drew_the_codes():
    rng = np.random.default_rng(3)
    true_tau, d = 6.0, 2
    track, time, codes = _ou_tracks(true_tau, 150, 40, d, rng)
    prior = TemporalPrior(TrackLayout.from_tracks(track, time), correlation_time=1.0)
    z = torch.tensor(codes)
    # codes known exactly: posterior precisions (nearly) infinite
    exact = 1e8 * torch.eye(d, dtype=torch.float64).expand(z.shape[0], d, d)
    assert prior.fit(z, exact) == pytest.approx(true_tau, rel=0.06)
    # rows not used take their whole track out; with none left nothing changes
    prior.correlation_time = 2.0
    assert prior.fit(z, exact, use=np.zeros(z.shape[0], dtype=bool)) == 2.0


@pytest.mark.parametrize("tau", [0.5, 3.0, 20.0])
def test_images_that_say_nothing_leave_the_correlation_time_as_it_is(tau):
    """Codes at the prior mean with the prior's own precision (H = p I): the EM update is a
    fixed point (a mean-field update would collapse τ to the bottom of its grid)."""
    track, time = _shuffled_tracks(seed=2)
    prior = TemporalPrior(TrackLayout.from_tracks(track, time), correlation_time=tau)
    z = torch.zeros(len(track), 2, dtype=torch.float64)
    _, p = prior.conditional(torch.arange(len(track)), z)
    h = p[:, None, None] * torch.eye(2, dtype=torch.float64)
    assert prior.fit(z, h) == pytest.approx(tau, rel=0.03)


def test_em_on_noisy_observations_approaches_the_true_correlation_time():
    """y_k = z_k + noise (σ = 0.7): alternating the exact joint posterior (dense algebra, here)
    with fit() climbs from a wrong start towards the τ that drew the codes."""
    rng = np.random.default_rng(5)
    true_tau, d, sigma = 8.0, 1, 0.7
    track, time, codes = _ou_tracks(true_tau, 120, 30, d, rng)
    y = codes + sigma * rng.standard_normal(codes.shape)
    layout = TrackLayout.from_tracks(track, time)
    prior = TemporalPrior(layout, correlation_time=1.5)
    for _ in range(25):
        means = np.zeros_like(codes)
        for chain in layout.chains():
            q = prior._chain_prior_precision(layout.dt_previous[chain[1:]])
            joint = q + np.eye(chain.shape[0]) / sigma**2
            means[chain, 0] = np.linalg.solve(joint, y[chain, 0] / sigma**2)
        _, p = prior.conditional(torch.arange(len(layout)), torch.zeros(len(layout), d))
        h = (p.double() + 1 / sigma**2)[:, None, None] * torch.ones(1, 1, 1, dtype=torch.float64)
        prior.fit(torch.tensor(means), h)
    assert prior.correlation_time == pytest.approx(true_tau, rel=0.15)  # 7.37 measured


def test_log_probability_is_the_gaussian_process_density():
    """Hand-made irregular sequences against the multivariate normal of the joint covariance
    exp(-|t_i - t_j| / τ) per dimension; untracked rows are N(0, I)."""
    track = np.array([5, 5, 5, 5, -1, 9, 9])
    time = np.array([0.0, 0.5, 2.0, 2.25, 0.0, 1.0, 4.0])
    prior = TemporalPrior(TrackLayout.from_tracks(track, time), correlation_time=1.7)
    codes = torch.tensor([[0.3, -1.0], [0.5, -0.6], [-0.2, 0.1], [0.0, 0.4], [1.2, 0.7],
                          [-0.4, 0.9], [0.8, -0.3]], dtype=torch.float64)
    expected = 0.0
    for rows in (np.flatnonzero(track == 5), np.flatnonzero(track == 9), np.array([4])):
        t = time[rows]
        cov = torch.tensor(np.exp(-np.abs(t[:, None] - t[None]) / 1.7))
        for j in range(2):
            expected += float(torch.distributions.MultivariateNormal(
                torch.zeros(len(rows), dtype=torch.float64), cov).log_prob(codes[rows, j]))
    assert prior.log_probability(codes) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_codes_from_a_tempered_likelihood_are_read_with_their_real_uncertainty(beta):
    """Codes inferred with NLL / beta (the trainer's KL weight) claim beta times their real
    variance; read as they are, the EM finds fast motion (a short τ). likelihood_scale=beta
    recovers the τ that drew them; 1 does not."""
    rng = np.random.default_rng(8)
    true_tau, d, sigma = 8.0, 1, 0.7
    track, time, codes = _ou_tracks(true_tau, 120, 30, d, rng)
    y = codes + sigma * rng.standard_normal(codes.shape)
    layout = TrackLayout.from_tracks(track, time)

    def em(scale):
        prior = TemporalPrior(layout, correlation_time=1.5)
        for _ in range(25):
            means = np.zeros_like(codes)
            for chain in layout.chains():  # the tempered posterior, as the trainer infers it
                q = prior._chain_prior_precision(layout.dt_previous[chain[1:]])
                joint = q + np.eye(chain.shape[0]) / (beta * sigma**2)
                means[chain, 0] = np.linalg.solve(joint, y[chain, 0] / (beta * sigma**2))
            _, p = prior.conditional(torch.arange(len(layout)), torch.zeros(len(layout), d))
            h = (p.double() + 1 / (beta * sigma**2))[:, None, None] * torch.ones(
                1, 1, 1, dtype=torch.float64)
            prior.fit(torch.tensor(means), h, likelihood_scale=scale)
        return prior.correlation_time

    assert em(beta) == pytest.approx(true_tau, rel=0.15)  # measured 7.80 for both betas
    assert em(1.0) < 0.6 * true_tau  # measured 2.01 (beta 0.1) and 2.68 (0.3)
