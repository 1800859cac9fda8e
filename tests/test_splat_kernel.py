"""The fused splat kernel (dynamight_core/_splat_kernel.py) against the torch splat.

The truth is :func:`dynamight_core.gaussian_projection.splat_bilinear_2d`'s torch code and its
autograd gradients (positions that wrap around the periodic grid both ways, shared and
per-particle masses, several width classes), then the whole projection with and without the
kernel, then two joint training epochs with and without it. The kernel runs on a CUDA device
(marker ``gpu``) or, where Triton is installed, in Triton's CPU interpreter (a subprocess:
``TRITON_INTERPRET`` is read when the kernel is defined). The CPU wheel of torch brings no
Triton: there the torch code runs and these tests skip.
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

from dynamight_core._splat_kernel import fused_splat_usable
from dynamight_core.gaussian_projection import splat_bilinear_2d

CHECK = textwrap.dedent("""
    import os, sys, torch
    from dynamight_core import _splat_kernel, gaussian_projection as gp
    from dynamight_core._splat_kernel import fused_splat_usable, splat_bilinear_fused

    device = torch.device(sys.argv[1])
    torch.manual_seed(0)
    # particles, Gaussians, width classes, grid size, masses per particle
    for b, n, c, s, batched in ((3, 700, 1, 16, False), (2, 150, 3, 12, True),
                                (1, 5, 2, 8, False)):
        xy = ((torch.rand(b, n, 2) - 0.5) * 3 * s).to(device).requires_grad_()
        masses = (torch.rand(b, n) if batched else torch.rand(n)).to(device).requires_grad_()
        classes = torch.randint(0, c, (n,)).to(device)
        assert fused_splat_usable(xy)
        os.environ["DYNAMIGHT_FUSED_SPLAT"] = "0"
        assert not fused_splat_usable(xy)
        truth = gp.splat_bilinear_2d(xy, masses, classes, c, s)
        os.environ["DYNAMIGHT_FUSED_SPLAT"] = "1"
        fused = splat_bilinear_fused(xy, masses, classes, c, s)
        assert fused is not None and fused.shape == truth.shape
        # atomic additions in another order: float32 rounding
        torch.testing.assert_close(fused, truth, rtol=1e-5, atol=1e-5)
        weights = torch.randn_like(truth)
        expected = torch.autograd.grad((truth * weights).sum(), [xy, masses])
        got = torch.autograd.grad((fused * weights).sum(), [xy, masses])
        for g, e in zip(got, expected):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # accuracy against float64: the kernel's float32 splat and gradients are as close to the
    # float64 truth as the torch code's float32 ones (measured: 1.1-1.3e-7 of the largest
    # value for both)
    xy = ((torch.rand(4, 3000, 2) - 0.5) * 80).to(device)
    masses, classes = torch.rand(3000).to(device), torch.zeros(3000, dtype=torch.long).to(device)
    weights = torch.randn(4, 1, 64, 64, dtype=torch.float64).to(device)
    results = {}
    for name, dtype, fused in (("truth", torch.float64, "0"), ("torch", torch.float32, "0"),
                               ("kernel", torch.float32, "1")):
        os.environ["DYNAMIGHT_FUSED_SPLAT"] = fused
        x, m = xy.to(dtype).requires_grad_(), masses.to(dtype).requires_grad_()
        grid = (splat_bilinear_fused(x, m, classes, 1, 64) if fused == "1"
                else gp.splat_bilinear_2d(x, m, classes, 1, 64))
        results[name] = [grid.double(), *(g.double() for g in torch.autograd.grad(
            (grid.double() * weights).sum(), [x, m]))]
    for truth, torch32, kernel in zip(*results.values()):
        scale = float(truth.abs().max())
        error = float((kernel - truth).abs().max()) / scale
        assert error <= 2 * float((torch32 - truth).abs().max()) / scale + 1e-9, error
    positions = (torch.randn(300, 3) * 10).to(device).requires_grad_()
    rotations = torch.linalg.qr(torch.randn(4, 3, 3))[0].to(device)
    masses = torch.rand(300).to(device).requires_grad_()
    classes = torch.randint(0, 2, (300,)).to(device)
    sigmas = torch.tensor([1.0, 2.0]).to(device)
    results = {}
    for fused in ("0", "1"):
        os.environ["DYNAMIGHT_FUSED_SPLAT"] = fused
        image = gp.project_gaussians_rfft(positions, sigmas, masses, classes, rotations, 32, 2.0)
        results[fused] = (image, *torch.autograd.grad((image.abs() ** 2).sum(),
                                                      [positions, masses]))
    for got, expected in zip(results["1"], results["0"]):
        error = float((got - expected).abs().max() / expected.abs().max())
        assert error < 1e-5, error
    assert not _splat_kernel._FAILED, _splat_kernel._FAILED
    print("splat and projection match the torch code")
""")

def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the torch code runs, so CPU
    results do not depend on whether Triton is installed."""
    skip_if_interpreting()
    xy = torch.rand(2, 10, 2) * 8
    assert not fused_splat_usable(xy)
    grid = splat_bilinear_2d(xy, torch.ones(10), torch.zeros(10, dtype=torch.long), 1, 8)
    torch.testing.assert_close(grid.sum((-2, -1)), torch.full((2, 1), 10.0))


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernel_in_triton_interpreter_matches_the_torch_splat():
    """The kernels, run by Triton's CPU interpreter, against the torch splat and its
    gradients, and through the whole projection."""
    assert "match the torch code" in run_check("splat", CHECK, "cpu", interpret=True)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_training_with_the_kernel_matches_the_torch_code():
    """A warm-up and a joint epoch of a half-set trainer, every render's splat from the kernel
    (Triton's interpreter) and from the torch code: the codes, the Gaussians and the epoch's
    statistics agree to float32 rounding. One joint epoch, not two: both the kernel's sums and
    its gradients round differently from the torch code's (equally close to float64, checked
    above), and training amplifies that; measured relative difference of the codes 1.4e-4
    after one joint epoch and 3.7e-3 after two (the torch code with only its forward sums
    reordered: 2.0e-4 and 3.1e-4). A wrong kernel differs at the first step."""
    script = training_comparison("splat", warmup_epochs=1, joint_epochs=1)
    assert "relative difference" in run_check("splat", script, "cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_on_cuda_matches_the_torch_splat():
    """The compiled kernels on a GPU against the torch splat, and a joint training epoch
    with them and without."""
    assert "match the torch code" in run_check("splat", CHECK, "cuda", interpret=False)
    script = training_comparison("splat", warmup_epochs=1, joint_epochs=1)
    assert "relative difference" in run_check("splat", script, "cuda", interpret=False)
