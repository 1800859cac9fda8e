"""Helpers for the tests of the core's GPU kernels (``test_tangent_kernel.py``,
``test_splat_kernel.py``, ``test_lookup_kernel.py``, ``test_decoder_pass_kernel.py``,
``test_mlp_kernel.py``).

A kernel runs on a CUDA device or, where Triton is installed, in Triton's CPU interpreter. The
interpreter is chosen by ``TRITON_INTERPRET=1`` when a kernel is defined, so every check runs in
a subprocess (:func:`run_check`) with its own environment.

- :data:`HAS_TRITON`, :data:`NO_TRITON`: whether Triton imports, and the skip reason if not.
- :data:`TRITON_VERSION`, :data:`OLD_INTERPRETER`, :data:`OLD_INTERPRETER_REASON`: Triton's
  (major, minor) version, and whether its interpreter is one that cannot run the kernels whose
  loop bound comes from the program id (the MLP backward and the lookup kernel). Measured:
  3.6.0 (the lent GPU machines' version) fails there, 3.9.0 runs them; the compiled kernels are
  not affected (the lookup kernel passed its GPU test under 3.6.0).
- :func:`skip_if_interpreting`: the CPU path's tests skip where the interpreter is on.
- :func:`run_check` runs a check script in a subprocess, one kernel switched on and the other
  kernels off (each test file checks one kernel alone), and returns its output.
- :func:`training_comparison` is such a script: joint epochs (two by default) of a half-set
  trainer (after warm-up epochs if asked) with a kernel and with the torch code, whose codes,
  Gaussians and statistics must agree to float32 rounding.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "Triton is not installed (CUDA builds of torch bring it; the CPU wheel does not)"


def _triton_version() -> tuple[int, int]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = version("triton").split(".")[:2]
        return int(major), int(minor)
    except (PackageNotFoundError, ValueError):
        return (0, 0)


TRITON_VERSION = _triton_version()
OLD_INTERPRETER = HAS_TRITON and TRITON_VERSION < (3, 9)
OLD_INTERPRETER_REASON = (
    f"Triton {TRITON_VERSION[0]}.{TRITON_VERSION[1]}'s CPU interpreter cannot run a loop whose "
    "bound is computed from the program id (3.6.0: TypeError 'only 0-dimensional arrays can be "
    "converted to Python scalars'); 3.9 can, and the compiled kernels are not affected")
# each kernel's switch (the environment variable that selects the torch code with "0")
SWITCHES = {"tangent": "DYNAMIGHT_FUSED_TANGENTS", "splat": "DYNAMIGHT_FUSED_SPLAT",
            "lookup": "DYNAMIGHT_FUSED_LOOKUP", "decoder_pass": "DYNAMIGHT_FUSED_DECODER_PASS",
            "mlp": "DYNAMIGHT_FUSED_MLP"}


def skip_if_interpreting() -> None:
    """A test of the CPU path skips where ``TRITON_INTERPRET=1`` would run the kernels on the
    CPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel would run on the CPU")


def run_check(kernel: str, script: str, device: str, *, interpret: bool) -> str:
    """Run ``script`` (argument: ``device``) with ``kernel``'s own switch left to the script
    and every other kernel off; ``interpret``: in Triton's CPU interpreter."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    others = {switch: "0" for name, switch in SWITCHES.items() if name != kernel}
    env = {**os.environ, **others, "PYTHONPATH": path,
           **({"TRITON_INTERPRET": "1"} if interpret else {})}
    result = subprocess.run([sys.executable, "-c", script, device], env=env, cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


_TRAINING = textwrap.dedent("""
    import os, sys
    import numpy as np, torch
    sys.path.insert(0, "benchmarks")
    import bench_optimize_deformations as bench
    from dynamight_core.gaussian_model import init_gaussians_from_map
    from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
    from dynamight_core.simulation import consensus_map
    from dynamight_core import {module} as kernel

    device = torch.device(sys.argv[1])
    torch.set_num_threads(1)
    particles, structure = bench._dataset(32, 6.0, 64, 0)
    gaussians, _ = init_gaussians_from_map(consensus_map(structure, 32, 6.0), 6.0, 300, None, 1,
                                           torch.Generator().manual_seed(0))
    results = {{}}
    for fused in ("0", "1"):
        os.environ["{switch}"] = fused
        config = TrainerConfig(box_size=32, pixel_size=6.0, n_gaussians=gaussians.n_gaussians,
                               n_warmup_epochs={warmup}, latent_dim=3, n_linear_layers=2,
                               decoder_precision="float32")
        trainer = HalfSetTrainer(1, config, gaussians, np.arange(64), device)
        trainer.initialise_noise(bench._batches(particles, np.arange(64), 32, device))
        for _ in range({warmup} + {joint}):  # warm-up epochs (Gaussians alone), joint epochs
            stats = trainer.train_epoch(bench._batches(particles, trainer.epoch_order(), 32,
                                                       device))
        results[fused] = (trainer.latents.detach().cpu().clone(),
                          trainer.model.gaussians.positions.detach().cpu().clone(), stats)
    assert not kernel._FAILED, kernel._FAILED
    (z0, p0, s0), (z1, p1, s1) = results["0"], results["1"]
    assert z0.abs().max() > 0.01, "the codes did not move"
    error = float((z1 - z0).norm() / z0.norm())
    assert error < 1e-3, error
    moved = float((p0 - gaussians.positions).norm())
    assert moved > 0 and float((p1 - p0).norm()) < 1e-3 * moved
    for key in ("data", "kl"):
        assert abs(s1[key] - s0[key]) <= 1e-4 * abs(s0[key]) + 1e-6, (key, s0[key], s1[key])
    print("codes after {joint} joint epochs, fused against torch: relative difference", error)
""")


def training_comparison(kernel: str, warmup_epochs: int = 0, joint_epochs: int = 2) -> str:
    """The training check script for ``kernel`` (a key of :data:`SWITCHES`; module docstring), with
    ``warmup_epochs`` before ``joint_epochs`` joint ones."""
    return _TRAINING.format(module=f"_{kernel}_kernel", switch=SWITCHES[kernel],
                            warmup=int(warmup_epochs), joint=int(joint_epochs))
