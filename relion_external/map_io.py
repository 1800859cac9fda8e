"""Read and write 3D maps (MRC) as RELION does: mode 2, voxel size in the header, origin 0."""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import mrcfile
import numpy as np
import torch

from ._atomic import atomic_output
from .errors import InputError

logger = logging.getLogger(__name__)


def read_map(path: str | PathLike) -> tuple[torch.Tensor, float]:
    """Read a cubic map: ``(volume (z, y, x) float32, voxel size in Å)`` from the header."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "map file", "does not exist",
                         "Check the path (relative paths are taken from the RELION project "
                         "directory) and select an existing .mrc map.")
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            data = np.array(mrc.data, dtype=np.float32)
            voxel = mrc.voxel_size
            voxel_xyz = (float(voxel.x), float(voxel.y), float(voxel.z))
    except ValueError as err:
        raise InputError(path, "MRC header", f"not a valid MRC file ({err})",
                         "Select a map written by RELION or another MRC2014 writer.") from err
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, "MRC header nx/ny/nz",
                         f"the map must be a cubic 3D volume, got shape (z, y, x) = {data.shape}",
                         "Resize or pad it to a cube, e.g. with relion_image_handler --new_box.")
    voxel_size = voxel_xyz[0]
    if not np.isfinite(voxel_size) or voxel_size <= 0:
        raise InputError(path, "MRC header voxel size (cella / mx)",
                         f"voxel size is {voxel_size} Å, it must be positive",
                         "Set it, e.g. relion_image_handler --i map.mrc --o fixed.mrc "
                         "--angpix <Å/pixel>.")
    if not np.allclose(voxel_xyz, voxel_size, rtol=1e-3):
        logger.warning("%s: voxel sizes differ along x, y, z %s; using x = %.4f Å",
                       path, voxel_xyz, voxel_size)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, "map data",
                         f"{int(bad.sum())} voxels are NaN or infinite",
                         "Regenerate the map; it must contain only finite values.")
    return torch.from_numpy(data), voxel_size


def write_map(path: str | PathLike, volume: torch.Tensor | np.ndarray, voxel_size: float) -> None:
    """Write a ``(z, y, x)`` volume as MRC mode 2 (float32), ``voxel_size`` in Å, origin 0.

    The file appears atomically: it is written beside ``path`` and renamed into place.
    """
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    data = np.ascontiguousarray(volume, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {data.shape}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    with atomic_output(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = float(voxel_size)
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0


__all__ = ["read_map", "write_map"]
