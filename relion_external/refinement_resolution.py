"""The resolution of the consensus refinement a particles STAR file comes from.

RELION's 3D auto-refine writes ``<prefix>_data.star`` (the particles) next to
``<prefix>_model.star``, whose ``data_model_general`` block holds ``_rlnCurrentResolution``
(Å, from the gold-standard FSC). ``optimize-deformations`` uses it to choose the training box
(:func:`dynamight_core.fourier_crop.training_box`). Anything else (another name, no model file,
an unreadable value) gives None, with the reason logged: the rule then has a default.
"""

from __future__ import annotations

import logging
import math
import re
from os import PathLike
from pathlib import Path

logger = logging.getLogger(__name__)

_VALUE = re.compile(r"^\s*_rlnCurrentResolution\s+(\S+)", re.MULTILINE)


def model_star_for(particles_star: str | PathLike) -> Path | None:
    """``run_model.star`` for ``run_data.star`` (any ``<prefix>_data.star``), else None."""
    path = Path(particles_star)
    if not path.name.endswith("_data.star"):
        return None
    return path.with_name(path.name[: -len("_data.star")] + "_model.star")


def consensus_resolution(particles_star: str | PathLike) -> float | None:
    """``_rlnCurrentResolution`` (Å) of the refinement's model STAR file, or None."""
    model = model_star_for(particles_star)
    if model is None or not model.is_file():
        logger.info("no refinement model STAR file beside %s: consensus resolution unknown",
                    particles_star)
        return None
    try:
        # the general block comes first; the file can be long (per-class spectra)
        with open(model, errors="replace") as f:
            head = f.read(1 << 16)
    except OSError as err:
        logger.warning("%s cannot be read (%s): consensus resolution unknown", model, err)
        return None
    match = _VALUE.search(head)
    try:
        value = float(match.group(1)) if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        logger.warning("%s has no usable _rlnCurrentResolution: consensus resolution unknown",
                       model)
        return None
    logger.info("consensus resolution %.2f Å (%s)", value, model)
    return value


__all__ = ["consensus_resolution", "model_star_for"]
