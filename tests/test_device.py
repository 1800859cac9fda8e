"""Device and decoder-precision choice."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.device import choose_device, cpu_has_native_bfloat16, resolve_decoder_precision


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
