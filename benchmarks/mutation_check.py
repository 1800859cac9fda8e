"""Would the tests notice? Plant plausible bugs, one at a time, in a copy of the repository and
run the default test suite against each.

Each mutation replaces one exact piece of source text (it must occur exactly once, so a
refactoring that moves the code makes the script fail loudly rather than test nothing). The
suite runs in a temporary copy of the tracked files (``git ls-files``) with ``../shared``
reachable as in a checkout, stopping at the first failure (``-x``). A mutation is *caught*
when the suite fails; every mutation listed must be caught.

The list holds the training bugs an audit found the earlier suite blind to (issue 16: the CTF
dropped from the training model, the KL/prior term switched off, the regulariser dropped from
the loss, the consensus update anchored to the current model, half 2 resumed with half 1's
state, half 1's decoder in half 2's backprojection), plus physics and gold-standard bugs.

Usage::

    python benchmarks/mutation_check.py                 # all mutations, default suite
    python benchmarks/mutation_check.py --only ctf-dropped prior-dropped
    python benchmarks/mutation_check.py --list
    python benchmarks/mutation_check.py -- tests/test_half_set_trainer.py   # a subset of tests

Prints one line per mutation (caught / SURVIVED, seconds, first failing test) and exits 1 if
any survived.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    why: str


MUTATIONS = [
    Mutation("ctf-dropped", "dynamight_core/deformation_model.py",
             "lambda: (ctf_2d_rfft(batch.ctf, self.box_size, self.pixel_size),",
             "lambda: (torch.ones_like(ctf_2d_rfft(batch.ctf, self.box_size, self.pixel_size)),",
             "the training model's images (and their Jacobian) without the CTF"),
    Mutation("prior-dropped", "dynamight_core/latent_inference.py",
             "descent = data - p * offset",
             "descent = data",
             "the KL/prior term of the latent posterior switched off"),
    Mutation("beta-ignored", "dynamight_core/latent_inference.py",
             "precision = torch.bmm(weighted, weighted.transpose(1, 2)) / beta",
             "precision = torch.bmm(weighted, weighted.transpose(1, 2))",
             "the KL weight beta left out of the posterior precision"),
    Mutation("regulariser-dropped", "dynamight_core/half_set_trainer.py",
             "loss = loss + self.regularization_weight * reg_mean",
             "loss = loss + 0.0 * reg_mean",
             "distance preservation and repulsion dropped from the loss"),
    Mutation("consensus-anchored-to-current", "dynamight_core/half_set_trainer.py",
             "offset = self.model.gaussians.positions.detach() - self.initial_positions",
             "offset = 0.0 * self.initial_positions",
             "consensus update chooses particles closest to the current, not the initial model"),
    Mutation("half2-resumed-with-half1", "dynamight_core/deformation_training.py",
             "HalfSetTrainer.from_state_dict(state[\"halves\"][str(half)], self.device)",
             "HalfSetTrainer.from_state_dict(state[\"halves\"][\"1\"], self.device)",
             "resuming loads half 1's state into both halves"),
    Mutation("half1-decoder-in-half2-map", "relion_external/commands/deformable_backprojection.py",
             "run.models[half], lambda batch: run.latents(half, batch)",
             "run.models[1], lambda batch: run.latents(half, batch)",
             "half 2's backprojection deformed by half 1's decoder"),
    Mutation("latents-from-other-half", "relion_external/forward_run.py",
             "return self.trainers[half].latents_for(batch)",
             "return self.trainers[3 - half].latents_for(batch)",
             "the later stages read each particle's code from the other half"),
    Mutation("validation-trained", "dynamight_core/deformation_training.py",
             "train = np.flatnonzero(members & ~self.validation.numpy())",
             "train = np.flatnonzero(members)",
             "validation particles trained on"),
    Mutation("noise-weights-ignored", "dynamight_core/latent_inference.py",
             "return multiplicity * (noise_weights > 0) * noise_weights * noise_norm",
             "return multiplicity * (noise_weights > 0) * noise_norm",
             "the inference ignores the noise spectrum"),
    Mutation("origin-sign", "dynamight_core/shift.py",
             "return phase_ramp_2d_rfft(-shifts_angstrom / pixel_size, box_size)",
             "return phase_ramp_2d_rfft(shifts_angstrom / pixel_size, box_size)",
             "images moved by +rlnOrigin instead of -rlnOrigin"),
    Mutation("no-code-update", "dynamight_core/half_set_trainer.py",
             "mean = gauss_newton_step(z, descent, precision, self.config.max_latent_step)",
             "mean = z",
             "training never updates the latent codes"),
]


def _copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"],
                               cwd=REPO, check=True, capture_output=True
                               ).stdout.decode().split("\0")
    for name in filter(None, files + untracked):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _apply(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"{mutation.name}: the text to replace occurs {count} times in "
                         f"{mutation.path} (expected once); update the mutation list")
    path.write_text(text.replace(mutation.old, mutation.new))


def run(mutation: Mutation, pytest_args: list[str]) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-",
                                     dir=REPO.parent) as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        _copy_repository(root)
        _apply(root, mutation)
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
        # ../shared beside the copy, as beside a checkout
        shared = REPO.parent / "shared"
        if shared.is_dir():
            (Path(tmp) / "shared").symlink_to(shared)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *pytest_args], cwd=root, env=env,
                              capture_output=True, text=True, check=False)
        elapsed = time.time() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
    caught = proc.returncode != 0
    return caught, elapsed, failed[0] if failed else proc.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="mutation names")
    parser.add_argument("--list", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1:]
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.path}: {m.why}")
        return 0
    survived = []
    for m in chosen:
        caught, seconds, detail = run(m, pytest_args)
        print(f"{m.name:32s} {'caught' if caught else 'SURVIVED':9s} {seconds:6.0f} s  {detail}",
              flush=True)
        if not caught:
            survived.append(m.name)
    print(f"{len(chosen) - len(survived)}/{len(chosen)} caught"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
