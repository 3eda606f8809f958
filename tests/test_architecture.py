"""The package follows the data flow: the layered import contract in pyproject.toml holds, and
it fails when a module imports against the flow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "brainmets"


def _lint_imports(config: Path, src: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.is_file():
        exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(exe), "--config", str(config), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=src.parent,
        timeout=300,
    )


def test_the_package_keeps_its_layers():
    done = _lint_imports(ROOT / "pyproject.toml", PACKAGE.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "against_the_flow"),
    [
        ("data/cache.py", "import brainmets.train.trainer"),  # data would need training
        ("metrics.py", "from brainmets.evaluate import report"),  # metrics below evaluate
        ("inference.py", "import brainmets.predict"),  # the shared loader below its commands
        ("data/dicom.py", "import brainmets.data.prepare"),  # a reader below its user
        ("backends/__init__.py", "import brainmets.predict"),  # model loading below commands
        ("inference.py", "import brainmets.backends"),  # torch scoring below the backends
        ("backends/exported.py", "import brainmets.export"),  # reading below writing
        ("export.py", "import brainmets.train"),  # the exporter beside the trainer ...
        ("train/trainer.py", "import brainmets.export"),  # ... and the trainer beside it
    ],
)
def test_an_import_against_the_flow_breaks_the_contract(tmp_path, module, against_the_flow):
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "brainmets", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "brainmets" / module
    target.write_text(target.read_text() + f"\n{against_the_flow}  # noqa\n")
    config = tmp_path / "pyproject.toml"
    shutil.copy(ROOT / "pyproject.toml", config)
    done = _lint_imports(config, src)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout


LONGEST_FUNCTION = 100


def test_no_function_is_longer_than_a_screen_or_two():
    """A function that does one step reads top to bottom; past ~100 lines it does several."""
    import ast

    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} {lines}")
    assert not long, long
