"""Seconds per 10,000 particles for each stage of the whole pipeline, in one line.

Simulates a dataset with ``dynamight simulate --preset`` (reused if the folder holds one), then
runs ``optimize-deformations`` (its defaults, plus any options given after ``--``),
``optimize-inverse-deformations`` and ``deformable-backprojection`` as a user would, timing each
stage's wall clock, and prints::

    seconds per 10,000 particles: optimize-deformations T (E epochs, T/E per epoch),
    optimize-inverse-deformations I, deformable-backprojection B; total S

Wall time includes each command's start-up (model set-up, the motion-mode start, reading the
particles), as a user waits for it.

Example::

    python benchmarks/bench_pipeline.py --output-directory /tmp/bp --n-particles 2000 \\
        --n-threads 2 -- --n-gaussians 2000 --n-epochs 5
    python benchmarks/bench_pipeline.py --output-directory /tmp/bp --gpu-id 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common

import starfile
from _common import run_dynamight


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-directory", type=Path, required=True)
    parser.add_argument("--preset", default="twist-hinge")
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--n-particles", type=int, default=None, help="default: the preset's")
    parser.add_argument("--box-size", type=int, default=None)
    parser.add_argument("--gpu-id", default=None)
    parser.add_argument("--n-threads", type=int, default=2)
    args = parser.parse_args(argv)

    out = args.output_directory
    data, job = out / "data", out / "job"
    if not (data / "particles.star").is_file():
        simulate = ["simulate", "--output-directory", str(data), "--preset", args.preset,
                    "--snr", str(args.snr)]
        for key in ("n_particles", "box_size"):
            if getattr(args, key) is not None:
                simulate += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        run_dynamight(simulate)
    common = (["--gpu-id", args.gpu_id] if args.gpu_id is not None else []) + [
        "--n-threads", str(args.n_threads)]
    train = run_dynamight(["optimize-deformations", "--refinement-star-file",
                  str(data / "particles.star"), "--initial-model",
                  str(data / "consensus_map.mrc"), "--output-directory", str(job),
                  *common, *extra])
    inverse = run_dynamight(["optimize-inverse-deformations", str(job), *common])
    backprojection = run_dynamight(["deformable-backprojection", str(job), "--mask-file",
                           str(data / "mask.mrc"), *common])
    table = starfile.read(data / "particles.star")
    n = len(table["particles"] if isinstance(table, dict) else table)
    epochs = len((job / "forward_deformations" / "loss_log.txt").read_text().splitlines())
    per = 10_000 / n
    result = {"particles": n, "epochs": epochs, "train_s": train, "inverse_s": inverse,
              "backprojection_s": backprojection,
              "options": " ".join(extra) or "defaults", "gpu_id": args.gpu_id}
    print(f"seconds per 10,000 particles: optimize-deformations {train * per:.0f} ({epochs} "
          f"epochs, {train * per / max(epochs, 1):.1f} per epoch), "
          f"optimize-inverse-deformations {inverse * per:.0f}, "
          f"deformable-backprojection {backprojection * per:.0f}; "
          f"total {(train + inverse + backprojection) * per:.0f} "
          f"({n} particles, {'GPU ' + args.gpu_id if args.gpu_id is not None else 'CPU'}, "
          f"options: {result['options']})", flush=True)
    (out / "pipeline_times.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
