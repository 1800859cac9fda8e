"""The decoder MLP's fused forward and backward kernels (dynamight_core/_mlp_kernel.py) against
float64 autograd and the torch code.

The truth is the network in float64 with torch autograd: its output (``_mlp``) and the gradients
of a random output weighting with respect to every parameter (position, latent, hidden and
output layers) and to the codes. Cases: several depths, widths and latent sizes (one with no
hidden layer), the backward pass's particles in one run per program and in several, autograd off
(no activations kept), positions per code (the torch code), the deformation decoder with its
anchor row and a movable mask, a backward failure falling back to autograd, and two joint
training epochs. The kernels run on a CUDA device (marker ``gpu``) or, where Triton is
installed, in Triton's CPU interpreter (a subprocess: ``TRITON_INTERPRET`` is read when a kernel
is defined); the CPU wheel of torch brings no Triton, so there these tests skip.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import (
    HAS_TRITON,
    NO_TRITON,
    OLD_INTERPRETER,
    OLD_INTERPRETER_REASON,
    run_check,
    skip_if_interpreting,
    training_comparison,
)

from dynamight_core._latent_mlp import LatentConditionedMLP
from dynamight_core._mlp_kernel import fused_mlp_usable

CHECK = textwrap.dedent("""
    import os, sys, torch
    from dynamight_core import _mlp_kernel as kernel
    from dynamight_core._latent_mlp import LatentConditionedMLP
    from dynamight_core.decoder import DeformationDecoder

    def gradients(net, positions, z, weighting, precision=torch.float32):
        # output and d(sum(out * weighting))/d(parameters, z)
        z = z.detach().clone().requires_grad_()
        with torch.autocast(z.device.type, dtype=precision, enabled=precision != torch.float32):
            out = net._mlp(positions, z)
        inputs = [z, *net.parameters()]
        return out, torch.autograd.grad((out.double() * weighting).sum(), inputs)

    def truth(net, positions, z, weighting):
        net64 = LatentConditionedMLP(**net.config).double()
        net64.load_state_dict(net.state_dict())
        out, grads = gradients(net64, positions.double().cpu(), z.double().cpu(),
                               weighting.double().cpu())
        return out.detach(), grads

    def relative(x, y):
        return float((x.detach().double().cpu() - y).norm() / y.norm())

    device = torch.device(sys.argv[1])
    torch.manual_seed(0)
    # float32 through 8 residual layers of this random network: about 1e-4 for the torch code
    precisions = [(torch.float32, 3e-4)]
    if device.type == "cuda":  # the interpreter computes bfloat16 products wrongly
        precisions.append((torch.bfloat16, 3e-2))
    # latent dims, hidden layers, width, Gaussians, codes, programs of the backward pass (about:
    # 1024, one particle per program; 4, in the interpreter's 2 blocks of 64 Gaussians, runs of
    # 3 and 2 particles; 1, all 3 particles in one run)
    for d, layers, width, m, b, programs in ((6, 8, 32, 300, 3, 1024), (2, 2, 32, 100, 5, 4),
                                             (1, 0, 16, 70, 2, 1024), (3, 1, 64, 33, 3, 1)):
        kernel._PROGRAMS = programs
        net = LatentConditionedMLP(64, 1.5, d, width, layers, 10)
        for parameter in net.parameters():  # every term counts (the output layer starts at 0)
            torch.nn.init.normal_(parameter, std=0.3)
        positions, z, weighting = torch.randn(m, 3) * 20, torch.randn(b, d), torch.randn(b, m, 3)
        out_true, grads_true = truth(net, positions, z, weighting)
        net = net.to(device)
        positions, z, weighting = positions.to(device), z.to(device), weighting.to(device)
        for precision, tolerance in precisions:
            results = {}
            for fused in ("0", "1"):
                os.environ["DYNAMIGHT_FUSED_MLP"] = fused
                out, grads = gradients(net, positions, z, weighting, precision)
                assert out.shape == (b, m, 3) and out.dtype == precision
                assert len(grads) == len(grads_true)
                errors = [relative(out, out_true)] + [
                    relative(g, t) for g, t in zip(grads, grads_true) if t.norm() > 0]
                assert max(errors) < tolerance, (d, layers, width, precision, fused, errors)
                results[fused] = errors
            # float32 sums and h: no less accurate than the torch code
            for fused_error, torch_error in zip(results["1"], results["0"]):
                assert fused_error <= 1.5 * torch_error + 2e-6, results
        # autograd off: the same output, no activations kept
        os.environ["DYNAMIGHT_FUSED_MLP"] = "1"
        with torch.no_grad():
            out = net._mlp(positions, z)
        assert not out.requires_grad and relative(out, out_true) < 1e-4
        # positions per code: the torch code (the kernel takes one shared position term)
        with torch.no_grad():
            out = net._mlp(positions.expand(b, m, 3), z)
        assert relative(out, out_true) < 1e-4
    kernel._PROGRAMS = 1024

    # the deformation decoder: anchor row, movable mask, Å; gradients of every parameter
    decoder = DeformationDecoder(64, 1.5, 3, 32, 4, 10)
    for parameter in decoder.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    mask = torch.rand(200) < 0.6
    decoder.set_movable_mask(mask)
    decoder = decoder.to(device)
    positions, z = (torch.randn(200, 3) * 20).to(device), torch.randn(5, 3).to(device)
    weighting = torch.randn(5, 200, 3, device=device)
    results = {}
    for fused in ("0", "1"):
        os.environ["DYNAMIGHT_FUSED_MLP"] = fused
        displacements = decoder(positions, z)
        results[fused] = displacements, torch.autograd.grad((displacements * weighting).sum(),
                                                            list(decoder.parameters()))
    (d0, g0), (d1, g1) = results["0"], results["1"]
    assert torch.equal(d1[:, ~mask.to(device)], torch.zeros_like(d1[:, ~mask.to(device)]))
    assert float(d0.abs().max()) > 1.0
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-4 * float(d0.abs().max()))
    names = [name for name, _ in decoder.named_parameters()]
    scale = max(float(c.abs().max()) for c in g0)

    def same_gradients(first, second):
        for name, a, c in zip(names, first, second, strict=True):
            if name == "output_layer.bias":  # f(z) - f(0): cancels, rounding alone is left
                assert max(float(a.abs().max()), float(c.abs().max())) < 1e-5 * scale
                continue
            assert float(c.abs().max()) > 1e-3 * scale, name  # a gradient worth comparing
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4 * float(c.abs().max()))

    same_gradients(g1, g0)
    assert not kernel._FAILED, kernel._FAILED

    # a backward kernel that fails: torch autograd from the saved inputs, the same gradients
    def broken(*args, **kwargs):
        raise RuntimeError("planted backward failure")
    kernel._backward = broken
    os.environ["DYNAMIGHT_FUSED_MLP"] = "1"
    displacements = decoder(positions, z)
    same_gradients(torch.autograd.grad((displacements * weighting).sum(),
                                       list(decoder.parameters())), g0)
    assert kernel._FAILED and "planted" in kernel._FAILED[0]
    term = torch.zeros(200, 32, device=device)
    assert not kernel.fused_mlp_usable(term, 32, decoder.output_layer.weight)  # torch from now
    print("decoder MLP matches float64 autograd and the torch code")
""")


def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the torch code runs, so CPU
    results do not depend on whether Triton is installed."""
    skip_if_interpreting()
    net = LatentConditionedMLP(32, 2.0, 2, 32, 2, 4)
    out = net._mlp(torch.randn(10, 3), torch.randn(3, 2))
    assert out.shape == (3, 10, 3) and out.grad_fn is not None
    assert "FusedMLP" not in type(out.grad_fn).__name__
    assert not fused_mlp_usable(torch.zeros(10, 32), 32, net.output_layer.weight)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(OLD_INTERPRETER, reason=OLD_INTERPRETER_REASON)
def test_kernels_in_triton_interpreter_match_autograd():
    """The kernels, run by Triton's CPU interpreter, against float64 autograd and the torch
    code (float32; the interpreter gets bfloat16 products wrong, so they are checked on a
    GPU)."""
    assert "matches float64 autograd" in run_check("mlp", CHECK, "cpu", interpret=True)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(OLD_INTERPRETER, reason=OLD_INTERPRETER_REASON)
def test_training_with_the_kernels_matches_the_torch_code():
    """A joint epoch of a half-set trainer (float32 decoder, 3 latent dimensions), the decoder's
    training passes from the kernels (Triton's interpreter) and from the torch code: codes,
    Gaussians and statistics agree to float32 rounding (relative 3e-5 measured; the check's
    bound is 1e-3). One epoch, not two: the anchored output's bias has a gradient of rounding
    alone (it cancels in ``f(z) - f(0)``), which Adam turns into full steps, so in the second
    epoch any two summation orders part (0.5 relative in that bias, 1e-3 in the codes; a 1e-6
    relative change of the Gaussians' positions alone gives 2e-4 in the codes after one)."""
    out = run_check("mlp", training_comparison("mlp", joint_epochs=1), "cpu", interpret=True)
    assert "relative difference" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_on_cuda_match_autograd():
    """The compiled kernels on a GPU, float32 and bfloat16, against float64 autograd and the
    torch code; and a joint training epoch with them and without."""
    assert "matches float64 autograd" in run_check("mlp", CHECK, "cuda", interpret=False)
    out = run_check("mlp", training_comparison("mlp", joint_epochs=1), "cuda", interpret=False)
    assert "relative difference" in out
