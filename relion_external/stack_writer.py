"""Writing particle stacks (``.mrcs``) batch by batch, memory-mapped, appearing atomically."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import mrcfile
import numpy as np
import torch

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


class StackWriter:
    """Context manager: ``with StackWriter(path, n, box, pixel) as w: w.write(start, images)``.

    The stack is filled through a memory map of a hidden temporary file and renamed into place
    only when the ``with`` block ends without error.
    """

    def __init__(self, path: str | Path, n_images: int, box_size: int, pixel_size: float):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        self.shape = (n_images, box_size, box_size)
        self.pixel_size = pixel_size
        self._mrc = None

    def __enter__(self) -> Self:
        self._mrc = mrcfile.new_mmap(self.tmp, shape=self.shape, mrc_mode=2, overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.pixel_size
        return self

    def write(self, start: int, images: torch.Tensor | np.ndarray) -> None:
        data = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        self._mrc.data[start:start + data.shape[0]] = data.astype(np.float32)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._mrc.update_header_stats()
            self._mrc.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
