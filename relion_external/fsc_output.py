"""Half-map FSC curves as a RELION-style STAR table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from dynamight_core.fsc import resolution_at_threshold

from ._atomic import atomic_output


def write_fsc(out_stem: Path, curves: dict[str, torch.Tensor], box_size: int,
              pixel_size: float, title: str) -> dict[str, float]:
    """Write ``<stem>.star`` and ``<stem>.png``; return the 0.143 resolution of each curve (Å).

    ``curves`` maps a label (``"unmasked"``, ``"masked"``) to an FSC per shell.
    """
    shells = np.arange(box_size // 2 + 1)
    with np.errstate(divide="ignore"):
        res = np.where(shells > 0, box_size * pixel_size / np.maximum(shells, 1), 999.0)
    table = pd.DataFrame({
        "rlnSpectralIndex": shells,
        "rlnResolution": shells / (box_size * pixel_size),
        "rlnAngstromResolution": res,
    })
    labels = {"unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
              "masked": "rlnFourierShellCorrelationMaskedMaps"}
    resolutions = {}
    for key, curve in curves.items():
        table[labels.get(key, f"rlnFourierShellCorrelation_{key}")] = curve.cpu().numpy()
        resolutions[key] = resolution_at_threshold(curve, box_size, pixel_size)
    general = {"rlnFinalResolution": min(resolutions.values())}
    with atomic_output(out_stem.with_suffix(".star")) as tmp:
        starfile.write({"general": general, "fsc": table}, tmp)
    _plot(out_stem.with_suffix(".png"), table, curves, resolutions, title)
    return resolutions


def _plot(path: Path, table: pd.DataFrame, curves, resolutions, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, curve in curves.items():
        ax.plot(table["rlnResolution"], curve.cpu().numpy(),
                label=f"{key} ({resolutions[key]:.2f} Å)")
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
