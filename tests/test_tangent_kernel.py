"""The fused latent-tangent kernel (dynamight_core/_tangent_kernel.py) against autograd.

The truth is the Jacobian ``∂out/∂z`` of the decoder MLP computed by autograd in float64. The
kernel runs on a CUDA device (marker ``gpu``) or, where Triton is installed, in Triton's CPU
interpreter (a subprocess: ``TRITON_INTERPRET`` is read when the kernel is defined). The CPU
wheel of torch brings no Triton: there the plain torch code runs and these tests skip.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import (
    HAS_TRITON,
    NO_TRITON,
    run_check,
    skip_if_interpreting,
    training_comparison,
)

from dynamight_core._latent_mlp import LatentConditionedMLP
from dynamight_core._tangent_kernel import fused_tangents_usable

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


def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the plain torch code runs, so
    CPU results do not depend on whether Triton is installed."""
    skip_if_interpreting()
    net = LatentConditionedMLP(32, 2.0, 2, 32, 2, 4)
    out, tangents = net._mlp_and_tangents(torch.randn(10, 3), torch.randn(3, 2))
    assert not fused_tangents_usable(out, 32)
    assert tangents.shape == (3, 2, 10, 3)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernel_in_triton_interpreter_matches_autograd():
    """The kernel, run by Triton's CPU interpreter, against float64 autograd (float32 path;
    the interpreter computes bfloat16 products wrongly, so they are checked on a GPU)."""
    out = run_check("tangent", CHECK, "cpu", interpret=True)
    assert "worst relative error" in out


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_training_with_the_kernel_matches_the_torch_code():
    """Two joint epochs of a half-set trainer (float32 decoder, 3 latent dimensions), the
    tangents from the kernel (Triton's interpreter) and from the torch code: the codes and
    the epoch's statistics agree to float32 rounding."""
    out = run_check("tangent", training_comparison("tangent"), "cpu", interpret=True)
    assert "relative difference" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_on_cuda_matches_autograd():
    """The compiled kernel on a GPU, float32 and bfloat16, against float64 autograd and
    against the plain torch code; and two joint training epochs with it and without."""
    out = run_check("tangent", CHECK, "cuda", interpret=False)
    assert "worst relative error" in out
    out = run_check("tangent", training_comparison("tangent"), "cuda", interpret=False)
    assert "relative difference" in out
