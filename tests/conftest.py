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


@pytest.fixture
def run_as_main_script(tmp_path):
    """Run Python source as a new process's main script and return its stdout: spawned pool
    workers run that script again, as they would a user's."""
    import subprocess
    import sys

    def run(source: str) -> str:
        script = tmp_path / "parent.py"
        script.write_text(source)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
