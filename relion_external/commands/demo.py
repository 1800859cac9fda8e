"""Run the whole pipeline on a realistic simulated dataset and compare with the ground truth.

simulate (a protein-like structure whose two lobes move by 8-15 Å, SNR 0.05, astigmatic CTFs,
random shifts; preset ``clamp``) and the same particles without motion -> rigid reconstruction
of the half sets of both (the consensus, and the motion-free upper bound) ->
optimize-deformations (the command's default training settings) ->
optimize-inverse-deformations -> deformable-backprojection, then prints how much closer to the
true map the deformed half maps are than the consensus (FSC against the truth in the moving and
static regions, the fraction of the gap to the motion-free reconstruction that is closed), the
half-map resolutions and how well each half's latent codes follow the true motion. Each stage
is the real command, so the output folder holds a complete run: ``data/`` and
``data_nomotion/`` (datasets, ground truth), ``reconstruct/`` and ``reconstruct_nomotion/``
(rigid), ``dynamight/`` (forward_deformations, inverse_deformations, backprojection,
particles.star), ``comparison.star`` (the FSC curves) and ``comparison.png`` (FSC against the
truth in the moving region, and central slices of the true, consensus and deformed maps).

The demo is smaller than a real run so that it takes minutes on two CPU cores: box 48 at 2 Å/px,
4,000 particles, 3,000 Gaussians and a budget of 20 training epochs (the command's own default
is up to 50, ended by early stopping); options change any of it.

Example:
  dynamight demo --output-directory demo_output
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..truth_comparison import (
    TruthComparison,
    compare_with_truth,
    log_comparison,
    write_comparison_png,
    write_comparison_star,
)
from . import (
    deformable_backprojection,
    optimize_deformations,
    optimize_inverse_deformations,
    reconstruct,
    simulate,
)

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--output-directory", default="demo_output")
    p.add_argument("--preset", default="clamp", choices=("clamp", "twist-hinge"))
    p.add_argument("--n-particles", type=int, default=4000)
    p.add_argument("--box-size", type=int, default=48, help="pixels")
    p.add_argument("--pixel-size", type=float, default=2.0, help="Å per pixel")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--n-gaussians", type=int, default=3000)
    p.add_argument("--n-epochs", type=int, default=20,
                   help="optimize-deformations epochs at most (0: the command's default)")
    p.add_argument("--seed", type=int, default=0)
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


def compare(out: Path) -> TruthComparison:
    """The demo's run against the truth: logged, and written to comparison.star/.png."""
    maps = {"rigid": out / "reconstruct", "deformed": out / "dynamight" / "backprojection"}
    if (out / "reconstruct_nomotion" / "map_half2.mrc").is_file():
        maps["upper"] = out / "reconstruct_nomotion"
    particles = out / "dynamight" / "particles.star"
    result = compare_with_truth(out / "data", maps, particles if particles.is_file() else None)
    write_comparison_star(result, out / "comparison.star")
    write_comparison_png(result, out / "comparison.png")
    log_comparison(result)
    logger.info("wrote %s and %s", out / "comparison.star", out / "comparison.png")
    return result


def main(args, control) -> None:
    out = Path(args.output_directory)
    data, job = out / "data", out / "dynamight"
    t0 = time.time()
    dataset = {"preset": args.preset, "n_particles": args.n_particles,
               "box_size": args.box_size, "pixel_size": args.pixel_size, "snr": args.snr,
               "seed": args.seed}
    stages = [
        ("simulate", simulate, (), dict(output_directory=data, **dataset)),
        ("simulate the same particles without motion", simulate, (), dict(
            output_directory=out / "data_nomotion", no_motion=True, **dataset)),
        ("rigid reconstruction (the consensus half maps)", reconstruct, (), {
            "refinement_star_file": data / "particles.star",
            "output_directory": out / "reconstruct", "mask_file": data / "mask.mrc",
            "gpu_id": args.gpu_id}),
        ("rigid reconstruction without motion (the upper bound)", reconstruct, (), {
            "refinement_star_file": out / "data_nomotion" / "particles.star",
            "output_directory": out / "reconstruct_nomotion", "mask_file": data / "mask.mrc",
            "gpu_id": args.gpu_id}),
        ("optimize-deformations", optimize_deformations, (), {
            "refinement_star_file": data / "particles.star",
            "initial_model": data / "consensus_map.mrc", "output_directory": job,
            "n_gaussians": args.n_gaussians, "n_epochs": args.n_epochs or None,
            "n_threads": args.n_threads,
            "gpu_id": args.gpu_id, "seed": args.seed}),
        ("optimize-inverse-deformations", optimize_inverse_deformations, (job,), {
            "n_threads": args.n_threads, "gpu_id": args.gpu_id}),
        ("deformable-backprojection", deformable_backprojection, (job,), {
            "mask_file": data / "mask.mrc", "n_threads": args.n_threads, "gpu_id": args.gpu_id}),
    ]
    for k, (name, module, positional, values) in enumerate(stages, start=1):
        logger.info("[%d/%d] %s (%.0f s so far)", k, len(stages), name, time.time() - t0)
        module.main(_sub_args(module, *positional, **values), control)
    logger.info("[compare] consensus vs DynaMight, against the ground truth")
    compare(out)
    logger.info("demo finished in %.0f s; outputs in %s", time.time() - t0, out)
