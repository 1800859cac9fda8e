"""Does the temporal prior help on time series (liquid-phase EM movies, TEMPOR)? The same
simulated series trained with the standard prior and with ``--temporal-prior``, same options
and the same number of epochs, scored against the truth.

1. ``dynamight simulate --tracks N --frames T --preset P --snr S`` (molecules imaged frame
   after frame, the motion coordinate drifting and diffusing smoothly, the pose turning
   smoothly; whole tracks in one half set) and the same particles without motion
   (``--no-motion``: the motion-free upper bound);
2. rigid reconstructions of both (the consensus half maps and the upper bound);
3. ``optimize-deformations`` without and with ``--temporal-prior`` (``--n-epochs E
   --early-stopping-patience 0``, so both train the same epochs; plus any options given after
   ``--``) and ``deformable-backprojection``, timing each;
4. scores as ``bench_quality.py`` (:mod:`relion_external.truth_comparison`): per-half kNN R²
   of the true motion from the latents, moving- and static-region FSC areas against the true
   reference map, the fraction of the rigid-to-motion-free gap closed.

Example (the table in RESULTS.md)::

    python benchmarks/bench_temporal.py --output-directory /tmp/bench_temporal \\
        --preset clamp --tracks 80 --frames 50 --snr 0.02 --n-epochs 30 -- --n-gaussians 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, bench_quality

from _common import cpu_name, run_dynamight
from bench_quality import prepare_dataset, score


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-directory", type=Path, required=True)
    parser.add_argument("--preset", default="clamp")
    parser.add_argument("--tracks", type=int, default=80)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--snr", type=float, default=0.02)
    parser.add_argument("--n-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-id", default=None)
    parser.add_argument("--n-threads", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]
    root = args.output_directory
    root.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {cpu_name() if args.gpu_id is None else 'GPU'}, "
          f"threads {args.n_threads}", flush=True)
    data = root / "data"
    prepare_dataset(root, ["--preset", args.preset, "--snr", str(args.snr), "--seed",
                           str(args.seed), "--tracks", str(args.tracks), "--frames",
                           str(args.frames)])
    gpu = ["--gpu-id", args.gpu_id] if args.gpu_id is not None else []
    threads = ["--n-threads", str(args.n_threads)]
    results = []
    for name, flags in (("standard", []), ("temporal", ["--temporal-prior"])):
        job = root / name
        t_train = run_dynamight(["optimize-deformations", "--refinement-star-file",
                        str(data / "particles.star"), "--initial-model",
                        str(data / "consensus_map.mrc"), "--output-directory", str(job),
                        "--n-epochs", str(args.n_epochs), "--early-stopping-patience", "0",
                        *gpu, *threads, *flags, *extra])
        t_bp = run_dynamight(["deformable-backprojection", str(job), "--mask-file",
                     str(data / "mask.mrc"), *gpu, *threads])
        result = {"prior": name, "preset": args.preset, "snr": args.snr,
                  "tracks": args.tracks, "frames": args.frames,
                  "options": " ".join(flags + extra) or "defaults",
                  "train_s": round(t_train), "backprojection_s": round(t_bp)}
        result.update(score(root, job))
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
        (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
