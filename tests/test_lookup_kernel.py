"""The fused lookup of the deformed backprojection (dynamight_core/_lookup_kernel.py) against
the torch code.

The truth is :meth:`DeformedBackprojector.add`'s torch code (trilinear upsampling of the
coarse lookup grid, ``grid_sample``, the sum over particles), itself checked against a direct
per-voxel backprojection and the rigid reconstruction in ``test_deformed_backprojection.py``.
Cases: odd and even boxes, rigid (no field) and a displacement field large enough that many
voxels project outside the image (which reads 0), a sum that already holds a batch, and the
reconstructed map. The kernel runs on a CUDA device (marker ``gpu``) or, where Triton is
installed, in Triton's CPU interpreter (a subprocess: ``TRITON_INTERPRET`` is read when the
kernel is defined). The CPU wheel of torch brings no Triton: there the torch code runs and these
tests skip.
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
)

from dynamight_core._lookup_kernel import fused_lookup_usable

CHECK = textwrap.dedent("""
    import os, sys, torch
    from dynamight_core import _lookup_kernel
    from dynamight_core._lookup_kernel import fused_lookup_usable
    from dynamight_core.deformed_backprojection import DeformedBackprojector
    from dynamight_core.particles import CTFParams
    from dynamight_core.rotation import random_rotations

    device = torch.device(sys.argv[1])
    generator = torch.Generator().manual_seed(0)
    # box, particles per batch, displacement grid nodes (None: rigid), displacement scale (Å)
    for box, b, g, scale in ((16, 3, 5, 12.0), (15, 2, None, 0.0), (15, 4, 4, 3.0),
                             (12, 1, 7, 40.0)):
        px = 2.5
        batches = []
        for _ in range(2):  # two batches: the sum is added to, not overwritten
            images = torch.randn(b, box, box, generator=generator)
            rotations = random_rotations(b, generator)
            shifts = torch.randn(b, 2, generator=generator) * 3.0
            ctf = CTFParams.from_values(
                b, defocus_u_angstrom=(torch.rand(b, generator=generator) * 1e4 + 5e3),
                defocus_v_angstrom=(torch.rand(b, generator=generator) * 1e4 + 5e3),
                defocus_angle_degrees=torch.rand(b, generator=generator) * 180)
            field = None if g is None else torch.randn(b, 3, g, g, g, generator=generator) * scale
            batches.append((images, rotations, shifts, ctf, field))
        sums = {}
        for fused in ("0", "1"):
            os.environ["DYNAMIGHT_FUSED_LOOKUP"] = fused
            bp = DeformedBackprojector(box, px, device, max_chunk_voxels=box**3 // 2)
            assert fused_lookup_usable(bp.data) == (fused == "1")
            for images, rotations, shifts, ctf, field in batches:
                bp.add(images.to(device), rotations.to(device), shifts.to(device),
                       ctf.to(device), None if field is None else field.to(device))
            sums[fused] = (bp.data.cpu(), bp.weight.cpu(), bp.n_particles,
                           bp.reconstruct().cpu())
        (d0, w0, n0, m0), (d1, w1, n1, m1) = sums["0"], sums["1"]
        assert n1 == n0 == 2 * b
        # the CTF² weights do not go through the kernel: equal, except that CUDA's index_add_
        # adds in no fixed order (two runs of the torch code differ by 6e-8 of the largest
        # weight there; measured on an H100)
        if device.type == "cuda":
            torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6 * float(w0.abs().max()))
        else:
            assert torch.equal(w1, w0)
        assert d0.abs().max() > 0
        if b == 1:  # displacements of several boxes: many voxels read outside the image
            assert (d0 == 0).float().mean() > 0.01, "no voxel read outside the image"
        # another order of float32 operations
        torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-5 * float(d0.abs().max()))
        torch.testing.assert_close(m1, m0, rtol=1e-4, atol=1e-5 * float(m0.abs().max()))
    assert not _lookup_kernel._FAILED, _lookup_kernel._FAILED
    print("backprojection sums match the torch code")
""")


def test_cpu_tensors_use_the_torch_code():
    """Without a CUDA device (and outside Triton's interpreter) the torch code runs, so CPU
    results do not depend on whether Triton is installed."""
    skip_if_interpreting()
    assert not fused_lookup_usable(torch.zeros(2, 8, 8))


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(OLD_INTERPRETER, reason=OLD_INTERPRETER_REASON)
def test_kernel_in_triton_interpreter_matches_the_torch_lookup():
    """The kernel, run by Triton's CPU interpreter, against the torch code's sums."""
    assert "match the torch code" in run_check("lookup", CHECK, "cpu", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_on_cuda_matches_the_torch_lookup():
    """The compiled kernel on a GPU against the torch code on the same GPU."""
    assert "match the torch code" in run_check("lookup", CHECK, "cuda", interpret=False)
