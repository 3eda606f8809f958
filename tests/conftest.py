"""Shared fixtures: the real DICOM corpus is found through BRAINMETS_CORPUS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Root of ../shared/corpus; tests that need it skip cleanly when it is not configured."""
    root = os.environ.get("BRAINMETS_CORPUS")
    if not root:
        pytest.skip("BRAINMETS_CORPUS is not set: real-DICOM corpus tests skipped")
    path = Path(root).resolve()  # tests symlink into it; a relative path would break them
    if not path.is_dir():
        pytest.skip(f"BRAINMETS_CORPUS={root} is not a directory")
    return path
