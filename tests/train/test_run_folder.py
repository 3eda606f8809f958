"""The run folder while a trainer owns it: one owner, the log, and undoing a failed start."""

from __future__ import annotations

import logging

import pytest

from brainmets import rundir
from brainmets.io import InUseError
from brainmets.train.run_folder import RunFolder


def test_a_second_owner_is_refused_until_the_first_closes(tmp_path):
    first = RunFolder(tmp_path / "run")
    first.claim()
    with pytest.raises(InUseError, match="run folder"):
        RunFolder(tmp_path / "run").claim()
    first.close()
    second = RunFolder(tmp_path / "run")
    second.claim()
    second.close()


def test_a_failed_start_leaves_the_folder_as_it_was_and_the_log_says_why(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    folder = RunFolder(run)
    folder.claim()
    folder.check(resume=False)
    folder.open_log()
    (run / rundir.SPLITS).write_text("patient_id,split\n")
    logging.getLogger("brainmets.train.trainer").info("started")
    folder.log_failed_start(ValueError("the val split is empty"))
    folder.close()
    folder.undo_start()
    assert sorted(p.name for p in run.iterdir()) == sorted(["notes.txt", rundir.LOG])
    log = (run / rundir.LOG).read_text()
    assert "started" in log and "training could not start: ValueError" in log


def test_a_folder_that_did_not_exist_leaves_no_trace(tmp_path):
    folder = RunFolder(tmp_path / "new")
    folder.claim()
    folder.check(resume=False)
    folder.close()
    folder.undo_start()
    assert not (tmp_path / "new").exists()


def test_resume_needs_a_state_and_a_new_run_keeps_an_old_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="never saved a checkpoint"):
        RunFolder(tmp_path / "run").check(resume=True)
    state = tmp_path / "run" / rundir.CHECKPOINTS / rundir.RESUME_STATE
    state.parent.mkdir(parents=True)
    state.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--resume"):
        RunFolder(tmp_path / "run").check(resume=False)
