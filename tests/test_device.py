"""Device and decoder-precision choice."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.device import (
    adam,
    choose_device,
    cpu_has_native_bfloat16,
    load_adam_state,
    resolve_decoder_precision,
)


def test_cpu_without_gpu_id():
    assert choose_device(None) == torch.device("cpu")
    assert choose_device("-1") == torch.device("cpu")


def test_native_bfloat16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bfloat16("flags : fpu sse avx512f avx512_bf16 avx2")
    assert cpu_has_native_bfloat16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bfloat16("flags : fpu sse avx2 avx512f")


def test_explicit_precisions_are_kept_and_bad_ones_rejected():
    cpu = torch.device("cpu")
    assert resolve_decoder_precision("float32", cpu) == "float32"
    assert resolve_decoder_precision("bfloat16", cpu) == "bfloat16"
    expected = "bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert resolve_decoder_precision("auto", cpu) == expected
    with pytest.raises(ValueError, match="decoder precision"):
        resolve_decoder_precision("half", cpu)


@pytest.mark.parametrize(("capability", "expected"), [
    ((7, 0), "float32"), ((7, 5), "float32"),  # V100, T4 / RTX 20xx: bfloat16 emulated only
    ((8, 0), "bfloat16"), ((8, 6), "bfloat16"), ((8, 9), "bfloat16"), ((9, 0), "bfloat16")])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, capability,
                                                                expected):
    """``auto`` asks the capability of the run's own GPU (here ``cuda:1``), not whether bfloat16
    tensors can be made (``torch.cuda.is_bf16_supported`` says yes on a V100 or T4, whose
    bfloat16 is emulated and slower than float32)."""
    asked = []

    def capability_of(device=None):
        asked.append(torch.device(device))
        return capability

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_decoder_precision("auto", torch.device("cuda:1")) == expected
    assert asked == [torch.device("cuda:1")]
    assert resolve_decoder_precision("float32", torch.device("cuda:1")) == "float32"


def _adam_steps(device: str, fused_expected: bool, state: dict | None = None):
    generator = torch.Generator().manual_seed(0)  # the same start on every device
    params = [torch.randn(40, 3, generator=generator).to(device).requires_grad_(),
              torch.randn(7, generator=generator).to(device).requires_grad_()]
    optimiser = adam([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}],
                     torch.device(device))
    if state is not None:
        load_adam_state(optimiser, state)
    assert bool(optimiser.param_groups[0]["fused"]) == fused_expected
    for _ in range(3):
        optimiser.zero_grad()
        sum((p ** 3).sum() for p in params).backward()
        optimiser.step()
    return [p.detach().cpu() for p in params], optimiser.state_dict()


def test_adam_is_the_plain_one_on_the_cpu_and_a_fused_state_continues_there():
    params, state = _adam_steps("cpu", fused_expected=False)
    assert all(torch.isfinite(p).all() for p in params)
    # a state written by the fused kernel (a GPU run's checkpoint) continues unfused
    for group in state["param_groups"]:
        group["fused"] = True
    continued, _ = _adam_steps("cpu", fused_expected=False, state=state)
    assert not torch.equal(continued[0], params[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adam_is_fused_on_a_gpu_and_takes_the_plain_steps():
    """The fused kernel is the same algorithm: the same parameters to float32 rounding as on
    the CPU, and its state (a checkpoint) continues on the CPU and back."""
    cpu, cpu_state = _adam_steps("cpu", fused_expected=False)
    gpu, gpu_state = _adam_steps("cuda", fused_expected=True)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    _adam_steps("cpu", fused_expected=False, state=gpu_state)
    _adam_steps("cuda", fused_expected=True, state=cpu_state)
