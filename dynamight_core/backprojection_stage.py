"""The deformed-backprojection stage: one half set's particles backprojected with its own model.

:func:`backproject_half` decodes each particle's displacements from its latent code (the
half's model), turns them into a displacement field on a coarse grid
(:func:`.displacement_field.displacement_grid_from_gaussians`) and backprojects the CTF-weighted
image along the deformed rays (:class:`.deformed_backprojection.DeformedBackprojector`). With a
data-parallel :class:`.distributed.Group` each process backprojects its share of the particles
(full batches each, :func:`.batches.batches` with ``per_process``) and the sums (data, CTF²
weights, counts) are added over the group before the division, so the map equals the one of a
single process up to the order of floating-point additions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from .batches import batches
from .deformation_model import Batch, DeformationModel
from .deformed_backprojection import DeformedBackprojector, choose_grid_size, downsample_images
from .displacement_field import displacement_grid_from_gaussians
from .distributed import Group
from .particles import ParticleSet

logger = logging.getLogger(__name__)

LOG_EVERY_BATCHES = 10


def backproject_half(model: DeformationModel, codes: Callable[[Batch], torch.Tensor],
                     particles: ParticleSet, indices: np.ndarray, *, half: int,
                     batch_size: int, device: torch.device, grid_size: int | None = None,
                     downsample: int = 1, group: Group | None = None,
                     check_abort: Callable[[], None] | None = None) -> torch.Tensor:
    """Deformed backprojection of ``indices`` with ``model`` (codes from ``codes(batch)``);
    returns the map ``(n, n, n)`` on the CPU, ``n = box // downsample``, on every process of
    ``group``."""
    group = group or Group()
    box = particles.box_size // downsample
    pixel_size = particles.pixel_size * downsample
    positions = model.gaussians.positions.detach()
    if grid_size is None:
        grid_size = choose_grid_size(positions, box, pixel_size)
    logger.info("half %d: %d particles, box %d (%.3f Å/px), displacement grid %d³%s",
                half, len(indices), box, pixel_size, grid_size,
                f", {group.size} processes" if group.parallel else "")
    backprojector = DeformedBackprojector(box, pixel_size, device)
    t0 = time.time()
    total = len(indices)
    for n_batches, batch in enumerate(batches(particles, indices, batch_size, device,
                                              group=group, check_abort=check_abort,
                                              per_process=True), start=1):
        if len(batch):
            with torch.no_grad():
                displacements = model.displacements(codes(batch))
                field = displacement_grid_from_gaussians(positions, displacements, box,
                                                         pixel_size, grid_size=grid_size)
            backprojector.add(downsample_images(batch.images, downsample), batch.rotations,
                              batch.shifts_angstrom, batch.ctf, field)
        done = min(total, n_batches * batch_size * group.size)
        if n_batches % LOG_EVERY_BATCHES == 0 or done == total:
            elapsed = max(time.time() - t0, 1e-9)
            logger.info("  half %d: %d/%d particles (%.1f particles/s, %.0f s left)", half,
                        done, total, done / elapsed, elapsed / max(done, 1) * (total - done))
    if group.parallel:
        group.all_reduce(backprojector.data)
        group.all_reduce(backprojector.weight)
        backprojector.n_particles = int(group.all_reduce_numbers(
            [float(backprojector.n_particles)])[0])
    return backprojector.reconstruct().cpu()


__all__ = ["backproject_half"]
