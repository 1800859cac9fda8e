"""Simulate a RELION dataset of a test structure with a known continuous motion.

Structures: the small hinged blob structure of the unit tests (default), or with --preset a
protein-like structure at atomic density (about 320 residues, helical-bundle domains):
``clamp`` (two lobes closing and opening about hinges, 8-15 Å) or ``twist-hinge`` (a bundle
twisting about its axis plus a lobe hinging non-linearly). A preset also switches to realistic
data: 6,000 particles, box 64, 1.5 Å/px, SNR 0.05 (each can still be set), astigmatic defocus
0.8-2.5 µm, shifts up to 6 Å; its consensus map is a rigid reconstruction of the particles
(FSC-weighted average of the two half sets), as a consensus refinement would give.

Writes, into the output directory: particles.star (RELION 3.1 optics + particles, half sets in
rlnRandomSubset), particles.mrcs, consensus_map.mrc, mask.mrc, ground_truth/state_<t>.mrc (maps
at several motion values; t = 0 is the reference state), ground_truth/moving_region.mrc and
static_region.mrc (soft masks of the moving domains and of the rest, in the reference state) and
ground_truth/motion.star (the motion coordinate of every particle, the ground truth a latent
space should recover). --no-motion images the same particles (same poses, CTFs, half sets and
noise for the same --seed) all in the reference state: the motion-free upper bound of a
benchmark.

--tracks N --frames T simulates a time series instead (liquid-phase EM movies, for
``optimize-deformations --temporal-prior``): N molecules imaged T frames each, the motion
coordinate drifting and diffusing smoothly in time, the pose turning smoothly, one defocus per
track, whole tracks in one half set; particles.star then carries rlnDynaMightTrack,
rlnDynaMightTime (the frame) and rlnMicrographName (one movie per track), and
ground_truth/motion.star the same track and time next to dmMotion.

Examples:
  dynamight simulate --output-directory Simulated/ --n-particles 2000 --box-size 64 --snr 0.1
  dynamight simulate --output-directory Clamp/ --preset clamp          # 6,000 particles, SNR 0.05
  dynamight simulate --output-directory Series/ --preset clamp --tracks 80 --frames 50 --snr 0.02
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

from dynamight_core.fsc import fsc_weighted_average
from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.quality_scores import region_masks
from dynamight_core.reconstruction import FourierAccumulator
from dynamight_core.rotation import matrix_to_euler
from dynamight_core.simulation import (
    consensus_map,
    noise_sigma_for_snr,
    plan_simulation,
    plan_tracks,
    render_state,
    simulate_images,
    soft_mask,
)
from dynamight_core.synthetic_structure import hinged_structure

from ..errors import InputError
from ..map_io import write_map
from ..stack_writer import StackWriter
from ..star_io import write_particles_star

logger = logging.getLogger(__name__)


# (without a preset, with a preset)
_DEFAULTS = {"n_particles": (2000, 6000), "box_size": (64, 64), "pixel_size": (3.0, 1.5),
             "snr": (0.1, 0.05), "consensus": ("average", "reconstruction")}


def add_args(p) -> None:
    p.add_argument("--output-directory", required=True, help="folder to write the dataset into")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="protein-like structure at atomic density, with realistic data defaults "
                        "(see above; default: the hinged blob test structure)")
    p.add_argument("--n-particles", type=int, default=None, help="default 2000 (preset: 6000)")
    p.add_argument("--box-size", type=int, default=None, help="pixels (default 64)")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="Å per pixel (default 3.0; preset: 1.5)")
    p.add_argument("--snr", type=float, default=None,
                   help="signal variance / noise variance over the box, 0 = no noise (default "
                        "0.1; preset: 0.05)")
    p.add_argument("--consensus", choices=("average", "reconstruction"), default=None,
                   help="consensus_map.mrc: the true maps averaged over the motion, or a rigid "
                        "reconstruction of the particles (default: average; preset: "
                        "reconstruction)")
    p.add_argument("--n-gaussians", type=int, default=1200,
                   help="Gaussians in the hinged test structure (not used with --preset)")
    p.add_argument("--motion-states", type=int, default=5,
                   help="ground-truth maps written at this many motion values in [-1, 1]")
    p.add_argument("--no-motion", action="store_true",
                   help="every particle in the t = 0 state (a rigid control dataset)")
    p.add_argument("--tracks", type=int, default=0,
                   help="simulate a time series of this many tracks (molecules filmed frame "
                        "after frame; replaces --n-particles by tracks × frames)")
    p.add_argument("--frames", type=int, default=50, help="frames per track (with --tracks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)


def image_path_for_star(stack: Path) -> str:
    """RELION resolves image names from the project directory (the working directory)."""
    stack = stack.resolve()
    try:
        return os.path.relpath(stack, Path.cwd()) if stack.is_relative_to(Path.cwd()) else str(stack)
    except ValueError:
        return str(stack)


def _resolve_defaults(args) -> None:
    for key, (plain, preset) in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset if args.preset else plain)


def main(args, control) -> None:
    _resolve_defaults(args)
    out = Path(args.output_directory)
    (out / "ground_truth").mkdir(parents=True, exist_ok=True)
    box, px = args.box_size, args.pixel_size
    if args.preset:
        structure = protein_like_structure(args.preset, seed=args.seed)
    else:
        structure = hinged_structure(n_gaussians=args.n_gaussians, seed=args.seed)
    tracks = None
    if args.tracks > 0:
        if args.frames < 1:
            raise InputError(None, "--frames", f"must be at least 1, got {args.frames}",
                             "Give the number of frames per track.")
        tracks = plan_tracks(args.tracks, args.frames, seed=args.seed)
        plan = tracks.plan
        args.n_particles = args.tracks * args.frames
    else:
        plan = plan_simulation(args.n_particles, seed=args.seed)
    # the noise level of the moving particles, so that a --no-motion control has the same noise
    sigma = noise_sigma_for_snr(structure, plan, box, px, args.snr) if args.snr > 0 else 0.0
    plan = replace(plan, noise_sigma=sigma)
    if args.no_motion:
        plan = replace(plan, motion=torch.zeros_like(plan.motion))
    logger.info("simulating %s: %d particles, box %d, %.3f Å/px, SNR %g (noise σ %.4g)%s",
                structure.name, args.n_particles, box, px, args.snr, sigma,
                ", all in the reference state" if args.no_motion else "")

    stack = out / "particles.mrcs"
    t0 = time.time()
    halves = {h: FourierAccumulator(box, px) for h in (1, 2)}
    with StackWriter(stack, args.n_particles, box, px) as writer:
        for idx, images in simulate_images(structure, plan, box, px,
                                           batch_size=args.batch_size, seed=args.seed):
            control.check_abort()
            writer.write(idx.start, images)
            if args.consensus == "reconstruction":
                for h, acc in halves.items():
                    sel = torch.nonzero(plan.half_set[idx] == h).squeeze(-1)
                    if sel.numel() == 0:  # a batch of one half's tracks only
                        continue
                    rows = np.arange(idx.start, idx.stop)[sel.numpy()]
                    acc.add(images[sel], plan.rotations[rows].float(),
                            plan.shifts_angstrom[rows].float(), plan.ctf.subset(rows))
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
    truth = pd.DataFrame({"rlnImageName": image_names, "dmMotion": plan.motion.numpy(),
                          "rlnRandomSubset": plan.half_set.numpy()})
    if tracks is not None:
        for table in (particles, truth):
            table["rlnMicrographName"] = [f"movies/track{k:05d}.mrcs"
                                          for k in tracks.track.tolist()]
            table["rlnDynaMightTrack"] = tracks.track.numpy()
            table["rlnDynaMightTime"] = tracks.time.numpy().astype(np.float64)
    write_particles_star(out / "particles.star", (optics, particles))
    write_particles_star(out / "ground_truth" / "motion.star", (optics, truth))

    logger.info("rendering the consensus map, mask and %d ground-truth states",
                args.motion_states)
    average = (render_state(structure, 0.0, box, px) if args.no_motion
               else consensus_map(structure, box, px))
    if args.consensus == "reconstruction":
        consensus = fsc_weighted_average(halves[1].reconstruct(), halves[2].reconstruct())
    else:
        consensus = average
    write_map(out / "consensus_map.mrc", consensus, px)
    write_map(out / "mask.mrc", soft_mask(average, 0.05 * float(average.max())), px)
    for t in np.linspace(-1, 1, args.motion_states):
        write_map(out / "ground_truth" / f"state_{t:+.2f}.mrc",
                  render_state(structure, float(t), box, px), px)
    moving, static = region_masks(structure, box, px)
    write_map(out / "ground_truth" / "moving_region.mrc", moving, px)
    write_map(out / "ground_truth" / "static_region.mrc", static, px)
    logger.info("wrote %s (particles.star, particles.mrcs, consensus_map.mrc, mask.mrc, "
                "ground_truth/)", out)
