"""Shared fixtures: project paths and the optional real-data folder next to the project."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real retinal sample data not found at {REAL} (only present next to CI checkouts)")
    return REAL
