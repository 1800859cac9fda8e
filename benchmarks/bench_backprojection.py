"""Throughput and memory of the deformed weighted backprojection, per particle as the
``deformable-backprojection`` command does it (image reading excluded):

    latent code (stored by training) -> decoder (10 000 Gaussian displacements) -> coarse
    displacement field (displacement_grid_from_gaussians) -> DeformedBackprojector.add

Inputs are synthetic: 10 000 Gaussians uniform in a ball of radius 0.35 × box, random latent
codes and an untrained decoder whose zero-initialised output layer
is replaced by random weights (displacements of a few Å, so the field is non-zero everywhere
inside the model), white-noise images, random poses, shifts and CTFs. The field grid is
``choose_grid_size`` (about 8 Gaussians per node), as in the command.

On a CUDA device with Triton the voxel lookup is one kernel per batch (the header says which;
``DYNAMIGHT_FUSED_LOOKUP=0`` selects the torch code). One line per box: particles timed, wall
seconds, particles/s, CPU seconds per particle (``time.process_time``, all threads of the
process), the share of the decoder + field, and peak
memory (``torch.cuda.max_memory_allocated`` on CUDA, reset per box; on CPU the process's maximum
RSS from ``getrusage``, a high-water mark over the whole run, ``+N`` = how much this box raised
it). A warm-up batch before each timed loop is excluded; ``reconstruct()`` is timed separately.

Example::

    OMP_NUM_THREADS=2 python benchmarks/bench_backprojection.py            # CPU: box 64, 128
    python benchmarks/bench_backprojection.py --device cuda --boxes 64 128 256 320
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
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

from dynamight_core._lookup_kernel import fused_lookup_usable
from dynamight_core.decoder import DeformationDecoder
from dynamight_core.deformation_model import Batch, DeformationModel
from dynamight_core.deformed_backprojection import DeformedBackprojector, choose_grid_size
from dynamight_core.displacement_field import displacement_grid_from_gaussians
from dynamight_core.gaussian_model import GaussianModel
from dynamight_core.rotation import random_rotations

DEFAULT_PARTICLES = {64: 2000, 128: 256, 256: 512, 320: 256}
DEFAULT_BATCH = {64: 32, 128: 16, 256: 16, 320: 8}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_device_arg(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=None,
                        help="default: 64 128 on CPU, 64 128 256 320 on CUDA")
    parser.add_argument("--n-particles", type=int, default=None,
                        help=f"particles timed per box (default {DEFAULT_PARTICLES})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"particles per batch (default {DEFAULT_BATCH})")
    parser.add_argument("--n-gaussians", type=int, default=10000)
    parser.add_argument("--pixel-size", type=float, default=1.5, help="Å")
    parser.add_argument("--grid-size", type=int, default=None,
                        help="displacement-field nodes per axis (default: choose_grid_size)")
    parser.add_argument("--max-chunk-voxels", type=int, default=None,
                        help="DeformedBackprojector chunk (default: its device default)")
    add_threads_seed_args(parser)
    return parser


def _model(args, box: int, g: torch.Generator, device: torch.device) -> DeformationModel:
    radius = 0.35 * box * args.pixel_size
    direction = torch.randn(args.n_gaussians, 3, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    positions = direction * radius * torch.rand(args.n_gaussians, 1, generator=g) ** (1 / 3)
    gaussians = GaussianModel(positions, torch.tensor([args.pixel_size]), torch.tensor([1.0]))
    decoder = DeformationDecoder(box, args.pixel_size, 2)
    with torch.no_grad():  # a fresh decoder returns exactly zero: give it a random output layer
        decoder.output_layer.weight.copy_(
            torch.randn(decoder.output_layer.weight.shape, generator=g) * 0.01)
    return DeformationModel(gaussians, decoder, box, args.pixel_size).to(device).eval()


def _batch(box: int, b: int, g: torch.Generator, device: torch.device, start: int) -> Batch:
    ctf = random_ctf(b, g)
    return Batch(indices=np.arange(start, start + b),
                 images=torch.randn(b, box, box, generator=g).to(device),
                 rotations=random_rotations(b, generator=g).float().to(device),
                 shifts_angstrom=(torch.rand(b, 2, generator=g) * 8.0 - 4.0).to(device),
                 ctf=ctf.to(device))


def bench_box(args, box: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(args.seed)
    n = args.n_particles or DEFAULT_PARTICLES.get(box, 256)
    b = min(args.batch_size or DEFAULT_BATCH.get(box, 16), n)
    model = _model(args, box, g, device)
    positions = model.gaussians.positions.detach()
    grid_size = args.grid_size or choose_grid_size(positions, box, args.pixel_size)
    sizes = [b] * (n // b) + ([n % b] if n % b else [])  # exactly n particles
    # a few distinct batches, reused (content does not change the cost)
    batches = [_batch(box, b, g, device, i * b) for i in range(min(len(sizes), 4))]
    if n % b:
        last = _batch(box, n % b, g, device, 0)
    with PeakMemory(device) as memory:
        backprojector = DeformedBackprojector(box, args.pixel_size, device,
                                              max_chunk_voxels=args.max_chunk_voxels)
        networks = 0.0

        def step(batch: Batch) -> float:
            # the previous batch's backprojection first: on a GPU it runs asynchronously, and
            # without this wait its kernels were timed as this batch's decoder and field
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                z = torch.randn(len(batch), 2, generator=g).to(device)  # the stored codes
                field = displacement_grid_from_gaussians(positions, model.displacements(z), box,
                                                         args.pixel_size, grid_size=grid_size)
            sync(device)
            t1 = time.perf_counter()
            backprojector.add(batch.images, batch.rotations, batch.shifts_angstrom, batch.ctf,
                              field)
            return t1 - t0

        step(batches[0])  # warm-up, excluded
        sync(device)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i, size in enumerate(sizes):
            networks += step(batches[i % len(batches)] if size == b else last)
        sync(device)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n_timed = sum(sizes)
    print(f"deformed_bp box={box:<4d} batch={b:<3d} grid={grid_size:<3d} particles={n_timed:<5d} "
          f"time={wall:8.2f} s  throughput={n_timed / wall:8.1f} particles/s  "
          f"cpu={cpu / n_timed:.4f} CPU-s/particle  networks+field={networks / wall:5.1%}  "
          f"{memory.text}", flush=True)
    t0 = time.perf_counter()
    backprojector.reconstruct()
    sync(device)
    print(f"{'reconstruct()':<11} box={box:<4d} time={time.perf_counter() - t0:8.3f} s",
          flush=True)


def main(args: argparse.Namespace) -> None:
    device = setup_device(args)
    boxes = args.boxes or ([64, 128, 256, 320] if device.type == "cuda" else [64, 128])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    fused = fused_lookup_usable(torch.empty(0, device=device))
    print_header(device, f"load average {load}", f"{args.n_gaussians} Gaussians",
                 f"voxel lookup: {'fused kernel' if fused else 'torch code'}")
    for box in boxes:
        bench_box(args, box, device)


if __name__ == "__main__":
    main(add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
