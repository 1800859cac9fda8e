"""The best R² any method could reach: the Bayes posterior mean of the motion coordinate of each
particle, computed with everything a method could ever learn handed to it (the true structure and
its true motion, the particle's pose, CTF, shift and the noise level).

For each particle the clean image is rendered at a grid of motion values m in [-1, 1] and the
white-noise likelihood exp(-|y - x(m)|² / 2σ²) is combined with the uniform prior of the
simulation; the posterior mean is the estimator with the least squared error given the image.
R² = 1 - MSE / Var(m) of that estimate bounds from above what the latent codes of any encoder or
per-particle inference can carry about the motion (their kNN R² is a cross-validated estimate of
the same quantity from codes, so it can only be lower, up to sampling error). A target above this
bound cannot be met on that dataset, whatever the training.

Works on datasets made by ``dynamight simulate --preset P`` (the structure is rebuilt from the
preset and ``--seed``); σ is estimated from the residual at the true motion value.

Example::

    dynamight simulate --output-directory /tmp/twist --preset twist-hinge
    python benchmarks/oracle_r2.py /tmp/twist --preset twist-hinge --n-particles 1500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import starfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository

from dynamight_core.ctf import ctf_2d_rfft
from dynamight_core.fourier_grids import irfft2_centered
from dynamight_core.gaussian_projection import project_gaussians_rfft
from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.shift import apply_relion_origin_rfft
from relion_external.particles_adapter import load_particle_set


def clean_images(structure, particles, rows: np.ndarray, motion: torch.Tensor) -> torch.Tensor:
    """Noise-free images (len(rows), box, box) of ``rows`` at per-row motion values."""
    box, px = particles.box_size, particles.pixel_size
    positions = structure.deformed_positions(motion)
    ft = project_gaussians_rfft(positions, torch.tensor([structure.sigma_angstrom]),
                                structure.masses,
                                torch.zeros(positions.shape[1], dtype=torch.long),
                                particles.rotations[rows].float(), box, px)
    ft = ft * ctf_2d_rfft(particles.ctf.subset(rows), box, px)
    ft = apply_relion_origin_rfft(ft, particles.shifts_angstrom[rows], px, box)
    return irfft2_centered(ft, box)


def posterior_means(structure, particles, rows: np.ndarray, truth: torch.Tensor,
                    grid: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """Posterior mean of m for each row (uniform prior on the grid), and the estimated σ."""
    sq = torch.empty(len(rows), len(grid), dtype=torch.float64)
    images = torch.empty(len(rows), particles.box_size, particles.box_size)
    resid = 0.0
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        y = particles.images.read(r).float()
        images[s:s + len(r)] = y
        resid += float(((y - clean_images(structure, particles, r, truth[s:s + len(r)])) ** 2)
                       .sum())
        for j, m in enumerate(grid):
            x = clean_images(structure, particles, r, m.expand(len(r)))
            sq[s:s + len(r), j] = ((y - x) ** 2).sum(dim=(-2, -1)).double()
    sigma2 = resid / (len(rows) * particles.box_size ** 2)
    log_post = -sq / (2 * sigma2)
    w = torch.softmax(log_post, dim=1)
    return (w * grid.double()).sum(1), sigma2 ** 0.5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", type=Path, help="folder made by dynamight simulate --preset")
    p.add_argument("--preset", choices=PRESETS, required=True)
    p.add_argument("--seed", type=int, default=0, help="the simulation's --seed")
    p.add_argument("--n-particles", type=int, default=1500, help="first N particles scored")
    p.add_argument("--grid", type=int, default=41, help="motion values in [-1, 1]")
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args(argv)

    star = args.dataset / "particles.star"
    particles, _ = load_particle_set(star, project_dir=Path.cwd())
    truth_table = starfile.read(args.dataset / "ground_truth" / "motion.star")["particles"]
    n = min(args.n_particles, len(particles))
    rows = np.arange(n)
    truth = torch.tensor(truth_table["dmMotion"].to_numpy()[:n], dtype=torch.float32)
    structure = protein_like_structure(args.preset, seed=args.seed)
    grid = torch.linspace(-1, 1, args.grid)
    t0 = time.perf_counter()
    est, sigma = posterior_means(structure, particles, rows, truth, grid, args.batch_size)
    mse = float(((est - truth.double()) ** 2).mean())
    r2 = 1 - mse / float(truth.double().var())
    print(f"{args.dataset}: {n} particles, grid {args.grid}, σ {sigma:.4g} (from the residual "
          f"at the true motion), posterior-mean R² {r2:.3f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
