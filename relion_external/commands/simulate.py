"""Simulate a RELION dataset of a hinged test structure with a known continuous motion.

Writes, into the output directory: particles.star (RELION 3.1 optics + particles, half sets in
rlnRandomSubset), particles.mrcs, consensus_map.mrc (the average over the motion, what a
consensus refinement sees), mask.mrc, ground_truth/state_<t>.mrc (maps at several motion values)
and ground_truth/motion.star (the motion coordinate of every particle, the ground truth a latent
space should recover).

Example:
  dynamight simulate --output-directory Simulated/ --n-particles 2000 --box-size 64 --snr 0.1
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamight_core.rotation import matrix_to_euler
from dynamight_core.simulation import (
    consensus_map, noise_sigma_for_snr, plan_simulation, render_state, simulate_images, soft_mask)
from dynamight_core.synthetic_structure import hinged_structure

from ..map_io import write_map
from ..stack_writer import StackWriter
from ..star_io import write_particles_star

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--output-directory", required=True, help="folder to write the dataset into")
    p.add_argument("--n-particles", type=int, default=2000)
    p.add_argument("--box-size", type=int, default=64, help="pixels")
    p.add_argument("--pixel-size", type=float, default=3.0, help="Å per pixel")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal variance / noise variance over the box (0 = no noise)")
    p.add_argument("--n-gaussians", type=int, default=1200,
                   help="Gaussians in the test structure")
    p.add_argument("--motion-states", type=int, default=5,
                   help="ground-truth maps written at this many motion values in [-1, 1]")
    p.add_argument("--no-motion", action="store_true",
                   help="every particle in the t = 0 state (a rigid control dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)


def image_path_for_star(stack: Path) -> str:
    """RELION resolves image names from the project directory (the working directory)."""
    stack = stack.resolve()
    try:
        return os.path.relpath(stack, Path.cwd()) if stack.is_relative_to(Path.cwd()) else str(stack)
    except ValueError:
        return str(stack)


def main(args, control) -> None:
    out = Path(args.output_directory)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    box, px = args.box_size, args.pixel_size
    structure = hinged_structure(n_gaussians=args.n_gaussians, seed=args.seed)
    motion = torch.zeros(args.n_particles) if args.no_motion else None
    plan = plan_simulation(args.n_particles, seed=args.seed, motion_values=motion)
    sigma = noise_sigma_for_snr(structure, plan, box, px, args.snr) if args.snr > 0 else 0.0
    plan = replace(plan, noise_sigma=sigma)
    logger.info("simulating %d particles, box %d, %.3f Å/px, SNR %g (noise σ %.4g)",
                args.n_particles, box, px, args.snr, sigma)

    stack = out / "particles.mrcs"
    t0 = time.time()
    with StackWriter(stack, args.n_particles, box, px) as writer:
        for idx, images in simulate_images(structure, plan, box, px,
                                           batch_size=args.batch_size, seed=args.seed):
            control.check_abort()
            writer.write(idx.start, images)
            logger.info("  images %d/%d (%.0f particles/s)", idx.stop, args.n_particles,
                        idx.stop / (time.time() - t0))

    rot, tilt, psi = (a.numpy() for a in matrix_to_euler(plan.rotations))
    name = image_path_for_star(stack)
    n = args.n_particles
    image_names = [f"{i + 1:06d}@{name}" for i in range(n)]
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [px], "rlnImageSize": [box], "rlnImageDimensionality": [2],
        "rlnCtfDataAreCtfPremultiplied": [0],
    })
    particles = pd.DataFrame({
        "rlnImageName": image_names,
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": plan.shifts_angstrom[:, 0].numpy().astype(np.float64),
        "rlnOriginYAngst": plan.shifts_angstrom[:, 1].numpy().astype(np.float64),
        "rlnDefocusU": plan.ctf.defocus_u_angstrom.numpy().astype(np.float64),
        "rlnDefocusV": plan.ctf.defocus_v_angstrom.numpy().astype(np.float64),
        "rlnDefocusAngle": plan.ctf.defocus_angle_degrees.numpy().astype(np.float64),
        "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n),
        "rlnCtfScalefactor": np.ones(n), "rlnOpticsGroup": np.ones(n, dtype=int),
        "rlnRandomSubset": plan.half_set.numpy(),
    })
    write_particles_star(out / "particles.star", (optics, particles))
    truth = pd.DataFrame({"rlnImageName": image_names, "dmMotion": plan.motion.numpy(),
                          "rlnRandomSubset": plan.half_set.numpy()})
    write_particles_star(out / "ground_truth" / "motion.star", (optics, truth))

    logger.info("rendering the consensus map, mask and %d ground-truth states",
                args.motion_states)
    if args.no_motion:
        consensus = render_state(structure, 0.0, box, px)
    else:
        consensus = consensus_map(structure, box, px)
    write_map(out / "consensus_map.mrc", consensus, px)
    write_map(out / "mask.mrc", soft_mask(consensus, 0.05 * float(consensus.max())), px)
    for t in np.linspace(-1, 1, args.motion_states):
        write_map(out / "ground_truth" / f"state_{t:+.2f}.mrc",
                  render_state(structure, float(t), box, px), px)
    logger.info("wrote %s (particles.star, particles.mrcs, consensus_map.mrc, mask.mrc, "
                "ground_truth/)", out)
