"""How each per-particle colouring is shown: its label, unit and colour map, and the mapping of
values to RGBA (matplotlib colour maps; no Qt). Values that do not exist (NaN) are grey."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps

MISSING_RGBA = (0.5, 0.5, 0.5, 0.6)


@dataclass(frozen=True)
class ColourSpec:
    label: str
    unit: str
    colormap: str
    cyclic: bool = False  # values are angles in degrees (-180, 180]
    full_range: bool = False  # min..max instead of the 2nd..98th percentile


COLOURINGS: dict[str, ColourSpec] = {
    "amount of motion": ColourSpec("amount of motion", "Å", "viridis"),
    "direction of motion": ColourSpec("direction of motion", "degrees", "twilight", cyclic=True),
    "location of motion": ColourSpec("location of motion", "Å along the long axis", "coolwarm"),
    "deformation error": ColourSpec("deformation error", "Å", "magma"),
    "half-set agreement": ColourSpec("half-set agreement |d1 - d2|", "Å", "magma"),
    "particle index": ColourSpec("particle index", "", "viridis", full_range=True),
    "tilt": ColourSpec("tilt", "degrees", "cividis", full_range=True),
    "shift": ColourSpec("shift", "Å", "cividis"),
    "density": ColourSpec("density", "particles per unit area", "plasma"),
}


def value_range(values: np.ndarray, spec: ColourSpec) -> tuple[float, float]:
    """The values mapped to the ends of the colour map."""
    if spec.cyclic:
        return -180.0, 180.0
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = ((finite.min(), finite.max()) if spec.full_range
                 else np.percentile(finite, [2.0, 98.0]))
    if not high > low:
        high = low + 1.0
    return float(low), float(high)


def colour_values(
    values: np.ndarray,  # (n,)
    spec: ColourSpec,
    value_limits: tuple[float, float] | None = None,
) -> np.ndarray:  # (n, 4) RGBA in [0, 1]
    """RGBA of each value under ``spec``'s colour map; NaN values get :data:`MISSING_RGBA`."""
    values = np.asarray(values, dtype=np.float64)
    low, high = value_limits if value_limits is not None else value_range(values, spec)
    if not high > low:
        high = low + 1.0
    with np.errstate(invalid="ignore"):
        t = np.clip((values - low) / (high - low), 0.0, 1.0)
    rgba = colormaps[spec.colormap](np.nan_to_num(t))
    rgba[~np.isfinite(values)] = MISSING_RGBA
    return rgba


__all__ = ["COLOURINGS", "MISSING_RGBA", "ColourSpec", "colour_values", "value_range"]
