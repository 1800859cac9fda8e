"""A dynamical prior on the latent codes of particles tracked through time (TEMPOR, Shi et al.,
arXiv 2308.11927): liquid-phase EM images the same molecule frame after frame while it moves, so
the codes of one track should change smoothly in time.

The codes of a track ``z_1, z_2, ...`` (times ``t_1 < t_2 < ...``) follow a stationary
Gauss-Markov (Ornstein-Uhlenbeck) process with correlation time ``τ``::

    z_1 ~ N(0, I),    z_k | z_{k-1} ~ N(a_k z_{k-1}, (1 - a_k²) I),    a_k = exp(-(t_k - t_{k-1}) / τ)

so every code is still N(0, I) on its own, like an untracked particle's (one latent space for
both), while neighbours in time are tied more tightly the shorter the time between them and the
longer ``τ`` (the noise variance ``1 - a²`` is ``2 Δt / τ`` for short steps: a diffusion scaled
by the time step). ``τ`` is learnt (:meth:`TemporalPrior.fit`, the maximum of the expected
log-probability of the codes' posteriors under the process).

Inference uses the prior of one code given its two neighbours, which for a Markov chain is its
prior given the whole track: Gaussian, isotropic, with precision
``p = 1 / (1 - a_prev²) + a_next² / (1 - a_next²)`` (``1`` instead of the first term for the
first frame, no second term for the last) and mean ``(a_prev z_prev / (1 - a_prev²) + a_next
z_next / (1 - a_next²)) / p`` at the neighbours' current codes. Each Gauss-Newton update of a
code (:mod:`.latent_inference`, ``prior=``) uses it, so the evidence of neighbouring frames flows
along a track as its codes are revisited (a Gauss-Seidel sweep over the chain, one particle at a
time): a particle whose image alone says little borrows from the frames around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_MAX_A = math.sqrt(1.0 - 1e-4)  # |a| cap: a prior precision of at most 1e4 per neighbour


@dataclass(frozen=True)
class TrackLayout:
    """Neighbours in time of each row of a code table. Rows of untracked particles (track
    ``< 0``) have none and keep the prior N(0, I)."""

    previous: np.ndarray  # (n,) row of the previous frame of the same track, -1 if none
    next: np.ndarray  # (n,) row of the next frame, -1 if none
    dt_previous: np.ndarray  # (n,) time since the previous frame (0 without one)
    dt_next: np.ndarray  # (n,) time to the next frame (0 without one)

    @classmethod
    def from_tracks(cls, track: np.ndarray, time: np.ndarray) -> TrackLayout:
        """From each row's track identifier (``< 0``: not in a track) and time. Two rows of one
        track at the same time raise ``ValueError``."""
        track = np.asarray(track, dtype=np.int64)
        time = np.asarray(time, dtype=np.float64)
        if track.shape != time.shape or track.ndim != 1:
            raise ValueError("track and time must be 1-D arrays of the same length")
        n = track.shape[0]
        previous = np.full(n, -1, dtype=np.int64)
        nxt = np.full(n, -1, dtype=np.int64)
        dt_previous = np.zeros(n)
        dt_next = np.zeros(n)
        rows = np.flatnonzero(track >= 0)
        order = rows[np.lexsort((time[rows], track[rows]))]
        same = track[order[1:]] == track[order[:-1]]
        steps = time[order[1:]] - time[order[:-1]]
        if np.any(same & (steps <= 0)):
            k = int(np.flatnonzero(same & (steps <= 0))[0])
            raise ValueError(f"track {int(track[order[k]])} has two particles at time "
                             f"{time[order[k]]:g}")
        a, b = order[:-1][same], order[1:][same]
        previous[b], nxt[a] = a, b
        dt_previous[b] = dt_next[a] = steps[same]
        return cls(previous, nxt, dt_previous, dt_next)

    def __len__(self) -> int:
        return self.previous.shape[0]

    def chains(self) -> list[np.ndarray]:
        """Rows of each track of two or more frames, in time order."""
        firsts = np.flatnonzero((self.previous < 0) & (self.next >= 0))
        out = []
        for first in firsts:
            rows = [int(first)]
            while self.next[rows[-1]] >= 0:
                rows.append(int(self.next[rows[-1]]))
            out.append(np.array(rows, dtype=np.int64))
        return out

    @property
    def n_pairs(self) -> int:
        """Consecutive pairs of frames."""
        return int((self.previous >= 0).sum())


class TemporalPrior:
    """The Gauss-Markov prior of the module docstring over the rows of a :class:`TrackLayout`,
    with correlation time ``correlation_time`` (in the unit of the times)."""

    def __init__(self, layout: TrackLayout, correlation_time: float = 10.0,
                 device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.correlation_time = float(correlation_time)
        self.device = torch.device(device)
        t = lambda a, dtype: torch.as_tensor(a, dtype=dtype, device=self.device)
        self._previous = t(layout.previous, torch.long)
        self._next = t(layout.next, torch.long)
        self._dt_previous = t(layout.dt_previous, torch.float64)
        self._dt_next = t(layout.dt_next, torch.float64)

    def _coefficient(self, dt: torch.Tensor) -> torch.Tensor:
        return torch.exp(-dt / self.correlation_time).clamp(max=_MAX_A)

    @torch.no_grad()
    def conditional(self, rows: torch.Tensor, codes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # mean (b, d), precision (b,)
        """Prior of the codes of ``rows`` given their neighbours' codes in ``codes`` (the whole
        table, (n, d)): the ``prior`` argument of :mod:`.latent_inference`."""
        rows = rows.to(self.device)
        prev, nxt = self._previous[rows], self._next[rows]
        has_prev, has_next = prev >= 0, nxt >= 0
        a_prev = self._coefficient(self._dt_previous[rows])
        a_next = self._coefficient(self._dt_next[rows])
        w_prev = torch.where(has_prev, 1.0 / (1.0 - a_prev**2), torch.ones_like(a_prev))
        w_next = torch.where(has_next, 1.0 / (1.0 - a_next**2), torch.zeros_like(a_next))
        z_prev = torch.where(has_prev[:, None], codes[prev.clamp(min=0)], 0.0).double()
        z_next = torch.where(has_next[:, None], codes[nxt.clamp(min=0)], 0.0).double()
        precision = w_prev + w_next * a_next**2
        mean = ((w_prev * torch.where(has_prev, a_prev, 0.0))[:, None] * z_prev
                + (w_next * a_next)[:, None] * z_next) / precision[:, None]
        return mean.to(codes.dtype), precision.to(codes.dtype)

    @torch.no_grad()
    def log_probability(self, codes: torch.Tensor) -> float:
        """``log p(codes)`` (n, d) of all rows under the prior: each track's chain (first
        frame N(0, I), then the transitions) and N(0, I) for rows in no chain of two or more
        frames."""
        z = codes.detach().double().cpu()
        d = z.shape[1]
        total = -0.5 * float((z**2).sum()) - 0.5 * d * len(self.layout) * math.log(2 * math.pi)
        b = np.flatnonzero(self.layout.previous >= 0)  # frames with a predecessor
        if b.size:
            a = torch.exp(-torch.as_tensor(self.layout.dt_previous[b]) / self.correlation_time
                          ).clamp(max=_MAX_A)
            v = 1.0 - a**2
            prev = z[self.layout.previous[b]]
            # replace N(0, I) of these frames by their transition density
            total += 0.5 * float((z[b] ** 2).sum())
            total -= float((0.5 * ((z[b] - a[:, None] * prev) ** 2).sum(-1) / v
                            + 0.5 * d * torch.log(v)).sum())
        return total

    def _chain_prior_precision(self, dt: np.ndarray) -> np.ndarray:  # (T, T)
        """Precision matrix of the codes (one dimension) of one chain with time steps ``dt``
        (T - 1,) under the process: tridiagonal."""
        a = np.minimum(np.exp(-dt / self.correlation_time), _MAX_A)
        w = 1.0 / (1.0 - a**2)
        n = dt.shape[0] + 1
        q = np.zeros((n, n))
        q[0, 0] = 1.0
        idx = np.arange(1, n)
        q[idx, idx] += w
        q[idx - 1, idx - 1] += w * a**2
        q[idx, idx - 1] = q[idx - 1, idx] = -w * a
        return q

    @torch.no_grad()
    def fit(self, codes: torch.Tensor, precisions: torch.Tensor,
            use: np.ndarray | None = None, grid: int = 400,
            likelihood_scale: float = 1.0) -> float:
        """One EM update of ``correlation_time``: the maximum, over a log grid from 0.1 to 10⁴
        times the median time step, of the expected log-probability of consecutive frames
        under the joint Gaussian posterior of each chain.

        ``codes`` (n, d) are the posterior means and ``precisions`` (n, d, d) the Gauss-Newton
        precisions ``H`` of every row, both computed under this prior at the current
        ``correlation_time`` (as :mod:`.latent_inference` does with :meth:`conditional`), so
        ``H - p I`` is what the image says about the code. Each chain's joint posterior
        precision is then that, block-diagonal, plus the chain's prior precision
        (tridiagonal); its inverse gives the covariances of every frame and of every pair of
        consecutive frames. (Treating the frames' posteriors as independent instead would
        drive the correlation time to zero whenever the images say little: the prior's own
        correlations would be missing from the statistics.) With images that say nothing the
        update returns the current value. ``use`` (n,) bool: chains with a row not used are
        left out (default: all used). Without pairs nothing changes. Returns the new value.

        ``likelihood_scale``: codes inferred with a tempered likelihood (``NLL / beta``, so
        ``H - p I`` is ``1 / beta`` times what the image says) are noisier than their
        precisions admit, and read as they are they look like fast motion. With
        ``likelihood_scale = beta`` each code is taken apart into what its image says (the
        code it would have without the prior, ``ẑ = z + L⁻¹ p (z - m)`` at its prior mean
        ``m`` given its neighbours, ``L = H - p I``) with the untempered precision ``beta L``,
        and the chain's joint posterior is recomputed from those (a Kalman smoother), so the
        update sees each image's real uncertainty."""
        z_all = codes.detach().double().cpu().numpy()
        h_all = precisions.detach().double().cpu().numpy()
        d = z_all.shape[1]
        m_cond, p_cond = self.conditional(torch.arange(len(self.layout), device=self.device),
                                          codes.to(self.device))
        m_cond = m_cond.double().cpu().numpy()
        p_cond = p_cond.double().cpu().numpy()
        s_tt, s_pp, s_tp, dts = [], [], [], []
        for chain in self.layout.chains():
            if chain.shape[0] < 2 or (use is not None and not np.all(use[chain])):
                continue
            n = chain.shape[0]
            dt = self.layout.dt_previous[chain[1:]]
            likelihood = h_all[chain] - p_cond[chain, None, None] * np.eye(d)
            likelihood = 0.5 * (likelihood + np.swapaxes(likelihood, 1, 2))
            z = z_all[chain]
            # what each image says, L ẑ = L z + p (z - m), with its untempered precision
            information = (np.einsum("kij,kj->ki", likelihood, z)
                           + p_cond[chain, None] * (z - m_cond[chain]))
            likelihood = likelihood_scale * likelihood
            information = likelihood_scale * information
            joint = np.kron(self._chain_prior_precision(dt), np.eye(d))
            for k in range(n):
                joint[k * d:(k + 1) * d, k * d:(k + 1) * d] += likelihood[k]
            cov = np.linalg.inv(joint)
            z = (cov @ information.reshape(-1)).reshape(n, d)  # the chain's posterior means
            diag = np.array([np.trace(cov[k * d:(k + 1) * d, k * d:(k + 1) * d])
                             for k in range(n)])
            cross = np.array([np.trace(cov[k * d:(k + 1) * d, (k - 1) * d:k * d])
                              for k in range(1, n)])
            s_tt.append((z[1:] ** 2).sum(-1) + diag[1:])
            s_pp.append((z[:-1] ** 2).sum(-1) + diag[:-1])
            s_tp.append((z[1:] * z[:-1]).sum(-1) + cross)
            dts.append(dt)
        if not dts:
            return self.correlation_time
        s_tt, s_pp, s_tp, dt = (torch.from_numpy(np.concatenate(x))
                                for x in (s_tt, s_pp, s_tp, dts))
        taus = float(dt.median()) * torch.logspace(-1, 4, grid, dtype=torch.float64)
        ll = []
        for chunk in taus.split(16):  # (16, pairs) at a time: memory O(pairs)
            a = torch.exp(-dt[None] / chunk[:, None]).clamp(max=_MAX_A)
            v = 1.0 - a**2
            ll.append(-0.5 * (d * torch.log(v) + (s_tt - 2 * a * s_tp + a**2 * s_pp) / v).sum(-1))
        self.correlation_time = float(taus[int(torch.argmax(torch.cat(ll)))])
        return self.correlation_time


__all__ = ["TemporalPrior", "TrackLayout"]
