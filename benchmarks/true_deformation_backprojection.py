"""What the deformed backprojection gives with the *true* deformations: one dataset of
``bench_quality.py``, its particles backprojected as ``deformable-backprojection`` does, but
with each particle's displacement field made from the simulation's own motion instead of a
learnt decoder; scored against the truth exactly as the benchmark scores a run.

The field is the command's: ``displacement_grid_from_gaussians`` on the grid
``choose_grid_size`` picks, here from the true atoms (positions of the reference state t = 0,
displaced to the particle's motion coordinate ``dmMotion``) instead of the consensus Gaussians
moved by the decoder. So the difference between this and a run's scores is what the learnt
deformations lose, and the difference between this and the motion-free reconstruction
(``upper``) is what the map-making step (coarse field, real-space lookup, rigid CTF² weights)
loses.

With ``--motion-from-codes`` it does the same a second time with each particle's motion
coordinate read from the run's latent codes instead (the cross-validated k-nearest-neighbour
prediction from the codes of its half set, the estimate behind the benchmark's kNN R²): the
true motion model driven by what the codes know. Between the two lies what the codes' noise
costs; between that and the run, what the learnt decoder's path costs.

It also prints the spread of the masked half-map FSC under the null near Nyquist (the second
half map's phases randomised beyond shell 16, 30 draws, both masked with the soft mask as
``truth_comparison`` masks them): the scale against which the ``claim_excess`` score of those
shells is to be read, since ``sqrt(2 FSC / (1 + FSC))`` turns a half-map FSC of a few hundredths
into a claimed FSC of 0.2-0.3.

Example (after ``bench_quality.py --output-directory /tmp/grid6k --presets twist-hinge ...``)::

    python benchmarks/true_deformation_backprojection.py /tmp/grid6k/twist-hinge_snr0.05 \\
        --preset twist-hinge --run /tmp/grid6k/twist-hinge_snr0.05/edges

Writes ``DATASET/true_deformation/map_half{1,2}.mrc`` and one ``RESULT`` line (JSON): the scores
of the true-deformation maps, of the run given with ``--run`` (optional) and the null spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import starfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import true_motion

from dynamight_core.deformed_backprojection import DeformedBackprojector, choose_grid_size
from dynamight_core.device import choose_device
from dynamight_core.displacement_field import displacement_grid_from_gaussians
from dynamight_core.fsc import fsc
from dynamight_core.protein_like_structure import PRESETS, protein_like_structure
from dynamight_core.quality_scores import knn_predict, knn_r2
from relion_external.map_io import read_map, write_map
from relion_external.particles_adapter import load_particle_set
from relion_external.truth_comparison import compare_with_truth

KEYS = ("moving_gap_closed", "moving_area_deformed", "static_area_change",
        "half_map_resolution_deformed", "claim_excess_deformed", "claim_excess_upper")


def motion_from_codes(data: Path, run: Path) -> tuple[np.ndarray, dict[int, float]]:
    """Each particle's motion coordinate predicted from its half set's codes (module
    docstring), and the kNN R² per half."""
    table = starfile.read(run / "particles.star", always_dict=True)["particles"]
    columns = sorted(c for c in table.columns if c.startswith("rlnDynaMightLatent"))
    codes, half_set = table[columns].to_numpy(), table["rlnDynaMightHalfSet"].to_numpy()
    truth = true_motion(data)
    estimate, r2 = np.empty_like(truth), {}
    for half in (1, 2):
        rows = half_set == half
        estimate[rows] = knn_predict(codes[rows], truth[rows])
        r2[half] = round(knn_r2(codes[rows], truth[rows]), 3)
    return estimate, r2


def backproject_true(data: Path, preset: str, out: Path, batch_size: int,
                     motion: np.ndarray | None = None, device: torch.device | None = None
                     ) -> int:
    """Both half maps of ``data``'s particles with the true motion model's displacement fields
    into ``out``, at the true motion coordinates or at ``motion`` (n,), backprojected on
    ``device``; returns the field's grid size."""
    device = torch.device("cpu") if device is None else device
    particles, _ = load_particle_set(str(data / "particles.star"), project_dir=str(data))
    motion = true_motion(data) if motion is None else motion
    structure = protein_like_structure(preset)
    reference = structure.deformed_positions(torch.zeros(1))[0]  # (n, 3) at t = 0
    box, pixel = particles.box_size, particles.pixel_size
    grid = choose_grid_size(reference, box, pixel)
    out.mkdir(parents=True, exist_ok=True)
    for half in (1, 2):
        rows = particles.indices_of_half(half)
        backprojector = DeformedBackprojector(box, pixel, device)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            m = torch.as_tensor(motion[batch], dtype=torch.float32)
            displacements = structure.deformed_positions(m) - reference[None]
            field = displacement_grid_from_gaussians(reference, displacements, box, pixel,
                                                     grid_size=grid).to(device)
            backprojector.add(particles.images.read(batch), particles.rotations[batch],
                              particles.shifts_angstrom[batch], particles.ctf.subset(batch),
                              field)
        write_map(out / f"map_half{half}.mrc", backprojector.reconstruct().cpu(), pixel)
    return grid


def decomposition(root: Path, job: Path, preset: str, batch_size: int = 64,
                  device: torch.device | None = None) -> dict[str, float]:
    """The moving region's gap closed by the true motion (``root/true_deformation``, made once
    per dataset) and by the true motion model at the codes' estimate of the motion
    (``job/true_model_at_codes``), scored as ``bench_quality.py`` scores a run."""
    data = root / "data"
    maps = {"gap_true_deformations": root / "true_deformation",
            "gap_true_model_at_codes": job / "true_model_at_codes"}
    if not (maps["gap_true_deformations"] / "map_half2.mrc").is_file():
        backproject_true(data, preset, maps["gap_true_deformations"], batch_size, None, device)
    backproject_true(data, preset, maps["gap_true_model_at_codes"], batch_size,
                     motion_from_codes(data, job)[0], device)
    return {key: compare_with_truth(data, {"rigid": root / "rigid", "deformed": folder,
                                           "upper": root / "upper"}).scores["moving_gap_closed"]
            for key, folder in maps.items()}


def null_spread(data: Path, folder: Path, shells: range, draws: int = 30) -> dict[int, float]:
    """Standard deviation per shell of the masked half-map FSC with the second half map's
    phases randomised beyond shell 16 (module docstring)."""
    half1, half2 = (read_map(folder / f"map_half{h}.mrc")[0] for h in (1, 2))
    mask = read_map(data / "mask.mrc")[0]
    box = half1.shape[-1]
    k = torch.fft.fftfreq(box) * box
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    generator = torch.Generator().manual_seed(0)
    curves = []
    for _ in range(draws):
        phases = torch.exp(2j * torch.pi * torch.rand(half2.shape, generator=generator))
        ft = torch.fft.fftn(half2)
        randomised = torch.fft.ifftn(torch.where(radius >= 16, ft * phases, ft)).real
        curves.append(fsc(half1 * mask, randomised * mask))
    spread = torch.stack(curves).std(0)
    return {s: round(float(spread[s]), 4) for s in shells}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="a dataset folder of bench_quality.py")
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--run", type=Path, default=None,
                        help="a run's job folder in the dataset, scored beside it")
    parser.add_argument("--motion-from-codes", action="store_true",
                        help="also backproject at the motion coordinates the --run's codes "
                             "predict (module docstring)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-id", default=None, help="GPU to backproject on (default: CPU)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root, data = args.dataset, args.dataset / "data"
    t0 = time.time()
    device = choose_device(args.gpu_id)
    out = root / "true_deformation"
    grid = backproject_true(data, args.preset, out, args.batch_size, None, device)
    seconds = time.time() - t0
    result = {"dataset": str(root), "grid": grid, "seconds": round(seconds, 1)}
    maps = {"true deformations": out}
    if args.motion_from_codes:
        if args.run is None:
            parser.error("--motion-from-codes needs --run")
        estimate, result["codes_knn_r2"] = motion_from_codes(data, args.run)
        maps["true model at the codes' motion"] = root / "true_deformation_from_codes"
        backproject_true(data, args.preset, maps["true model at the codes' motion"],
                         args.batch_size, estimate, device)
    if args.run is not None:
        maps["run"] = args.run / "backprojection"
    for label, folder in maps.items():
        scores = compare_with_truth(data, {"rigid": root / "rigid", "deformed": folder,
                                           "upper": root / "upper"}).scores
        result[label] = {key: scores[key] for key in KEYS}
        print(f"{label:32s} " + "  ".join(f"{key} {scores[key]}" for key in KEYS), flush=True)
    box = read_map(out / "map_half1.mrc")[0].shape[-1]
    result["null_fsc_sd"] = null_spread(data, out, range(box // 2 - 4, box // 2 + 1))
    print(f"masked half-map FSC under the null, sd per shell: {result['null_fsc_sd']}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
