"""Read and write RELION 3.1+ particle STAR files (``data_optics`` + ``data_particles``).

Every block and column is kept, including ones this package does not know, so a file read
and written again is the same table (numbers may be formatted differently, never rounded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import pandas as pd
import starfile

from ._atomic import atomic_output
from .errors import InputError

logger = logging.getLogger(__name__)

# columns kept as text even when a value looks like a number ("01" must stay "01")
STRING_COLUMNS = (
    "rlnImageName", "rlnMicrographName", "rlnOpticsGroupName", "rlnGroupName",
    "rlnOriginalParticleName", "rlnCtfImage", "rlnMicrographMovieName",
    "rlnMicrographGainName", "rlnMicrographDefectFile", "rlnMtfFileName",
    "rlnReferenceImage", "rlnImageOriginalName",
)

_CONVERT_HINT = ("DynaMight needs a RELION 3.1+ particles file with data_optics and "
                 "data_particles blocks: use the particles.star of a RELION 3.1+ 3D auto-refine, "
                 "or convert this one with `relion_convert_star --i old.star --o new.star`.")


@dataclass
class RelionParticles:
    """A particles STAR file as tables: ``optics`` (one row per optics group), ``particles``
    (one row per particle, file order) and any other blocks by name (tables or key-value
    dicts), all as read. ``path`` is where it was read from (``None`` if built in memory)."""

    path: Path | None
    optics: pd.DataFrame
    particles: pd.DataFrame
    other_blocks: dict[str, pd.DataFrame | dict] = field(default_factory=dict)


def read_particles_star(path: str | PathLike) -> RelionParticles:
    """Read a RELION 3.1+ particles STAR file; :class:`InputError` on anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "particles STAR file", "does not exist",
                         "Select an existing particles .star file (relative paths are taken "
                         "from the RELION project directory).")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(STRING_COLUMNS))
    except Exception as err:  # the parser raises pandas/ValueError/IndexError on bad syntax
        raise InputError(path, "STAR syntax", f"cannot be parsed ({type(err).__name__}: {err})",
                         "Check that the file is a complete STAR file written by RELION."
                         ) from err
    if "optics" not in blocks:
        found = ", ".join(f"data_{name}" for name in blocks) or "no data blocks"
        raise InputError(path, "data_optics", f"block missing (found {found}); this looks like "
                         "a RELION 3.0 or older file", _CONVERT_HINT)
    if "particles" not in blocks:
        raise InputError(path, "data_particles", "block missing", _CONVERT_HINT)
    other = {name: block for name, block in blocks.items() if name not in ("optics", "particles")}
    return RelionParticles(path=path, optics=_as_table(blocks["optics"]),
                           particles=_as_table(blocks["particles"]), other_blocks=other)


def write_particles_star(
    path: str | PathLike,
    data: RelionParticles | tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    """Write ``data_optics`` first, then ``data_particles``, then any other blocks.

    Every column is written in its order; floats are written with as many digits as they
    need to read back exactly. The file appears atomically (written beside, then renamed).
    """
    if isinstance(data, RelionParticles):
        optics, particles, other = data.optics, data.particles, data.other_blocks
    else:
        (optics, particles), other = data, {}
    blocks: dict[str, pd.DataFrame | dict] = {"optics": _exact_floats(optics),
                                              "particles": _exact_floats(particles)}
    for name, block in other.items():
        if name in blocks:
            raise ValueError(f"other_blocks must not contain {name!r}")
        blocks[name] = _exact_floats(block) if isinstance(block, pd.DataFrame) else block
    with atomic_output(path) as tmp:
        starfile.write(blocks, tmp)
    logger.debug("wrote %d particles to %s", len(particles), path)


def _as_table(block: pd.DataFrame | dict) -> pd.DataFrame:
    """A block as a table (a key-value block becomes one row)."""
    return block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])


def _exact_floats(table: pd.DataFrame) -> pd.DataFrame:
    """Float columns as their shortest exact text (``repr``), so nothing is rounded and a
    float column always reads back as float (``18482.0``, ``1e-07``, ``nan``)."""
    table = table.copy()
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column].dtype):
            table[column] = [repr(value) for value in table[column].astype(float).tolist()]
    return table


__all__ = ["STRING_COLUMNS", "RelionParticles", "read_particles_star", "write_particles_star"]
