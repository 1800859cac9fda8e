"""The latent trajectories of a time series: each latent coordinate against time for a few
tracks of each half set (``track_latents.png`` of ``optimize-deformations --temporal-prior``),
so a user sees whether the codes of a molecule move smoothly through its movie."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._atomic import atomic_output


def write_track_latents_plot(path: str | Path, latents: np.ndarray, track: np.ndarray,
                             time: np.ndarray, half_set: np.ndarray,
                             tracks_per_half: int = 3) -> Path:
    """``latents`` (n, d) against ``time`` for the ``tracks_per_half`` longest tracks of each
    half set (one panel per half, one colour per track, one line style per coordinate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    d = latents.shape[1]
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100, sharey=True)
    for ax, half in zip(axes, (1, 2)):
        tracked = (half_set == half) & (track >= 0)
        labels, counts = np.unique(track[tracked], return_counts=True)
        for colour, k in enumerate(labels[np.argsort(-counts, kind="stable")][:tracks_per_half]):
            rows = np.flatnonzero(tracked & (track == k))
            rows = rows[np.argsort(time[rows], kind="stable")]
            for j in range(d):
                ax.plot(time[rows], latents[rows, j], styles[j % len(styles)], color=f"C{colour}",
                        lw=1.2, label=f"track {int(k)}" if j == 0 else None)
        ax.set_title(f"half set {half}")
        ax.set_xlabel("time (rlnDynaMightTime)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("latent coordinate (" + ", ".join(
        f"{j + 1}: {styles[j % len(styles)]}" for j in range(d)) + ")")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


__all__ = ["write_track_latents_plot"]
