"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the process's maximum
resident set size from ``getrusage``: a high-water mark over the whole run, so a measurement
can only report how much it *raised* it (the ``+N`` in :class:`PeakMemory`'s text).

The scripts put the repository root and this folder on ``sys.path`` and ``import _common``, so
``python benchmarks/bench_X.py`` works from anywhere.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dynamight_core.particles import CTFParams

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` (default cpu)."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def add_threads_seed_args(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (``torch.set_num_threads``; default: torch's) and ``--seed`` (default 0)."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)


def setup_device(args: argparse.Namespace) -> torch.device:
    """The ``--device`` (exit if CUDA is asked for and absent); applies ``--threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def run_dynamight(argv: list[str]) -> float:
    """``dynamight ARGV`` in this process; its wall time in seconds (exit if it fails)."""
    from relion_external.cli import main

    t0 = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"dynamight {' '.join(argv)} failed")
    return time.perf_counter() - t0


def batches_of(particles, indices, batch_size: int, device: torch.device):
    """``make_batch`` of ``indices`` in order, ``batch_size`` at a time."""
    from dynamight_core.deformation_model import make_batch

    for start in range(0, len(indices), batch_size):
        yield make_batch(particles, indices[start:start + batch_size], device)


def true_motion(dataset: Path) -> np.ndarray:  # (n,) in the particles' order
    """The motion coordinate of every particle of a ``dynamight simulate`` folder."""
    import starfile

    table = starfile.read(dataset / "ground_truth" / "motion.star", always_dict=True)
    return table["particles"]["dmMotion"].to_numpy()


def start_training(dataset: Path, command_args: list[str], device: torch.device):
    """``optimize-deformations`` set up on a ``dynamight simulate`` folder exactly as the
    command sets it up (its parser, so its defaults; ``command_args`` are its options), up to
    the start of training: ``(options, particles, true motion per particle, training)``."""
    from dynamight_core.deformation_training import DeformationTraining
    from relion_external.commands import optimize_deformations as command
    from relion_external.particles_adapter import load_particle_set

    parser = argparse.ArgumentParser()
    command.add_args(parser)
    opts = parser.parse_args([
        "--refinement-star-file", str(dataset / "particles.star"),
        "--initial-model", str(dataset / "consensus_map.mrc"),
        "--output-directory", "/nonexistent", *command_args])
    particles, _ = load_particle_set(opts.refinement_star_file, preload=True,
                                     project_dir=opts.project_directory)
    motion = true_motion(dataset)
    training = DeformationTraining(particles, device, command._schedule(opts),
                                   command._settings(opts))
    gaussians, movable = command._initial_gaussians(opts, particles)
    training.start(gaussians, command._trainer_config(opts, particles, gaussians, device),
                   movable=movable, validation_fraction=opts.validation_fraction, seed=opts.seed)
    return opts, particles, motion, training


def add_save_states_args(parser: argparse.ArgumentParser, default_prefix: str) -> None:
    """``--save-states EPOCH...`` and ``--state-prefix`` (see :func:`save_state`)."""
    parser.add_argument("--save-states", type=int, nargs="*", default=[], metavar="EPOCH",
                        help="save half 1's trainer state after these epochs, as "
                             "PREFIX_EPOCH.pth (for heldout_evidence.py)")
    parser.add_argument("--state-prefix", default=default_prefix,
                        help=f"path prefix of the saved states (default: ./{default_prefix})")


def save_state(trainer, args: argparse.Namespace, epoch: int) -> None:
    """Save ``trainer``'s state as ``PREFIX_EPOCH.pth`` if ``epoch`` is one of
    ``--save-states``."""
    if epoch in args.save_states:
        torch.save(trainer.state_dict(), f"{args.state_prefix}_{epoch}.pth")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_header(device: torch.device, *extra: str) -> None:
    """``# torch V, device D (name), threads N[, extra...]``: the first line of every script."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(", ".join([f"# torch {torch.__version__}", f"device {device} ({name})",
                     f"threads {torch.get_num_threads()}", *extra]), flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU), so wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mib() -> float:
    """The process's maximum resident set size so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_mib(device: torch.device) -> float:
    """Peak memory so far, MiB: allocated GPU memory on CUDA, maximum RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return max_rss_mib()


class PeakMemory:
    """Peak memory of the code in a ``with`` block; ``.text`` is set on exit.

    On CUDA the cache is emptied and the peak statistics reset on entry, and ``.text`` is
    ``peak_gpu=N MiB``; on CPU it is ``max_rss=N MiB (+M)``, M being how much the block raised
    the process's high-water mark.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.text = ""

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_before = max_rss_mib()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.text = f"peak_gpu={peak_mib(self.device):.0f} MiB"
        else:
            after = max_rss_mib()
            self.text = f"max_rss={after:.0f} MiB (+{after - self.rss_before:.0f})"


def random_ctf(n: int, generator: torch.Generator) -> CTFParams:
    """``n`` CTFs on CPU: defocus uniform in 8000–20000 Å, ±300 Å astigmatism, random angle."""
    defocus = 8000.0 + 12000.0 * torch.rand(n, generator=generator)
    return CTFParams.from_values(
        n, defocus_u_angstrom=defocus + 300.0, defocus_v_angstrom=defocus - 300.0,
        defocus_angle_degrees=180.0 * torch.rand(n, generator=generator))
