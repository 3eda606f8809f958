"""The serve record's state machine and the spool, without a network: a fake clock drives the
stability window and the forwarding back-off."""

from __future__ import annotations

import pytest

from brainmets.serve.forward import Destination, backoff
from brainmets.serve.record import Record, format_status, read_status
from brainmets.serve.spool import Spool, register_spooled

STUDY = "1.2.826.0.1.3680043.8.498.1"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def record(tmp_path, clock):
    rec = Record(tmp_path, clock=clock)
    yield rec
    rec.close()


def _receive(record, clock, *sops, study=STUDY, step=1.0):
    for sop in sops:
        record.receive(study, sop, f"/spool/{study}/{sop}.dcm")
        clock.now += step


def test_a_study_is_taken_for_scoring_once_it_is_stable(record, clock):
    _receive(record, clock, "1.1", "1.2", "1.3")  # last instance at now - 1
    assert record.claim_next(stable_seconds=5) is None
    clock.now += 4.5
    study = record.claim_next(stable_seconds=5)
    assert study is not None and study.study_uid == STUDY and study.instances == 3
    assert record.claim_next(stable_seconds=5) is None  # claimed once
    assert record.table()["state"].tolist() == ["processing"]


def test_instances_after_scoring_make_a_new_revision_and_resends_do_not(record, clock):
    _receive(record, clock, "1.1", "1.2")
    clock.now += 10
    study = record.claim_next(5)
    record.finish(study.id, results=["a.dcm"], probability=0.7, decision=1, threshold=0.5)
    _receive(record, clock, "1.1", "1.2")  # a sender repeating what was acknowledged
    assert len(record.table()) == 1
    _receive(record, clock, "1.3")
    table = record.table()
    assert table["revision"].tolist() == [0, 1]
    assert table["state"].tolist() == ["done", "received"]
    assert table["instances"].tolist() == [2, 3]  # the new result covers the whole study


def test_an_instance_during_scoring_opens_the_next_revision(record, clock):
    _receive(record, clock, "1.1")
    clock.now += 10
    study = record.claim_next(5)
    _receive(record, clock, "1.2")
    record.finish(study.id, error="too few slices")
    assert record.table()[["revision", "state"]].values.tolist() == [
        [0, "failed"],
        [1, "received"],
    ]


def test_restart_scores_again_what_a_crash_left_in_scoring(tmp_path, clock):
    record = Record(tmp_path, clock=clock)
    _receive(record, clock, "1.1")
    clock.now += 10
    record.claim_next(5)
    record.close()  # the process died here
    again = Record(tmp_path, clock=clock)
    assert again.recover().rescore == 1
    study = again.claim_next(5)
    assert study is not None and study.revision == 0
    again.close()


def test_a_refused_study_fails_with_its_reason_until_ct_arrives(record, clock):
    record.refuse(STUDY, "refused: MR Image Storage (only CT is accepted)")
    row = record.table().iloc[0]
    assert (row["state"], row["instances"]) == ("failed", 0)
    assert "MR Image Storage" in row["error"]
    _receive(record, clock, "1.1")
    row = record.table().iloc[0]
    assert (row["state"], row["instances"], row["error"]) == ("received", 1, "")
    record.refuse(STUDY, "refused: a dose report")  # beside accepted CT: no row of its own
    assert len(record.table()) == 1


def test_unsent_results_wait_for_their_back_off(record, clock):
    _receive(record, clock, "1.1")
    clock.now += 10
    study = record.claim_next(5)
    record.finish(study.id, results=["sr.dcm"])
    assert [s.id for s in record.due_for_sending()] == [study.id]
    record.send_failed(study.id, "no association with PACS", retry_in=backoff(1))
    assert record.due_for_sending() == []
    clock.now += backoff(1)
    (due,) = record.due_for_sending()
    assert due.send_attempts == 1
    record.sent(study.id)
    assert record.table()["state"].tolist() == ["sent"]
    assert [backoff(n) for n in (1, 2, 3, 10)] == [5, 10, 20, 300]


def test_status_reads_the_record_of_a_store(record, clock, tmp_path):
    _receive(record, clock, "1.1")
    text = format_status(read_status(tmp_path))
    assert "received" in text and "…" in text  # the UID shortened to its tail
    with pytest.raises(FileNotFoundError, match="no serve record"):
        read_status(tmp_path / "elsewhere")


def test_instances_in_the_spool_but_not_the_record_are_recorded(tmp_path, clock):
    spool = Spool(tmp_path)
    spool.write(STUDY, "1.1", b"DICM")
    spool.write(STUDY, "1.2", b"DICM")
    (spool.study_dir(STUDY) / ".1.3.dcm.x.tmp").write_bytes(b"half")  # never acknowledged
    record = Record(tmp_path, clock=clock)
    record.receive(STUDY, "1.1", str(spool.study_dir(STUDY) / "1.1.dcm"))
    assert register_spooled(spool, record) == 1
    assert record.table()["instances"].tolist() == [2]
    assert not list(spool.study_dir(STUDY).glob("*.tmp"))
    record.close()


@pytest.mark.parametrize(
    "text",
    ["ORTHANC", "ORTHANC@host", "@host:104", "ORTHANC@host:0", "A_TITLE_LONGER_THAN_16@h:104"],
)
def test_a_bad_destination_is_refused(text):
    with pytest.raises(ValueError, match="AET@HOST:PORT"):
        Destination.parse(text)


def test_a_destination_is_parsed():
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)


# ------------------------------------------------------------------------------- no lost score


def _scored(record, clock, *sops):
    _receive(record, clock, *sops)
    clock.now += 10
    study = record.claim_next(5)
    record.record_score(
        study.id, patient_id="P1", series_uid="1.2.3", probability=0.82, decision=1,
        threshold=0.5, model="abc123", scores='[{"patient_id": "P1"}]',
    )  # fmt: skip
    return study


def test_a_score_is_kept_when_its_results_cannot_be_written(record, clock):
    study = _scored(record, clock, "1.1")
    assert record.write_failed(study.id, "No space left on device", retry_in=5)
    row = record.table().iloc[0]
    assert (row["state"], row["probability"], row["decision"]) == ("scored", 0.82, 1)
    assert "No space left on device" in row["error"] and row["write_attempts"] == 1
    assert record.claim_next(5) is None  # not before its back-off
    clock.now += 5
    again = record.claim_next(5)
    assert again.id == study.id and again.scores and again.model == "abc123"
    record.written(again.id, ["sr.dcm"])
    row = record.table().iloc[0]
    assert (row["state"], row["error"], row["write_attempts"]) == ("done", "", 2)


def test_writing_gives_up_after_its_attempts_and_a_restart_tries_again(tmp_path, clock):
    from brainmets.serve.record import MAX_WRITE_ATTEMPTS

    record = Record(tmp_path, clock=clock)
    study = _scored(record, clock, "1.1")
    for attempt in range(1, MAX_WRITE_ATTEMPTS + 1):
        again = record.write_failed(study.id, "disk full", retry_in=0)
        assert again == (attempt < MAX_WRITE_ATTEMPTS)
        if again:
            assert record.claim_next(5).id == study.id
    row = record.table().iloc[0]
    assert row["state"] == "failed" and row["probability"] == 0.82  # the score survives
    assert f"gave up after {MAX_WRITE_ATTEMPTS} attempts" in row["error"]
    assert record.claim_next(5) is None
    record.close()
    restarted = Record(tmp_path, clock=clock)
    assert restarted.recover().rewrite == 1
    assert restarted.claim_next(5).scores  # written from the recorded score, not rescored
    restarted.close()


def test_a_crash_after_scoring_writes_the_results_from_the_recorded_score(tmp_path, clock):
    record = Record(tmp_path, clock=clock)
    _scored(record, clock, "1.1")
    record.close()  # killed while writing the results
    restarted = Record(tmp_path, clock=clock)
    recovered = restarted.recover()
    assert (recovered.rescore, recovered.rewrite) == (0, 1)
    assert restarted.table()["state"].tolist() == ["scored"]
    restarted.close()


def test_a_study_sent_at_the_first_try_counts_one_attempt(record, clock):
    study = _scored(record, clock, "1.1")
    record.written(study.id, ["sr.dcm"])
    record.sent(study.id)
    assert record.table()["send_attempts"].tolist() == [1]


def test_sending_gives_up_after_its_attempts_and_a_restart_tries_again(tmp_path, clock):
    from brainmets.serve.record import MAX_SEND_ATTEMPTS

    record = Record(tmp_path, clock=clock)
    study = _scored(record, clock, "1.1")
    record.written(study.id, ["sr.dcm"])
    for _ in range(MAX_SEND_ATTEMPTS - 1):
        assert record.send_failed(study.id, "no association with PACS", retry_in=0)
    assert not record.send_failed(study.id, "no association with PACS", retry_in=0)
    assert record.due_for_sending() == []
    row = record.table().iloc[0]
    assert row["send_attempts"] == MAX_SEND_ATTEMPTS and "gave up" in row["send_error"]
    record.close()
    restarted = Record(tmp_path, clock=clock)
    assert restarted.recover().resend == 1
    assert [s.id for s in restarted.due_for_sending()] == [study.id]
    restarted.close()


# ------------------------------------------------------------------------------- receipt


def test_the_patient_id_is_in_the_record_from_the_first_instance(record, clock):
    record.receive(STUDY, "1.1", "/spool/1.1.dcm", patient_id="PAT-7")
    record.receive(STUDY, "1.2", "/spool/1.2.dcm", patient_id="PAT-7")
    row = record.table().iloc[0]
    assert (row["state"], row["patient_id"], row["instances"]) == ("received", "PAT-7", 2)


def test_changed_content_under_a_known_uid_is_a_new_revision(record, clock, tmp_path):
    path = tmp_path / "1.1.dcm"
    path.write_bytes(b"DICM")
    first = record.receive(STUDY, "1.1", str(path), digest="aaa")
    assert first.opened and not first.changed
    assert record.held("1.1", "aaa") and not record.held("1.1", "bbb")
    clock.now += 10
    study = record.claim_next(5)
    record.finish(study.id, results=["sr.dcm"], probability=0.2, decision=0, threshold=0.5)
    same = record.receive(STUDY, "1.1", str(path), digest="aaa")  # a retry: nothing new
    assert not same.opened and len(record.table()) == 1
    other = record.receive(STUDY, "1.1", str(path), digest="bbb")
    assert other.opened and other.changed and other.revision == 1
    table = record.table()
    assert table["state"].tolist() == ["done", "received"]
    assert record.held("1.1", "bbb")


def test_an_incomplete_study_waits_and_each_arrival_checks_it_again(record, clock):
    _receive(record, clock, "1.1", "1.3")
    clock.now += 10
    study = record.claim_next(5)
    assert record.hold(study.id, until=clock.now + 100, reason="slices missing")
    row = record.table().iloc[0]
    assert (row["state"], row["partial"]) == ("received", "slices missing")
    clock.now += 50
    assert record.claim_next(5) is None  # waiting for the rest
    _receive(record, clock, "1.2")  # the missing slice: checked again once stable
    clock.now += 5
    again = record.claim_next(5)
    assert again.id == study.id and again.instances == 3


def test_a_study_checked_while_more_arrived_is_superseded_by_its_next_revision(record, clock):
    _receive(record, clock, "1.1", "1.3")
    clock.now += 10
    study = record.claim_next(5)
    _receive(record, clock, "1.2")  # arrives while the worker checks revision 0
    assert not record.hold(study.id, until=clock.now + 100, reason="slices missing")
    table = record.table()
    assert table[["revision", "state"]].values.tolist() == [[0, "failed"], [1, "received"]]
    assert "superseded by revision 1" in table["error"].iloc[0]


def test_a_restart_gives_a_study_cut_short_the_stable_window_again(tmp_path, clock):
    record = Record(tmp_path, clock=clock)
    _receive(record, clock, "1.1", "1.2")
    record.close()  # killed while the study arrived
    clock.now += 3600  # restarted much later: its sender may resume now
    restarted = Record(tmp_path, clock=clock)
    restarted.recover(stable_seconds=5)
    assert restarted.claim_next(5) is None
    clock.now += 5
    assert restarted.claim_next(5) is not None
    restarted.close()


def test_a_record_of_the_earlier_version_is_upgraded_in_place(tmp_path, clock):
    import sqlite3

    db = sqlite3.connect(tmp_path / "serve.sqlite")
    db.executescript(V1_SCHEMA)
    db.execute(
        "INSERT INTO studies (study_uid, revision, state, instances, first_received, "
        "last_received, probability, decision, results, send_attempts) "
        "VALUES (?, 0, 'done', 1, 1, 1, 0.4, 0, '[\"sr.dcm\"]', 2)",
        (STUDY,),
    )
    db.execute("INSERT INTO instances VALUES ('1.1', ?, '/spool/1.1.dcm', 1, 1)", (STUDY,))
    db.commit()
    db.close()
    record = Record(tmp_path, clock=clock)
    row = record.table().iloc[0]
    assert (row["state"], row["probability"], row["send_attempts"]) == ("done", 0.4, 2)
    assert [s.results for s in record.due_for_sending()] == [["sr.dcm"]]
    study = _scored(record, clock, "1.2")  # the new state is allowed
    record.write_failed(study.id, "disk full", retry_in=5)
    assert record.table()["state"].tolist() == ["done", "scored"]
    record.close()
    Record(tmp_path, clock=clock).close()  # opening an upgraded record changes nothing


# ------------------------------------------------------------------------------- retention


def test_retention_deletes_a_finished_studys_spool_and_keeps_its_record(tmp_path, clock):
    from brainmets.serve.spool import apply_retention

    spool = Spool(tmp_path)
    record = Record(tmp_path, clock=clock)
    path = spool.write(STUDY, "1.1", b"DICM")
    record.receive(STUDY, "1.1", str(path), digest="aaa")
    clock.now += 10
    study = record.claim_next(5)
    results = tmp_path / "results" / STUDY / "r0"
    results.mkdir(parents=True)
    sr, capture = results / "P1_sr.dcm", results / "P1_gradcam_rank1.dcm"
    sr.write_bytes(b"SR")
    capture.write_bytes(b"SC")
    record.finish(study.id, results=[str(sr), str(capture)], probability=0.3, decision=0)
    keep = 86400.0
    assert apply_retention(spool, record, keep, forwarding=True, now=clock.now + 2 * keep) == 0
    record.sent(study.id)  # nothing waits once PACS has the results
    assert apply_retention(spool, record, keep, forwarding=True, now=clock.now + keep / 2) == 0
    assert apply_retention(spool, record, keep, forwarding=True, now=clock.now + 2 * keep) == 1
    assert not spool.study_dir(STUDY).exists()
    assert sr.is_file() and not capture.exists()  # the SR a later revision would replace
    row = record.table().iloc[0]
    assert row["state"] == "sent" and row["pruned_at"] > 0
    # The same instance sent again after the spool is gone is received again.
    assert not record.held("1.1", "aaa")
    again = record.receive(STUDY, "1.1", str(spool.write(STUDY, "1.1", b"DICM")), digest="aaa")
    assert again.opened and again.revision == 1
    assert apply_retention(spool, record, keep, forwarding=True, now=clock.now + 3 * keep) == 0
    record.close()


V1_SCHEMA = """
CREATE TABLE studies (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'done', 'failed', 'sent')),
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    probability REAL,
    decision INTEGER,
    threshold REAL,
    model TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '[]',
    processed_at REAL,
    sent_at REAL,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_send REAL NOT NULL DEFAULT 0,
    send_error TEXT NOT NULL DEFAULT '',
    UNIQUE (study_uid, revision)
);
CREATE TABLE instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    received REAL NOT NULL,
    study_row INTEGER NOT NULL REFERENCES studies (id)
);
CREATE INDEX studies_state ON studies (state);
CREATE INDEX instances_study ON instances (study_uid);
"""
