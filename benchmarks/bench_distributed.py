"""Scaling of optimize-deformations over processes (torch.distributed), and the communication
a step needs.

Runs ``dynamight optimize-deformations`` on DATASET (a folder made by ``dynamight simulate``:
particles.star + consensus_map.mrc) once per process count in ``--processes`` (``--n-processes``:
1 = both halves in one process, 2 = halves side by side, 4 = two processes per half sharing each
batch), with ``--total-threads`` CPU threads shared equally, for ``--epochs`` joint epochs, and
prints the training rate of the last epoch (particles/s, both halves), the wall time and the
speed-up over one process. Then, from the model size, the bytes a data-parallel step
all-reduces (gradients of the decoder and of the Gaussians) and what that costs on NVLink and
on 100 Gb/s Ethernet next to a step's compute time at a given rate (``--gpu-rate``).

Example (2-core CPU, numbers in RESULTS.md):
  python benchmarks/bench_distributed.py /tmp/grid6k/clamp_snr0.05/data --processes 1 2 \\
      --total-threads 2 --epochs 2 -- --n-gaussians 2000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

import _common
import torch

from dynamight_core.decoder import DeformationDecoder

RATE = re.compile(r"epoch (\d+)/\d+ \(joint\).* ([0-9.]+) particles/s")


def run(dataset: Path, processes: int, threads: int, epochs: int, extra: list[str]) -> tuple:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "relion_external.cli", "optimize-deformations",
                   "--refinement-star-file", str(dataset / "particles.star"),
                   "--initial-model", str(dataset / "consensus_map.mrc"),
                   "--output-directory", out, "--n-epochs", str(epochs),
                   "--early-stopping-patience", "0", "--n-threads", str(threads),
                   "--n-processes", str(processes), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        t0 = time.time()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.time() - t0
    if done.returncode:
        sys.exit(f"{processes} processes failed:\n{done.stderr[-3000:]}")
    rates = [float(m.group(2)) for m in RATE.finditer(done.stdout)]
    return rates[-1] if rates else float("nan"), wall


def gradient_bytes(n_gaussians: int, latent_dim: int, layers: int, neurons: int,
                   box: int, pixel_size: float) -> int:
    decoder = DeformationDecoder(box, pixel_size, latent_dim, neurons, layers, 10, None)
    n_decoder = sum(p.numel() for p in decoder.parameters())
    return 4 * (n_decoder + 5 * n_gaussians)  # float32: decoder + positions, width, mass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--total-threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpu-rate", type=float, default=10000.0,
                        help="particles/s of one GPU for the communication estimate")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--model-gaussians", type=int, default=30000,
                        help="Gaussians of the model in the communication estimate")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    _common.print_header(torch.device("cpu"), f"dataset {args.dataset}",
                         f"total threads {args.total_threads}", f"epochs {args.epochs}")
    base = None
    for n in args.processes:
        threads = max(1, args.total_threads // n)
        rate, wall = run(args.dataset, n, threads, args.epochs,
                         [*args.extra, "--batch-size", str(args.batch_size)])
        base = base or rate
        print(f"RESULT processes {n} threads/process {threads}: last joint epoch "
              f"{rate:.0f} particles/s (both halves), speed-up {rate / base:.2f}, "
              f"wall {wall:.0f} s", flush=True)
    size = gradient_bytes(args.model_gaussians, 2, 2, 32, 256, 1.0)
    step = args.batch_size / args.gpu_rate  # s per step of one process
    for name, bandwidth, latency in (("NVLink (NCCL bus ~200 GB/s)", 200e9, 20e-6),
                                     ("100 Gb/s Ethernet (~10 GB/s)", 10e9, 100e-6)):
        for world in (2, 4, 8):
            cost = 2 * (world - 1) / world * size / bandwidth + 2 * (world - 1) * latency
            print(f"RESULT all-reduce {size / 1e6:.2f} MB per step over {world} processes of a "
                  f"half, {name}: {cost * 1e3:.3f} ms against {step * 1e3:.1f} ms of compute "
                  f"per {args.batch_size}-particle step at {args.gpu_rate:.0f} particles/s "
                  f"({100 * cost / step:.1f}%)", flush=True)


if __name__ == "__main__":
    main()
