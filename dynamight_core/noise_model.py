"""Radially averaged noise power and the noise-weighted Fourier data term.

Layout: unshifted torch FFT of ``(box, box)`` images. With ``rfft=True`` (``torch.fft.rfft2``)
an array is ``(box, box // 2 + 1)``: rows are ``torch.fft.fftfreq(box) * box``, columns
``torch.fft.rfftfreq(box) * box`` (pixels). Shell index as RELION: ``round(|k|)`` with ``|k|`` in
Fourier pixels and round-half-up (``floor(|k| + 0.5)``). "Within Nyquist" means shell
``<= box // 2``.

Hermitian symmetry: in the rfft half-plane the columns ``1 .. (box - 1) // 2`` stand for two
pixels of the full spectrum, column 0 (and column ``box // 2`` for even boxes) for one. Sums below
count each rfft pixel with that multiplicity, so averages are full-spectrum averages.

The estimate is a pair of explicit sums per shell (``power_sum``, ``count``); an all-reduce of
both (``torch.distributed.all_reduce(est.power_sum)``, same for ``count``) merges ranks.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def radial_shell_index(box: int, *, rfft: bool = True) -> torch.Tensor:
    """Shell index ``floor(|k| + 0.5)`` (Fourier pixels) of every pixel, long tensor of shape
    ``(box, box // 2 + 1)`` (``rfft=True``) or ``(box, box)`` (unshifted full FFT)."""
    ky = torch.fft.fftfreq(box, dtype=torch.float64) * box
    kx = (torch.fft.rfftfreq(box, dtype=torch.float64) if rfft
          else torch.fft.fftfreq(box, dtype=torch.float64)) * box
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return torch.floor(radius + 0.5).to(torch.long)


def nyquist_mask(box: int, *, rfft: bool = True) -> torch.Tensor:
    """Bool mask of pixels with shell index ``<= box // 2``."""
    return radial_shell_index(box, rfft=rfft) <= box // 2


def rfft_multiplicity(box: int) -> torch.Tensor:  # (box, box // 2 + 1) float64
    """How many full-spectrum pixels each rfft pixel stands for (1 or 2)."""
    multiplicity = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64)
    multiplicity[:, 0] = 1.0
    if box % 2 == 0:
        multiplicity[:, -1] = 1.0
    return multiplicity


class RadialNoiseEstimate:
    """Accumulates ``sum |residual|^2`` and pixel counts per shell over batches, and turns them
    into per-pixel weights ``1 / sigma^2(shell)`` for :func:`weighted_fourier_loss`.

    ``power_sum`` and ``count`` (``(n_shells,)`` float64) are plain sums: add them across
    processes to combine estimates.
    """

    def __init__(self, box: int, *, device: torch.device | str | None = None) -> None:
        self.box = int(box)
        self.shell_index = radial_shell_index(self.box, rfft=True).to(device)
        self.multiplicity = rfft_multiplicity(self.box).to(device)
        self.within_nyquist = self.shell_index <= self.box // 2
        self.n_shells = int(self.shell_index.max()) + 1
        self.power_sum = torch.zeros(self.n_shells, dtype=torch.float64, device=device)
        self.count = torch.zeros(self.n_shells, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.power_sum.zero_()
        self.count.zero_()

    @torch.no_grad()
    def accumulate(
        self,
        residual_rfft: torch.Tensor,  # (b, box, box // 2 + 1) complex: image - model
    ) -> None:
        """Add ``|residual|^2`` of a batch to the per-shell sums."""
        expected = (self.box, self.box // 2 + 1)
        if residual_rfft.shape[-2:] != expected:
            raise ValueError(f"residual must be (b, {expected[0]}, {expected[1]}), "
                             f"got {tuple(residual_rfft.shape)}")
        residual_rfft = residual_rfft.reshape(-1, *expected).to(self.power_sum.device)
        n_images = residual_rfft.shape[0]
        power = (residual_rfft.abs().to(torch.float64) ** 2).sum(dim=0) * self.multiplicity
        shells = self.shell_index.flatten()
        self.power_sum.index_add_(0, shells, power.flatten())
        self.count.index_add_(0, shells, self.multiplicity.flatten() * n_images)

    def noise_power(self) -> torch.Tensor:  # (n_shells,) float64
        """Mean ``|residual|^2`` per shell; 0 for shells without data."""
        return torch.where(self.count > 0, self.power_sum / self.count.clamp_min(1.0),
                           torch.zeros_like(self.power_sum))

    def weights(self, min_relative_power: float = 1e-3) -> torch.Tensor:  # (box, box//2+1)
        """Per-pixel ``1 / sigma^2(shell)`` (float32), 0 beyond Nyquist.

        ``sigma^2`` is clamped below at ``min_relative_power`` times its largest value within
        Nyquist (bounding the weights' dynamic range); shells without data take the mean power of
        the others; the weights are normalised to a multiplicity-weighted mean of 1 within
        Nyquist. Without any data the weights are flat (1 within Nyquist).
        """
        inside_shells = torch.arange(self.n_shells, device=self.count.device) <= self.box // 2
        has_data = (self.count > 0) & inside_shells
        if not bool(has_data.any()):
            return self.within_nyquist.to(torch.float32)
        power = self.noise_power()
        power = torch.where(has_data, power, power[has_data].mean())
        floor = min_relative_power * power[has_data].max()
        if float(floor) <= 0.0:  # all-zero residuals: nothing to weight by
            return self.within_nyquist.to(torch.float32)
        shell_weights = 1.0 / power.clamp_min(floor)
        pixel_weights = shell_weights[self.shell_index] * self.within_nyquist
        norm = ((pixel_weights * self.multiplicity).sum()
                / (self.multiplicity * self.within_nyquist).sum())
        return (pixel_weights / norm).to(torch.float32)


def weighted_fourier_loss(
    model_rfft: torch.Tensor,  # (b, box, box // 2 + 1) complex
    image_rfft: torch.Tensor,  # (b, box, box // 2 + 1) complex
    weights: torch.Tensor,  # (box, box // 2 + 1) real, e.g. RadialNoiseEstimate.weights()
    mask_within_nyquist: torch.Tensor,  # (box, box // 2 + 1) bool
) -> torch.Tensor:  # (b,)
    """Per particle ``sum_k m_k w_k |model_k - image_k|^2 / sum_k m_k`` over rfft pixels ``k``
    within the mask, ``m_k`` the Hermitian multiplicity: the weighted mean squared error over
    the full-spectrum pixels inside Nyquist (units of ``|FFT|^2`` times the weights)."""
    box = model_rfft.shape[-2]
    if model_rfft.shape[-1] != box // 2 + 1:
        raise ValueError(f"expected rfft layout (b, box, box // 2 + 1), got "
                         f"{tuple(model_rfft.shape)}")
    multiplicity = rfft_multiplicity(box).to(device=model_rfft.device,
                                             dtype=weights.dtype)
    pixel_factor = multiplicity * mask_within_nyquist.to(weights.dtype)
    difference = model_rfft - image_rfft
    squared_error = difference.real**2 + difference.imag**2  # (b, box, box // 2 + 1)
    weighted = squared_error * (weights * pixel_factor)
    return weighted.sum(dim=(-2, -1)) / pixel_factor.sum()


__all__ = [
    "RadialNoiseEstimate",
    "nyquist_mask",
    "radial_shell_index",
    "rfft_multiplicity",
    "weighted_fourier_loss",
]
