"""Where does a training step read values back to the host? Counts, per joint epoch of one
half-set trainer, every ``aten::_local_scalar_dense`` (``float(t)``, ``t.item()``, ``bool(t)``:
on a GPU each is a synchronisation that stalls the pipeline) and ``aten::nonzero`` (boolean
indexing: also a synchronisation), by the project's call site (file:line).

Built as ``bench_optimize_deformations.py`` builds its trainer (hinged test structure, in-memory
images). Adam's own reads of its step counters are on host tensors (not a GPU
synchronisation) and are listed apart.

Example::

    python benchmarks/count_host_syncs.py --box 32 --n-particles 200 --n-gaussians 1000
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


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WATCHED:
            stack = traceback.extract_stack()
            ours = [f for f in stack if "/dynamight_core/" in f.filename]
            where = "torch (optimiser)" if any("/torch/optim/" in f.filename for f in stack) \
                else (f"{Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})"
                      if ours else "elsewhere")
            self.sites[(str(func.overloadpacket.__name__), where)] += 1
        return func(*args, **(kwargs or {}))


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
    args = parser.parse_args(argv)
    pixel_size = args.pixel_size or 192.0 / args.box
    device = torch.device("cpu")
    particles, structure = bench._dataset(args.box, pixel_size, args.n_particles, 0)
    volume = consensus_map(structure, args.box, pixel_size)
    gaussians, _ = init_gaussians_from_map(volume, pixel_size, args.n_gaussians, None, 1,
                                           torch.Generator().manual_seed(0))
    config = TrainerConfig(box_size=args.box, pixel_size=pixel_size,
                           n_gaussians=gaussians.n_gaussians, decoder_precision="float32",
                           latent_dim=args.n_latent_dimensions,
                           n_linear_layers=args.n_linear_layers)
    trainer = HalfSetTrainer(1, config, gaussians, np.arange(args.n_particles), device)
    every = np.arange(args.n_particles)
    trainer.initialise_noise(bench._batches(particles, every, args.batch_size, device))
    trainer.train_epoch(bench._batches(particles, trainer.epoch_order(), args.batch_size, device))
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
