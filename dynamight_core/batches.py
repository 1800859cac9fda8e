"""Batches of particles for the stage runners, shared between the processes of a half set.

:func:`batches` cuts an index list into batches and reads each (images, poses, CTFs) onto the
device as :func:`.deformation_model.make_batch` would, a few batches ahead in a background
thread (:func:`.batch_prefetch.prefetch_batches`; pinned memory on CUDA). With a data-parallel :class:`.distributed.
Group` every process takes its share of each batch (:meth:`.distributed.Group.share`) and
reads only that, and every process makes the same number of steps, so collectives inside the
loop line up; the batch records its place in the whole (:attr:`.deformation_model.Batch.offset`,
``total``). Abort requests are polled before each batch and agreed on by the group, so all its
processes stop at the same batch (:func:`poll_abort`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch

from .batch_prefetch import prefetch_batches
from .deformation_model import Batch
from .distributed import Group
from .particles import ParticleSet

SINGLE_GROUP = Group()


def poll_abort(group: Group, check_abort: Callable[[], None] | None) -> None:
    """Call ``check_abort`` (which raises when an abort was requested); with several
    processes, every process of ``group`` raises when any one's does."""
    if check_abort is None:
        return
    if not group.parallel:
        check_abort()
        return
    try:
        check_abort()
        asked = None
    except Exception as err:  # noqa: BLE001 - re-raised below, on every process together
        asked = err
    if group.any(asked is not None):
        if asked is not None:
            raise asked
        check_abort()
        raise RuntimeError("another process of this half set was asked to stop")


def batches(particles: ParticleSet, indices: np.ndarray, batch_size: int,
            device: torch.device, *, group: Group = SINGLE_GROUP,
            check_abort: Callable[[], None] | None = None,
            per_process: bool = False) -> Iterator[Batch]:
    """Batches of ``indices`` in order, ``batch_size`` particles each (the last smaller).
    With a parallel ``group`` this process gets its share of each batch (a batch of
    ``batch_size`` split between the group), or with ``per_process`` its share of each
    ``batch_size × group.size`` particles (each process then handles full batches)."""
    indices = np.asarray(indices, dtype=np.int64)
    step = batch_size * (group.size if per_process else 1)
    chunks = [indices[start:start + step] for start in range(0, indices.shape[0], step)]
    shares = [group.share(chunk.shape[0]) for chunk in chunks]
    read = prefetch_batches(particles, [chunk[rows] for chunk, rows in
                                        zip(chunks, shares, strict=True)], device)
    try:
        for chunk, rows in zip(chunks, shares, strict=True):
            poll_abort(group, check_abort)
            batch = next(read)
            yield replace(batch, offset=rows.start, total=chunk.shape[0]) \
                if group.parallel else batch
    finally:
        read.close()


__all__ = ["batches", "poll_abort"]
