"""Training speed side by side with the reference DynaMight, same data, settings and device.

The reference is github.com/3dem/DynaMight, read from a checkout (``--reference-source``; e.g.
``git archive`` of its repository unpacked somewhere). Nothing of it is part of this project.
On one machine this script:

1. simulates a dataset with ``dynamight simulate`` (``--preset``, ``--n-particles``,
   ``--box-size``), so both programs read the same RELION particles STAR, stack and consensus
   map;
2. runs this project's ``optimize-deformations`` with the reference's model size (30,000
   Gaussians, 6 latent dimensions, 8 × 32 decoder, batch 128; each can be set) for
   ``--n-epochs`` epochs, early stopping off;
3. runs the reference's ``optimize_deformations`` with the same options in a child process of
   this script (``reference`` mode below) for at most ``--reference-seconds``;
4. prints each program's epoch times and the speed of its joint epochs (the reference's
   warm-up epochs fit only the consensus) as *particles in the STAR file per second of epoch
   wall time* for both, and their ratio.

The reference's epoch time is what it prints itself ("Epoch: E Epoch time: T", the time of
epoch E - 1, from the regularisation weight's calibration to the end of its logging). This
project's epoch time is its training particles divided by the particles/s it logs (training
and the held-out evaluation). The median of the joint epochs after the first two of each
program is compared: the first joint epochs of both do one-off work.

How the reference is run (``reference`` mode): its package imports every command, the latent
explorer's GUI included, so modules that ``optimize-deformations`` does not use and the GPU
machines lack (napari, PyQt5, qtpy, magicgui, umap, tsnecuda, Bio, voxelium, torchvision)
and matplotlib's Qt canvas, are replaced by placeholders that fail if called, and TensorBoard's ``SummaryWriter`` by one
that writes nothing. The figures are still drawn. So the reference does a little less per
epoch than on its own (no TensorBoard files), which favours the reference in the ratio. Its
dependencies tqdm, typer and scikit-learn must be importable (on a GPU machine: carried as
wheels).

Examples::

    # on the CPU, tiny (a dry run of the whole procedure)
    python benchmarks/reference_side_by_side.py --reference-source /tmp/refdm \\
        --work-directory /tmp/sbs --device cpu --n-particles 400 --box-size 32 \\
        --n-gaussians 2000 --n-epochs 6 --reference-seconds 300
    # on one GPU
    python benchmarks/reference_side_by_side.py --reference-source .reference_dynamight \\
        --work-directory /tmp/sbs --device cuda --n-particles 6000 --box-size 128 --n-epochs 8
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import re
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PLACEHOLDER_PACKAGES = ("napari", "PyQt5", "qtpy", "magicgui", "umap", "tsnecuda", "Bio",
                        "voxelium", "torchvision")
PLACEHOLDER_MODULES = ("matplotlib.backends.backend_qt5agg",)


# -- reference mode: the reference's optimize_deformations in this process -----------------
class _Missing:
    """Stands for anything of a placeholder module; fails when used."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a placeholder: optimize-deformations should not "
                           "call it (reference_side_by_side.py)")

    def __getattr__(self, attr: str):
        return _Missing(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # usable as a base class
        return (object,)


class _Placeholder(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Placeholder modules for the packages in ``PLACEHOLDER_PACKAGES`` that are not
    installed (after every real finder)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in PLACEHOLDER_PACKAGES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _SummaryWriter:
    """TensorBoard's ``SummaryWriter`` writing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, attr: str):
        return lambda *args, **kwargs: None


def run_reference(args: argparse.Namespace) -> None:
    sys.meta_path.append(_PlaceholderFinder())
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = _SummaryWriter
    sys.modules["torch.utils.tensorboard"] = tensorboard
    for name in PLACEHOLDER_MODULES:  # the GUI's matplotlib canvas
        sys.modules[name] = _Placeholder(name)
    sys.path.insert(0, str(Path(args.reference_source).resolve()))
    from dynamight.deformations.optimize_deformations import optimize_deformations

    optimize_deformations(
        refinement_star_file=Path(args.star), output_directory=Path(args.output_directory),
        initial_model=Path(args.initial_model), n_gaussians=args.n_gaussians,
        n_latent_dimensions=args.n_latent_dimensions, n_linear_layers=args.n_linear_layers,
        n_neurons_per_layer=args.n_neurons_per_layer, batch_size=args.batch_size,
        gpu_id=None if args.gpu_id < 0 else args.gpu_id, n_epochs=args.n_epochs,
        n_threads=args.n_threads)


# -- compare mode ---------------------------------------------------------------------------
REFERENCE_EPOCH = re.compile(r"Epoch:\s+(\d+)\s+Epoch time:\s+([0-9.eE+-]+)")
OWN_TRAINING = re.compile(r"(\d+) \+ (\d+) particles, \d+ held out for validation")
OWN_EPOCH = re.compile(r"epoch (\d+)/\d+ \((warm-up|joint)\):.* ([0-9.]+) particles/s")


def reference_epochs(text: str, n_warmup: int) -> list[tuple[int, float, bool]]:
    """``(epoch, seconds, joint)`` from the reference's log: "Epoch: E Epoch time: T" is the
    time of epoch E - 1 (0-based; epochs below ``n_warmup`` are warm-up)."""
    out = []
    for match in REFERENCE_EPOCH.finditer(text):
        epoch, seconds = int(match.group(1)) - 1, float(match.group(2))
        if epoch >= 0 and seconds > 0:
            out.append((epoch, seconds, epoch >= n_warmup))
    return out


def own_epochs(text: str, n_train: int) -> list[tuple[int, float, bool]]:
    """``(epoch, seconds, joint)`` from this project's log (training particles / the logged
    particles/s)."""
    return [(int(m.group(1)), n_train / float(m.group(3)), m.group(2) == "joint")
            for m in OWN_EPOCH.finditer(text) if float(m.group(3)) > 0]


def joint_speed(epochs: list[tuple[int, float, bool]], n_particles: int, skip: int = 2):
    """(particles/s of the median joint epoch after the first ``skip``, how many were used)."""
    joint = [s for _, s, j in epochs if j]
    used = joint[skip:] if len(joint) > skip else joint
    if not used:
        return float("nan"), 0
    return n_particles / statistics.median(used), len(used)


def _count_particles(star: Path) -> int:
    """Particles in ``star``."""
    import starfile

    return len(starfile.read(star, always_dict=True)["particles"])


def _run(command: list[str], log: Path, timeout: float | None = None) -> tuple[str, float, bool]:
    """Run ``command``; its output into ``log``; (output, wall s, finished)."""
    t0, finished = time.perf_counter(), True
    with open(log, "w") as out:
        try:
            subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                           cwd=REPOSITORY, check=False)
        except subprocess.TimeoutExpired:
            finished = False
    return log.read_text(errors="replace"), time.perf_counter() - t0, finished


def compare(args: argparse.Namespace) -> None:
    work = Path(args.work_directory)
    data = work / "data"
    cli = [sys.executable, "-m", "relion_external.cli"]
    gpu = [] if args.device == "cpu" else ["--gpu-id", "0"]
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "particles.star").exists():
        subprocess.run(cli + ["simulate", "--output-directory", str(data), "--preset",
                              args.preset, "--n-particles", str(args.n_particles),
                              "--box-size", str(args.box_size)], check=True, cwd=REPOSITORY)
    star, initial = data / "particles.star", data / "consensus_map.mrc"
    n_all = _count_particles(star)
    model = ["--n-gaussians", str(args.n_gaussians), "--n-latent-dimensions",
             str(args.n_latent_dimensions), "--n-linear-layers", str(args.n_linear_layers),
             "--n-neurons-per-layer", str(args.n_neurons_per_layer), "--batch-size",
             str(args.batch_size)]
    print(f"### {n_all} particles, box {args.box_size}, {args.n_gaussians} Gaussians, "
          f"{args.n_latent_dimensions} latent dimensions, decoder {args.n_linear_layers} x "
          f"{args.n_neurons_per_layer}, batch {args.batch_size}, device {args.device}",
          flush=True)

    own_dir, ref_dir = work / "own", work / "reference"
    for folder in (own_dir, ref_dir):  # fresh runs, not continued from a checkpoint
        shutil.rmtree(folder, ignore_errors=True)
    text, wall, _ = _run(cli + ["optimize-deformations", "--refinement-star-file", str(star),
                                "--initial-model", str(initial), "--output-directory",
                                str(own_dir), "--n-epochs", str(args.n_epochs),
                                "--early-stopping-patience", "0", "--n-threads",
                                str(args.n_threads)] + model + gpu + args.own_options,
                         work / "own.log")
    training = OWN_TRAINING.search(text)  # "N1 + N2 particles, M held out for validation"
    own = own_epochs(text, int(training[1]) + int(training[2])) if training else []
    if not own:
        raise SystemExit(f"no epochs in {work / 'own.log'}:\n{text[-3000:]}")

    ref_text, ref_wall, finished = _run(
        [sys.executable, __file__, "reference", "--reference-source", args.reference_source,
         "--star", str(star), "--initial-model", str(initial), "--output-directory",
         str(ref_dir), "--gpu-id", "-1" if args.device == "cpu" else "0", "--n-epochs",
         str(args.n_epochs), "--n-threads", str(args.n_threads)] + model,
        work / "reference.log", timeout=args.reference_seconds)
    # the reference tees what it prints into std.out, flushed at every write (its buffered
    # stdout may lose the last lines when it is stopped); the log until it got that far
    stdout_copy = ref_dir / "std.out"
    if stdout_copy.exists():
        ref_text = stdout_copy.read_text(errors="replace")
    ref = reference_epochs(ref_text, args.reference_warmup_epochs)
    if not any(j for _, _, j in ref):
        raise SystemExit(f"no joint epochs of the reference in {work / 'reference.log'} "
                         f"({'finished' if finished else 'stopped'} after {ref_wall:.0f} s):\n"
                         f"{ref_text[-3000:]}")
    batch = re.findall(r"Using a batch size of (\d+)", ref_text)

    for name, epochs in (("this project", own), ("reference", ref)):
        print(f"{name}: epoch seconds " + ", ".join(
            f"{e}{'' if j else 'w'}:{s:.2f}" for e, s, j in epochs), flush=True)
    own_speed, own_n = joint_speed(own, n_all)
    ref_speed, ref_n = joint_speed(ref, n_all)
    print(f"reference batch size in use: {batch[-1] if batch else 'not printed'}; reference "
          f"{'finished' if finished else f'stopped at {args.reference_seconds:.0f} s'}; "
          f"wall s: this project {wall:.0f}, reference {ref_wall:.0f}")
    print(f"RESULT side_by_side box {args.box_size} particles {n_all} device {args.device}: "
          f"this project {own_speed:.0f} particles/s (median of {own_n} joint epochs), "
          f"reference {ref_speed:.0f} particles/s (median of {ref_n}), ratio "
          f"{own_speed / ref_speed:.1f}x", flush=True)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-gaussians", type=int, default=30000)
    parser.add_argument("--n-latent-dimensions", type=int, default=6)
    parser.add_argument("--n-linear-layers", type=int, default=8)
    parser.add_argument("--n-neurons-per-layer", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-epochs", type=int, default=8)
    parser.add_argument("--n-threads", type=int, default=4)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reference"]:
        parser = argparse.ArgumentParser(prog="reference_side_by_side.py reference")
        parser.add_argument("--reference-source", required=True)
        parser.add_argument("--star", required=True)
        parser.add_argument("--initial-model", required=True)
        parser.add_argument("--output-directory", required=True)
        parser.add_argument("--gpu-id", type=int, default=0, help="-1: CPU")
        _model_args(parser)
        run_reference(parser.parse_args(argv[1:]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-source", required=True,
                        help="a checkout of github.com/3dem/DynaMight (the folder holding "
                             "the dynamight package)")
    parser.add_argument("--work-directory", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--preset", default="clamp")
    parser.add_argument("--n-particles", type=int, default=6000)
    parser.add_argument("--box-size", type=int, default=128)
    parser.add_argument("--reference-seconds", type=float, default=300,
                        help="stop the reference after this long (default 300)")
    parser.add_argument("--reference-warmup-epochs", type=int, default=3,
                        help="the reference's n_warmup_epochs (its default 3)")
    _model_args(parser)
    parser.add_argument("own_options", nargs="*",
                        help="after --: more options for this project's command")
    compare(parser.parse_args(argv))


if __name__ == "__main__":
    main()
