"""Fixtures of the DICOM results tests: dicom3tools' validator, a scored generated study, and
copies of its series with edited headers (the scores stay; only what the writer reads
changes)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest


def _tool(name: str) -> str:
    """A validator on PATH: skipped locally without it, a failure under CI."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (apt-get install dicom3tools dcmtk)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], list[str]]:
    """``check(path)``: runs dciodvfy, fails on any line that says Error, returns the
    warnings."""
    exe = _tool("dciodvfy")

    def check(path: Path) -> list[str]:
        done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if "Error" in line]
        assert not errors, f"{path}: dciodvfy says\n" + "\n".join(errors)
        return [line for line in lines if line.startswith("Warning")]

    return check


@pytest.fixture(scope="session")
def dsrdump() -> str:
    return _tool("dsrdump")


@pytest.fixture(scope="session")
def trained(tiny_run):
    from brainmets.inference import load_trained

    return load_trained(tiny_run, "cpu")


@pytest.fixture(scope="session")
def scored(trained, head_ct_studies):
    """SYN0003 scored as ``predict`` and ``serve`` score it."""
    from brainmets.predict import predict_study

    predictions, errors = predict_study(trained, head_ct_studies / "SYN0003")
    assert not errors and len(predictions) == 1
    return predictions[0]


@pytest.fixture
def edited(scored, tmp_path) -> Callable[..., object]:
    """``edited(edit)``: the scored patient with its series copied and ``edit(ds, index)``
    applied to each header, for the writer to read."""

    def make(edit: Callable[[pydicom.Dataset, int], None], name: str = "edited"):
        folder = tmp_path / name
        folder.mkdir()
        files = []
        for i, path in enumerate(scored.item.job.files):
            ds = pydicom.dcmread(path)
            # The edits write invalid values on purpose.
            with pydicom.config.disable_value_validation():
                edit(ds, i)
                target = folder / Path(path).name
                ds.save_as(target)
            files.append(str(target))
        job = dataclasses.replace(scored.item.job, files=files)
        return dataclasses.replace(scored.item, job=job)

    return make
