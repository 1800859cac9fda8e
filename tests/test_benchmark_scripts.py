"""Every script in ``benchmarks/`` imports: what it takes from the project and from the other
scripts still exists (``bench_temporal.py`` still imported a helper of ``bench_quality.py`` after
the helper had moved to ``_common.py``, and nothing noticed)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "_common")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [name])
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py has no docstring saying what it measures"
