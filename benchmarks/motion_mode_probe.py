"""How much of the motion the leading motion modes hold before any training
(:mod:`dynamight_core.motion_modes`): on a simulated dataset with ground truth (``dynamight
simulate``), half set 1's training particles, the generalised eigenvalues against the noise edge
and the cross-validated kNN R² (k = 20) of the true motion coordinate from each particle's
least-squares coefficients along the leading mode(s).

Example::

    python benchmarks/motion_mode_probe.py /tmp/grid6k/twist-hinge_snr0.02/data --clusters 25 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import batches_of, start_training

from dynamight_core.motion_modes import motion_modes
from dynamight_core.quality_scores import knn_r2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("--clusters", type=int, nargs="+", default=[50])
    parser.add_argument("--modes", type=int, default=2)
    parser.add_argument("--n-gaussians", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    _, particles, motion, training = start_training(
        args.dataset, ["--n-gaussians", str(args.n_gaussians)], device)
    movable = training.trainers[1].model.decoder.movable_mask
    trainer = training.trainers[1]
    train = trainer.train_indices

    def passes():
        return batches_of(particles, train, 100, device)

    for clusters in args.clusters:
        t0 = time.time()
        _, summary, coefficients = motion_modes(
            trainer.model, passes(), passes(), trainer.pixel_weights, args.modes, clusters,
            movable, torch.Generator().manual_seed(0))
        a = torch.cat([c[1] for c in coefficients]).numpy()
        order = np.concatenate([c[0] for c in coefficients])
        r2 = [knn_r2(a[:, :k], motion[order]) for k in range(1, args.modes + 1)]
        print(f"{clusters} clusters: eigenvalues {summary['eigenvalues']} (noise edge "
              f"{summary['noise_edge'][0]}), amplitudes {summary['amplitude_angstrom']} Å, "
              f"kNN R² from the leading 1..{args.modes} modes {np.round(r2, 3).tolist()}, "
              f"{time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
