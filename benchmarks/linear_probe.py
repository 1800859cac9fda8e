"""How much could an image encoder learn? A linear read-out of the true motion coordinate from
each particle's pixels, trained *with* the truth (ridge regression, the best of a range of
penalties), scored on held-out particles.

This is the measurement behind dropping the image encoder (README, *How training works*): an
encoder network has to produce the code from the image alone, and at the SNR of real particles
the motion signal in the pixels depends on the viewing direction, so a read-out that ignores the
pose finds almost nothing, however it is trained. Inputs tried: the image centred (moved by
+rlnOrigin) and turned in-plane by -psi (what the earlier encoder saw), optionally multiplied by
its CTF (or its sign) and Fourier-cropped (a low-pass).

Example::

    dynamight simulate --output-directory /tmp/clamp --preset clamp
    python benchmarks/linear_probe.py /tmp/clamp --n-train 2700 --n-test 600
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import starfile
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository

from dynamight_core.ctf import ctf_2d_rfft
from dynamight_core.fourier_grids import irfft2_centered, rfft2_centered
from dynamight_core.shift import recentre_relion_images_rfft
from relion_external.particles_adapter import load_particle_set


def canonical_images(particles, crop: int, ctf_mode: str | None) -> torch.Tensor:  # (n, c, c)
    """Centred, (CTF-multiplied,) cropped and in-plane-derotated images."""
    box, px = particles.box_size, particles.pixel_size
    f = rfft2_centered(particles.images.read(np.arange(len(particles))))
    f = recentre_relion_images_rfft(f, particles.shifts_angstrom, px, box)
    if ctf_mode:
        c = ctf_2d_rfft(particles.ctf, box, px)
        f = f * (torch.sign(c) if ctf_mode == "flip" else c)
    if crop < box:
        half = crop // 2
        rows = torch.cat([torch.arange(half), torch.arange(box - half, box)])
        f = f[..., rows, : half + 1]
    small = irfft2_centered(f, crop)
    a = particles.rotations
    psi = torch.atan2(a[:, 1, 2], -a[:, 0, 2])  # A = Rz(psi) Ry(tilt) Rz(rot)
    c, s = torch.cos(psi), torch.sin(psi)
    idx = torch.arange(crop, dtype=small.dtype) - crop // 2
    qy, qx = torch.meshgrid(idx, idx, indexing="ij")
    x_in = c[:, None, None] * qx + s[:, None, None] * qy
    y_in = -s[:, None, None] * qx + c[:, None, None] * qy
    grid = torch.stack([(2 * (x_in + crop // 2) + 1) / crop - 1,
                        (2 * (y_in + crop // 2) + 1) / crop - 1], -1)
    return F.grid_sample(small[:, None], grid, align_corners=False)[:, 0]


def ridge_r2(x: np.ndarray, t: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    mean, std = x[train].mean(0), x[train].std(0) + 1e-9
    x = (x - mean) / std
    best = -np.inf
    for penalty in (1e1, 1e2, 1e3, 1e4, 1e5):
        a = x[train]
        w = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]),
                            a.T @ (t[train] - t[train].mean()))
        predicted = x[test] @ w + t[train].mean()
        r2 = 1 - ((t[test] - predicted) ** 2).sum() / ((t[test] - t[test].mean()) ** 2).sum()
        best = max(best, float(r2))
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder written by dynamight simulate")
    parser.add_argument("--n-train", type=int, default=2700)
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--crops", type=int, nargs="+", default=None,
                        help="input boxes (Fourier crops; default: box, box/2, box/3)")
    parser.add_argument("--project-directory", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    particles, _ = load_particle_set(args.dataset / "particles.star", preload=True,
                                     project_dir=args.project_directory)
    truth = starfile.read(args.dataset / "ground_truth" / "motion.star", always_dict=True)
    t = truth["particles"]["dmMotion"].to_numpy()
    order = np.random.default_rng(0).permutation(len(particles))
    train, test = order[:args.n_train], order[args.n_train:args.n_train + args.n_test]
    box = particles.box_size
    crops = args.crops or [box, box // 2 // 2 * 2, box // 3 // 2 * 2]
    print(f"# {args.dataset}: {len(train)} training, {len(test)} held-out particles; "
          "held-out R² of the best ridge read-out of the true motion")
    for crop in crops:
        for mode in (None, "flip", "multiply"):
            x = canonical_images(particles, crop, mode).reshape(len(particles), -1).double()
            r2 = ridge_r2(x.numpy(), t, train, test)
            print(f"input {crop:3d} px, CTF {mode!s:8s}: R² {r2:.3f}", flush=True)


if __name__ == "__main__":
    main()
