"""The deformation decoder alone, as a training step runs it: milliseconds per batch and
particles/s of

- ``train``: the training pass, ``decoder(positions, z)`` with autograd and its backward
  (:mod:`dynamight_core._mlp_kernel` on CUDA, ``DYNAMIGHT_FUSED_MLP=0``: torch autograd);
- ``codes``: the codes step's pass without autograd, displacements and latent tangents
  (``forward_with_tangents``; :mod:`dynamight_core._decoder_pass_kernel` on CUDA,
  ``DYNAMIGHT_FUSED_DECODER_PASS=0``: torch code and the tangent kernel),

each with the fused kernels and with the torch code, in the decoder's precision (the
command's ``auto``: bfloat16 autocast where the hardware computes it natively), and how far the
two agree at this size (largest difference of the displacements and of the parameters'
gradients, relative to the largest value). ``--sweep`` also times the training pass's
kernels with other rows per program and warps (``_mlp_kernel._ROWS``, ``_WARPS``), to choose
them on a new GPU.

The decoder has random weights (its output layer too, so that every term counts), the
reference DynaMight's size by default: 30,000 Gaussians, 8 hidden layers of 32, 6 latent
dimensions, batch 128 (the anchor row ``z = 0`` is one more). Warm-up passes are excluded; peak
memory is ``torch.cuda.max_memory_allocated`` (CUDA) or the process's maximum RSS (CPU).

Example::

    python benchmarks/bench_decoder.py --device cuda            # reference size, bf16
    python benchmarks/bench_decoder.py --device cuda --sweep
    python benchmarks/bench_decoder.py --n-gaussians 3000       # CPU: the torch code only
"""

from __future__ import annotations

import argparse
import os
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

from dynamight_core import _decoder_pass_kernel, _mlp_kernel
from dynamight_core.decoder import DeformationDecoder
from dynamight_core.device import resolve_decoder_precision

SWITCHES = {"train": "DYNAMIGHT_FUSED_MLP", "codes": "DYNAMIGHT_FUSED_DECODER_PASS"}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_device_arg(parser)
    add_threads_seed_args(parser)
    parser.add_argument("--n-gaussians", type=int, default=30000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-linear-layers", type=int, default=8)
    parser.add_argument("--n-neurons", type=int, default=32)
    parser.add_argument("--n-latent-dimensions", type=int, default=6)
    parser.add_argument("--decoder-precision", default="auto",
                        choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true",
                        help="also time the training kernels at other rows / warps (CUDA)")
    return parser


def _setup(args, device: torch.device):
    g = torch.Generator().manual_seed(args.seed)
    decoder = DeformationDecoder(64, 1.5, args.n_latent_dimensions, args.n_neurons,
                                 args.n_linear_layers)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
    positions = (torch.rand(args.n_gaussians, 3, generator=g) - 0.5) * 40.0
    z = torch.randn(args.batch_size, args.n_latent_dimensions, generator=g)
    weighting = torch.randn(args.batch_size, args.n_gaussians, 3, generator=g)
    return decoder.to(device), positions.to(device), z.to(device), weighting.to(device)


def _train_pass(decoder, positions, z, weighting, dtype):
    with torch.autocast(z.device.type, dtype=dtype, enabled=dtype != torch.float32):
        displacements = decoder(positions, z)
    loss = (displacements.float() * weighting).sum()
    grads = torch.autograd.grad(loss, list(decoder.parameters()))
    return displacements.detach().float(), grads


def _codes_pass(decoder, positions, z, dtype):
    with torch.no_grad(), torch.autocast(z.device.type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        displacements, tangents = decoder.forward_with_tangents(positions, z)
    return displacements.float(), tangents.float()


def _time(fn, device: torch.device, repeats: int) -> tuple[float, object, str]:
    """Milliseconds per call (after one warm-up call), the last result, peak memory."""
    result = fn()
    sync(device)
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        for _ in range(repeats):
            result = fn()
        sync(device)
        elapsed = (time.perf_counter() - t0) / repeats
    return 1e3 * elapsed, result, memory.text


def _tensors(result) -> list[torch.Tensor]:
    if isinstance(result, tuple | list):
        return [t for part in result for t in _tensors(part)]
    return [result]


def _difference(a, b) -> float:
    """Largest |a - b| of each tensor of a (nested) result, relative to its largest |b|; the
    worst tensor's. Tensors of rounding alone (largest |b| under 1e-5 of the largest of all:
    the output bias's gradient, which the anchor ``f(z) - f(0)`` cancels) are left out."""
    pairs = list(zip(_tensors(a), _tensors(b), strict=True))
    scale = max(float(y.abs().max()) for _, y in pairs)
    return max(float((x - y).abs().max() / y.abs().max())
               for x, y in pairs if float(y.abs().max()) > 1e-5 * scale)


def _kernel_state(module) -> str:
    return f"failed: {module._FAILED[0].splitlines()[0]}" if module._FAILED else "ok"


def main(argv: list[str] | None = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    device = setup_device(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        resolve_decoder_precision(args.decoder_precision, device)]
    decoder, positions, z, weighting = _setup(args, device)
    b = args.batch_size
    print_header(device, f"{args.n_gaussians} Gaussians", f"batch {b}",
                 f"{args.n_linear_layers} layers of {args.n_neurons}",
                 f"{args.n_latent_dimensions} latent dimensions", f"decoder {dtype}")
    passes = {"train": lambda: _train_pass(decoder, positions, z, weighting, dtype),
              "codes": lambda: _codes_pass(decoder, positions, z, dtype)}
    print("pass   code    ms/batch  particles/s  memory                 difference")
    for name, fn in passes.items():
        results = {}
        for code, value in (("torch", "0"), ("fused", "1")):
            os.environ[SWITCHES[name]] = value
            ms, results[code], memory = _time(fn, device, args.repeats)
            difference = (f"{_difference(results['fused'], results['torch']):.2e}"
                          if code == "fused" else "")
            print(f"{name:6s} {code:6s} {ms:9.2f}  {1e3 * b / ms:11.0f}  {memory:22s} "
                  f"{difference}", flush=True)
        os.environ.pop(SWITCHES[name])
    usable = _mlp_kernel.fused_mlp_usable(positions.new_zeros(1, args.n_neurons),
                                          args.n_neurons, decoder.output_layer.weight)
    print(f"# kernels: MLP {_kernel_state(_mlp_kernel)}, usable here {usable}; codes' decoder "
          f"pass {_kernel_state(_decoder_pass_kernel)}", flush=True)
    if args.sweep and not usable:
        print("# no sweep: the training kernels do not run here")
    elif args.sweep:
        print("sweep of the training kernels: rows warps ms/batch")
        for rows in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                _mlp_kernel._ROWS, _mlp_kernel._WARPS = rows, warps
                ms, _, _ = _time(passes["train"], device, args.repeats)
                print(f"  {rows:4d} {warps:5d} {ms:9.2f}", flush=True)
        _mlp_kernel._ROWS, _mlp_kernel._WARPS = None, None


if __name__ == "__main__":
    main()
