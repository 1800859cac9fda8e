"""Which of several trained models of half set 1 the held-out particles prefer, and how much each
way of reading codes from a model keeps of the motion (``dynamight simulate --preset`` datasets).

For each model (a run's checkpoint, ``checkpoint_final.pth`` or ``NNN.pth``, or a trainer state
saved by ``decoder_with_true_codes.py --save-states``), on the validation particles of half 1
(never trained on; the split is the command's, from its seed), all under one set of noise
weights (those of the first model):

- **held-out log evidence** ``Σ log ∫ p(x | z) N(z; 0, I) dz``, the integral a sum over a grid
  of codes (``--grid`` points per latent dimension over ±3.5; 1 or 2 latent dimensions): the
  likelihood of the particles under the model with the code integrated out, which neither
  rewards codes fitted to a particle's noise nor needs any code estimate. Differences to the
  first model are paired over particles, with their standard error;
- kNN R² (k = 20, cross-validated) of the true motion coordinate from three readings of the
  codes: the **posterior mean** on that grid at ``beta = 1`` (the Bayesian posterior), the
  posterior mean at the model's own ``beta`` (the tempered one the codes are inferred under),
  and the **Gauss-Newton codes** the command would infer for new particles (``--gn-steps``
  damped steps from 0 at the model's ``beta``);
- the decoder's displacement over the training particles' stored codes: the shares of its
  variance along its leading directions (a one-dimensional motion has one), and the cosine of
  the leading one with the true motion's linear direction in each moving domain.

Example (the measurements in benchmarks/RESULTS.md)::

    D=/tmp/grid6k/twist-hinge_snr0.02
    python benchmarks/heldout_evidence.py $D/data --preset twist-hinge \\
        $D/modes/forward_deformations/checkpoints/checkpoint_final.pth \\
        $D/modes/forward_deformations/checkpoints/010.pth /tmp/true_codes_15.pth
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, model_ceiling_r2

from _common import batches_of, start_training
from model_ceiling_r2 import energies, moved_by_truth, posterior_mean

from dynamight_core.fourier_grids import rfft2_centered
from dynamight_core.half_set_trainer import HalfSetTrainer
from dynamight_core.latent_inference import infer_latents
from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.quality_scores import knn_r2


def load_trainer(path: Path, device: torch.device) -> HalfSetTrainer:
    """Half set 1's trainer from a run checkpoint or a saved trainer state."""
    state = torch.load(path, map_location=device, weights_only=True)
    if "halves" in state:
        state = state["halves"]["1"]
    return HalfSetTrainer.from_state_dict(state, device)


def code_grid(dim: int, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes on a grid over ±3.5 per dimension (G, dim) and ``log N(z; 0, I) + log cell``."""
    if dim not in (1, 2):
        raise SystemExit(f"{dim} latent dimensions: the grid covers 1 or 2")
    axis = torch.linspace(-3.5, 3.5, points)
    grid = torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"), -1).reshape(-1, dim)
    cell = float(axis[1] - axis[0]) ** dim
    log_prior = (-0.5 * (grid.double() ** 2).sum(-1) - 0.5 * dim * math.log(2 * math.pi)
                 + math.log(cell))
    return grid, log_prior


def gauss_newton_codes(trainer, particles, rows, weights, steps, device) -> np.ndarray:
    out = []
    for batch in batches_of(particles, rows, 100, device):
        z0 = torch.zeros(len(batch), trainer.config.latent_dim, device=device)
        out.append(infer_latents(lambda z, b=batch: trainer.model.linearise(b, z), z0,
                                 rfft2_centered(batch.images), weights, steps,
                                 beta=trainer.config.beta,
                                 max_step=trainer.config.max_latent_step)[0])
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def decoder_directions(trainer, preset: str, n_codes: int = 800) -> str:
    """Variance shares of the decoded displacements' leading directions and the leading one's
    cosine with the true motion's linear direction per moving domain."""
    consensus = trainer.model.gaussians.positions.detach()
    moved = moved_by_truth(protein_like_structure(preset), consensus)
    m = torch.linspace(-1, 1, 61)
    displacement = moved.deformed_positions(m) - moved.deformed_positions(torch.zeros(1))
    linear = (m[:, None, None] * displacement).sum(0) / (m**2).sum()  # (n_g, 3) per unit m
    codes = trainer.stored_latents(trainer.train_indices)[:n_codes]
    decoded = trainer.model.displacements(codes)
    decoded = (decoded - decoded.mean(0)).reshape(decoded.shape[0], -1)
    _, s, vh = torch.linalg.svd(decoded, full_matrices=False)
    shares = (s**2 / (s**2).sum())[:2].tolist()
    lead = vh[0].reshape(-1, 3)
    cosines = []
    for domain in sorted(set(moved.domain.tolist()) - {0}):
        sel = moved.domain == domain
        a, b = linear[sel].reshape(-1), lead[sel].reshape(-1)
        cosines.append(abs(float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))))
    return (f"decoder directions: variance shares {shares[0]:.3f} / {shares[1]:.3f}; leading "
            f"one against the true motion, |cos| per moving domain "
            f"{' / '.join(f'{c:.3f}' for c in cosines)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("models", type=Path, nargs="+",
                        help="run checkpoints or saved trainer states (the first is the "
                             "reference of the paired differences and gives the noise weights)")
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--grid", type=int, default=29, help="codes per latent dimension")
    parser.add_argument("--gn-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    trainers = [load_trainer(path, device) for path in args.models]
    n_gaussians = trainers[0].config.n_gaussians
    _, particles, motion, training = start_training(
        args.dataset, ["--n-gaussians", str(n_gaussians)], device)
    half_set = training.particles.half_set.numpy()
    rows = np.flatnonzero(training.validation.numpy() & (half_set == 1))
    for path, trainer in zip(args.models, trainers, strict=True):
        if np.isin(rows, trainer.train_indices).any():
            raise SystemExit(f"{path}: trained on some of the held-out particles (another "
                             "validation split or seed)")
    weights = trainers[0].pixel_weights
    truth = motion[rows]
    print(f"# {args.dataset}: {len(rows)} held-out particles of half 1; noise weights of "
          f"{args.models[0].name}")
    reference = None
    for path, trainer in zip(args.models, trainers, strict=True):
        t0 = time.time()
        trainer.pixel_weights = weights
        grid, log_prior = code_grid(trainer.config.latent_dim, args.grid)
        with torch.no_grad():
            positions = trainer.model.gaussians.positions.detach()[None] \
                + trainer.model.displacements(grid)
        energy = energies(trainer, particles, rows, positions, 100, device)
        log_evidence = torch.logsumexp(-energy + log_prior[None], 1).numpy()
        if reference is None:
            reference = log_evidence
        diff = log_evidence - reference
        beta = trainer.config.beta
        r2_mean = knn_r2(posterior_mean(energy - log_prior[None], grid), truth)
        r2_tempered = knn_r2(posterior_mean(energy / beta - log_prior[None], grid), truth)
        r2_gn = knn_r2(gauss_newton_codes(trainer, particles, rows, weights, args.gn_steps,
                                          device), truth)
        print(f"{path}\n    held-out log evidence {log_evidence.sum():.1f} (against the first: "
              f"{diff.sum():+.1f} ± {diff.std() * math.sqrt(len(diff)):.1f} nats)\n"
              f"    kNN R²: posterior mean (beta 1) {r2_mean:.3f}, posterior mean (beta "
              f"{beta:g}) {r2_tempered:.3f}, Gauss-Newton codes ({args.gn_steps} steps from 0, "
              f"beta {beta:g}) {r2_gn:.3f}\n"
              f"    {decoder_directions(trainer, args.preset)} ({time.time() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
