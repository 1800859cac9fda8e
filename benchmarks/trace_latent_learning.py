"""When does the latent space learn the motion? Epoch-by-epoch trace of one half set's training
on a simulated dataset with ground truth (``dynamight simulate``).

The trainer is built exactly as ``dynamight optimize-deformations`` builds it (its argument
parser and :class:`dynamight_core.deformation_training.DeformationTraining`, so the defaults
are the command's; any option of the command can
be given after ``--``). After every epoch the script prints, for half set 1 (and 2 with
``--both-halves``): the data term, KL, λ, the held-out residual the early stopping watches, the
spread of the latent codes, and the cross-validated kNN R² (k = 20) of the true motion
coordinate from the codes of the training particles and of the validation particles (inferred
through the model, which never trains on them), as the command has them after the epoch.

With ``--batch-trace FILE`` every training batch adds a JSON line to ``FILE``: half, epoch, λ,
the batch's regulariser (mean and largest), data MSE, the largest and mean code norm, and the
norm of the decoder's parameter change made by the step before it (an Adam step's size: about
``lr × sqrt(parameters)`` when every parameter moves by the full learning rate). It found the
blow-ups of *Blow-ups in the middle of training* (``benchmarks/RESULTS.md``).

Example::

    dynamight simulate --output-directory /tmp/clamp --preset clamp
    python benchmarks/trace_latent_learning.py /tmp/clamp --epochs 30 -- --n-gaussians 3000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import add_save_states_args, save_state, start_training
from _common import batches_of as _batches

from dynamight_core import half_set_trainer
from dynamight_core.quality_scores import knn_r2


def trace_batches(path: Path) -> None:
    """Append a JSON line per training batch to ``path`` (module docstring), by wrapping
    :meth:`HalfSetTrainer._batch_terms` (this process only)."""
    terms = half_set_trainer.HalfSetTrainer._batch_terms
    out = path.open("w")
    previous = {}

    def traced(self, batch, warmup):
        result = terms(self, batch, warmup)
        _, mse, reg, mean, _, _ = result
        params = torch.cat([p.detach().flatten() for p in self.model.decoder.parameters()])
        last = previous.get(self.half)
        previous[self.half] = params.clone()
        norms = mean.detach().norm(dim=1)
        out.write(json.dumps({
            "half": self.half, "epoch": self.epoch, "lambda": float(self.regularization_weight),
            "reg": float(reg.detach().mean()), "reg_max": float(reg.detach().max()),
            "mse": float(mse.detach().mean()), "code_norm_max": float(norms.max()),
            "code_norm_mean": float(norms.mean()),
            "decoder_step": float((params - last).norm()) if last is not None else 0.0}) + "\n")
        out.flush()
        return result

    half_set_trainer.HalfSetTrainer._batch_terms = traced


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--both-halves", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-trace", type=Path, help="per-batch JSON lines to this file")
    add_save_states_args(parser, "trace")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.command_args = argv[split + 1:]  # options of optimize-deformations
    torch.set_num_threads(args.threads)

    if args.batch_trace is not None:
        trace_batches(args.batch_trace)
    device = torch.device("cpu")
    opts, particles, motion, training = start_training(args.dataset, args.command_args, device)
    trainers, validation = training.trainers, training.validation
    halves = (1, 2) if args.both_halves else (1,)

    held = {h: np.flatnonzero(validation.numpy() & (particles.half_set.numpy() == h))
            for h in halves}
    print(f"# {args.dataset}: options {' '.join(args.command_args) or '(defaults)'}",
          flush=True)
    print("epoch half phase   data        kl       lambda    heldout      mu_std  "
          "r2_train r2_val  s/epoch", flush=True)
    for epoch in range(1, args.epochs + 1):
        for h in halves:
            t = trainers[h]
            t0 = time.time()
            if t.needs_decoder_start:
                t.start_decoder_from_modes(
                    _batches(particles, t.train_indices, opts.batch_size, device),
                    _batches(particles, t.known_indices, opts.batch_size, device))
            stats = t.train_epoch(_batches(particles, t.epoch_order(), opts.batch_size, device))
            elapsed = time.time() - t0
            residual = t.evaluate(_batches(particles, held[h], opts.batch_size, device))
            mu_t = t.stored_latents(t.train_indices).cpu().numpy()
            mu_v = t.stored_latents(held[h]).cpu().numpy()  # as evaluate() left them
            r2_t = knn_r2(mu_t, motion[t.train_indices])
            r2_v = knn_r2(mu_v, motion[held[h]])
            phase = "warmup" if stats["warmup"] else "joint"
            print(f"{epoch:5d} {h:4d} {phase:6s} {stats['data']:10.5g} {stats['kl']:9.4g} "
                  f"{stats['regularization_weight']:9.3g} {residual:12.7g} "
                  f"{float(mu_t.std(0).mean()):7.3f} {r2_t:8.3f} {r2_v:6.3f} {elapsed:8.1f}",
                  flush=True)
        save_state(trainers[1], args, epoch)


if __name__ == "__main__":
    main()
