"""The streaming error summary."""

from __future__ import annotations

import pytest
import torch

from dynamight_core.inversion_error import ErrorSummary


def test_error_summary_percentiles():
    values = torch.rand(20000, generator=torch.Generator().manual_seed(0)) ** 2 * 5
    summary = ErrorSummary()
    for chunk in values.split(3000):
        summary.add(chunk)
    assert summary.mean == pytest.approx(float(values.mean()), rel=1e-6)
    assert summary.percentile(95) == pytest.approx(float(values.quantile(0.95)), rel=0.025)
    assert summary.max == pytest.approx(float(values.max()))
