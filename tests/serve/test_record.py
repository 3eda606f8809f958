"""The serve record's state machine and the spool, without a network: a fake clock drives the
stability window and the forwarding back-off."""

from __future__ import annotations

import pytest

from brainmets.serve.forward import Destination, backoff
from brainmets.serve.record import Record, format_status, read_status
from brainmets.serve.scp import Spool, register_spooled

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
    assert record.claim_stable(stable_seconds=5) is None
    clock.now += 4.5
    study = record.claim_stable(stable_seconds=5)
    assert study is not None and study.study_uid == STUDY and study.instances == 3
    assert record.claim_stable(stable_seconds=5) is None  # claimed once
    assert record.table()["state"].tolist() == ["processing"]


def test_instances_after_scoring_make_a_new_revision_and_resends_do_not(record, clock):
    _receive(record, clock, "1.1", "1.2")
    clock.now += 10
    study = record.claim_stable(5)
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
    study = record.claim_stable(5)
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
    record.claim_stable(5)
    record.close()  # the process died here
    again = Record(tmp_path, clock=clock)
    assert again.recover() == 1
    study = again.claim_stable(5)
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
    study = record.claim_stable(5)
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
