"""Rigid CTF-weighted reconstruction of the two half sets (RELION's half maps without deformation).

Writes map_half1.mrc, map_half2.mrc, fsc.star and fsc.png into the output directory and prints
the resolution at FSC = 0.143 (unmasked, and masked when --mask-file is given). The half sets are
those of the refinement (rlnRandomSubset).

Example:
  dynamight reconstruct --refinement-star-file Refine3D/job010/run_data.star \\
      --output-directory Rigid/ --mask-file MaskCreate/job011/mask.mrc
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dynamight_core.device import choose_device
from dynamight_core.fsc import fsc
from dynamight_core.particles import ParticleSet
from dynamight_core.reconstruction import FourierAccumulator

from ..fsc_output import write_fsc
from ..map_io import read_map, write_map
from ..particles_adapter import check_map_matches, load_particle_set

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--refinement-star-file", required=True,
                   help="particles STAR of a consensus refinement (RELION 3.1+)")
    p.add_argument("--output-directory", required=True)
    p.add_argument("--mask-file", default=None, help="mask for the masked FSC")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--gpu-id", default=None, help="GPU to use (default: CPU)")
    p.add_argument("--preload-images", action="store_true", help="read all images into RAM")
    p.add_argument("--random-half-sets", action="store_true",
                   help="split randomly when the STAR file has no rlnRandomSubset")
    p.add_argument("--project-directory", default=None,
                   help="RELION project folder image names are relative to (default: cwd)")


def reconstruct_half(particles: ParticleSet, half: int, batch_size: int, device: torch.device,
                     control=None) -> torch.Tensor:
    """Rigid reconstruction of one half set, streaming images in batches."""
    idx = particles.indices_of_half(half)
    acc = FourierAccumulator(particles.box_size, particles.pixel_size, device=device)
    t0 = time.time()
    for n_done, start in enumerate(range(0, len(idx), batch_size), start=1):
        if control is not None:
            control.check_abort()
        batch = idx[start:start + batch_size]
        acc.add(particles.images.read(batch), particles.rotations[batch],
                particles.shifts_angstrom[batch], particles.ctf.subset(batch))
        if n_done % 20 == 0 or start + batch_size >= len(idx):
            done = min(start + batch_size, len(idx))
            logger.info("  half %d: %d/%d particles (%.0f particles/s)", half, done, len(idx),
                        done / max(time.time() - t0, 1e-9))
    return acc.reconstruct().cpu()


def main(args, control) -> None:
    out = Path(args.output_directory)
    device = choose_device(args.gpu_id)
    particles, _ = load_particle_set(args.refinement_star_file,
                                     project_dir=args.project_directory,
                                     random_split=args.random_half_sets,
                                     preload=args.preload_images)
    mask = None
    if args.mask_file:
        mask, mask_voxel = read_map(args.mask_file)
        check_map_matches(args.mask_file, mask_voxel, mask.shape[-1], particles)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("rigid reconstruction on %s", device)
    maps = {half: reconstruct_half(particles, half, args.batch_size, device, control)
            for half in (1, 2)}
    for half, volume in maps.items():
        write_map(out / f"map_half{half}.mrc", volume, particles.pixel_size)
    curves = {"unmasked": fsc(maps[1], maps[2])}
    if mask is not None:
        curves["masked"] = fsc(maps[1] * mask, maps[2] * mask)
    res = write_fsc(out / "fsc", curves, particles.box_size, particles.pixel_size,
                    "rigid half maps")
    for key, value in res.items():
        logger.info("resolution (FSC 0.143, %s): %.2f Å", key, value)
    print(f"Resolution: {min(res.values()):.2f} Å "
          f"({', '.join(f'{k} {v:.2f} Å' for k, v in res.items())})", flush=True)
