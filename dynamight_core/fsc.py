"""Fourier shell correlation with RELION's shell convention (shell = round(|k| · box))."""

from __future__ import annotations

import torch

from .fourier_grids import irfftn_centered_3d, radial_shell_index_3d_rfft, rfftn_centered_3d


def fsc(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:  # (box // 2 + 1,)
    """FSC per shell 0..box//2 between two cubic maps ``(d, d, d)``."""
    box = map1.shape[-1]
    f1 = rfftn_centered_3d(map1.to(torch.float64))
    f2 = rfftn_centered_3d(map2.to(torch.float64))
    shells = radial_shell_index_3d_rfft(box, f1.device)
    # the rfft holds half of the (Hermitian) transform: count the kx > 0 planes twice
    mult = torch.full(f1.shape, 2.0, dtype=torch.float64, device=f1.device)
    mult[..., 0] = 1.0
    if box % 2 == 0:
        mult[..., -1] = 1.0
    n = box // 2 + 1
    keep = shells < n
    s = shells[keep]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64, device=f1.device).index_add_(
            0, s, (values * mult)[keep])

    num = shell_sum((f1 * f2.conj()).real)
    den = torch.sqrt(shell_sum(f1.abs() ** 2) * shell_sum(f2.abs() ** 2))
    out = torch.where(den > 0, num / torch.clamp(den, min=1e-300), torch.zeros_like(num))
    out[0] = 1.0 if den[0] > 0 else 0.0
    return out


def combined_map_fsc(curve: torch.Tensor) -> torch.Tensor:
    """``sqrt(2 FSC / (1 + FSC))`` (0 where the FSC is not positive): the FSC with the truth that
    a half-map FSC implies for the average of the two halves."""
    positive = curve.clamp_min(0.0)
    return torch.sqrt(2 * positive / (1 + positive))


def filter_shells(volume: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``volume`` with each Fourier shell 0..box//2 scaled by ``weight`` (0 beyond)."""
    box = volume.shape[-1]
    ft = rfftn_centered_3d(volume.to(torch.float64))
    shells = radial_shell_index_3d_rfft(box, ft.device).clamp_max(box // 2 + 1)
    per_voxel = torch.cat([weight.to(torch.float64), weight.new_zeros(1, dtype=torch.float64)])
    return irfftn_centered_3d(ft * per_voxel[shells], box).to(volume.dtype)


def fsc_weighted_average(half1: torch.Tensor, half2: torch.Tensor) -> torch.Tensor:
    """The average of two half maps with each shell scaled by :func:`combined_map_fsc` of their
    FSC: the figure-of-merit weighting of the combined map, the kind of low-pass a consensus
    refinement's map has seen."""
    weight = combined_map_fsc(fsc(half1, half2))
    weight[0] = 1.0
    average = 0.5 * (half1 + half2).to(torch.float64)
    return filter_shells(average, weight).to(half1.dtype)


def shell_resolution_angstrom(box_size: int, pixel_size: float) -> torch.Tensor:
    """Resolution (Å) of each shell; shell 0 is infinite."""
    shells = torch.arange(box_size // 2 + 1, dtype=torch.float64)
    return torch.where(shells > 0, box_size * pixel_size / torch.clamp(shells, min=1),
                       torch.full_like(shells, float("inf")))


def resolution_at_threshold(curve: torch.Tensor, box_size: int, pixel_size: float,
                            threshold: float = 0.143) -> float:
    """Resolution (Å) of the last shell before the FSC first drops below ``threshold``
    (RELION's rule); Nyquist if it never does."""
    below = torch.nonzero(curve[1:] < threshold)
    last_good = int(below[0]) if below.numel() else curve.numel() - 1
    if last_good == 0:
        return float("inf")
    return float(box_size * pixel_size / last_good)
