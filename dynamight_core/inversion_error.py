"""How well an inverse deformation inverts: the error at the Gaussians and its streaming summary.

The measure (the same for every method): ``|x(c_j + δ_j) − c_j|`` in Å, the distance between a
deformed Gaussian mapped back and the consensus Gaussian it came from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def inversion_errors(
    inverse: Callable[[torch.Tensor], torch.Tensor],  # (b, n_g, 3) deformed -> consensus Å
    consensus: torch.Tensor,  # (n_g, 3) Å
    displacements: torch.Tensor,  # (b, n_g, 3) Å
) -> torch.Tensor:  # (b, n_g) Å
    """``|x(c_j + δ_j) − c_j|`` for every particle and Gaussian (Å)."""
    with torch.no_grad():
        return (inverse(consensus[None] + displacements) - consensus[None]).norm(dim=-1)


class ErrorSummary:
    """Streaming mean, maximum and percentiles of non-negative errors (Å): memory does not grow
    with the number of values. Percentiles come from a histogram with geometric bins from 1e-4
    to 1e3 Å (2.3 % wide), read at the bin's geometric centre."""

    _edges = np.geomspace(1e-4, 1e3, 701)

    def __init__(self) -> None:
        self.counts = np.zeros(self._edges.shape[0] + 1, dtype=np.int64)
        self.total = 0.0
        self.n = 0
        self.max = 0.0

    def add(self, errors: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(torch.as_tensor(errors).detach().cpu().double().reshape(-1))
        if values.size == 0:
            return
        self.counts += np.bincount(np.searchsorted(self._edges, values, side="right"),
                                   minlength=self.counts.shape[0])
        self.total += float(values.sum())
        self.n += int(values.size)
        self.max = max(self.max, float(values.max()))

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def percentile(self, q: float) -> float:
        if not self.n:
            return float("nan")
        rank = q / 100.0 * self.n
        b = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        if b == 0:
            return float(self._edges[0])
        if b >= self._edges.shape[0]:
            return self.max
        return min(float(np.sqrt(self._edges[b - 1] * self._edges[b])), self.max)

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "p95": self.percentile(95.0), "max": self.max,
                "n": float(self.n)}



__all__ = ["ErrorSummary", "inversion_errors"]
