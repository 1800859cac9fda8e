"""Processes that work together on one stage, with torch.distributed (started by torchrun).

Layout of a world of ``W`` processes (:class:`ProcessLayout`):

- ``W = 1``: one process handles both half sets, one after the other (the default).
- ``W`` even: ranks ``0 .. W/2 - 1`` handle half set 1, ranks ``W/2 .. W - 1`` half set 2, so
  the halves run at the same time on different GPUs (or CPU processes). The ranks of one half
  form a :class:`Group` that splits every batch between them (data parallel: each rank reads
  only its share of the batch) and sums what the batch contributes: gradients, noise spectra,
  losses, backprojection sums. The half then trains as one process would with the same batch,
  up to the order of floating-point additions.

The halves never exchange model data; the world only agrees on small per-epoch numbers (the
losses for the log and the early-stopping residual, an abort request) and gathers each half's
state on rank 0, which alone writes files. Tensor collectives run on the device's backend
(NCCL for CUDA, gloo for the CPU); the per-epoch numbers and the gathered states go through a
gloo group on the CPU.

Nothing here starts processes: ``torchrun`` (or the command's own launch through torchrun's
engine) does, and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables that
:func:`join_processes` reads.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

HALVES = (1, 2)


class Group:
    """Collective sums within the processes of one half set (no-ops for a single process)."""

    def __init__(self, group=None, size: int = 1, rank: int = 0, cpu_group=None) -> None:
        self.group = group  # the device's backend (NCCL for CUDA tensors, else gloo)
        self.cpu_group = cpu_group  # gloo, for flags and numbers without touching the device
        self.size = int(size)
        self.rank = int(rank)

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """The rows of an ``n``-particle batch this rank handles (contiguous, the first
        ``n % size`` ranks one more; empty when ``n < size`` for the last ranks)."""
        base, extra = divmod(int(n), self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it."""
        if self.parallel:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_numbers(self, values: list[float]) -> list[float]:
        """Sums of plain numbers over the group (on the CPU)."""
        if not self.parallel:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.cpu_group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank of the group when ``flag`` is true on any."""
        return bool(self.all_reduce_numbers([float(bool(flag))])[0] > 0)

    def all_reduce_gradients(self, params) -> None:
        """Sum the ``.grad`` of ``params`` (parameters requiring grad; a missing gradient
        counts as zero) over the group, in one flat buffer."""
        if not self.parallel:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sync_rows(self, table: torch.Tensor, touched: torch.Tensor) -> None:
        """Give every rank the rows of ``table`` (n, ...) that one rank changed (``touched``
        (n,) bool on that rank): each row is changed by at most one rank, whose value is kept
        exactly; untouched rows keep their (common) value."""
        if not self.parallel:
            return
        shape = (-1,) + (1,) * (table.dim() - 1)
        mask = touched.to(table.dtype).view(shape)
        summed = self.all_reduce(table * mask)
        count = self.all_reduce(touched.to(table.dtype).clone())
        table.copy_(torch.where(count.view(shape) > 0, summed, table))

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Parameters and buffers of the group's first rank to all (identical replicas)."""
        if not self.parallel:
            return
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=src, group=self.group)


@dataclass
class ProcessLayout:
    """Which half sets this process handles and with whom (module docstring)."""

    world_size: int = 1
    rank: int = 0
    halves: tuple[int, ...] = HALVES
    groups: dict[int, Group] = field(default_factory=lambda: {h: Group() for h in HALVES})
    cpu_group: object = None  # gloo group of the world (None for one process)

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: logs, writes every file and holds both halves at the end."""
        return self.rank == 0

    def is_leader(self, half: int) -> bool:
        """The first rank of ``half``'s group (reports the half's numbers and state)."""
        return half in self.halves and self.groups[half].rank == 0

    @property
    def world(self) -> Group:
        """All processes, for plain numbers and flags (CPU, gloo)."""
        return Group(None, self.world_size, self.rank, self.cpu_group)

    def sum_numbers(self, values: list[float]) -> list[float]:
        """Sums of plain numbers over the world."""
        return self.world.all_reduce_numbers(values)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. an abort request)."""
        return self.world.any(flag)

    def gather_halves(self, local: dict[int, dict]) -> dict[int, dict] | None:
        """Rank 0 receives every half's ``local`` entry from that half's leader (CPU copies);
        other ranks get None. ``local`` maps the halves this rank leads to plain data."""
        if not self.parallel:
            return dict(local)
        mine = {h: _to_cpu(v) for h, v in local.items() if self.is_leader(h)}
        received = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, received, dst=0, group=self.cpu_group)
        if not self.is_main:
            return None
        merged: dict[int, dict] = {}
        for part in received:
            merged.update(part or {})
        return merged

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.parallel:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier(group=self.cpu_group)


SINGLE = ProcessLayout()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def world_size_from_environment() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank_from_environment() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def join_processes(device: torch.device, *, timeout_minutes: float = 30.0) -> ProcessLayout:
    """The layout of this process: :data:`SINGLE` outside torchrun (``WORLD_SIZE`` unset or
    1), else joins the process group (NCCL for CUDA tensors when ``device`` is a GPU, gloo for
    the CPU) and builds the half-set groups. ``ValueError`` for an odd world size > 1."""
    world = world_size_from_environment()
    if world <= 1:
        return SINGLE
    if world % 2:
        raise ValueError(f"{world} processes: give an even number (half of them per half set) "
                         "or one")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    rank = dist.get_rank()
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    per_half = world // 2
    members = {1: list(range(per_half)), 2: list(range(per_half, world))}
    # every rank takes part in creating every group, in the same order
    handles = {h: dist.new_group(ranks, timeout=timeout) for h, ranks in members.items()}
    cpu_handles = {h: dist.new_group(ranks, backend="gloo", timeout=timeout)
                   for h, ranks in members.items()}
    half = 1 if rank < per_half else 2
    groups = {half: Group(handles[half], per_half, members[half].index(rank), cpu_handles[half])}
    logger.debug("rank %d of %d: half set %d (%d of %d)", rank, world, half,
                 groups[half].rank + 1, per_half)
    return ProcessLayout(world, rank, (half,), groups, cpu_group)


def leave_processes(layout: ProcessLayout) -> None:
    """Leave the process group joined by :func:`join_processes` (after a final barrier)."""
    if layout.parallel and dist.is_initialized():
        dist.barrier(group=layout.cpu_group)
        dist.destroy_process_group()


__all__ = [
    "SINGLE",
    "Group",
    "ProcessLayout",
    "join_processes",
    "leave_processes",
    "local_rank_from_environment",
    "world_size_from_environment",
]
