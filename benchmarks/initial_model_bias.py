"""Does the shared starting model bias the two halves? One dataset of ``bench_quality.py``,
trained again with a different starting model, scored against the truth the same way.

``optimize-deformations`` fits one Gaussian model to the consensus map and gives it to both
half sets. The consensus map is made from all particles, so it holds the noise of both halves:
each half starts from a model that contains the other half's noise, and the codes of its
particles are fitted against it (a pose-free cousin of "Einstein from noise"). Shared features
that are not in the truth then show up as half-map FSC that the truth does not support
(``claim_excess_deformed``). Variants:

- ``consensus``: the command as it is (the baseline, same as ``bench_quality.py``);
- ``independent``: the consensus map of *other* particles of the same structure and motion (same
  preset, SNR and count, particle seed + 1): a starting model that holds no noise of either half;
- ``half-maps``: gold standard: each half's Gaussians fitted to its own rigid half map
  (``rigid/map_half{1,2}.mrc`` of the dataset, each shell scaled by the half maps' FSC), from
  positions placed in the consensus map. Nothing of one half reaches the other.

This is an experiment on the method (a monkeypatch of the command's model set-up), not an
option of the command. One ``RESULT`` line with the scores of ``bench_quality.score``.

Example (after ``bench_quality.py --output-directory /tmp/bench_quality ...``)::

    python benchmarks/initial_model_bias.py /tmp/bench_quality/clamp_snr0.02 --variant half-maps \\
        -- --n-gaussians 2000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import starfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import score

from dynamight_core import deformation_training as training
from dynamight_core.fsc import filter_shells, fsc
from dynamight_core.gaussian_projection import render_gaussians_3d
from relion_external.cli import main as dynamight
from relion_external.commands import optimize_deformations as od
from relion_external.commands import simulate as sim
from relion_external.map_io import read_map


def _independent_consensus(root: Path, out: Path) -> Path:
    """Consensus map of other particles of the same structure (structure seed kept, particle
    seed + 1)."""
    target = out / "independent_particles"
    if not (target / "consensus_map.mrc").is_file():
        opt = starfile.read(root / "data" / "particles.star")["optics"]
        n = len(starfile.read(root / "data" / "particles.star")["particles"])
        preset = "twist-hinge" if "twist" in root.name else "clamp"
        snr = root.name.split("snr")[-1]
        real = sim.protein_like_structure
        sim.protein_like_structure = lambda p, seed=0: real(p, seed=0)
        try:
            if dynamight(["simulate", "--output-directory", str(target), "--preset", preset,
                          "--snr", snr, "--n-particles", str(n),
                          "--box-size", str(int(opt["rlnImageSize"][0])),
                          "--pixel-size", str(float(opt["rlnImagePixelSize"][0])),
                          "--seed", "1"]) != 0:
                raise SystemExit("simulate failed")
        finally:
            sim.protein_like_structure = real
    return target / "consensus_map.mrc"


def _fit_each_half_to_its_own_map(root: Path) -> None:
    halves = {h: read_map(root / "rigid" / f"map_half{h}.mrc")[0] for h in (1, 2)}
    weight = fsc(halves[1], halves[2]).clamp(0.0, 1.0)
    weight[0] = 1.0
    targets = {h: filter_shells(halves[h], weight) for h in (1, 2)}
    real_fit, real_trainer, unfitted = od.fit_gaussians_to_map, training.HalfSetTrainer, {}

    def remember_then_fit(model, volume, voxel, n_steps, render):
        unfitted.update(model=copy.deepcopy(model), voxel=voxel, n_steps=n_steps,
                        box=volume.shape[-1])
        return real_fit(model, volume, voxel, n_steps, render)  # the shared fit: mask only

    def trainer_with_own_model(half, config, gaussians, *rest, **kw):
        own = copy.deepcopy(unfitted["model"])

        def render(positions, sigmas, masses):
            return render_gaussians_3d(positions, torch.exp(own.log_sigmas),
                                       own.amplitudes[own.class_index], own.class_index,
                                       unfitted["box"], unfitted["voxel"])

        real_fit(own, targets[half].to(own.positions.device), unfitted["voxel"],
                 unfitted["n_steps"], render)
        return real_trainer(half, config, own, *rest, **kw)

    od.fit_gaussians_to_map = remember_then_fit
    training.HalfSetTrainer = trainer_with_own_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="one dataset folder of bench_quality.py")
    parser.add_argument("--variant", choices=["consensus", "independent", "half-maps"],
                        required=True)
    parser.add_argument("--n-threads", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]
    root = args.dataset
    job = root / f"bias_{args.variant}"
    initial = root / "data" / "consensus_map.mrc"
    if args.variant == "independent":
        initial = _independent_consensus(root, root)
    elif args.variant == "half-maps":
        _fit_each_half_to_its_own_map(root)
    threads = ["--n-threads", str(args.n_threads)]
    for command in (["optimize-deformations", "--refinement-star-file",
                     str(root / "data" / "particles.star"), "--initial-model", str(initial),
                     "--output-directory", str(job), *threads, *extra],
                    ["deformable-backprojection", str(job), "--mask-file",
                     str(root / "data" / "mask.mrc"), *threads]):
        if dynamight(command) != 0:
            raise SystemExit(f"dynamight {command[0]} failed")
    result = {"dataset": str(root), "variant": args.variant, "options": " ".join(extra)}
    result.update(score(root, job))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
