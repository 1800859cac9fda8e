"""Particle images streamed from MRC stacks (``.mrcs``), memory-mapped and opened lazily."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import mrcfile
import numpy as np
import torch

from .errors import InputError

logger = logging.getLogger(__name__)

_MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}  # MRC modes that hold real-valued images


class MrcStackImageSource:
    """An :class:`~dynamight_core.particles.ImageSource` over MRC stacks.

    ``entries[i] = (stack_path, index_in_stack)`` (0-based) is particle ``i``. Stacks are
    checked from their headers at construction, opened memory-mapped on first use and kept
    open (least recently used first to close beyond ``max_open_files``). With
    ``preload=True`` every image is read into RAM once. Pixel values are returned as stored.
    ``star_path`` and ``image_names`` (the ``rlnImageName`` values) only make errors precise.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str | PathLike, int]],
        *,
        box_size: int,
        star_path: str | PathLike | None = None,
        image_names: Sequence[str] | None = None,
        preload: bool = False,
        max_open_files: int = 64,
    ):
        self.box_size = int(box_size)
        self._max_open = max(1, int(max_open_files))
        self._handles: OrderedDict[int, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()
        stacks: dict[Path, int] = {}
        stack_ids = np.empty(len(entries), dtype=np.int64)
        positions = np.empty(len(entries), dtype=np.int64)
        for i, (stack, position) in enumerate(entries):
            stack_ids[i] = stacks.setdefault(Path(stack), len(stacks))
            positions[i] = position
        self._stacks = list(stacks)
        self._stack_ids = stack_ids
        self._positions = positions
        self._validate(star_path, image_names)
        self._images: torch.Tensor | None = None
        if preload:
            self._images = self._read_from_stacks(np.arange(len(self)))
            self.close()
            logger.info("preloaded %d images (%.1f MiB)", len(self),
                        self._images.numel() * 4 / 2**20)

    def __len__(self) -> int:
        return len(self._positions)

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``(b, h, w)`` float32 for 0-based particle ``indices`` (any order)."""
        indices = np.array(indices, dtype=np.int64).reshape(-1)  # a writable copy
        if self._images is not None:
            return self._images[torch.from_numpy(indices)]
        return self._read_from_stacks(indices)

    def close(self) -> None:
        """Close every open stack (they reopen on the next :meth:`read`)."""
        while self._handles:
            self._handles.popitem(last=False)[1].close()

    def __getstate__(self) -> dict:
        # open memory maps do not travel to other processes; each reopens its own
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: modules may be gone
            pass

    def _read_from_stacks(self, indices: np.ndarray) -> torch.Tensor:
        out = np.empty((len(indices), self.box_size, self.box_size), dtype=np.float32)
        for stack_id, rows in _group_by(self._stack_ids[indices]):
            data = self._open(stack_id).data
            if data.ndim == 2:  # a single-image file
                data = data[None]
            out[rows] = data[self._positions[indices[rows]]]
        return torch.from_numpy(out)

    def _open(self, stack_id: int) -> mrcfile.mrcmemmap.MrcMemmap:
        handle = self._handles.get(stack_id)
        if handle is None:
            handle = mrcfile.mmap(self._stacks[stack_id], mode="r", permissive=False)
            self._handles[stack_id] = handle
            if len(self._handles) > self._max_open:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(stack_id)
        return handle

    def _validate(self, star_path: str | PathLike | None,
                  image_names: Sequence[str] | None) -> None:
        """Check from the headers only that each stack exists, is square with the expected
        box and is long enough for every image asked of it."""
        for stack_id, rows in _group_by(self._stack_ids):
            self._check_stack(stack_id, rows, star_path, image_names)

    def _check_stack(self, stack_id: int, rows: np.ndarray, star_path: str | PathLike | None,
                     image_names: Sequence[str] | None) -> None:
        stack = self._stacks[stack_id]
        first = int(rows[np.argmin(self._positions[rows])])

        def fail(problem: str, fix: str, row: int = first) -> InputError:
            name = image_names[row] if image_names is not None else f"image {row + 1}"
            return InputError(star_path if star_path is not None else stack, "rlnImageName",
                              f"{name!r} (particle row {row + 1}) refers to stack {stack}, "
                              f"which {problem}", fix)

        if not stack.is_file():
            raise fail("does not exist", "Check that the stack was not moved or deleted and "
                       "that the job runs from the RELION project directory.")
        try:
            with mrcfile.open(stack, mode="r", header_only=True, permissive=False) as mrc:
                header = mrc.header
                nx, ny, nz, mode = (int(header.nx), int(header.ny), int(header.nz),
                                    int(header.mode))
                data_offset = header.nbytes + int(header.nsymbt)
        except ValueError as err:
            raise fail(f"is not a valid MRC file ({err})",
                       "Re-extract the particles with RELION.") from err
        if nx != ny or nx != self.box_size:
            raise fail(f"holds {nx} x {ny} pixel images, but rlnImageSize is {self.box_size}",
                       "Images must be square and match the rlnImageSize of their optics "
                       "group; re-extract the particles or fix data_optics.")
        if mode not in _MODE_BYTES:
            raise fail(f"has MRC mode {mode}, which is not a real-valued image type",
                       "Convert the stack to mode 2 (float32), e.g. with relion_image_handler.")
        image_bytes = nx * ny * _MODE_BYTES[mode]
        n_images = min(nz, max(0, (stack.stat().st_size - data_offset) // image_bytes))
        if n_images < nz:
            raise fail(f"is truncated: its header promises {nz} images but the file holds "
                       f"only {n_images}", "Re-extract the particles; the stack is incomplete "
                       "(an interrupted copy or extraction?).")
        if self._positions[first] < 0:
            raise fail(f"has no image number {self._positions[first] + 1}",
                       "Image numbers in rlnImageName start at 1.")
        beyond = rows[self._positions[rows] >= n_images]
        if len(beyond):
            row = int(beyond.min())
            others = f"; {len(beyond) - 1} more particles too" if len(beyond) > 1 else ""
            raise fail(f"holds only {n_images} images (image number "
                       f"{self._positions[row] + 1} requested{others})",
                       "Image numbers in rlnImageName are 1-based and must not exceed the "
                       "stack length; is the STAR file from another extraction?", row=row)


def _group_by(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(key, positions in keys holding it), ...]`` for each distinct key, in O(n log n)."""
    if len(keys) == 0:
        return []
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return [(int(sorted_keys[a]), order[a:b]) for a, b in zip(starts, ends)]


__all__ = ["MrcStackImageSource"]
