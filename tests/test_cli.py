"""The CLI's process-level behaviour: what each torchrun rank prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_rank_0_speaks_and_the_others_report_errors_only(tmp_path, rank):
    """Every rank shares the state most warnings come from, so only rank 0 prints them (8 GPUs
    would print each 8 times); an error, or a warning about a rank's own state, still shows
    from any rank, with its rank in front."""
    script = (
        "import logging, sys; from brainmets import PER_RANK_LOGGER; from brainmets.cli import _setup_logging, main; "
        "_setup_logging(False); log = logging.getLogger('brainmets'); "
        "log.info('INFO-LINE'); log.warning('WARNING-LINE'); log.error('ERROR-LINE'); "
        "logging.getLogger(PER_RANK_LOGGER).warning('OWN-LINE'); "
        "sys.exit(main(['prepare', '--labels', 'no-such-labels.csv', '--out', 'x']))"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    prefix = f"[rank {rank}] " if rank else ""
    said = {word for word in ("INFO", "WARNING", "ERROR", "OWN") if f"{word}-LINE" in done.stderr}
    # A warning about the rank's own state (its BatchNorm statistics) is printed by every rank.
    assert said == ({"INFO", "WARNING", "ERROR", "OWN"} if rank == 0 else {"ERROR", "OWN"})
    assert all(line.startswith(prefix) for line in lines if "-LINE" in line)
    (message,) = [line for line in lines if "no-such-labels.csv" in line]
    assert message.startswith(f"{prefix}brainmets: ")


def test_index_of_a_missing_wrong_or_empty_root_says_so(tmp_path, capsys):
    from brainmets.cli import main

    (tmp_path / "notes.txt").write_text("not a folder\n")
    for name, why in (("no-such-dir", "does not exist"), ("notes.txt", "not a directory")):
        assert main(["index", str(tmp_path / name), "--out", str(tmp_path / "index")]) == 2
        assert capsys.readouterr().err == f"brainmets: {tmp_path / name}: {why}\n"
    # A folder without images is most often the wrong one: no quiet success.
    (tmp_path / "empty").mkdir()
    argv = ["-q", "index", str(tmp_path / "empty"), "--out", str(tmp_path / "index")]
    assert main(argv) == 1
    assert f"no DICOM images under {tmp_path / 'empty'}" in capsys.readouterr().err
    assert main([*argv, "--allow-failures"]) == 0
