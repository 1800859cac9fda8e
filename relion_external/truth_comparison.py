"""A finished run on simulated data compared with the truth (``dynamight simulate`` folders):
what the demo prints and the quality benchmark records.

Maps compared (each the average of its two half maps): ``rigid`` (the consensus half maps),
``deformed`` (DynaMight's deformed backprojection) and, when given, ``upper`` (a rigid
reconstruction of the same particles imaged without motion: the best any method could do).
Scores (:mod:`dynamight_core.quality_scores`):

- FSC against the true reference map (t = 0) in the moving and in the static region, per shell
  and as the mean over shells 1..Nyquist (the "area"); the fraction of the gap between rigid and
  upper that the deformed map closes in the moving region; the change of the area in the static
  region (deformed - rigid);
- half-map FSC 0.143 resolution within the soft mask, and how far the half-map FSC claims more
  than the truth supports: ``max(sqrt(2 FSC / (1 + FSC)) - FSC_vs_truth)`` over shells in the
  static region (where the reference is right for every map) - a shared bias of the two halves
  would raise it above the upper bound's;
- cross-validated kNN R² (k = 20) of the true motion from each half's latent codes, for all the
  half's particles and for its validation particles (never trained on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from dynamight_core.fsc import combined_map_fsc, fsc, resolution_at_threshold
from dynamight_core.quality_scores import gap_closed, knn_r2

from ._atomic import atomic_output
from .map_io import read_map

logger = logging.getLogger(__name__)


@dataclass
class TruthComparison:
    scores: dict  # plain numbers (module docstring)
    curves: dict[str, np.ndarray]  # per-shell curves, shells 0..box//2
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # central z slices
    box: int = 0
    voxel: float = 1.0


def _halves(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return read_map(folder / "map_half1.mrc")[0], read_map(folder / "map_half2.mrc")[0]


def _particles(path: Path) -> pd.DataFrame:
    return starfile.read(path, always_dict=True)["particles"]


def compare_with_truth(data: Path, maps: dict[str, Path],
                       particles_star: Path | None = None) -> TruthComparison:
    """Scores of the half-map folders ``maps`` (``rigid``, ``deformed``, optional ``upper``)
    against the truth of the simulated dataset ``data``; latent scores from ``particles_star``
    (optimize-deformations' particles.star) when given."""
    truth = data / "ground_truth"
    reference, voxel = read_map(truth / "state_+0.00.mrc")
    regions = {"moving": read_map(truth / "moving_region.mrc")[0],
               "static": read_map(truth / "static_region.mrc")[0]}
    mask = read_map(data / "mask.mrc")[0]
    box = reference.shape[-1]
    curves: dict[str, np.ndarray] = {}
    scores: dict = {}
    halves = {name: _halves(folder) for name, folder in maps.items()}
    averages = {name: 0.5 * (h1 + h2) for name, (h1, h2) in halves.items()}
    for region, region_mask in regions.items():
        for name, average in averages.items():
            curve = fsc(average * region_mask, reference * region_mask)
            curves[f"{name}_vs_truth_{region}"] = curve.numpy()
            scores[f"{region}_area_{name}"] = round(float(curve[1:].mean()), 4)
    if "upper" in maps:
        scores["moving_gap_closed"] = round(gap_closed(
            scores["moving_area_deformed"], scores["moving_area_rigid"],
            scores["moving_area_upper"]), 3)
    scores["static_area_change"] = round(scores["static_area_deformed"]
                                         - scores["static_area_rigid"], 4)
    for name, (half1, half2) in halves.items():
        half = fsc(half1 * mask, half2 * mask)
        curves[f"{name}_half_maps_masked"] = half.numpy()
        scores[f"half_map_resolution_{name}"] = round(resolution_at_threshold(half, box, voxel), 2)
        claimed = combined_map_fsc(half)
        static = torch.from_numpy(curves[f"{name}_vs_truth_static"])
        scores[f"claim_excess_{name}"] = round(float((claimed - static)[1:].max()), 3)
    if particles_star is not None:
        table = _particles(particles_star)
        motion = _particles(truth / "motion.star")["dmMotion"].to_numpy()
        columns = sorted(c for c in table.columns if c.startswith("rlnDynaMightLatent"))
        latents = table[columns].to_numpy()
        half_set = table["rlnDynaMightHalfSet"].to_numpy()
        held = table["rlnDynaMightValidation"].to_numpy() == 1
        for h in (1, 2):
            scores[f"r2_half{h}"] = round(knn_r2(latents[half_set == h],
                                                 motion[half_set == h]), 3)
            sel = (half_set == h) & held
            scores[f"r2_half{h}_validation"] = round(knn_r2(latents[sel], motion[sel]), 3)
    centre = box // 2
    slices = {"truth": reference[centre].numpy()}
    slices.update({name: average[centre].numpy() for name, average in averages.items()})
    return TruthComparison(scores=scores, curves=curves, slices=slices, box=box, voxel=voxel)


def write_comparison_star(result: TruthComparison, path: Path) -> None:
    """The per-shell curves as a STAR table (``rlnSpectralIndex``, ``rlnAngstromResolution``,
    ``dm_<curve>``)."""
    shells = np.arange(result.box // 2 + 1)
    table = pd.DataFrame({"rlnSpectralIndex": shells,
                          "rlnAngstromResolution": result.box * result.voxel
                          / np.maximum(shells, 1)})
    for key, curve in result.curves.items():
        table[f"dm_{key}"] = curve
    with atomic_output(path) as tmp:
        starfile.write({"comparison": table}, tmp, overwrite=True)


def write_comparison_png(result: TruthComparison, path: Path) -> None:
    """One figure: FSC against the truth in the moving region (rigid, deformed, motion-free)
    and central slices of the truth, rigid and deformed maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shells = np.arange(result.box // 2 + 1)
    frequency = shells / (result.box * result.voxel)
    figure = plt.figure(figsize=(13, 4.2), constrained_layout=True)
    grid = figure.add_gridspec(1, 4, width_ratios=[1.6, 1, 1, 1])
    ax = figure.add_subplot(grid[0])
    styles = {"rigid": ("consensus (rigid)", "tab:gray", "-"),
              "deformed": ("DynaMight (deformed)", "tab:red", "-"),
              "upper": ("no motion (upper bound)", "black", ":")}
    for name, (label, colour, line) in styles.items():
        key = f"{name}_vs_truth_moving"
        if key in result.curves:
            ax.plot(frequency[1:], result.curves[key][1:], line, color=colour, label=label)
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC against the true map, moving region")
    gap = result.scores.get("moving_gap_closed")
    ax.set_title("moving region" + (f": {gap:.0%} of the gap closed" if gap is not None else ""))
    ax.set_ylim(-0.05, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    limits = np.percentile(result.slices["truth"], [1, 99.8])
    for k, name in enumerate(("truth", "rigid", "deformed"), start=1):
        if name not in result.slices:
            continue
        image = figure.add_subplot(grid[k])
        image.imshow(result.slices[name], cmap="gray", vmin=limits[0], vmax=limits[1],
                     origin="lower")
        image.set_title({"truth": "true map (t = 0)", "rigid": "consensus",
                         "deformed": "DynaMight"}[name] + ", central slice", fontsize=9)
        image.set_xticks([])
        image.set_yticks([])
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def log_comparison(result: TruthComparison) -> None:
    s = result.scores
    logger.info("FSC against the true map, mean over shells 1..Nyquist:")
    for region in ("moving", "static"):
        parts = [f"{name} {s[f'{region}_area_{name}']:.3f}"
                 for name in ("rigid", "deformed", "upper") if f"{region}_area_{name}" in s]
        logger.info("  %-6s region: %s", region, ", ".join(parts))
    if "moving_gap_closed" in s:
        logger.info("  moving region: %.0f%% of the gap between the consensus and a motion-free "
                    "reconstruction closed", 100 * s["moving_gap_closed"])
    logger.info("half-map resolution (FSC 0.143, masked): %s", ", ".join(
        f"{name} {s[f'half_map_resolution_{name}']:.2f} Å"
        for name in ("rigid", "deformed", "upper") if f"half_map_resolution_{name}" in s))
    if "r2_half1" in s:
        logger.info("latent codes vs the true motion (kNN R²): half 1 %.2f (validation %.2f), "
                    "half 2 %.2f (validation %.2f)", s["r2_half1"], s["r2_half1_validation"],
                    s["r2_half2"], s["r2_half2_validation"])


__all__ = ["TruthComparison", "compare_with_truth", "log_comparison", "write_comparison_png",
           "write_comparison_star"]
