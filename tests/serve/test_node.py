"""The node as a whole in this process (reception, the scoring worker, the record), with dcmtk's
storescu as the sender: what it refuses to serve, what it survives, and what it does with a
study that is not all there."""

from __future__ import annotations

import logging
import threading

import pydicom
import pytest

from brainmets.backends import BackendSpec
from brainmets.serve.node import ModelRefused, Node, NodeConfig
from brainmets.serve.record import status_text

from .conftest import ct_series_files, status_rows, storescu, wait_for


@pytest.fixture
def start_node(peers, tmp_path, caplog, one_thread):
    """Start a node on a free port with short windows; every one started is stopped after."""
    caplog.set_level(logging.INFO, logger="brainmets.serve")
    started = []

    def start(run, store=None, **options) -> Node:
        config = {"port": 0, "stable_seconds": 0.3, "poll_seconds": 0.1, "top_k": 1,
                  "backend": BackendSpec(device="cpu"), **options}  # fmt: skip
        node = Node(run, store or tmp_path / "store", NodeConfig(**config))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def _latest(store, revision=None):
    table = status_rows(store)
    if revision is not None:
        table = table[table["revision"] == revision]
    return table.sort_values("revision").iloc[-1] if len(table) else None


def _state(store, revision=None) -> str | None:
    row = _latest(store, revision)
    return None if row is None else row["state"]


def _sr(node, revision: int):
    """The study's SR of ``revision`` as a TID 1500 reader parses it, and its SOP UID."""
    from brainmets.dicom_results import read_result

    (path,) = (node.store / "results").glob(f"*/r{revision}/*_sr.dcm")
    return read_result(path), pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def test_a_model_that_does_not_rank_is_refused_unless_allowed(
    start_node, chance_run, head_ct_studies, tmp_path, caplog, capsys
):
    from brainmets.cli import main

    store = tmp_path / "store"
    with pytest.raises(ModelRefused, match="not shown to rank .* add --allow-chance"):
        start_node(chance_run, store)
    assert main(["-q", "serve", str(chance_run), "--store", str(tmp_path / "cli")]) == 2
    assert "--allow-chance" in capsys.readouterr().err
    node = start_node(chance_run, store, allow_chance=True, keep_days=0, retention_every=0.1)
    assert "serving with --allow-chance: the model is not shown to rank" in caplog.text
    status = status_text(store)
    assert "does_not_rank (served with --allow-chance)" in status.splitlines()[0]
    storescu(node.port, head_ct_studies / "SYN0009")
    wait_for(lambda: _state(store) == "done", 60, "the study scored")
    reported, _ = _sr(node, 0)
    assert any("not shown to rank" in n and "--allow-chance" in n for n in reported.notes)
    # Retention (0 days): once nothing of the study waits, its spool goes, its record stays.
    wait_for(lambda: not any((store / "spool").iterdir()), 10, "the spool emptied")
    assert _latest(store)["pruned_at"] > 0 and _sr(node, 0)


def test_the_workers_survive_a_database_that_refuses_writes(
    start_node, serve_run, head_ct_studies, caplog
):
    node = start_node(serve_run, stable_seconds=2)
    record = node.record
    storescu(node.port, head_ct_studies / "SYN0010")
    with record._lock:  # SQLite refuses writes, as it does on a full disk
        record._db.execute("PRAGMA query_only = ON")
    wait_for(lambda: "scoring: " in caplog.text, 10, "the worker's error")
    threading.Event().wait(2)  # the worker keeps trying meanwhile
    with record._lock:
        record._db.execute("PRAGMA query_only = OFF")
    wait_for(lambda: _state(node.store) == "done", 60, "the study scored without a restart")
    assert caplog.text.count("readonly database") == 1  # said once, not once per attempt
    assert "the study stays queued" in caplog.text
    assert "scoring: working again after" in caplog.text
    assert any(t.name == "brainmets-score" and t.is_alive() for t in threading.enumerate())


def test_a_score_is_kept_when_its_results_cannot_be_written(
    start_node, serve_run, head_ct_studies, tmp_path, caplog
):
    store = tmp_path / "store"
    store.mkdir()
    (store / "results").write_text("a file where the results folder goes")
    node = start_node(serve_run, store)
    storescu(node.port, head_ct_studies / "SYN0011")

    def scored():
        row = _latest(store)
        return row.to_dict() if row is not None and row["state"] == "scored" else None

    row = wait_for(scored, 60, "the study scored, its results not written")
    assert 0 <= row["probability"] <= 1 and row["decision"] in (0, 1)
    assert "results not written" in row["error"] and "results" in row["error"]
    (store / "results").unlink()  # space again: the worker writes from the recorded score
    wait_for(lambda: _state(store) == "done", 30, "the results written")
    done = _latest(store)
    assert done["probability"] == row["probability"] and done["error"] == ""
    assert done["write_attempts"] == 2
    assert caplog.text.count(" instances, scoring") == 1  # scored once, written twice
    assert _sr(node, 0)[0].probability == pytest.approx(done["probability"], abs=1e-6)


def test_an_incomplete_study_waits_then_is_marked_partial_and_the_rest_replaces_it(
    start_node, serve_run, head_ct_studies, tmp_path, caplog
):
    store = tmp_path / "store"
    node = start_node(serve_run, store, incomplete_seconds=3)
    files = ct_series_files(head_ct_studies / "SYN0012")
    held_back = files[len(files) // 2]
    arrived = tmp_path / "arrived"
    arrived.mkdir()
    for path in files:
        if path != held_back:
            (arrived / path.name).symlink_to(path)
    storescu(node.port, arrived)

    def waiting():
        row = _latest(store)
        ok = row is not None and row["state"] == "received" and row["partial"]
        return row.to_dict() if ok else None

    row = wait_for(waiting, 10, "the study held back as incomplete")
    assert "slices missing between" in row["partial"] and row["patient_id"]
    assert "looks incomplete" in caplog.text
    wait_for(lambda: _state(store) == "done", 30, "the partial result after the wait")
    assert "scored, and its result marked partial" in caplog.text
    first, first_uid = _sr(node, 0)
    assert not first.complete and any("slices missing between" in n for n in first.notes)
    storescu(node.port, held_back)  # the missing slice: a complete revision replaces it
    wait_for(lambda: _state(store, revision=1) == "done", 30, "the complete revision")
    complete = _latest(store, revision=1)
    assert complete["partial"] == "" and complete["instances"] == len(files)
    second, _ = _sr(node, 1)
    assert second.complete and second.predecessors == [first_uid]
