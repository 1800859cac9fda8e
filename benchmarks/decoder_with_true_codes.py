"""Can the decoder learn the motion at all when it is handed the true codes, how fast, and does
the usual training keep what it learnt? (``dynamight simulate --preset`` datasets only.)

Half set 1 is trained exactly as ``optimize-deformations`` trains it (its parser, so its
defaults; options after ``--``; the decoder starts from zero), except that for the first
``--supervised-epochs`` joint epochs each training particle's code is not inferred but set to
the true motion coordinate: ``z = (1.7 m, 0, ...)`` (1.7: about the spread the codes of the
unit prior take), with a posterior so narrow that the decoder trains on that code itself.
After that the codes are inferred as usual, starting from those true codes.

Every ``--every`` epochs it prints, on the first ``--n-particles`` particles of half 1:

- *decoder at true codes*: the posterior mean of m on 61 values when the model is the learnt
  consensus moved by the decoder at the codes ``(1.7 m, 0)``: what the decoder has learnt about
  the motion (cross-validated kNN R², k = 20);
- *consensus + truth*: the learnt consensus moved by the true motion
  (``model_ceiling_r2.py``): what the model of the structure carries;
- the decoder's path error at m = ±0.9 (moving domains, Å, the offset at m = 0 removed) out of
  the true displacement there;

and after the supervised epochs, every epoch, the kNN R² of the stored codes of the training
particles (what ``trace_latent_learning.py`` reports).

Example (the measurement in benchmarks/RESULTS.md)::

    python benchmarks/decoder_with_true_codes.py /tmp/grid6k/twist-hinge_snr0.02/data \\
        --preset twist-hinge --epochs 25 --supervised-epochs 15 -- --n-gaussians 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, model_ceiling_r2

from _common import add_save_states_args, batches_of, save_state, start_training
from model_ceiling_r2 import energies, moved_by_truth, posterior_mean

from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.quality_scores import knn_r2

CODE_SCALE = 1.7


def true_code_refiner(trainer, codes: torch.Tensor):
    """A stand-in for the trainer's ``_refine_codes``: the stored code of each particle of the
    batch becomes its true code, with a posterior precision of 1e4 (so the draw is the code)."""
    def refine(batch):
        z = codes[torch.as_tensor(batch.indices)].to(trainer.device)
        rows = trainer._rows(batch.indices)[0]
        trainer.latents[rows] = z
        precision = 1e4 * torch.eye(z.shape[1], device=z.device).expand(z.shape[0], -1, -1)
        return z, precision.clone(), None
    return refine


def report(trainer, particles, rows, truth, structure, batch_size, device) -> str:
    m_grid = torch.linspace(-1, 1, 61)
    z = torch.zeros(m_grid.numel(), trainer.config.latent_dim)
    z[:, 0] = CODE_SCALE * m_grid
    consensus = trainer.model.gaussians.positions.detach()
    moved = moved_by_truth(structure, consensus)
    with torch.no_grad():
        decoded = consensus[None] + trainer.model.displacements(z)
        ends = torch.tensor([-0.9, 0.0, 0.9])
        code_ends = torch.zeros(3, trainer.config.latent_dim)
        code_ends[:, 0] = CODE_SCALE * ends
        true_d = moved.deformed_positions(ends) - consensus
        path_d = trainer.model.displacements(code_ends)
    out = []
    for positions in (decoded, moved.deformed_positions(m_grid)):
        e = energies(trainer, particles, rows, positions, batch_size, device)
        out.append(knn_r2(posterior_mean(e, m_grid), truth))
    moving = moved.domain > 0
    diff = (path_d - true_d)[:, moving]
    diff = diff - diff[1:2]
    error = diff.norm(dim=-1).mean(1)
    size = (true_d - true_d[1:2])[:, moving].norm(dim=-1).mean(1)
    return (f"decoder at true codes kNN R² {out[0]:.3f}, consensus + truth {out[1]:.3f}, "
            f"path error at m = -0.9 / +0.9: {float(error[0]):.2f} / {float(error[2]):.2f} Å "
            f"of {float(size[0]):.2f} / {float(size[2]):.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--supervised-epochs", type=int, default=15)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--n-particles", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    add_save_states_args(parser, "true_codes")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command_args = ["--decoder-start", "zero", *argv[split + 1:]]
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    opts, particles, motion, training = start_training(args.dataset, command_args, device)
    trainer = training.trainers[1]
    codes = torch.zeros(len(motion), trainer.config.latent_dim)
    codes[:, 0] = CODE_SCALE * torch.as_tensor(np.array(motion), dtype=torch.float32)
    rows = np.flatnonzero(training.particles.half_set.numpy() == 1)[:args.n_particles]
    structure = protein_like_structure(args.preset)
    print(f"# {args.dataset}: options {' '.join(command_args)}; true codes for "
          f"{args.supervised_epochs} epochs", flush=True)
    trainer._refine_codes = true_code_refiner(trainer, codes)
    for epoch in range(1, args.epochs + 1):
        if epoch == args.supervised_epochs + 1:
            del trainer._refine_codes  # the class's own inference from now on
        t0 = time.time()
        stats = trainer.train_epoch(batches_of(particles, trainer.epoch_order(),
                                               opts.batch_size, device))
        line = f"epoch {epoch:3d} λ {stats['regularization_weight']:8.3g} ({time.time() - t0:.0f} s)"
        if epoch > args.supervised_epochs:
            r2 = knn_r2(trainer.stored_latents(trainer.train_indices).numpy(),
                        motion[trainer.train_indices])
            line += f": codes kNN R² {r2:.3f}"
        print(line, flush=True)
        save_state(trainer, args, epoch)
        if epoch % args.every == 0 or epoch == args.epochs:
            print("          " + report(trainer, particles, rows, motion[rows], structure,
                                        opts.batch_size, device), flush=True)


if __name__ == "__main__":
    main()
