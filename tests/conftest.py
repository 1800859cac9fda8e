"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES_DIR = Path(__file__).parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The RELION-written fixtures in ``../shared/fixtures`` beside the checkout."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"RELION fixtures not found at {FIXTURES_DIR} (expected ../shared/fixtures "
                    "beside the checkout)")
    return FIXTURES_DIR
