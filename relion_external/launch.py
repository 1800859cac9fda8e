"""Several processes for one command, started through torchrun's engine.

``--gpu-id 0,1`` (as RELION passes GPU lists) or ``--n-processes N`` asks for more than one
process. The command then does not run its stage itself: it starts ``N`` copies of itself on
this node with torchrun's launcher (``torch.distributed.run``, standalone rendezvous), each
with ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` set, waits for them and reports one result. The
copies take GPU ``ids[LOCAL_RANK]`` (:func:`dynamight_core.device.choose_device`) and split the
work (:mod:`dynamight_core.distributed`). Started by ``torchrun`` itself, a command runs its
share directly.

Several nodes: one copy of the command per node (``srun`` in the SLURM template
``job_templates/slurm_dynamight_multinode.sh``) with ``DYNAMIGHT_NNODES`` (nodes),
``DYNAMIGHT_NODE_RANK`` (default ``SLURM_NODEID``) and ``DYNAMIGHT_MASTER`` (``host:port`` of
node 0) in the environment: each starts its processes as above and torchrun's static
rendezvous joins them into one world, ranks numbered node by node (rank 0 on node 0).

Exit files: only the process RELION started writes them — the launching process (of node 0),
or rank 0 under an outside torchrun; the copies only poll for RELION's abort request.
"""

from __future__ import annotations

import logging
import os
import sys

from dynamight_core.device import gpu_ids
from dynamight_core.distributed import world_size_from_environment

from .errors import InputError

logger = logging.getLogger(__name__)

WORKER_ENV = "DYNAMIGHT_LAUNCHED_WORKER"  # set in the copies started by launch()
COMMANDS = ("optimize-deformations", "deformable-backprojection")


class WorkersFailed(Exception):
    """A process started by :func:`launch` failed (its own message is above in run.err)."""


def add_args(p) -> None:
    p.add_argument("--n-processes", type=int, default=0, metavar="N",
                   help="processes on this node (torchrun): 0 = one per GPU of --gpu-id, "
                        "1 on the CPU; 2 trains the half sets side by side, 2k shares each "
                        "half's batches between k processes")


def _nodes() -> tuple[int, int, str]:
    """(nodes, this node's rank, ``host:port`` of node 0) from the environment."""
    n = int(os.environ.get("DYNAMIGHT_NNODES", "1") or 1)
    rank = int(os.environ.get("DYNAMIGHT_NODE_RANK", os.environ.get("SLURM_NODEID", "0")) or 0)
    return n, rank, os.environ.get("DYNAMIGHT_MASTER", "")


def is_worker() -> bool:
    """True in a process that another process of this command started or supervises, or on
    a node other than the first (it must not write RELION exit files)."""
    nodes, node_rank, _ = _nodes()
    return (bool(os.environ.get(WORKER_ENV)) or os.environ.get("RANK", "0") not in ("", "0")
            or (nodes > 1 and node_rank != 0))


def wanted(args) -> int:
    """Processes to start on this node for ``args`` (1 on one node = run here): none inside
    torchrun."""
    if world_size_from_environment() > 1 or args.command not in COMMANDS:
        return 1
    n = int(getattr(args, "n_processes", 0) or 0)
    return n if n > 0 else max(1, len(gpu_ids(getattr(args, "gpu_id", None))))


def needed(args) -> bool:
    """Whether the command must start processes (several here, or several nodes)."""
    return args.command in COMMANDS and world_size_from_environment() <= 1 and (
        wanted(args) > 1 or _nodes()[0] > 1)


def launch(n: int, argv: list[str]) -> None:
    """Run ``dynamight ARGV`` in ``n`` processes on this node (on every node of a multi-node
    run) and wait; :class:`WorkersFailed` when any fails."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nodes, node_rank, master = _nodes()
    world = n * nodes
    if world % 2:
        raise InputError(None, "--n-processes", f"{world} processes cannot be shared equally "
                         "by the two half sets", "Give an even number (or one GPU id per "
                         "process, an even number of them), or 1.")
    logger.info("starting %d processes (torchrun%s): half set 1 on ranks 0-%d, half set 2 on "
                "ranks %d-%d", world, f", {nodes} nodes of {n}" if nodes > 1 else "",
                world // 2 - 1, world // 2, world - 1)
    if nodes > 1:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(None, "DYNAMIGHT_MASTER", f"{master!r} is not host:port",
                             "Set it to the first node's name and a free port (the SLURM "
                             "template does).")
        where = [f"--nnodes={nodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                 f"--master-addr={host}", f"--master-port={port}"]
    else:
        where = ["--standalone"]
    config = get_args_parser().parse_args([
        *where, f"--nproc-per-node={n}", "--max-restarts=0", "--monitor-interval=1",
        "-m", "relion_external.cli", *argv])
    os.environ[WORKER_ENV] = "1"
    try:
        run(config)
    except ChildFailedError as err:
        failures = "; ".join(f"rank {rank}: exit code {f.exitcode}"
                             for rank, f in sorted(err.failures.items()))
        raise WorkersFailed(f"a worker process failed ({failures}); its error is above") \
            from None
    finally:
        os.environ.pop(WORKER_ENV, None)
        sys.stdout.flush()


__all__ = ["COMMANDS", "WorkersFailed", "add_args", "is_worker", "launch", "needed", "wanted"]
