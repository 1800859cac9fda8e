"""Where a finished run loses information about the motion: the kNN R² of its latent codes next
to what its own pseudo-atomic model could carry (``dynamight simulate --preset`` datasets only).

For half set 1 (its first ``--n-particles`` particles) of a finished ``optimize-deformations``
run on a simulated dataset, each a posterior-mean estimate of the true motion coordinate m
scored by R² (direct, 1 - MSE / Var(m)) and by cross-validated kNN R² (k = 20):

1. **codes**: the run's final latent codes (kNN R² only; what the quality benchmark reports);
2. **learnt decoder, grid posterior**: the posterior mean of the code over a grid of codes under
   the run's decoder and consensus (``E(z) = NLL / beta + |z|² / 2``, as the codes are inferred;
   1 or 2 latent dimensions), so no local minimum or Laplace approximation is involved;
3. **learnt consensus + true motion** (after training) and **initial consensus + true motion**
   (the Gaussians fitted to the consensus map, before training): the run's Gaussians moved by
   the simulation's own motion (each Gaussian in the domain of its nearest atom), the posterior
   mean of m on a grid of ``--grid`` values under the same noise weights. No decoder can give
   codes that carry more about m than this model of the structure does;
4. **true atoms + true motion** in the run's own likelihood (its noise weights): the oracle of
   ``benchmarks/oracle_r2.py`` on the same particles;
5. with ``--fitted-to MAP`` (repeatable): Gaussians fitted to another map, as the command fits
   them to the consensus (same number, seed and fit steps), moved by the true motion. ``MAP`` is
   one map or two half maps ``HALF1,HALF2``, averaged with the FSC weighting of the benchmark's
   consensus map (:func:`dynamight_core.fsc.fsc_weighted_average`): e.g. the true map of the
   reference state (the representation's own limit), the motion-free or the deformed half maps
   (how well the structure can be estimated from the particles).

This splits the shortfall of the codes into what the decoder loses, what the estimate of the
structure loses and what the Gaussian representation loses. It also prints the decoder's path:
for bins of m, the mean code and the mean distance of the decoder's displacement at that code
from the true displacement (moving domains, the mean offset between consensus and the t = 0
state removed).

Example (a run of the quality benchmark)::

    python benchmarks/model_ceiling_r2.py /tmp/grid6k/twist-hinge_snr0.05/data \\
        /tmp/grid6k/twist-hinge_snr0.05/modes --preset twist-hinge
    D=/tmp/grid6k/twist-hinge_snr0.02
    python benchmarks/model_ceiling_r2.py $D/data $D/modes --preset twist-hinge \\
        --fitted-to $D/data/ground_truth/state_+0.00.mrc \\
        --fitted-to $D/modes/backprojection/map_half1.mrc,$D/modes/backprojection/map_half2.mrc
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import batches_of, start_training

from dynamight_core.checkpoint import load_checkpoint
from dynamight_core.fourier_grids import rfft2_centered
from dynamight_core.fsc import fsc_weighted_average
from dynamight_core.gaussian_model import GaussianModel
from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.quality_scores import knn_r2


def energies(trainer, particles, indices, positions, batch_size, device) -> torch.Tensor:
    """``½ Σ W |render(positions[g]) - image|²`` for every particle and every grid point
    ``positions (G, n_g, 3)``: (len(indices), G) float64."""
    out = []
    with torch.no_grad():
        for batch in batches_of(particles, indices, batch_size, device):
            image = rfft2_centered(batch.images)
            e = torch.empty(len(batch), positions.shape[0], dtype=torch.float64)
            for g in range(positions.shape[0]):
                diff = trainer.model.render(positions[g], batch) - image
                e[:, g] = 0.5 * (trainer.pixel_weights
                                 * (diff.real**2 + diff.imag**2)).sum((-2, -1)).double()
            out.append(e)
    return torch.cat(out)


def posterior_mean(energy: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    """Posterior mean over ``grid`` (G,) or (G, d) given ``energy`` (n, G) = -log posterior up
    to a constant per row: (n,) or (n, d)."""
    return torch.softmax(-energy, 1).numpy() @ grid.numpy()


def moved_by_truth(structure, consensus: torch.Tensor):
    """``structure`` with the Gaussians ``consensus (n_g, 3)`` in place of its atoms, each in
    the domain of its nearest atom, so that ``deformed_positions`` moves them by the true
    motion."""
    nearest = torch.cdist(consensus, structure.positions).argmin(1)
    return dataclasses.replace(structure, positions=consensus, domain=structure.domain[nearest])


def fitted_gaussians(opts, particles, spec: str, target: Path) -> GaussianModel:
    """Gaussians fitted, as the command fits the consensus, to ``spec``: one map, or two half
    maps ``HALF1,HALF2`` averaged with the FSC weighting (written to ``target`` first)."""
    from relion_external.commands import optimize_deformations as command
    from relion_external.map_io import read_map, write_map

    paths = spec.split(",")
    if len(paths) == 2:
        (half1, voxel), (half2, _) = read_map(paths[0]), read_map(paths[1])
        write_map(target, fsc_weighted_average(half1, half2), voxel)
        paths = [str(target)]
    elif len(paths) != 1:
        raise SystemExit(f"--fitted-to {spec}: one map or HALF1,HALF2")
    fit_opts = argparse.Namespace(**vars(opts))
    fit_opts.initial_model, fit_opts.mask_file = paths[0], None
    return command._initial_gaussians(fit_opts, particles)[0]


def posterior_mean_motion(trainer, particles, rows, structure, gaussians, m_grid, batch_size,
                          device) -> np.ndarray:
    """Posterior mean of the motion coordinate on ``m_grid`` with the trainer's Gaussians
    replaced by ``gaussians`` moved by the true motion (restored afterwards)."""
    own = trainer.model.gaussians
    trainer.model.gaussians = gaussians
    try:
        positions = moved_by_truth(structure, gaussians.positions.detach())
        e = energies(trainer, particles, rows, positions.deformed_positions(m_grid), batch_size,
                     device)
    finally:
        trainer.model.gaussians = own
    return posterior_mean(e, m_grid)


def scores(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(direct R², kNN R²) of a posterior-mean estimate of ``truth`` (direct only in 1-D)."""
    direct = float("nan")
    if estimate.ndim == 1:
        direct = float(1.0 - ((estimate - truth) ** 2).mean() / truth.var())
    return direct, knn_r2(estimate, truth)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("run", type=Path, help="output folder of optimize-deformations")
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--n-particles", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=61, help="motion values in [-1, 1]")
    parser.add_argument("--code-grid", type=int, nargs=2, default=(41, 9), metavar=("N1", "N2"),
                        help="codes along latent dimensions 1 and 2")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth",
                        help="file in the run's checkpoints folder")
    parser.add_argument("--fitted-to", action="append", default=[], metavar="MAP[,MAP2]",
                        help="also score Gaussians fitted to this map (or FSC-weighted average "
                             "of these two half maps), moved by the true motion")
    parser.add_argument("--work-directory", type=Path, default=Path("."),
                        help="where --fitted-to writes its averaged maps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t_start = time.time()

    state = load_checkpoint(args.run / "forward_deformations" / "checkpoints"
                            / args.checkpoint)
    n_gaussians = state["halves"]["1"]["config"]["n_gaussians"]
    opts, particles, motion, training = start_training(
        args.dataset, ["--n-gaussians", str(n_gaussians)], device)
    training.resume(state)
    trainer = training.trainers[1]
    half_set = training.particles.half_set.numpy()
    rows = np.flatnonzero(half_set == 1)[:args.n_particles]
    truth = motion[rows]
    codes = trainer.stored_latents(rows).numpy()
    dim, beta = codes.shape[1], trainer.config.beta
    print(f"# {args.run} ({args.checkpoint}, epoch {state['epoch']}): half 1, {len(rows)} particles, {n_gaussians} Gaussians, "
          f"{dim} latent dimensions, beta {beta:g}")
    print(f"codes (final)                            kNN R² {knn_r2(codes, truth):.3f}")

    if dim <= 2:
        axes = [np.linspace(codes[:, 0].min() - 0.5, codes[:, 0].max() + 0.5,
                            args.code_grid[0])]
        if dim == 2:
            spread = 2.5 * codes[:, 1].std()
            axes.append(np.linspace(-spread, spread, args.code_grid[1]))
        grid = torch.tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim),
                            dtype=torch.float32)
        with torch.no_grad():
            positions = (trainer.model.gaussians.positions.detach()[None]
                         + trainer.model.displacements(grid))
        e = energies(trainer, particles, rows, positions, opts.batch_size, device) / beta
        e = e + 0.5 * (grid.double() ** 2).sum(-1)[None]
        mean = posterior_mean(e, grid)
        print(f"learnt decoder, grid posterior mean      kNN R² {knn_r2(mean, truth):.3f}")

    structure = protein_like_structure(args.preset)
    m_grid = torch.linspace(-1, 1, args.grid)
    moved = {label: moved_by_truth(structure, consensus) for label, consensus in
             (("learnt", trainer.model.gaussians.positions.detach()),
              ("initial", trainer.initial_positions))}
    for label in ("learnt", "initial"):
        e = energies(trainer, particles, rows, moved[label].deformed_positions(m_grid),
                     opts.batch_size, device)
        direct, knn = scores(posterior_mean(e, m_grid), truth)
        print(f"{label:7s} consensus + true motion           kNN R² {knn:.3f} "
              f"(direct {direct:.3f})")
    masses, classes = torch.unique(structure.masses, return_inverse=True)
    atoms = GaussianModel(structure.positions,
                          torch.full((masses.numel(),), structure.sigma_angstrom), masses, classes)
    direct, knn = scores(posterior_mean_motion(trainer, particles, rows, structure, atoms,
                                               m_grid, opts.batch_size, device), truth)
    print(f"true atoms + true motion                 kNN R² {knn:.3f} (direct {direct:.3f})")
    for i, spec in enumerate(args.fitted_to):
        fitted = fitted_gaussians(opts, particles, spec,
                                  args.work_directory / f"fitted_to_{i + 1}_average.mrc")
        direct, knn = scores(posterior_mean_motion(trainer, particles, rows, structure, fitted,
                                                   m_grid, opts.batch_size, device), truth)
        print(f"fitted to {spec}\n        + true motion                    kNN R² {knn:.3f} "
              f"(direct {direct:.3f})")

    # the decoder's path against the true displacements
    learnt = moved["learnt"]
    consensus, domain = learnt.positions, learnt.domain
    all_rows = trainer.known_indices
    all_codes, all_truth = trainer.stored_latents(all_rows).numpy(), motion[all_rows]
    edges = np.linspace(-1, 1, 11)
    centres = 0.5 * (edges[1:] + edges[:-1])
    which = np.clip(np.digitize(all_truth, edges) - 1, 0, len(centres) - 1)
    mean_codes = np.stack([all_codes[which == b].mean(0) for b in range(len(centres))])
    with torch.no_grad():
        path = trainer.model.displacements(torch.tensor(mean_codes, dtype=torch.float32))
        true = learnt.deformed_positions(torch.tensor(centres, dtype=torch.float32)) - consensus
    moving = domain > 0
    diff = (path - true)[:, moving]
    diff = diff - diff.mean(0, keepdim=True)  # consensus vs the t = 0 state
    error = diff.norm(dim=-1).mean(1)
    size = (true - true.mean(0, keepdim=True))[:, moving].norm(dim=-1).mean(1)
    print("m bin   mean code          path error / true displacement (Å, moving domains)")
    for b, c in enumerate(centres):
        print(f"{c:+.1f}  {np.array2string(mean_codes[b], precision=2):18s} "
              f"{float(error[b]):.2f} / {float(size[b]):.2f}")
    print(f"# {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
