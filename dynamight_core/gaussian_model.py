"""The Gaussian pseudo-atomic model of the consensus map, its initialisation and map fit.

Conventions: volumes are ``(z, y, x)``; positions are xyz in Å relative to the box centre, where
voxel index ``(z, y, x)`` sits at ``((x, y, z) - shape_xyz // 2) * voxel_size``. Widths
``sigma`` are in Å. A Gaussian's *mass* (amplitude) is its integral in voxel units, i.e. the
total it adds to the voxel values when rendered (``mass * (2 pi s^2)^-1.5 exp(-r^2 / 2 s^2)``
with ``s`` and ``r`` in voxels). Gaussians come in ``n_classes`` width classes; every class
shares one sigma and one mass (mass-conserving: a class's mass does not change with its width).

Automatic threshold (:func:`automatic_threshold`): Otsu's rule on the histogram (256 bins from 0
to the maximum) of the strictly positive voxel values: the bin edge that maximises the
between-class variance of the values below and above it.

Initial width: the mean nearest-neighbour distance of the sampled centres (so neighbouring
Gaussians overlap), at least one voxel; with several classes the class widths are spread
geometrically over a factor 2 around it (``s0 * 2**linspace(-0.5, 0.5, n_classes)``).
Initial mass: all classes equal, ``sum(volume[volume > threshold]) / n_gaussians``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from .device import adam

logger = logging.getLogger(__name__)

RenderFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``render_fn(positions (n, 3) Å, sigmas (n,) Å, masses (n,)) -> volume (z, y, x)``."""


class GaussianModel(nn.Module):
    """Consensus Gaussians: ``positions`` ``(n_g, 3)`` Å, per-class ``log_sigmas`` (log Å) and
    ``amplitudes`` (mass, voxel units) ``(n_classes,)``, and a ``class_index`` buffer
    ``(n_g,)``. Calling the module returns ``(positions, sigmas, masses)`` per Gaussian."""

    def __init__(
        self,
        positions_angstrom: torch.Tensor,  # (n_g, 3) xyz Å
        sigmas_angstrom: torch.Tensor,  # (n_classes,) Å
        amplitudes: torch.Tensor,  # (n_classes,) mass per Gaussian, voxel units
        class_index: torch.Tensor | None = None,  # (n_g,) long in [0, n_classes)
    ) -> None:
        super().__init__()
        positions = torch.as_tensor(positions_angstrom, dtype=torch.float32)
        sigmas = torch.as_tensor(sigmas_angstrom, dtype=torch.float32).reshape(-1)
        amps = torch.as_tensor(amplitudes, dtype=torch.float32).reshape(-1)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise ValueError(f"positions must be (n_g, 3), got {tuple(positions.shape)}")
        if sigmas.shape != amps.shape:
            raise ValueError("sigmas and amplitudes need one value per class")
        if class_index is None:
            class_index = torch.zeros(positions.shape[0], dtype=torch.long)
        class_index = torch.as_tensor(class_index, dtype=torch.long)
        if class_index.shape != (positions.shape[0],):
            raise ValueError("class_index must be (n_g,)")
        if positions.shape[0] and (class_index.min() < 0 or class_index.max() >= sigmas.numel()):
            raise ValueError("class_index out of range")
        self.positions = nn.Parameter(positions.clone())
        self.log_sigmas = nn.Parameter(torch.log(sigmas))
        self.amplitudes = nn.Parameter(amps.clone())
        self.register_buffer("class_index", class_index.clone())

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GaussianModel:
        """Empty model of the right shapes, to ``load_state_dict`` a checkpoint into."""
        n_g, n_classes = int(config["n_gaussians"]), int(config["n_classes"])
        return cls(torch.zeros(n_g, 3), torch.ones(n_classes), torch.ones(n_classes),
                   torch.zeros(n_g, dtype=torch.long))

    @property
    def config(self) -> dict[str, Any]:
        """Plain shape description for checkpoints (see :meth:`from_config`)."""
        return {"n_gaussians": self.n_gaussians, "n_classes": self.n_classes}

    @property
    def n_gaussians(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.log_sigmas.shape[0])

    @property
    def class_sigmas(self) -> torch.Tensor:  # (n_classes,) Å
        return torch.exp(self.log_sigmas)

    def sigmas(self) -> torch.Tensor:  # (n_g,) Å
        """Width of every Gaussian (its class's sigma), Å."""
        return self._per_gaussian(torch.exp(self.log_sigmas))

    def masses(self) -> torch.Tensor:  # (n_g,) voxel units
        """Mass (integral, voxel units) of every Gaussian (its class's amplitude)."""
        return self._per_gaussian(self.amplitudes)

    def _per_gaussian(self, per_class: torch.Tensor) -> torch.Tensor:  # (n_g,)
        """Each Gaussian's class value. Not ``per_class[class_index]``: that gradient
        (index_put with accumulation) sorts the indices on a GPU, 2.7 ms of a 51 ms training
        step at 30,000 Gaussians on an H100; one class is a broadcast (gradient: a sum),
        several an ``index_select`` (gradient: a scatter-add)."""
        if per_class.shape[0] == 1:
            return per_class.expand(self.class_index.shape[0])
        return per_class.index_select(0, self.class_index)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions (n_g, 3) Å, sigmas (n_g,) Å, masses (n_g,))``."""
        return self.positions, self.sigmas(), self.masses()


def voxel_to_angstrom(
    indices_zyx: torch.Tensor,  # (..., 3) voxel indices (may be fractional), zyx
    shape_zyx: tuple[int, int, int],
    voxel_size: float,
) -> torch.Tensor:  # (..., 3) xyz Å relative to the box centre
    """``(z, y, x)`` voxel index -> ``((x, y, z) - shape_xyz // 2) * voxel_size``."""
    centre_xyz = torch.tensor([s // 2 for s in shape_zyx[::-1]], dtype=indices_zyx.dtype,
                              device=indices_zyx.device)
    return (indices_zyx.flip(-1) - centre_xyz) * voxel_size


def automatic_threshold(volume: torch.Tensor, n_bins: int = 256) -> float:
    """Otsu's threshold on the histogram of the positive voxel values (see module docstring)."""
    values = torch.as_tensor(volume).detach().cpu().to(torch.float64).numpy()
    values = values[values > 0]
    if values.size < 2 or values.max() == values.min():
        raise ValueError("the map needs at least two distinct positive voxel values")
    hist, edges = np.histogram(values, bins=n_bins, range=(0.0, float(values.max())))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_below = np.cumsum(hist)[:-1]
    weight_above = values.size - weight_below
    sum_below = np.cumsum(hist * centres)[:-1]
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (np.sum(hist * centres) - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    between[(weight_below == 0) | (weight_above == 0)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def init_gaussians_from_map(
    volume: torch.Tensor,  # (z, y, x)
    voxel_size: float,  # Å
    n_gaussians: int,
    threshold: float | None = None,
    n_classes: int = 1,
    generator: torch.Generator | None = None,  # CPU generator
) -> tuple[GaussianModel, float]:  # (model on the volume's device, threshold used)
    """Fill the region ``volume > threshold`` with ``n_gaussians`` Gaussians.

    Voxels above threshold are drawn uniformly at random (without replacement while there are
    enough, then with replacement) and each centre is jittered uniformly within its voxel.
    ``threshold=None`` uses :func:`automatic_threshold`. Widths and masses as in the module
    docstring; the total mass equals the map's sum above threshold.
    """
    volume = torch.as_tensor(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got {tuple(volume.shape)}")
    if n_gaussians < 1 or n_classes < 1:
        raise ValueError("n_gaussians and n_classes must be >= 1")
    cpu_volume = volume.detach().cpu().to(torch.float64)
    if threshold is None:
        threshold = automatic_threshold(cpu_volume)
    inside = cpu_volume > threshold
    voxels = torch.nonzero(inside).to(torch.float64)  # (m, 3) zyx
    n_inside = voxels.shape[0]
    if n_inside == 0:
        raise ValueError(f"no voxel above threshold {threshold:g}")
    if n_gaussians <= n_inside:
        chosen = torch.randperm(n_inside, generator=generator)[:n_gaussians]
    else:
        chosen = torch.randint(n_inside, (n_gaussians,), generator=generator)
    jitter = torch.rand(n_gaussians, 3, generator=generator, dtype=torch.float64) - 0.5
    positions = voxel_to_angstrom(voxels[chosen] + jitter, tuple(cpu_volume.shape), voxel_size)

    if n_gaussians > 1:
        nn_distance, _ = cKDTree(positions.numpy()).query(positions.numpy(), k=2)
        sigma0 = max(float(nn_distance[:, 1].mean()), voxel_size)
    else:
        sigma0 = voxel_size
    spread = 2.0 ** torch.linspace(-0.5, 0.5, n_classes, dtype=torch.float64)
    class_sigmas = sigma0 * (spread if n_classes > 1 else torch.ones(1, dtype=torch.float64))
    total_mass = float(cpu_volume[inside].sum())
    amplitudes = torch.full((n_classes,), total_mass / n_gaussians, dtype=torch.float64)
    class_index = torch.arange(n_gaussians) % n_classes  # centres are in random order
    model = GaussianModel(positions, class_sigmas, amplitudes, class_index).to(volume.device)
    logger.info("Gaussian model: %d Gaussians in %d voxels above threshold %.4g, sigma %.3g Å, "
                "mass %.4g", n_gaussians, n_inside, threshold, sigma0, total_mass)
    return model, float(threshold)


def fit_gaussians_to_map(
    model: GaussianModel,
    volume: torch.Tensor,  # (z, y, x)
    voxel_size: float,  # Å
    n_steps: int,
    render_fn: RenderFn,
    lr: float = 0.1,
    min_sigma_angstrom: float | None = None,
) -> list[float]:  # mean squared error per step, before each update
    """Adam on positions, log widths and masses minimising ``mean((render_fn(*model()) -
    volume)**2)``. Step sizes: ``lr * voxel_size`` Å for positions, ``lr`` for log sigma and
    ``lr * mean|mass|`` for masses. Widths are kept ``>= min_sigma_angstrom`` (default half a
    voxel). Returns the loss history; the model is updated in place."""
    target = torch.as_tensor(volume).to(device=model.positions.device,
                                        dtype=model.positions.dtype)
    min_sigma = 0.5 * voxel_size if min_sigma_angstrom is None else min_sigma_angstrom
    mass_scale = float(model.amplitudes.detach().abs().mean().clamp_min(1e-12))
    optimiser = adam([
        {"params": [model.positions], "lr": lr * voxel_size},
        {"params": [model.log_sigmas], "lr": lr},
        {"params": [model.amplitudes], "lr": lr * mass_scale},
    ], model.positions.device)
    # cosine decay to a tenth of the step size over the run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.1 + 0.45 * (1.0 + math.cos(math.pi * step / max(n_steps, 1))))
    history: list[float] = []
    log_every = max(1, n_steps // 10)
    for step in range(n_steps):
        optimiser.zero_grad(set_to_none=True)
        loss = torch.mean((render_fn(*model()) - target) ** 2)
        loss.backward()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            model.log_sigmas.clamp_(min=math.log(min_sigma))
        history.append(float(loss.detach()))
        if step % log_every == 0 or step == n_steps - 1:
            logger.info("Gaussian fit step %d/%d: mse %.4g", step + 1, n_steps, history[-1])
    return history


__all__ = [
    "GaussianModel",
    "RenderFn",
    "automatic_threshold",
    "fit_gaussians_to_map",
    "init_gaussians_from_map",
    "voxel_to_angstrom",
]
