"""Throughput of the core physics: Gaussian projection (forward, forward + backward) and rigid
Fourier-slice reconstruction (``FourierAccumulator.add``).

One line per measurement: operation, box, batch, particles timed, seconds, particles/s, peak
memory. A warm-up batch runs before every timed loop and is not counted. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (reset before each measurement) and the process's
maximum resident set size on CPU (``getrusage``; a high-water mark over the whole run, so the
``+`` figure is how much this measurement raised it).

Example::

    python benchmarks/bench_physics.py --device cpu --boxes 64 128 256
    python benchmarks/bench_physics.py --device cuda --boxes 128 256 \\
        --n-particles 4096 --batch-size 128
"""

from __future__ import annotations

import argparse
import math
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
    random_ctf,
    setup_device,
    sync,
)

from dynamight_core.ctf import ctf_2d_rfft
from dynamight_core.gaussian_projection import project_gaussians_rfft
from dynamight_core.reconstruction import FourierAccumulator
from dynamight_core.rotation import random_rotations
from dynamight_core.shift import apply_relion_origin_rfft

# defaults sized for ~5 min on 2 CPU cores
DEFAULT_PARTICLES = {64: 4096, 128: 2048, 256: 512}
DEFAULT_BATCH = {64: 32, 128: 32, 256: 16}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_device_arg(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--n-particles", type=int, default=None,
                        help=f"particles timed per measurement (default per box: "
                             f"{DEFAULT_PARTICLES}, 256 otherwise)")
    parser.add_argument("--n-gaussians", type=int, default=10000)
    parser.add_argument("--n-classes", type=int, default=1, help="Gaussian width classes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"particles per call (default per box: {DEFAULT_BATCH}, 32 otherwise)")
    parser.add_argument("--pixel-size", type=float, default=1.5, help="Å")
    parser.add_argument("--oversampling", type=int, default=2,
                        help="project_gaussians_rfft splat oversampling")
    parser.add_argument("--only", nargs="+", default=["fwd", "fwd_bwd", "reconstruct"],
                        choices=["fwd", "fwd_bwd", "reconstruct"])
    add_threads_seed_args(parser)
    return parser


def _report(name: str, box: int, batch: int, n: int, seconds: float, memory: PeakMemory,
            extra: str = "") -> None:
    print(f"{name:<22} box={box:<4d} batch={batch:<4d} particles={n:<5d} time={seconds:8.3f} s "
          f"throughput={n / seconds:10.1f} particles/s  {memory.text}{extra}", flush=True)


def bench_gaussians(args, box: int, n: int, batch: int, device: torch.device,
                    backward: bool) -> None:
    g = torch.Generator().manual_seed(args.seed)
    radius = 0.35 * box * args.pixel_size
    positions = ((torch.rand(args.n_gaussians, 3, generator=g) - 0.5) * 2 * radius).to(device)
    sigmas = (args.pixel_size * 2.0 ** torch.linspace(-0.5, 0.5, args.n_classes)).to(device)
    masses = torch.ones(args.n_gaussians, device=device)
    class_index = torch.randint(0, args.n_classes, (args.n_gaussians,), generator=g).to(device)
    n_batches = math.ceil(n / batch)
    rotations = random_rotations(batch * (n_batches + 1), generator=g).to(device)
    shifts = (torch.rand(batch, 2, generator=g) * 4.0 - 2.0).to(device)
    ctf = ctf_2d_rfft(random_ctf(batch, g).to(device), box, args.pixel_size)
    target = torch.randn(batch, box, box // 2 + 1, dtype=torch.complex64, generator=g).to(device)
    if backward:
        positions.requires_grad_(True)

    def step(i: int) -> None:
        rot = rotations[i * batch:(i + 1) * batch]
        ft = project_gaussians_rfft(positions, sigmas, masses, class_index, rot, box,
                                    args.pixel_size, oversampling=args.oversampling)
        ft = apply_relion_origin_rfft(ft * ctf, shifts, args.pixel_size, box)
        if backward:
            loss = (ft - target).abs().pow(2).sum()
            loss.backward()
            positions.grad = None

    name = "gauss_proj fwd+bwd" if backward else "gauss_proj fwd"
    with torch.set_grad_enabled(backward):
        step(n_batches)  # warm-up, excluded
        sync(device)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            for i in range(n_batches):
                step(i)
            sync(device)
            seconds = time.perf_counter() - start
    _report(name, box, batch, n_batches * batch, seconds, memory,
            f"  n_gaussians={args.n_gaussians}")


def bench_reconstruction(args, box: int, n: int, batch: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(args.seed)
    n_batches = math.ceil(n / batch)
    images = torch.randn(batch, box, box, generator=g).to(device)
    rotations = random_rotations(batch * (n_batches + 1), generator=g).to(device)
    shifts = (torch.rand(batch, 2, generator=g) * 4.0 - 2.0).to(device)
    ctf = random_ctf(batch, g).to(device)
    with PeakMemory(device) as memory:
        acc = FourierAccumulator(box, args.pixel_size, device=device)
        acc.add(images, rotations[-batch:], shifts, ctf)  # warm-up, excluded
        sync(device)
        start = time.perf_counter()
        for i in range(n_batches):
            acc.add(images, rotations[i * batch:(i + 1) * batch], shifts, ctf)
        sync(device)
        seconds = time.perf_counter() - start
    _report("reconstruct add", box, batch, n_batches * batch, seconds, memory,
            f"  (pad 2: two {acc.padded_size}^2x{acc.padded_size // 2 + 1} volumes)")
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        acc.reconstruct()
        sync(device)
        seconds = time.perf_counter() - start
    print(f"{'reconstruct()':<22} box={box:<4d} time={seconds:8.3f} s  {memory.text}", flush=True)


def main(args: argparse.Namespace) -> None:
    device = setup_device(args)
    print_header(device, f"python {platform.python_version()}")
    for box in sorted(args.boxes):
        n = args.n_particles or DEFAULT_PARTICLES.get(box, 256)
        batch = min(args.batch_size or DEFAULT_BATCH.get(box, 32), n)
        if "fwd" in args.only:
            bench_gaussians(args, box, n, batch, device, backward=False)
        if "fwd_bwd" in args.only:
            bench_gaussians(args, box, n, batch, device, backward=True)
        if "reconstruct" in args.only:
            bench_reconstruction(args, box, n, batch, device)


if __name__ == "__main__":
    main(add_args(argparse.ArgumentParser(description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
         .parse_args())
