"""Where does a training step read values back to the host? Counts, per joint epoch of one
half-set trainer, every ``aten::_local_scalar_dense`` (``float(t)``, ``t.item()``, ``bool(t)``:
on a GPU each is a synchronisation that stalls the pipeline), ``aten::nonzero`` and indexing
with a boolean mask (also synchronisations), by the project's call site (file:line).

With ``--all-operations``: every dispatched operation (forward, backward, optimiser) of a
training batch that is not the epoch's first (the first also sets λ), the difference of a joint
epoch of ``--batches`` batches and one of a single batch, by call site. On a GPU each is a
kernel launch or at least a trip through the dispatcher, so this is the host's share of a step.
On a CPU the torch code of the GPU kernels (splat, tangents) runs and is counted, the ``d``
renders of the Jacobian are separate, and Adam is not fused.

Built as ``bench_optimize_deformations.py`` builds its trainer (hinged test structure, in-memory
images). Adam's own reads of its step counters are on host tensors (not a GPU
synchronisation) and are listed apart.

Examples::

    python benchmarks/count_host_syncs.py --box 32 --n-particles 200 --n-gaussians 1000
    python benchmarks/count_host_syncs.py --all-operations --n-latent-dimensions 6 \
        --n-linear-layers 8 --precision bfloat16 --batch-size 64
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_optimize_deformations as bench

from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
from dynamight_core.simulation import consensus_map

WATCHED = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
# indexing with a boolean mask counts the mask's true entries inside the kernel (a read-back on
# a GPU) without dispatching a nonzero that this mode would see
_INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
             torch.ops.aten.index_put_.default)


def _boolean_indexing(func, args) -> bool:
    return func in _INDEXING and len(args) > 1 and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


class _Counter(TorchDispatchMode):
    def __init__(self, every_operation: bool = False) -> None:
        super().__init__()
        self.every_operation = every_operation
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = _boolean_indexing(func, args)
        if self.every_operation or func in WATCHED or masked:
            stack = traceback.extract_stack()
            ours = [f for f in stack if "/dynamight_core/" in f.filename]
            where = "torch (optimiser)" if any("/torch/optim/" in f.filename for f in stack) \
                else (f"{Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})"
                      if ours else "elsewhere")
            name = str(func.overloadpacket.__name__)
            if masked:
                name += " (boolean mask)"
            self.sites[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def count_operations(trainer: HalfSetTrainer, particles, args, device: torch.device) -> None:
    """``--all-operations``: operations of a later batch of a joint epoch, by call site."""
    counts = []
    for n in (1, args.batches):
        counter = _Counter(every_operation=True)
        order = trainer.epoch_order()[:n * args.batch_size]
        with counter:
            trainer.train_epoch(bench._batches(particles, order, args.batch_size, device))
        counts.append(counter.sites)
    per_batch = {site: (counts[1][site] - counts[0].get(site, 0)) / (args.batches - 1)
                 for site in counts[1]}
    by_site: collections.Counter = collections.Counter()
    for (_, where), count in per_batch.items():
        by_site[where] += count
    print(f"# box {args.box}, {trainer.config.n_gaussians} Gaussians, batch {args.batch_size}, "
          f"{args.n_latent_dimensions} latent dimensions, {args.n_linear_layers} layers, "
          f"decoder {args.precision}")
    print(f"RESULT {sum(per_batch.values()):.0f} operations per later batch")
    for where, count in by_site.most_common(args.top):
        print(f"{count:7.1f}  {where}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--pixel-size", type=float, default=None)
    parser.add_argument("--n-particles", type=int, default=200)
    parser.add_argument("--n-gaussians", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--n-latent-dimensions", type=int, default=2)
    parser.add_argument("--n-linear-layers", type=int, default=2)
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="the decoder's")
    parser.add_argument("--all-operations", action="store_true",
                        help="count every operation of a later batch (module docstring)")
    parser.add_argument("--batches", type=int, default=3,
                        help="with --all-operations: batches of the longer epoch")
    parser.add_argument("--top", type=int, default=25, help="call sites listed")
    args = parser.parse_args(argv)
    pixel_size = args.pixel_size or 192.0 / args.box
    device = torch.device("cpu")
    particles, structure = bench._dataset(args.box, pixel_size, args.n_particles, 0)
    volume = consensus_map(structure, args.box, pixel_size)
    gaussians, _ = init_gaussians_from_map(volume, pixel_size, args.n_gaussians, None, 1,
                                           torch.Generator().manual_seed(0))
    config = TrainerConfig(box_size=args.box, pixel_size=pixel_size,
                           n_gaussians=gaussians.n_gaussians, decoder_precision=args.precision,
                           latent_dim=args.n_latent_dimensions,
                           n_linear_layers=args.n_linear_layers)
    trainer = HalfSetTrainer(1, config, gaussians, np.arange(args.n_particles), device)
    every = np.arange(args.n_particles)
    trainer.initialise_noise(bench._batches(particles, every, args.batch_size, device))
    trainer.train_epoch(bench._batches(particles, trainer.epoch_order(), args.batch_size, device))
    if args.all_operations:
        count_operations(trainer, particles, args, device)
        return
    counter = _Counter()
    with counter:
        trainer.train_epoch(bench._batches(particles, trainer.epoch_order(), args.batch_size,
                                           device))
    n_batches = -(-args.n_particles // args.batch_size)
    print(f"# one joint epoch, {n_batches} batches of {args.batch_size}, box {args.box}, "
          f"{gaussians.n_gaussians} Gaussians")
    for (op, where), count in sorted(counter.sites.items(), key=lambda kv: -kv[1]):
        print(f"RESULT {count:5d} ({count / n_batches:5.1f} per batch)  {op:22s} {where}")


if __name__ == "__main__":
    main()
