"""``RELION_OUTPUT_NODES.star``: the files a finished job hands to RELION's pipeline.

An External job tells RELION which of its files are pipeline nodes (inputs that later jobs can
select) by writing ``data_output_nodes`` into its job folder before the exit file. RELION 3.1
reads the integer ``_rlnPipeLineNodeType``; RELION 4 and 5 read the text
``_rlnPipeLineNodeTypeLabel``. We always write both columns: RELION 3.1.3 accepts the extra
label column (it prints "will ignore (but maintain) values for the unknown label:
rlnPipeLineNodeTypeLabel" and registers the nodes with their integer types; checked with
``relion_pipeliner`` in ``tests/test_relion_pipeliner.py``).

Node names are paths as RELION knows them: relative to the project directory
(``External/job007/backprojection/map_half1.mrc``), built from the job folder exactly as RELION
passed it (``--o External/job007/``).

RELION-5's own DynaMight job reads this file too (checked with RELION-5.0.1's
``relion_pipeliner``: a node listed there enters ``default_pipeline.star`` when the task
succeeds). Its pipeline declares the deformed backprojection's half maps
``<job>/backprojection/map_half{1,2}.mrc`` itself, as :data:`DYNAMIGHT_HALF_MAP` nodes; our
optimize-deformations adds ``particles.star`` (:data:`PARTICLES`), which RELION-5 does not
declare. :func:`dynamight_output_nodes` with ``half_map_type=DYNAMIGHT_HALF_MAP`` gives the list
of both for anything that wants to mirror it.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ._atomic import atomic_output

logger = logging.getLogger(__name__)

OUTPUT_NODES_STAR = "RELION_OUTPUT_NODES.star"


@dataclass(frozen=True)
class NodeType:
    """A pipeline node type in both vocabularies."""

    relion31: int  # _rlnPipeLineNodeType (RELION 3.1)
    label: str  # _rlnPipeLineNodeTypeLabel (RELION 4/5)


PARTICLES = NodeType(3, "ParticleGroupMetadata.star.relion")
DENSITY_MAP = NodeType(6, "DensityMap.mrc")
HALF_MAP = NodeType(10, "DensityMap.mrc.halfmap")
DYNAMIGHT_HALF_MAP = NodeType(10, "DensityMap.mrc.relion.halfmap.dynamight")
LOG_PDF = NodeType(13, "LogFile.pdf.relion")


@dataclass(frozen=True)
class OutputNode:
    name: str  # path relative to the project directory, as RELION names it
    type: NodeType


def node_name(job_dir: str | PathLike, relative: str) -> str:
    """``<job_dir>/<relative>`` spelled as RELION spells node names (no ``./``, ``/``-separated,
    the job folder kept as given, relative or absolute)."""
    return posixpath.normpath(posixpath.join(Path(job_dir).as_posix(), relative))


def write_output_nodes(job_dir: str | PathLike, nodes: Iterable[OutputNode]) -> Path:
    """Write ``<job_dir>/RELION_OUTPUT_NODES.star`` (both type columns), atomically."""
    nodes = list(nodes)
    lines = ["", "data_output_nodes", "", "loop_", "_rlnPipeLineNodeName #1",
             "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    for node in nodes:
        if not node.name or any(c.isspace() for c in node.name):
            raise ValueError(f"RELION node names cannot be empty or contain spaces: "
                             f"{node.name!r}")
        lines.append(f"{node.name} {node.type.relion31} {node.type.label}")
    path = Path(job_dir) / OUTPUT_NODES_STAR
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n\n")
    logger.info("wrote %s (%d nodes)", path, len(nodes))
    return path


def read_output_nodes(path: str | PathLike) -> list[tuple[str, int | None, str | None]]:
    """``(name, type int or None, label or None)`` per node of a RELION_OUTPUT_NODES.star."""
    import starfile

    table = starfile.read(path, always_dict=True)["output_nodes"]
    names = [str(n) for n in table["rlnPipeLineNodeName"]]
    types = (table["rlnPipeLineNodeType"].astype(int).tolist()
             if "rlnPipeLineNodeType" in table else [None] * len(names))
    labels = (table["rlnPipeLineNodeTypeLabel"].astype(str).tolist()
              if "rlnPipeLineNodeTypeLabel" in table else [None] * len(names))
    return list(zip(names, types, labels))


def dynamight_output_nodes(job_dir: str | PathLike, *,
                           half_map_type: NodeType = HALF_MAP) -> list[OutputNode]:
    """The DynaMight results present in ``job_dir``: ``particles.star`` (particles with latent
    coordinates) and ``backprojection/map_half{1,2}.mrc`` (only as a pair)."""
    job_dir = Path(job_dir)
    nodes = []
    if (job_dir / "particles.star").is_file():
        nodes.append(OutputNode(node_name(job_dir, "particles.star"), PARTICLES))
    halves = [f"backprojection/map_half{h}.mrc" for h in (1, 2)]
    if all((job_dir / h).is_file() for h in halves):
        nodes += [OutputNode(node_name(job_dir, h), half_map_type) for h in halves]
    return nodes


__all__ = [
    "DENSITY_MAP",
    "DYNAMIGHT_HALF_MAP",
    "HALF_MAP",
    "LOG_PDF",
    "OUTPUT_NODES_STAR",
    "PARTICLES",
    "NodeType",
    "OutputNode",
    "dynamight_output_nodes",
    "node_name",
    "read_output_nodes",
    "write_output_nodes",
]
