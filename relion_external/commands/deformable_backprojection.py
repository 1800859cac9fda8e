"""Deformed weighted backprojection: two half maps in the consensus frame, deformations undone.

OUTPUT_DIR is the output directory of optimize-deformations. Each half set is reconstructed
with its own model only: every particle of the half (its validation particles included) has the
latent code that half's training inferred for it (as in particles.star), its Gaussian
displacements from that half's decoder become a displacement field on a coarse grid
(--grid-size nodes per axis), and the particle's CTF-weighted image is backprojected along the
deformed rays into the consensus frame and divided by the summed CTF²
(dynamight_core.deformed_backprojection).

Writes OUTPUT_DIR/backprojection/map_half1.mrc and map_half2.mrc, fsc.star and fsc.png (the
half-map FSC, unmasked, and masked with --mask-file), and prints the resolution at FSC = 0.143.
--downsample N reconstructs at box / N (images Fourier-cropped, pixel size × N) for a quick look.

Example:
  dynamight deformable-backprojection DynaMight/job020/ --batch-size 32 --gpu-id 0 \\
      --mask-file MaskCreate/job011/mask.mrc
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dynamight_core.backprojection_stage import backproject_half as core_backproject_half
from dynamight_core.deformed_backprojection import downsample_map
from dynamight_core.device import choose_device
from dynamight_core.distributed import (
    Group,
    join_processes,
    leave_processes,
    local_rank_from_environment,
)
from dynamight_core.fsc import fsc

from .. import launch
from .._atomic import make_folder
from ..errors import InputError
from ..forward_run import ForwardRun, load_forward_run
from ..fsc_output import write_fsc
from ..map_io import read_map, write_map
from ..output_nodes import DYNAMIGHT_HALF_MAP, OutputNode, node_name, write_output_nodes
from ..particles_adapter import check_map_matches

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("output_directory", metavar="OUTPUT_DIR",
                   help="output directory of optimize-deformations (holds forward_deformations/)")
    p.add_argument("--batch-size", type=int, default=32, help="particles per batch")
    p.add_argument("--checkpoint-file", default=None,
                   help="forward checkpoint to use (default: forward_deformations/checkpoints/"
                        "checkpoint_final.pth, else the latest)")
    p.add_argument("--mask-file", default=None, help="mask for the masked FSC")
    p.add_argument("--grid-size", type=int, default=None,
                   help="displacement-field nodes per axis (default: automatic, the finest grid "
                        "with about 8 Gaussians per occupied node, at most one node per 2 voxels)")
    p.add_argument("--downsample", type=int, default=1,
                   help="reconstruct at box / N (the box must be a multiple of N)")
    p.add_argument("--preload-images", action="store_true", help="read all images into RAM")
    p.add_argument("--gpu-id", default=None,
                   help="GPU(s) to use (default: CPU); a list such as 0,1 runs one process "
                        "per GPU (see --n-processes)")
    launch.add_args(p)
    p.add_argument("--n-threads", type=int, default=4, help="CPU threads for torch")


def backproject_half(run: ForwardRun, half: int, *, batch_size: int, grid_size: int | None,
                     downsample: int = 1, control=None, group: Group | None = None
                     ) -> torch.Tensor:
    """Deformed backprojection of every particle of ``half`` with that half's model only
    (:func:`dynamight_core.backprojection_stage.backproject_half`); returns the map
    ``(n, n, n)`` on the CPU, ``n = box // downsample``."""
    return core_backproject_half(
        run.models[half], lambda batch: run.latents(half, batch), run.particles,
        run.members(half, include_validation=True), half=half, batch_size=batch_size,
        device=run.device, grid_size=grid_size, downsample=downsample, group=group,
        check_abort=None if control is None else control.check_abort)


def _check_downsample(factor: int, box: int) -> None:
    if factor < 1 or box % factor:
        raise InputError(None, "--downsample",
                         f"{factor} does not divide the box size {box}",
                         "Give a factor >= 1 that divides the box size, or leave it out.")


def main(args, control) -> None:
    torch.set_num_threads(max(1, int(args.n_threads)))
    out = Path(args.output_directory)
    if not out.is_dir():
        raise InputError(out, "OUTPUT_DIR", "is not a directory",
                         "Give the output directory of `dynamight optimize-deformations` "
                         "(the folder holding forward_deformations/).")
    device = choose_device(args.gpu_id, local_rank_from_environment())
    layout = join_processes(device)
    run = load_forward_run(out, checkpoint_file=args.checkpoint_file, device=device,
                           preload_images=args.preload_images)
    particles = run.particles
    _check_downsample(args.downsample, particles.box_size)
    box = particles.box_size // args.downsample
    pixel_size = particles.pixel_size * args.downsample
    mask = None
    if args.mask_file:
        mask, mask_voxel = read_map(args.mask_file)
        check_map_matches(args.mask_file, mask_voxel, mask.shape[-1], particles)
        mask = downsample_map(mask, args.downsample).clamp(0.0, 1.0)
    folder = make_folder(out / "backprojection") if layout.is_main else None
    logger.info("deformed backprojection on %s (checkpoint %s, epoch %d)%s", device,
                run.checkpoint_path, run.epoch,
                f", {layout.world_size} processes" if layout.parallel else "")
    maps = {}
    for half in layout.halves:
        maps[half] = backproject_half(run, half, batch_size=args.batch_size,
                                      grid_size=args.grid_size, downsample=args.downsample,
                                      control=control, group=layout.groups[half])
        if folder is not None:
            write_map(folder / f"map_half{half}.mrc", maps[half], pixel_size)
            logger.info("wrote %s", folder / f"map_half{half}.mrc")
    gathered = layout.gather_halves({h: {"map": m} for h, m in maps.items()})
    if gathered is None:
        leave_processes(layout)
        return
    for half, entry in gathered.items():
        if half not in maps:
            maps[half] = entry["map"]
            write_map(folder / f"map_half{half}.mrc", maps[half], pixel_size)
            logger.info("wrote %s", folder / f"map_half{half}.mrc")
    curves = {"unmasked": fsc(maps[1], maps[2])}
    if mask is not None:
        curves["masked"] = fsc(maps[1] * mask, maps[2] * mask)
    res = write_fsc(folder / "fsc", curves, box, pixel_size, "deformed half maps")
    for key, value in res.items():
        logger.info("resolution (FSC 0.143, %s): %.2f Å", key, value)
    if getattr(args, "pipeline_control", None):  # RELION-5's DynaMight job: the half maps are its output nodes
        write_output_nodes(args.pipeline_control, [
            OutputNode(node_name(out, f"backprojection/map_half{h}.mrc"), DYNAMIGHT_HALF_MAP)
            for h in (1, 2)])
    print(f"Resolution: {min(res.values()):.2f} Å "
          f"({', '.join(f'{k} {v:.2f} Å' for k, v in res.items())})", flush=True)
    leave_processes(layout)
