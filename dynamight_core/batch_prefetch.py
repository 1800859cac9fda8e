"""Batches read ahead of use: a background thread reads the next batches' images and metadata
(into pinned memory when the device is a GPU) while the caller computes on the current one.

``prefetch_batches(particles, index_chunks, device)`` yields exactly the batches
``make_batch(particles, chunk, device)`` would, in the same order: only *when* they are read
changes. The images come from ``particles.images.read`` (any :class:`~.particles.ImageSource`),
so the reader does not know where they are stored; reading releases the GIL in file reads and
numpy copies, so on CPU the thread overlaps with torch's own threads too.

``chunked_order`` is an epoch order for datasets stored in many files (one RELION stack per
micrograph): random over the dataset, but each batch drawn from a few groups (stacks), so a
batch opens few files and reads neighbouring images together. Training uses a plain random
permutation by default (see README, *Large datasets*, for when this matters).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .deformation_model import Batch, batch_to, host_batch
from .particles import ParticleSet

_DONE = object()


def prefetch_batches(
    particles: ParticleSet,
    index_chunks: Iterable[np.ndarray],
    device: torch.device | str,
    *,
    depth: int = 4,
    pin_memory: bool | None = None,
    before_each: Callable[[], None] | None = None,
) -> Iterator[Batch]:
    """Yield ``make_batch(particles, chunk, device)`` for each chunk of ``index_chunks``, read
    up to ``depth`` batches ahead by one background thread.

    ``pin_memory`` (default: when ``device`` is CUDA) puts host batches in page-locked memory
    and copies them to the device asynchronously. ``before_each()`` is called before each batch
    is handed out (e.g. an abort check); whatever it raises propagates. An exception of the
    reader (a missing or damaged stack) is raised here, at the batch it concerns. Closing the
    generator early (``break``, an exception in the caller) stops and joins the thread. Memory:
    at most ``depth + 2`` batches in host memory at any time, whatever the dataset's size.
    """
    device = torch.device(device)
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    ready: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in index_chunks:
                if stop.is_set() or not put(host_batch(particles, chunk, pin_memory=pin_memory)):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failure(err))

    reader = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            if before_each is not None:
                before_each()
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield batch_to(item, device, non_blocking=pin_memory)
    finally:
        stop.set()
        while reader.is_alive():
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        reader.join()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def chunked_order(
    indices: np.ndarray,  # (m,) particle indices to visit
    groups: np.ndarray,  # (n,) group (e.g. stack) of every particle of the dataset
    generator: torch.Generator,
    *,
    groups_per_block: int = 8,
) -> np.ndarray:  # (m,) a permutation of indices
    """An epoch order that is random but reads few groups at a time: the groups are shuffled,
    taken ``groups_per_block`` at a time, and the particles of each block shuffled together.
    Consecutive batches then come from ``groups_per_block`` (or a few more) groups each; every
    particle is visited once. Deterministic for a given ``generator`` state."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return indices.copy()
    member_groups = np.asarray(groups)[indices]
    labels, inverse = np.unique(member_groups, return_inverse=True)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[torch.randperm(len(labels), generator=generator).numpy()] = np.arange(len(labels))
    block = rank[inverse.reshape(-1)] // max(1, int(groups_per_block))
    noise = torch.rand(len(indices), generator=generator, dtype=torch.float64).numpy()
    return indices[np.lexsort((noise, block))]


__all__ = ["batch_to", "chunked_order", "host_batch", "prefetch_batches"]
