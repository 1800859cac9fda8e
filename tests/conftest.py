"""Shared test fixtures, and the rule that CI fails rather than skips.

Locally a test whose reference is missing (RELION's programs, ``../shared/fixtures``, Xvfb and
Qt for the napari window, the installed entry points) skips with the reason. In CI (the ``CI``
environment variable set, as ``.ci/run`` runs) every such skip is turned into a failure: a CI
run that silently tested less is worse than a red one. The only skips CI accepts are the ones in
:data:`SKIPS_ALLOWED_IN_CI` (optional extras, and GPU tests on a machine without CUDA).

Tests marked ``gpu`` run whenever CUDA is available and skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES_DIR = Path(__file__).parents[1].parent / "shared" / "fixtures"

SKIPS_ALLOWED_IN_CI = (
    "umap-learn is optional",  # an optional extra of the explorer
    "needs a CUDA device",  # gpu-marked tests on a CPU-only machine
)


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The RELION-written fixtures in ``../shared/fixtures`` beside the checkout."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"RELION fixtures not found at {FIXTURES_DIR} (expected ../shared/fixtures "
                    "beside the checkout)")
    return FIXTURES_DIR


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _allowed(report) -> bool:
    text = str(report.longrepr)
    return any(reason in text for reason in SKIPS_ALLOWED_IN_CI)


def _fail_in_ci(report) -> None:
    if in_ci() and report.skipped and not _allowed(report):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, which must have every reference: {reason}\n"
                           "(.ci/run installs RELION, Xvfb/Qt and the package; ../shared must "
                           "be beside the checkout)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_in_ci(outcome.get_result())
