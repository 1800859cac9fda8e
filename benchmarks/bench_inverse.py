"""Throughput of the inverse deformations: network training epochs and fixed-point evaluation.

Synthetic inputs sized like a real run: ``--n-gaussians`` consensus Gaussians filling an
ellipsoid in the box, a forward :class:`DeformationDecoder` with random weights (its output layer
re-initialised so displacements are a few Å), random latent codes. Measurements, one line each:

- ``network epoch``: one inverse-network epoch over ``--n-particles``: the forward decoder on all
  Gaussians of every particle plus one training step per batch (``--points-per-particle``
  Gaussians drawn per particle, smoothness term on). Comparable to the reference's inverse epoch
  (which also re-reads and re-encodes the images every epoch; here the codes are read from the
  forward run, as the command does).
- ``network eval``: the trained network on all Gaussians of every particle (the held-out
  measurement).
- ``fixed-point eval``: :class:`FixedPointInverse` on all Gaussians of every particle
  (forward and splatted inverse fields, ``--n-iterations`` iterations), the decoder included.
- ``warp volume``: :func:`warp_volume_to_latent` of a box³ map for a few particles (fixed-point
  inverse, all voxels).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's maximum RSS on CPU
(a high-water mark over the whole run; ``+N`` is how much that measurement raised it).

Example::

    OMP_NUM_THREADS=2 python benchmarks/bench_inverse.py --boxes 64 128
    python benchmarks/bench_inverse.py --device cuda --boxes 64 128 256 --n-particles 10000
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import (
    PeakMemory,
    add_device_arg,
    add_threads_seed_args,
    print_header,
    setup_device,
    sync,
)

from dynamight_core.decoder import DeformationDecoder
from dynamight_core.deformed_backprojection import choose_grid_size
from dynamight_core.fixed_point_inverse import (
    FixedPointInverse,
    fixed_point_inverse_map,
)
from dynamight_core.inverse_network import (
    InverseDeformationTrainer,
    InverseTrainerConfig,
)
from dynamight_core.inversion_error import inversion_errors
from dynamight_core.volume_warp import warp_volume_to_latent


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_device_arg(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--n-particles", type=int, default=2000)
    parser.add_argument("--n-gaussians", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--points-per-particle", type=int, default=1024)
    parser.add_argument("--n-neurons", type=int, default=64)
    parser.add_argument("--n-iterations", type=int, default=5)
    parser.add_argument("--n-warp", type=int, default=4, help="particles for the volume warp")
    parser.add_argument("--pixel-size", type=float, default=1.5, help="Å")
    parser.add_argument("--only", nargs="+", default=["network", "fixed-point", "warp"],
                        choices=["network", "fixed-point", "warp"])
    add_threads_seed_args(parser)
    return parser


def _report(name: str, box: int, n: int, seconds: float, memory: PeakMemory,
            extra: str = "") -> None:
    print(f"{name:<18} box={box:<4d} particles={n:<6d} time={seconds:8.2f} s "
          f"throughput={n / seconds:9.1f} particles/s  {memory.text}{extra}", flush=True)


def _setup(args, box: int, device: torch.device):
    g = torch.Generator().manual_seed(args.seed)
    half_box = box * args.pixel_size / 2
    pts = torch.rand(8 * args.n_gaussians, 3, generator=g) * 2 - 1
    pts = pts[(pts**2).sum(-1) <= 1][:args.n_gaussians]
    consensus = (pts * torch.tensor([0.6, 0.45, 0.4]) * half_box).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        decoder = DeformationDecoder(box, args.pixel_size, args.latent_dim)
        # smooth motions as a trained, regularised decoder gives: only the 3 coarsest
        # encoding frequencies feed it (same cost), displacements of a few Å
        with torch.no_grad():
            freq = torch.arange(decoder.position_layer.in_features) % (3 * decoder.n_freqs) // 3
            decoder.position_layer.weight[:, freq >= 3] = 0.0
            torch.nn.init.normal_(decoder.output_layer.weight, std=0.02)
    decoder = decoder.to(device).eval()
    z = torch.randn(args.n_particles, args.latent_dim, generator=g).to(device)
    return consensus, decoder, z


def bench_network(args, box: int, device: torch.device, consensus, decoder, z) -> None:
    config = InverseTrainerConfig(box, args.pixel_size, args.latent_dim,
                                  n_neurons=args.n_neurons,
                                  points_per_particle=args.points_per_particle, seed=args.seed)
    trainer = InverseDeformationTrainer(1, config, range(args.n_particles), device)
    bs = args.batch_size

    def displace(gaussians, zb):
        return decoder(consensus[gaussians], zb)

    trainer.train_step(consensus[:args.points_per_particle],
                       displace(torch.arange(args.points_per_particle, device=device),
                                z[:bs]).detach(), z[:bs])  # warm-up
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        stats = trainer.train_epoch(z, consensus, displace, bs)
        sync(device)
        seconds = time.perf_counter() - start
    _report("network epoch", box, args.n_particles, seconds, memory,
            f"  batch={bs} points/particle={args.points_per_particle} "
            f"n_gaussians={args.n_gaussians} rms={stats['rms']:.3f} Å")
    n_eval = min(args.n_particles, 500)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for s in range(0, n_eval, bs):
            zb = z[s:s + bs]
            with torch.no_grad():
                d = decoder(consensus, zb)
            inversion_errors(lambda y, zb=zb: trainer.invert(y, zb), consensus, d)
        sync(device)
        seconds = time.perf_counter() - start
    _report("network eval", box, n_eval, seconds, memory, "  all Gaussians")


def bench_fixed_point(args, box: int, device: torch.device, consensus, decoder, z) -> int:
    grid = choose_grid_size(consensus.cpu(), box, args.pixel_size)
    n_eval = min(args.n_particles, 500)
    bs = min(args.batch_size, 32)
    err_sum, err_n, iters = 0.0, 0, 0
    with torch.no_grad(), PeakMemory(device) as memory:
        start = time.perf_counter()
        for s in range(0, n_eval, bs):
            zb = z[s:s + bs]
            d = decoder(consensus, zb)
            solver = FixedPointInverse(consensus, d, box, args.pixel_size, grid_size=grid,
                                       n_iterations=args.n_iterations)
            e = inversion_errors(solver, consensus, d)
            err_sum, err_n = err_sum + float(e.sum()), err_n + e.numel()
            iters = max(iters, solver.iterations_used)
        sync(device)
        seconds = time.perf_counter() - start
    _report("fixed-point eval", box, n_eval, seconds, memory,
            f"  grid={grid}^3 batch={bs} iterations<={iters} mean error {err_sum / err_n:.3f} Å "
            f"(|d| mean {float(d.norm(dim=-1).mean()):.2f} Å)")
    return grid


def bench_warp(args, box: int, device: torch.device, consensus, decoder, z, grid: int) -> None:
    volume = torch.randn(box, box, box).to(device)
    with torch.no_grad(), PeakMemory(device) as memory:
        start = time.perf_counter()
        for p in range(args.n_warp):
            d = decoder(consensus, z[p:p + 1])[0]
            inverse = fixed_point_inverse_map(consensus, d, box, args.pixel_size, grid_size=grid,
                                              n_iterations=args.n_iterations)
            warp_volume_to_latent(volume, inverse, args.pixel_size)
        sync(device)
        seconds = time.perf_counter() - start
    _report("warp volume", box, args.n_warp, seconds, memory,
            f"  {box}^3 voxels, fixed-point grid {grid}^3")


def main(args: argparse.Namespace) -> None:
    device = setup_device(args)
    print_header(device, f"python {platform.python_version()}")
    for box in sorted(args.boxes):
        consensus, decoder, z = _setup(args, box, device)
        if "network" in args.only:
            bench_network(args, box, device, consensus, decoder, z)
        grid = choose_grid_size(consensus.cpu(), box, args.pixel_size)
        if "fixed-point" in args.only:
            grid = bench_fixed_point(args, box, device, consensus, decoder, z)
        if "warp" in args.only:
            bench_warp(args, box, device, consensus, decoder, z, grid)


if __name__ == "__main__":
    main(add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
