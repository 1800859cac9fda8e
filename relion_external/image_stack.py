"""Particle images streamed from MRC stacks (``.mrcs``): read with ``pread`` from stacks
whose headers were checked once, many stacks open at a time."""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np
import torch

from .errors import InputError

logger = logging.getLogger(__name__)

_MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}  # MRC modes that hold real-valued images
# leave this fraction of the available memory free when preloading
_PRELOAD_MARGIN = 0.2


def available_memory_bytes() -> int | None:
    """Memory the kernel could give this process without swapping: ``MemAvailable`` of
    ``/proc/meminfo``, else free physical pages (``os.sysconf``); ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _default_max_open() -> int:
    """A quarter of the soft limit on open files (at most 1,024, at least 16)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 4096
    return int(min(1024, max(16, soft // 4)))


class MrcStackImageSource:
    """An :class:`~dynamight_core.particles.ImageSource` over MRC stacks.

    ``entries[i] = (stack_path, index_in_stack)`` (0-based) is particle ``i``. Every stack's
    header is checked once at construction (exists, square, box, mode, long enough), and its
    data offset and pixel type are kept; images are then read with ``pread`` (no per-stack
    parsing): for each :meth:`read` the particles are grouped by stack, and images that are
    neighbours in a stack come in one read. Up to ``max_open_files`` stacks stay open (least
    recently used first to close; default a quarter of the process's open-file limit, at most
    1,024), per reading thread, so :meth:`read` may be called from several threads at once.
    ``read_threads > 1`` spreads the stacks of one :meth:`read` over that many threads (I/O in
    parallel: worth it when the stacks are not in the page cache).

    With ``preload=True`` every image is read into RAM once (float32, ``n·box²·4`` bytes),
    after checking that this leaves 20% of the available memory (``MemAvailable``) free;
    otherwise :class:`InputError` naming ``--preload-images``, before anything is read.
    Pixel values are returned as stored (float32). ``star_path`` and ``image_names`` (the
    ``rlnImageName`` values) only make errors precise.
    """

    def __init__(
        self,
        entries: Sequence[tuple[str | PathLike, int]],
        *,
        box_size: int,
        star_path: str | PathLike | None = None,
        image_names: Sequence[str] | None = None,
        preload: bool = False,
        max_open_files: int | None = None,
        read_threads: int = 1,
    ):
        stacks: dict[Path, int] = {}
        stack_ids = np.empty(len(entries), dtype=np.int64)
        positions = np.empty(len(entries), dtype=np.int64)
        for i, (stack, position) in enumerate(entries):
            stack_ids[i] = stacks.setdefault(Path(stack), len(stacks))
            positions[i] = position
        self._setup(list(stacks), stack_ids, positions, box_size=box_size, star_path=star_path,
                    image_names=image_names, preload=preload, max_open_files=max_open_files,
                    read_threads=read_threads)

    @classmethod
    def from_stack_table(cls, stacks: Sequence[str | PathLike], stack_ids: np.ndarray,
                         positions: np.ndarray, **kwargs) -> MrcStackImageSource:
        """The same source from arrays (no Python object per particle: 10^6 particles in
        milliseconds): particle ``i`` is image ``positions[i]`` (0-based) of
        ``stacks[stack_ids[i]]``; keyword arguments as for the constructor."""
        source = cls.__new__(cls)
        source._setup([Path(s) for s in stacks], np.asarray(stack_ids, dtype=np.int64),
                      np.asarray(positions, dtype=np.int64), **kwargs)
        return source

    def _setup(self, stacks: list[Path], stack_ids: np.ndarray, positions: np.ndarray, *,
               box_size: int, star_path: str | PathLike | None = None,
               image_names: Sequence[str] | None = None, preload: bool = False,
               max_open_files: int | None = None, read_threads: int = 1) -> None:
        self.box_size = int(box_size)
        self._max_open = max(1, int(max_open_files) if max_open_files else _default_max_open())
        self._read_threads = max(1, int(read_threads))
        self._stacks = stacks
        self._stack_ids = stack_ids
        self._positions = positions
        self._offsets = np.zeros(len(self._stacks), dtype=np.int64)  # bytes before image 0
        self._dtypes: list[np.dtype] = [np.dtype(np.float32)] * len(self._stacks)
        self._validate(star_path, image_names)
        self._init_handles()
        self._images: torch.Tensor | None = None
        if preload:
            self._check_preload_memory(star_path)
            self._images = self._read_from_stacks(np.arange(len(self)))
            self.close()
            logger.info("preloaded %d images (%.1f MiB)", len(self),
                        self._images.numel() * 4 / 2**20)

    def __len__(self) -> int:
        return len(self._positions)

    @property
    def n_stacks(self) -> int:
        return len(self._stacks)

    def group_ids(self) -> np.ndarray:
        """``(n,)`` the stack each particle is stored in (0-based stack numbers)."""
        return self._stack_ids.copy()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``(b, h, w)`` float32 for 0-based particle ``indices`` (any order)."""
        indices = np.array(indices, dtype=np.int64).reshape(-1)  # a writable copy
        if self._images is not None:
            return self._images[torch.from_numpy(indices)]
        return self._read_from_stacks(indices)

    def close(self) -> None:
        """Close every open stack (they reopen on the next :meth:`read`). Not while another
        thread is reading."""
        with self._lock:
            caches, self._caches = self._caches, []
            self._local = threading.local()
        for cache in caches:
            while cache:
                os.close(cache.popitem(last=False)[1])
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict:
        # open files, locks and threads do not travel to other processes; each opens its own
        state = self.__dict__.copy()
        for key in ("_lock", "_local", "_caches", "_pool"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_handles()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: modules may be gone
            pass

    def _init_handles(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # .cache: this thread's OrderedDict stack -> fd
        self._caches: list[OrderedDict[int, int]] = []
        self._pool: ThreadPoolExecutor | None = None

    def _check_preload_memory(self, star_path: str | PathLike | None) -> None:
        need = len(self) * self.box_size**2 * 4
        available = available_memory_bytes()
        if available is None or need <= (1.0 - _PRELOAD_MARGIN) * available:
            return
        raise InputError(star_path, "--preload-images",
                         f"would hold {len(self)} images of {self.box_size} x {self.box_size} "
                         f"pixels in RAM ({need / 2**30:.2f} GiB as float32), but only "
                         f"{available / 2**30:.2f} GiB is available (MemAvailable; 20% is kept "
                         "free)", "Leave out --preload-images: images are then read from the "
                         "stacks as they are needed, in memory that does not grow with the "
                         "number of particles.")

    def _read_from_stacks(self, indices: np.ndarray) -> torch.Tensor:
        out = np.empty((len(indices), self.box_size, self.box_size), dtype=np.float32)
        groups = _group_by(self._stack_ids[indices])
        if self._read_threads > 1 and len(groups) > 1:
            if self._pool is None:
                with self._lock:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(self._read_threads,
                                                        thread_name_prefix="mrcs-reader")
            parts = [groups[k::self._read_threads] for k in range(self._read_threads)]
            for future in [self._pool.submit(self._read_groups, part, indices, out)
                           for part in parts if part]:
                future.result()
        else:
            self._read_groups(groups, indices, out)
        return torch.from_numpy(out)

    def _read_groups(self, groups: list[tuple[int, np.ndarray]], indices: np.ndarray,
                     out: np.ndarray) -> None:
        """Fill ``out[rows]`` with the images of each ``(stack, rows)`` group: the distinct
        images of the stack, in file order, each run of neighbours with one ``pread``."""
        for stack_id, rows in groups:
            wanted, inverse = np.unique(self._positions[indices[rows]], return_inverse=True)
            dtype = self._dtypes[stack_id]
            buffer = np.empty((len(wanted), self.box_size, self.box_size), dtype=dtype)
            image_bytes = buffer[0].nbytes
            fd = self._fd(stack_id)
            starts = np.flatnonzero(np.r_[True, np.diff(wanted) != 1])
            for a, b in zip(starts, np.r_[starts[1:], len(wanted)]):
                _pread_into(fd, buffer[a:b],
                            int(self._offsets[stack_id]) + int(wanted[a]) * image_bytes,
                            self._stacks[stack_id])
            out[rows] = buffer[inverse.reshape(-1)]

    def _fd(self, stack_id: int) -> int:
        """This thread's open file of ``stack_id`` (opened, and the least recently used one
        closed beyond ``max_open_files``, as needed)."""
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
            with self._lock:
                self._caches.append(cache)
        fd = cache.get(stack_id)
        if fd is None:
            fd = os.open(self._stacks[stack_id], os.O_RDONLY)
            cache[stack_id] = fd
            if len(cache) > self._max_open:
                os.close(cache.popitem(last=False)[1])
        else:
            cache.move_to_end(stack_id)
        return fd

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
            if image_names is None:
                name = f"image {row + 1}"
            else:  # a list, or a pandas Series (by position)
                name = image_names.iloc[row] if hasattr(image_names, "iloc") else image_names[row]
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
                dtype = (mrcfile.utils.data_dtype_from_header(header)
                         if mode in _MODE_BYTES else None)
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
        self._offsets[stack_id] = data_offset
        self._dtypes[stack_id] = dtype


def _pread_into(fd: int, block: np.ndarray, offset: int, path: Path) -> None:
    """Fill ``block`` with the bytes of ``fd`` from ``offset`` (checked: a stack that shrank
    after its header was checked is reported, not read as zeros)."""
    view = memoryview(block.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InputError(path, "image data", f"ended at byte {offset + done} while reading "
                             "images its header promises (the file shrank while in use?)",
                             "Check that the stack is not being rewritten, and run again.")
        done += got


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
