"""Throughput of deformation training (one joint epoch of ``HalfSetTrainer``), the hot loop of
``dynamight optimize-deformations``.

Particles are simulated in memory (the hinged test structure, random poses, CTFs and shifts,
SNR 0.1); a Gaussian model with ``--n-gaussians`` Gaussians is placed in its consensus map; one
half-set trainer runs one warm-up epoch and two joint batches (not timed: one-time costs such
as the GPU kernel's compilation stay out) and then ``--epochs`` joint epochs that are timed:
per batch the Gauss-Newton step of the latent codes (decoder with forward-mode derivatives, one
extra render per latent dimension), the posterior draw, decoder and projection forward,
regularisation, backward and Adam. Batches are read as the command reads them (ahead of use,
through pinned memory on a GPU). One line per box: particles/s (particle updates per second),
seconds per epoch and CPU seconds per particle, with the decoder in ``--decoder-precision``
(auto: bfloat16 where the hardware computes it natively, as the command does), and which code
computed the decoder's latent tangents. ``--n-latent-dimensions 6 --n-linear-layers 8
--n-gaussians 30000 --batch-size 128`` is the reference DynaMight's model size. Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA, the process's maximum RSS on CPU.

Example::

    python benchmarks/bench_optimize_deformations.py --device cpu --boxes 64
    python benchmarks/bench_optimize_deformations.py --device cuda --boxes 128 256 \\
        --n-particles 4000 --batch-size 128
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import (
    add_device_arg,
    add_threads_seed_args,
    peak_mib,
    print_header,
    setup_device,
    sync,
)

from dynamight_core.batch_prefetch import prefetch_batches
from dynamight_core.device import DECODER_PRECISIONS, resolve_decoder_precision
from dynamight_core.gaussian_model import init_gaussians_from_map
from dynamight_core.half_set_trainer import PROFILE_LABELS, HalfSetTrainer, TrainerConfig
from dynamight_core.particles import ParticleSet, TensorImageSource
from dynamight_core.simulation import (
    consensus_map,
    noise_sigma_for_snr,
    plan_simulation,
    simulate_images,
)
from dynamight_core.synthetic_structure import hinged_structure


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_device_arg(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=[64])
    parser.add_argument("--n-particles", type=int, default=2000)
    parser.add_argument("--n-gaussians", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=100,
                        help="optimize-deformations' default is 100")
    parser.add_argument("--n-latent-dimensions", type=int, default=2,
                        help="optimize-deformations' default is 2 (the reference DynaMight's "
                             "model size: 6 latent dimensions, 8 layers of 32 neurons)")
    parser.add_argument("--active-dimensions", type=int, default=None,
                        help="latent dimensions in use (default all): the command decides per "
                             "half set from the motion modes, and the codes' Jacobian is "
                             "rendered along those in use only (a one-dimensional motion uses "
                             "one)")
    parser.add_argument("--n-linear-layers", type=int, default=2)
    parser.add_argument("--n-neurons-per-layer", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="timed joint epochs")
    parser.add_argument("--decoder-precision", choices=DECODER_PRECISIONS, default="auto",
                        help="as optimize-deformations (auto: bfloat16 where native)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more joint epoch (torch.profiler): the share of the "
                             "epoch in each part of a step, operator calls and host "
                             "synchronisations (aten::_local_scalar_dense) per batch")
    parser.add_argument("--profile-output", type=Path, default=None, metavar="DIR",
                        help="with --profile: write DIR/train_box<N>_ops.txt (operators and "
                             "kernels by device, else CPU, time) and a gzipped Chrome trace of "
                             "the profiled epoch's first batches, DIR/train_box<N>_trace.json.gz")
    parser.add_argument("--trace-batches", type=int, default=4,
                        help="batches in the Chrome trace (--profile-output)")
    parser.add_argument("--pixel-size", type=float, default=None,
                        help="Å (default: 192 Å / box, the same molecule at every box)")
    add_threads_seed_args(parser)
    return parser


def _dataset(box: int, pixel_size: float, n: int, seed: int):
    structure = hinged_structure(seed=seed)  # about 120 Å across: fits 192 Å boxes
    plan = plan_simulation(n, seed=seed)
    plan = replace(plan, noise_sigma=noise_sigma_for_snr(structure, plan, box, pixel_size, 0.1))
    images = torch.empty(n, box, box)
    for idx, batch in simulate_images(structure, plan, box, pixel_size, seed=seed):
        images[idx] = batch
    return ParticleSet(images=TensorImageSource(images), rotations=plan.rotations,
                       shifts_angstrom=plan.shifts_angstrom, ctf=plan.ctf,
                       half_set=torch.ones(n, dtype=torch.long), pixel_size=pixel_size,
                       box_size=box), structure


def _batches(particles, order, batch_size, device):
    """The batches of ``order`` as the command reads them: ahead of use, in a background
    thread, through pinned memory on a GPU (:mod:`dynamight_core.batch_prefetch`)."""
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return prefetch_batches(particles, chunks, device)


def run_box(box: int, args, device: torch.device) -> dict:
    pixel_size = args.pixel_size or 192.0 / box
    particles, structure = _dataset(box, pixel_size, args.n_particles, args.seed)
    volume = consensus_map(structure, box, pixel_size, device=device)  # slow at box 256 on CPU
    gaussians, _ = init_gaussians_from_map(volume, pixel_size, args.n_gaussians, None, 1,
                                           torch.Generator().manual_seed(args.seed))
    config = TrainerConfig(box_size=box, pixel_size=pixel_size,
                           n_gaussians=gaussians.n_gaussians, n_warmup_epochs=1, seed=args.seed,
                           latent_dim=args.n_latent_dimensions,
                           n_linear_layers=args.n_linear_layers,
                           n_neurons_per_layer=args.n_neurons_per_layer,
                           decoder_precision=resolve_decoder_precision(args.decoder_precision,
                                                                       device))
    trainer = HalfSetTrainer(1, config, gaussians, np.arange(len(particles)), device)
    if args.active_dimensions is not None:
        active = torch.arange(config.latent_dim, device=device) < args.active_dimensions
        trainer.active_dims = active
    trainer.initialise_noise(_batches(particles, np.arange(min(512, len(particles))),
                                      args.batch_size, device))
    trainer.train_epoch(_batches(particles, trainer.epoch_order(), args.batch_size, device))
    # two joint batches, untimed: one-time costs (Triton's compilation of the tangent kernel,
    # FFT plans) stay out of the timed epochs
    trainer.train_epoch(_batches(particles, trainer.epoch_order()[:2 * args.batch_size],
                                 args.batch_size, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        trainer.train_epoch(_batches(particles, trainer.epoch_order(), args.batch_size, device))
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    n = args.epochs * len(particles)
    if args.profile:
        _profile_epoch(trainer, particles, args, device)
    return {"box": box, "pixel_size": pixel_size, "n_gaussians": gaussians.n_gaussians,
            "particles": n, "seconds": seconds, "rate": n / seconds,
            "cpu_s_per_particle": cpu_seconds / n, "seconds_per_epoch": seconds / args.epochs,
            "peak_mib": peak_mib(device)}


def _profile_epoch(trainer, particles, args, device) -> None:
    """One joint epoch under torch.profiler: time per part of a step (the trainer's
    ``dm::`` ranges: host time, and on CUDA the device time of the kernels launched inside
    each) as a share of the epoch's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    n_batches = -(-len(particles) // args.batch_size)
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.train_epoch(_batches(particles, trainer.epoch_order(), args.batch_size, device))
        sync(device)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    cuda = device.type == "cuda"

    def kind(e) -> str:
        return getattr(getattr(e, "device_type", None), "name", "CPU")

    events = {e.key: e for e in averages if kind(e) == "CPU"}
    print(f"  profile of one joint epoch ({wall:.2f} s wall, {n_batches} batches); per part, "
          "seconds and share of the wall time: host (the range on the CPU)"
          + (", kernels (device time launched inside it)" if cuda else ""), flush=True)
    for label in PROFILE_LABELS:
        e = events.get(label)
        if e is None:
            continue
        line = f"    {label[4:]:<11} host {e.cpu_time_total / 1e6:8.3f} s " \
               f"{100 * e.cpu_time_total / 1e6 / wall:5.1f} %"
        if cuda:
            us = getattr(e, "device_time_total", 0)
            line += f"   kernels {us / 1e6:8.3f} s {100 * us / 1e6 / wall:5.1f} %"
        print(line, flush=True)
    ops = sum(e.count for k, e in events.items() if k.startswith("aten::"))
    syncs = events["aten::_local_scalar_dense"].count if "aten::_local_scalar_dense" in events \
        else 0
    # device-side events that are kernels and copies, not ranges (the dm:: labels and the
    # optimiser's step appear on the GPU timeline too, spanning their kernels)
    kernel_events = [e for e in averages if kind(e) == "CUDA"
                     and not getattr(e, "is_user_annotation", False)
                     and not e.key.startswith(("dm::", "Optimizer."))]
    kernels = sum(e.count for e in kernel_events)
    print(f"    per batch: {ops / n_batches:.0f} aten operator calls, "
          f"{syncs / n_batches:.1f} host read-backs (aten::_local_scalar_dense)"
          + (f", {kernels / n_batches:.0f} CUDA kernels" if cuda else ""), flush=True)
    if cuda:
        busy = sum(getattr(e, "self_device_time_total", 0) for e in kernel_events) / 1e6
        print(f"    GPU busy (sum of kernel times) {busy:.3f} s = {100 * busy / wall:.0f} % of "
              f"the wall time", flush=True)
    if args.profile_output is not None:
        _write_profile(prof, trainer, particles, args, device)


def _write_profile(prof, trainer, particles, args, device) -> None:
    """The operator table of the profiled epoch and a Chrome trace of a few batches."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    out = args.profile_output
    out.mkdir(parents=True, exist_ok=True)
    box = trainer.config.box_size
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):  # an older torch's name of the column
        table = prof.key_averages().table(sort_by=sort.replace("device", "cuda"), row_limit=80)
    (out / f"train_box{box}_ops.txt").write_text(table)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    order = trainer.epoch_order()[:args.trace_batches * args.batch_size]
    sync(device)
    with profile(activities=activities) as short:
        trainer.train_epoch(_batches(particles, order, args.batch_size, device))
        sync(device)
    raw = out / f"train_box{box}_trace.json"
    short.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    print(f"    wrote {out / f'train_box{box}_ops.txt'} and {raw}.gz", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    device = setup_device(args)
    precision = resolve_decoder_precision(args.decoder_precision, device)
    in_use = args.n_latent_dimensions if args.active_dimensions is None \
        else args.active_dimensions
    print_header(device, f"batch {args.batch_size}", f"{args.n_particles} particles",
                 f"decoder {precision}",
                 f"latent dimensions {in_use} of {args.n_latent_dimensions} in use")
    print("box  Å/px  gaussians  particles  s/epoch  particles/s  cpu-s/particle  peak MiB")
    for box in args.boxes:
        r = run_box(box, args, device)
        print(f"{r['box']:>3}  {r['pixel_size']:.2f}  {r['n_gaussians']:>9}  {r['particles']:>9}  "
              f"{r['seconds_per_epoch']:7.1f}  {r['rate']:11.1f}  {r['cpu_s_per_particle']:14.4f}  "
              f"{r['peak_mib']:8.0f}", flush=True)
    print(f"# latent tangents: {_kernel_used(device, 'tangent')}; "
          f"codes' decoder pass: {_kernel_used(device, 'decoder_pass')}; "
          f"decoder MLP with autograd: {_kernel_used(device, 'mlp')}; "
          f"splat: {_kernel_used(device, 'splat')}", flush=True)


def _kernel_used(device: torch.device, name: str) -> str:
    """Which code computed the decoder's latent tangents (``name`` "tangent",
    :mod:`dynamight_core._tangent_kernel`), the codes step's decoder pass ("decoder_pass",
    :mod:`dynamight_core._decoder_pass_kernel`), the training step's decoder MLP ("mlp",
    :mod:`dynamight_core._mlp_kernel`) or the projection's splat ("splat",
    :mod:`dynamight_core._splat_kernel`)."""
    try:
        kernel = importlib.import_module(f"dynamight_core._{name}_kernel")
    except ImportError:  # a tree from before the kernel
        return "torch code (no fused kernel in this tree)"
    probe = torch.zeros(1, device=device)
    if kernel._FAILED:
        return f"torch code (the fused kernel failed: {kernel._FAILED[0].splitlines()[0]})"
    if name == "tangent":
        usable = kernel.fused_tangents_usable(probe, 32)
    elif name == "decoder_pass":
        with torch.no_grad():  # as the codes step runs it
            usable = kernel.fused_decoder_pass_usable(probe, 32)
    elif name == "mlp":
        usable = kernel.fused_mlp_usable(torch.zeros(1, 32, device=device), 32,
                                         torch.zeros(1, device=device))
    else:
        usable = kernel.fused_splat_usable(probe)
    return "fused kernel" if usable else "torch code"


if __name__ == "__main__":
    main()
