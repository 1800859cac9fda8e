"""Does the map get better? The whole pipeline on realistic simulated data, scored against the
truth.

For each structure preset (``clamp``: two lobes moving 8-15 Å; ``twist-hinge``: a twisting
bundle plus a non-linear hinge; protein-like, about 320 residues at atomic density) and each
SNR, the script

1. simulates the dataset with ``dynamight simulate --preset`` (6,000 particles, box 64,
   1.5 Å/px, defocus 0.8-2.5 µm with astigmatism, shifts up to 6 Å; its consensus map is a
   rigid reconstruction of the particles) and the same particles without motion
   (``--no-motion``: same poses, CTFs, half sets and noise);
2. reconstructs both rigidly (``dynamight reconstruct``): the consensus half maps and the
   motion-free upper bound;
3. runs ``optimize-deformations`` with the command's defaults (plus any options given after
   ``--``) and ``deformable-backprojection``, timing each;
4. scores (:mod:`relion_external.truth_comparison`): FSC area against the true reference map
   (t = 0) of the averaged half maps in the moving and in the static region, and the fraction
   of the gap between the rigid and the motion-free maps that is closed; half-map FSC 0.143
   (soft mask) of rigid, deformed and motion-free maps, and how far the half-map FSC claims
   more than the truth supports (``sqrt(2 FSC / (1 + FSC))`` against the FSC with the truth,
   static region): a shared bias of the two halves would show there; the cross-validated kNN R²
   (k = 20) of the true motion from each half's latents, for all its particles and for its
   validation particles alone (never trained on);
5. unless ``--no-decomposition``: the moving region's gap closed when the same particles are
   backprojected with the true deformations (``gap_true_deformations``) and with the true
   motion model at the motion the codes predict (``gap_true_model_at_codes``;
   ``true_deformation_backprojection.py``): between them and the run lies what the codes and
   the learnt decoder lose.

One line per dataset goes to stdout and to ``results.json`` in the output directory. Reuses
simulated data and rigid maps already in the output directory.

Example (the table in RESULTS.md)::

    python benchmarks/bench_quality.py --output-directory /tmp/bench_quality \\
        --presets clamp twist-hinge --snrs 0.05 0.02
    # fewer particles, smaller model: a quick look on a laptop
    python benchmarks/bench_quality.py --output-directory /tmp/bq --presets clamp \\
        --snrs 0.05 --n-particles 3000 -- --n-gaussians 3000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

from _common import cpu_name, run_dynamight
from true_deformation_backprojection import decomposition

from dynamight_core.device import choose_device
from relion_external.truth_comparison import compare_with_truth


def score(root: Path, job: Path) -> dict:
    """Scores of one finished run (:mod:`relion_external.truth_comparison`), with the number
    of epochs trained."""
    result = compare_with_truth(root / "data", {"rigid": root / "rigid",
                                                "deformed": job / "backprojection",
                                                "upper": root / "upper"},
                                job / "particles.star")
    out = dict(result.scores)
    log = (job / "forward_deformations" / "loss_log.txt").read_text().splitlines()
    out["epochs"] = len(log)
    return out


def prepare_dataset(root: Path, simulate_options: list[str]) -> None:
    """``root/data`` and ``root/data_nomotion`` (``dynamight simulate`` with the options, and
    ``--no-motion``) and their rigid reconstructions ``root/rigid`` (the consensus half maps)
    and ``root/upper`` (the motion-free upper bound); what exists already is reused."""
    data, nomotion = root / "data", root / "data_nomotion"
    for folder, flags in ((data, []), (nomotion, ["--no-motion"])):
        if not (folder / "particles.star").is_file():
            run_dynamight(["simulate", "--output-directory", str(folder), *simulate_options,
                           *flags])
    for folder, source in ((root / "rigid", data), (root / "upper", nomotion)):
        if not (folder / "map_half2.mrc").is_file():
            run_dynamight(["reconstruct", "--refinement-star-file",
                           str(source / "particles.star"), "--output-directory", str(folder),
                           "--mask-file", str(data / "mask.mrc")])


def run_dataset(out: Path, preset: str, snr: float, args, extra: list[str]) -> dict:
    root = out / f"{preset}_snr{snr:g}"
    data = root / "data"
    common = ["--preset", preset, "--snr", str(snr), "--seed", str(args.seed)]
    for key in ("n_particles", "box_size", "pixel_size"):
        if getattr(args, key) is not None:
            common += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    prepare_dataset(root, common)
    job = root / args.job_name
    gpu = ["--gpu-id", args.gpu_id] if args.gpu_id is not None else []
    threads = ["--n-threads", str(args.n_threads)]
    t_train = run_dynamight(["optimize-deformations", "--refinement-star-file",
                             str(data / "particles.star"), "--initial-model",
                             str(data / "consensus_map.mrc"), "--output-directory", str(job),
                             *gpu, *threads, *extra])
    t_bp = run_dynamight(["deformable-backprojection", str(job), "--mask-file",
                          str(data / "mask.mrc"), *gpu, *threads])
    result = {"preset": preset, "snr": snr, "options": " ".join(extra) or "defaults",
              "train_s": round(t_train), "backprojection_s": round(t_bp)}
    result.update(score(root, job))
    if args.decomposition:  # where the learnt deformations lose (true_deformation_backprojection)
        device = choose_device(args.gpu_id)
        result.update(decomposition(root, job, preset, device=device))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-directory", type=Path, required=True)
    parser.add_argument("--presets", nargs="+", default=["clamp", "twist-hinge"])
    parser.add_argument("--snrs", nargs="+", type=float, default=[0.05, 0.02])
    parser.add_argument("--n-particles", type=int, default=None, help="default: the preset's")
    parser.add_argument("--box-size", type=int, default=None)
    parser.add_argument("--pixel-size", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-id", default=None)
    parser.add_argument("--n-threads", type=int, default=2)
    parser.add_argument("--job-name", default="dynamight",
                        help="folder of the DynaMight run inside each dataset's folder")
    parser.add_argument("--no-decomposition", dest="decomposition", action="store_false",
                        help="skip the gap closed by the true deformations and by the true "
                             "motion model at the codes' motion (about 30 s per dataset on "
                             "2 CPU cores)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]  # optimize-deformations options
    args.output_directory.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {cpu_name() if args.gpu_id is None else 'GPU'}, "
          f"threads {args.n_threads}", flush=True)
    results_file = args.output_directory / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for preset in args.presets:
        for snr in args.snrs:
            result = run_dataset(args.output_directory, preset, snr, args, args.extra)
            print("RESULT " + json.dumps(result), flush=True)
            results.append(result)
            results_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
