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
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamight_core.ctf import ctf_2d_rfft  # noqa: E402
from dynamight_core.gaussian_projection import project_gaussians_rfft  # noqa: E402
from dynamight_core.particles import CTFParams  # noqa: E402
from dynamight_core.reconstruction import FourierAccumulator  # noqa: E402
from dynamight_core.rotation import random_rotations  # noqa: E402
from dynamight_core.shift import apply_relion_origin_rfft  # noqa: E402

# defaults sized for ~5 min on 2 CPU cores
DEFAULT_PARTICLES = {64: 4096, 128: 2048, 256: 512}
DEFAULT_BATCH = {64: 32, 128: 32, 256: 16}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class PeakMemory:
    """Peak memory of a measurement (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_before = _max_rss_mib()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.text = f"peak_gpu={torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        else:
            after = _max_rss_mib()
            self.text = f"max_rss={after:.0f} MiB (+{after - self.rss_before:.0f})"


def _random_ctf(n: int, generator: torch.Generator, device: torch.device) -> CTFParams:
    defocus = 8000.0 + 12000.0 * torch.rand(n, generator=generator)
    return CTFParams.from_values(
        n, defocus_u_angstrom=defocus + 300.0, defocus_v_angstrom=defocus - 300.0,
        defocus_angle_degrees=180.0 * torch.rand(n, generator=generator)).to(device)


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
    ctf = ctf_2d_rfft(_random_ctf(batch, g, device), box, args.pixel_size)
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
        _sync(device)
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            for i in range(n_batches):
                step(i)
            _sync(device)
            seconds = time.perf_counter() - start
    _report(name, box, batch, n_batches * batch, seconds, memory,
            f"  n_gaussians={args.n_gaussians}")


def bench_reconstruction(args, box: int, n: int, batch: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(args.seed)
    n_batches = math.ceil(n / batch)
    images = torch.randn(batch, box, box, generator=g).to(device)
    rotations = random_rotations(batch * (n_batches + 1), generator=g).to(device)
    shifts = (torch.rand(batch, 2, generator=g) * 4.0 - 2.0).to(device)
    ctf = _random_ctf(batch, g, device)
    with PeakMemory(device) as memory:
        acc = FourierAccumulator(box, args.pixel_size, device=device)
        acc.add(images, rotations[-batch:], shifts, ctf)  # warm-up, excluded
        _sync(device)
        start = time.perf_counter()
        for i in range(n_batches):
            acc.add(images, rotations[i * batch:(i + 1) * batch], shifts, ctf)
        _sync(device)
        seconds = time.perf_counter() - start
    _report("reconstruct add", box, batch, n_batches * batch, seconds, memory,
            f"  (pad 2: two {acc.padded_size}^2x{acc.padded_size // 2 + 1} volumes)")
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        acc.reconstruct()
        _sync(device)
        seconds = time.perf_counter() - start
    print(f"{'reconstruct()':<22} box={box:<4d} time={seconds:8.3f} s  {memory.text}", flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"# torch {torch.__version__}, device {device} ({name}), "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}", flush=True)
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
