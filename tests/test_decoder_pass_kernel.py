"""The codes step's decoder pass in one kernel (dynamight_core/_decoder_pass_kernel.py) against
float64 autograd and the torch code.

The truth is the decoder MLP in float64: its output (``_mlp``) and the Jacobian ``∂out/∂z``
by autograd. Cases: several depths, widths and latent sizes (one with no hidden layer), the
anchor row without tangents (``tangent_rows``), a subset of latent coordinates, the deformation
decoder with a movable mask, and the kernel off while autograd is on. The kernel runs on a CUDA
device (marker ``gpu``) or, where Triton is installed, in Triton's CPU interpreter (a
subprocess: ``TRITON_INTERPRET`` is read when the kernel is defined); the CPU wheel of torch
brings no Triton, so there these tests skip.
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

from dynamight_core._decoder_pass_kernel import fused_decoder_pass_usable
from dynamight_core._latent_mlp import LatentConditionedMLP

CHECK = textwrap.dedent("""
    import os, sys, torch
    from dynamight_core import _decoder_pass_kernel as kernel
    from dynamight_core._latent_mlp import LatentConditionedMLP
    from dynamight_core.decoder import DeformationDecoder

    def truth(net, positions, z):  # out (b, m, 3), tangents (b, d, m, 3), float64
        net64 = LatentConditionedMLP(**net.config).double()
        net64.load_state_dict(net.state_dict())
        f = lambda zz: net64._mlp(positions.double().cpu(), zz)
        jac = torch.autograd.functional.jacobian(f, z.double().cpu())  # (b, m, 3, b, d)
        tangents = torch.stack([jac[i, :, :, i, :] for i in range(z.shape[0])])
        return f(z.double().cpu()), tangents.permute(0, 3, 1, 2)

    def relative(x, y):
        return float((x.detach().double().cpu() - y).norm() / y.norm())

    device = torch.device(sys.argv[1])
    torch.manual_seed(0)
    precisions = [(torch.float32, 1e-4)]
    if device.type == "cuda":  # the interpreter computes bfloat16 products wrongly
        precisions.append((torch.bfloat16, 3e-2))
    # latent dims, hidden layers, width, Gaussians, particles
    for d, layers, width, m, b in ((6, 8, 32, 300, 3), (2, 2, 32, 257, 2), (1, 0, 16, 70, 2),
                                   (3, 1, 64, 33, 1)):
        net = LatentConditionedMLP(64, 1.5, d, width, layers, 10)
        for parameter in net.parameters():  # every term counts (the output layer starts at 0)
            torch.nn.init.normal_(parameter, std=0.3)
        positions = torch.randn(m, 3) * 20
        z = torch.randn(b, d)
        out_true, tangents_true = truth(net, positions, z)
        net, positions, z = net.to(device), positions.to(device), z.to(device)
        for precision, tolerance in precisions:
            results = {}
            for fused in ("0", "1"):
                os.environ["DYNAMIGHT_FUSED_DECODER_PASS"] = fused
                with torch.no_grad(), torch.autocast(device.type, dtype=precision,
                                                     enabled=precision != torch.float32):
                    out, tangents = net._mlp_and_tangents(positions, z)
                assert out.shape == (b, m, 3) and tangents.shape == (b, d, m, 3)
                errors = relative(out, out_true), relative(tangents, tangents_true)
                assert max(errors) < tolerance, (d, layers, width, precision, fused, errors)
                results[fused] = errors
            # the kernel keeps h and t in float32: no less accurate than the torch code
            for fused_error, torch_error in zip(results["1"], results["0"]):
                assert fused_error <= 1.5 * torch_error + 1e-6, results
            # autograd on: the torch code, with a graph
            os.environ["DYNAMIGHT_FUSED_DECODER_PASS"] = "1"
            out, _ = net._mlp_and_tangents(positions, z)
            assert out.requires_grad
        # tangents of the leading rows only, of a subset of coordinates
        dims = torch.arange(d - 1, -1, -2, device=device)
        with torch.no_grad():
            os.environ["DYNAMIGHT_FUSED_DECODER_PASS"] = "1"
            out, tangents = net._mlp_and_tangents(positions, z, dims, tangent_rows=b - 1 or 1)
        assert tangents.shape == (b - 1 or 1, len(dims), m, 3)
        assert relative(tangents, tangents_true[:b - 1 or 1][:, dims.cpu()]) < 1e-4
        assert relative(out, out_true) < 1e-4

    # the deformation decoder: anchor row, movable mask, Å
    decoder = DeformationDecoder(64, 1.5, 3, 32, 4, 10)
    for parameter in decoder.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    mask = torch.rand(200) < 0.6
    decoder.set_movable_mask(mask)
    decoder = decoder.to(device)
    positions, z = (torch.randn(200, 3) * 20).to(device), torch.randn(5, 3).to(device)
    results = {}
    for fused in ("0", "1"):
        os.environ["DYNAMIGHT_FUSED_DECODER_PASS"] = fused
        with torch.no_grad():
            results[fused] = decoder.forward_with_tangents(positions, z)
    (d0, t0), (d1, t1) = results["0"], results["1"]
    assert torch.equal(d1[:, ~mask.to(device)], torch.zeros_like(d1[:, ~mask.to(device)]))
    assert float(d0.abs().max()) > 1.0
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-4 * float(d0.abs().max()))
    torch.testing.assert_close(t1, t0, rtol=1e-4, atol=1e-4 * float(t0.abs().max()))
    assert not kernel._FAILED, kernel._FAILED
    print("decoder pass matches float64 autograd and the torch code")
""")


def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the torch code runs, so CPU
    results do not depend on whether Triton is installed."""
    skip_if_interpreting()
    net = LatentConditionedMLP(32, 2.0, 2, 32, 2, 4)
    with torch.no_grad():
        out, tangents = net._mlp_and_tangents(torch.randn(10, 3), torch.randn(3, 2))
        assert not fused_decoder_pass_usable(out, 32)
    assert tangents.shape == (3, 2, 10, 3)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernel_in_triton_interpreter_matches_autograd():
    """The kernel, run by Triton's CPU interpreter, against float64 autograd and the torch
    code (float32; the interpreter gets bfloat16 products wrong, so they are checked on a
    GPU)."""
    assert "matches float64 autograd" in run_check("decoder_pass", CHECK, "cpu", interpret=True)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_training_with_the_kernel_matches_the_torch_code():
    """Two joint epochs of a half-set trainer (float32 decoder, 3 latent dimensions), the
    codes' decoder passes from the kernel (Triton's interpreter) and from the torch code: codes
    and statistics agree to float32 rounding."""
    out = run_check("decoder_pass", training_comparison("decoder_pass"), "cpu", interpret=True)
    assert "relative difference" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_on_cuda_matches_autograd():
    """The compiled kernel on a GPU, float32 and bfloat16, against float64 autograd and the
    torch code; and two joint training epochs with it and without."""
    assert "matches float64 autograd" in run_check("decoder_pass", CHECK, "cuda",
                                                   interpret=False)
    out = run_check("decoder_pass", training_comparison("decoder_pass"), "cuda", interpret=False)
    assert "relative difference" in out
