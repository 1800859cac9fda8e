"""The fused latent-tangent kernel (dynamight_core/_tangent_kernel.py) against autograd.

The truth is the Jacobian ``∂out/∂z`` of the decoder MLP computed by autograd in float64. The
kernel runs on a CUDA device (marker ``gpu``) or, where Triton is installed, in Triton's CPU
interpreter (a subprocess: ``TRITON_INTERPRET`` is read when the kernel is defined). The CPU
wheel of torch brings no Triton: there the plain torch code runs and these tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dynamight_core._latent_mlp import LatentConditionedMLP
from dynamight_core._tangent_kernel import fused_tangents_usable

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None

CHECK = textwrap.dedent("""
    import os, sys, torch
    from dynamight_core._latent_mlp import LatentConditionedMLP
    from dynamight_core._tangent_kernel import fused_tangents_usable

    def autograd_tangents(net, positions, z):  # (b, d, m, 3), float64
        net64 = LatentConditionedMLP(**net.config).double()
        net64.load_state_dict(net.state_dict())
        jac = torch.autograd.functional.jacobian(
            lambda zz: net64._mlp(positions.double(), zz), z.double())  # (b, m, 3, b, d)
        return torch.stack([jac[i, :, :, i, :] for i in range(z.shape[0])]).permute(0, 3, 1, 2)

    device = torch.device(sys.argv[1])
    torch.manual_seed(0)
    worst = 0.0
    # latent dims, hidden layers, width, Gaussians, particles
    for d, layers, width, m, b in ((6, 8, 32, 300, 3), (2, 2, 32, 257, 2), (1, 0, 16, 70, 2),
                                   (3, 1, 64, 33, 1)):
        net = LatentConditionedMLP(64, 1.5, d, width, layers, 10)
        torch.nn.init.normal_(net.output_layer.weight, std=0.3)
        net = net.to(device)
        positions = (torch.randn(m, 3) * 20).to(device)
        z = torch.randn(b, d).to(device)
        truth = autograd_tangents(net.cpu(), positions.cpu(), z.cpu())
        net = net.to(device)
        for precision, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            results = {}
            for fused in ("0", "1"):
                os.environ["DYNAMIGHT_FUSED_TANGENTS"] = fused
                with torch.autocast(device.type, dtype=precision,
                                    enabled=precision != torch.float32):
                    out, tangents = net._mlp_and_tangents(positions, z)
                    usable = fused_tangents_usable(out.detach(), width)
                assert usable == (fused == "1"), (fused, usable)
                assert tangents.shape == (b, d, m, 3) and torch.isfinite(tangents).all()
                error = float((tangents.double().cpu() - truth).norm() / truth.norm())
                assert error < tolerance, (d, layers, width, precision, fused, error)
                results[fused] = (out, error)
            # the primal output is the same computation either way
            assert torch.equal(results["0"][0], results["1"][0])
            # the fused kernel keeps tangents in float32: no less accurate than torch's path
            assert results["1"][1] <= 1.5 * results["0"][1] + 1e-6, results
            worst = max(worst, results["1"][1])
    print("worst relative error", worst)
""")


TRAIN = textwrap.dedent("""
    import os, sys
    import numpy as np, torch
    sys.path.insert(0, "benchmarks")
    import bench_optimize_deformations as bench
    from dynamight_core.gaussian_model import init_gaussians_from_map
    from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig
    from dynamight_core.simulation import consensus_map
    from dynamight_core import _tangent_kernel

    device = torch.device(sys.argv[1])
    torch.set_num_threads(1)
    particles, structure = bench._dataset(32, 6.0, 64, 0)
    gaussians, _ = init_gaussians_from_map(consensus_map(structure, 32, 6.0), 6.0, 300, None, 1,
                                           torch.Generator().manual_seed(0))
    results = {}
    for fused in ("0", "1"):
        os.environ["DYNAMIGHT_FUSED_TANGENTS"] = fused
        config = TrainerConfig(box_size=32, pixel_size=6.0, n_gaussians=gaussians.n_gaussians,
                               latent_dim=3, n_linear_layers=2, decoder_precision="float32")
        trainer = HalfSetTrainer(1, config, gaussians, np.arange(64), device)
        every = np.arange(64)
        trainer.initialise_noise(bench._batches(particles, every, 32, device))
        for _ in range(2):  # joint epochs: codes through the tangents, then a decoder update
            stats = trainer.train_epoch(bench._batches(particles, trainer.epoch_order(), 32,
                                                       device))
        results[fused] = (trainer.latents.detach().cpu().clone(), stats)
    assert not _tangent_kernel._FAILED, _tangent_kernel._FAILED
    (z0, s0), (z1, s1) = results["0"], results["1"]
    assert z0.abs().max() > 0.01, "the codes did not move"
    error = float((z1 - z0).norm() / z0.norm())
    assert error < 1e-3, error
    for key in ("data", "kl"):
        assert abs(s1[key] - s0[key]) <= 1e-4 * abs(s0[key]) + 1e-6, (key, s0[key], s1[key])
    print("codes after two joint epochs, fused against torch: relative difference", error)
""")


def _run_check(device: str, env_extra: dict[str, str], script: str = CHECK) -> str:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # the splat from the torch code: this file checks the tangents alone
    env = {**os.environ, "DYNAMIGHT_FUSED_SPLAT": "0", **env_extra, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script, device], env=env, cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the plain torch code runs, so
    CPU results do not depend on whether Triton is installed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the kernel would run on the CPU")
    net = LatentConditionedMLP(32, 2.0, 2, 32, 2, 4)
    out, tangents = net._mlp_and_tangents(torch.randn(10, 3), torch.randn(3, 2))
    assert not fused_tangents_usable(out, 32)
    assert tangents.shape == (3, 2, 10, 3)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of torch "
                                           "bring it; the CPU wheel does not)")
def test_kernel_in_triton_interpreter_matches_autograd():
    """The kernel, run by Triton's CPU interpreter, against float64 autograd (float32 path;
    the interpreter computes bfloat16 products wrongly, so they are checked on a GPU)."""
    out = _run_check("cpu", {"TRITON_INTERPRET": "1"})
    assert "worst relative error" in out


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (CUDA builds of torch "
                                           "bring it; the CPU wheel does not)")
def test_training_with_the_kernel_matches_the_torch_code():
    """Two joint epochs of a half-set trainer (float32 decoder, 3 latent dimensions), the
    tangents from the kernel (Triton's interpreter) and from the torch code: the codes and
    the epoch's statistics agree to float32 rounding."""
    out = _run_check("cpu", {"TRITON_INTERPRET": "1"}, TRAIN)
    assert "relative difference" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_on_cuda_matches_autograd():
    """The compiled kernel on a GPU, float32 and bfloat16, against float64 autograd and
    against the plain torch code; and two joint training epochs with it and without."""
    out = _run_check("cuda", {})
    assert "worst relative error" in out
    out = _run_check("cuda", {}, TRAIN)
    assert "relative difference" in out
