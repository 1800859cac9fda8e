"""Run the whole pipeline on the embedded default dataset and compare with the ground truth.

simulate (a hinged structure with one continuous motion) -> rigid reconstruction of the half
sets -> optimize-deformations -> optimize-inverse-deformations -> deformable-backprojection,
then prints the half-map resolution (masked FSC 0.143) of the rigid and the deformed maps and
their FSC against the ground-truth map in the moving region (where the simulated states
differ). Each stage is the real command with the settings below, so the output folder holds a
complete run: ``data/`` (dataset, ground truth), ``reconstruct/`` (rigid), ``dynamight/``
(forward_deformations, inverse_deformations, backprojection, particles.star) and
``comparison.star``.

Example:
  dynamight demo --output-directory demo_output
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from dynamight_core.fsc import fsc
from dynamight_core.simulation import soft_mask

from ..map_io import read_map
from . import (
    deformable_backprojection, optimize_deformations, optimize_inverse_deformations,
    reconstruct, simulate)

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--output-directory", default="demo_output")
    p.add_argument("--n-particles", type=int, default=2000)
    p.add_argument("--box-size", type=int, default=64, help="pixels")
    p.add_argument("--pixel-size", type=float, default=3.0, help="Å per pixel")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--n-gaussians", type=int, default=3000)
    p.add_argument("--n-epochs", type=int, default=20, help="optimize-deformations epochs")
    p.add_argument("--n-threads", type=int, default=2)
    p.add_argument("--gpu-id", default=None)


def _sub_args(module, *positional, **values) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    argv = [str(p) for p in positional]
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def moving_region_mask(truth_dir: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Soft mask where the ground-truth states differ, the reference (motion 0) map, voxel."""
    states = sorted(truth_dir.glob("state_*.mrc"))
    maps = {float(p.stem.split("_")[1]): read_map(p) for p in states}
    reference, voxel = maps[min(maps, key=abs)]
    change = torch.stack([m - reference for m, _ in maps.values()]).abs().amax(dim=0)
    return soft_mask(change, 0.2 * float(change.max())), reference, voxel


def _half_map_average(folder: Path) -> torch.Tensor:
    return 0.5 * (read_map(folder / "map_half1.mrc")[0] + read_map(folder / "map_half2.mrc")[0])


def _half_map_fsc(folder: Path, mask: torch.Tensor) -> torch.Tensor:
    return fsc(read_map(folder / "map_half1.mrc")[0] * mask,
               read_map(folder / "map_half2.mrc")[0] * mask)


def _resolution(curve: torch.Tensor, box: int, voxel: float) -> float:
    below = torch.nonzero(curve[1:] < 0.143)
    shell = int(below[0]) if below.numel() else curve.shape[0] - 1  # last shell above
    return box * voxel / max(shell, 1)


def compare(out: Path) -> pd.DataFrame:
    """FSC of rigid and deformed maps against the truth (moving region) and half-map FSC."""
    moving, reference, voxel = moving_region_mask(out / "data" / "ground_truth")
    mask = read_map(out / "data" / "mask.mrc")[0]
    box = reference.shape[-1]
    rows = {}
    for label, folder in (("rigid", out / "reconstruct"),
                          ("deformed", out / "dynamight" / "backprojection")):
        rows[f"{label}_vs_truth_moving"] = fsc(_half_map_average(folder) * moving,
                                               reference * moving)
        rows[f"{label}_half_maps_masked"] = _half_map_fsc(folder, mask)
    shells = np.arange(box // 2 + 1)
    table = pd.DataFrame({"rlnSpectralIndex": shells,
                          "rlnAngstromResolution": box * voxel / np.maximum(shells, 1)})
    for key, curve in rows.items():
        table[f"dm_{key}"] = curve.numpy()
    starfile.write({"comparison": table}, out / "comparison.star", overwrite=True)
    logger.info("shell  Å      rigid vs truth (moving)  deformed vs truth (moving)")
    for s in range(2, box // 2 + 1, 2):
        logger.info("%5d %6.1f %14.3f %24.3f", s, box * voxel / s,
                    float(rows["rigid_vs_truth_moving"][s]),
                    float(rows["deformed_vs_truth_moving"][s]))
    for label in ("rigid", "deformed"):
        logger.info("%-8s half maps: %.2f Å (masked FSC 0.143); FSC vs truth in the moving "
                    "region, mean over shells 1..Nyquist: %.3f", label,
                    _resolution(rows[f"{label}_half_maps_masked"], box, voxel),
                    float(rows[f"{label}_vs_truth_moving"][1:].mean()))
    return table


def main(args, control) -> None:
    out = Path(args.output_directory)
    data, job = out / "data", out / "dynamight"
    t0 = time.time()
    stages = [
        ("simulate", simulate, (), dict(output_directory=data, n_particles=args.n_particles,
                                       box_size=args.box_size, pixel_size=args.pixel_size,
                                       snr=args.snr)),
        ("rigid reconstruction", reconstruct, (), dict(
            refinement_star_file=data / "particles.star", output_directory=out / "reconstruct",
            mask_file=data / "mask.mrc", gpu_id=args.gpu_id)),
        ("optimize-deformations", optimize_deformations, (), dict(
            refinement_star_file=data / "particles.star",
            initial_model=data / "consensus_map.mrc", mask_file=None, output_directory=job,
            n_gaussians=args.n_gaussians, n_epochs=args.n_epochs, n_warmup_epochs=2,
            early_stopping_patience=0, checkpoint_interval=5, n_threads=args.n_threads,
            gpu_id=args.gpu_id)),
        ("optimize-inverse-deformations", optimize_inverse_deformations, (job,), dict(
            n_threads=args.n_threads, gpu_id=args.gpu_id)),
        ("deformable-backprojection", deformable_backprojection, (job,), dict(
            mask_file=data / "mask.mrc", n_threads=args.n_threads, gpu_id=args.gpu_id)),
    ]
    for k, (name, module, positional, values) in enumerate(stages, start=1):
        logger.info("[%d/%d] %s (%.0f s so far)", k, len(stages), name, time.time() - t0)
        module.main(_sub_args(module, *positional, **values), control)
    logger.info("[compare] rigid vs deformed, against the ground truth")
    compare(out)
    logger.info("demo finished in %.0f s; outputs in %s", time.time() - t0, out)
