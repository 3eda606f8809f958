"""Faults around ``brainmets serve``, each with nothing lost: concurrent senders, SIGKILL while
receiving and while scoring, an association aborted halfway, PACS down when results are ready.
Real peers throughout (storescu, Orthanc, serve as its own process)."""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from .conftest import (
    SERVE_AE,
    Orthanc,
    ServeProcess,
    ct_series_files,
    dcmtk,
    status_rows,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow


def _study_uid(study) -> str:
    return pydicom.dcmread(ct_series_files(study)[0], stop_before_pixels=True).StudyInstanceUID


def _files(study) -> list:
    return sorted(p for p in study.rglob("*") if p.is_file())


def _spooled(store, study_uid: str) -> set[str]:
    return {p.stem for p in (store / "spool" / study_uid).glob("*.dcm")}


def _sop_uids(study) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in _files(study)}


def _latest(table, study_uid: str):
    rows = table[table["study_uid"] == study_uid]
    return rows.sort_values("revision").iloc[-1] if len(rows) else None


def _all_sent(store, study_uids) -> bool:
    table = status_rows(store)
    latest = [_latest(table, uid) for uid in study_uids]
    return all(row is not None and row["state"] == "sent" for row in latest)


def _srs_in(orthanc, study_uid: str) -> int:
    return sum(
        1
        for item in orthanc.instances()
        if item.get("StudyInstanceUID") == study_uid and item.get("Modality") == "SR"
    )


def test_twenty_studies_from_four_senders_at_once(
    peers, orthanc, serve_run, head_ct_studies, tmp_path
):
    store = tmp_path / "store"
    serve = ServeProcess(serve_run, store, "--forward", orthanc.destination).start()
    try:
        studies = sorted(head_ct_studies.iterdir())[4:24]
        senders = [
            subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aec",
                    SERVE_AE,
                    "+sd",
                    "+r",
                    "127.0.0.1",
                    str(serve.port),
                    *map(str, studies[i::4]),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            for i in range(4)
        ]
        for sender in senders:
            assert sender.wait(120) == 0, sender.stdout.read()
        uids = [_study_uid(s) for s in studies]
        wait_for(lambda: _all_sent(store, uids), 150, "20 studies scored and sent")
        table = status_rows(store)
        for study, uid in zip(studies, uids, strict=True):
            assert _spooled(store, uid) == _sop_uids(study)  # every instance, none twice
            rows = table[table["study_uid"] == uid]
            assert len(rows) == 1 and rows["instances"].iloc[0] == len(_files(study))
            assert _srs_in(orthanc, uid) == 1
    finally:
        serve.stop()


def test_kill_while_receiving_then_restart(peers, orthanc, serve_run, head_ct_studies, tmp_path):
    store = tmp_path / "store"
    studies = sorted(head_ct_studies.iterdir())[:8]
    serve = ServeProcess(serve_run, store, "--forward", orthanc.destination).start()
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-aec", SERVE_AE, "+sd", "+r", "127.0.0.1", str(serve.port),
         *map(str, studies)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    spool = store / "spool"
    wait_for(lambda: len(list(spool.glob("*/*.dcm"))) >= 5, 60, "the first instances", 0.01)
    serve.kill()
    sender.wait(60)
    kept = {p.stem for p in spool.glob("*/*.dcm")}
    assert 0 < len(kept) < sum(len(_files(s)) for s in studies)  # killed halfway
    serve.start()
    try:
        storescu(serve.port, *studies)  # the sender tries again, as a PACS would
        uids = [_study_uid(s) for s in studies]
        wait_for(lambda: _all_sent(store, uids), 150, "every study scored and sent")
        table = status_rows(store)
        for study, uid in zip(studies, uids, strict=True):
            assert _spooled(store, uid) == _sop_uids(study)
            # The last result covers the whole study; a study scored from what arrived before
            # the kill (it was stable meanwhile) got a new revision, never a second result
            # of the same revision (a part too short to score is a failed row, no result).
            assert _latest(table, uid)["instances"] == len(_files(study))
            rows = table[table["study_uid"] == uid]
            assert _srs_in(orthanc, uid) == (rows["state"] == "sent").sum()
        assert not table.duplicated(["study_uid", "revision"]).any()
    finally:
        serve.stop()


def test_kill_while_scoring_then_restart(peers, orthanc, serve_run, head_ct_studies, tmp_path):
    store = tmp_path / "store"
    studies = sorted(head_ct_studies.iterdir())[8:11]
    serve = ServeProcess(serve_run, store, "--forward", orthanc.destination).start()
    storescu(serve.port, *studies)

    def scoring():
        table = status_rows(store)
        return (table["state"] == "processing").any()

    wait_for(scoring, 60, "a study being scored", 0.01)
    serve.kill()
    assert (status_rows(store)["state"] == "processing").any()
    serve.start()
    try:
        uids = [_study_uid(s) for s in studies]
        wait_for(lambda: _all_sent(store, uids), 120, "every study scored and sent")
        table = status_rows(store)
        assert len(table) == 3 and set(table["revision"]) == {0}  # each scored once
        for uid in uids:
            assert _srs_in(orthanc, uid) == 1
        assert "restart: 1 studies to score again" in serve.log_text()
    finally:
        serve.stop()


def test_association_aborted_halfway(peers, orthanc, serve_run, head_ct_studies, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    store = tmp_path / "store"
    study = head_ct_studies / "SYN0012"
    files = ct_series_files(study)
    serve = ServeProcess(serve_run, store, "--forward", orthanc.destination, stable=3).start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", serve.port, ae_title=SERVE_AE)
        assert assoc.is_established
        acknowledged = set()
        for path in files[: len(files) // 2]:
            ds = pydicom.dcmread(path)
            if assoc.send_c_store(ds).Status == 0:
                acknowledged.add(ds.SOPInstanceUID)
        assoc.abort()
        uid = _study_uid(study)
        assert acknowledged and _spooled(store, uid) == acknowledged
        assert _latest(status_rows(store), uid)["instances"] == len(acknowledged)
        storescu(serve.port, study)  # the whole study again
        wait_for(lambda: _all_sent(store, [uid]), 90, "the study scored and sent")
        assert _spooled(store, uid) == _sop_uids(study)
        assert _latest(status_rows(store), uid)["instances"] == len(_files(study))
    finally:
        serve.stop()


def test_pacs_down_when_results_are_ready_then_up(peers, serve_run, head_ct_studies, tmp_path):
    pacs = Orthanc(tmp_path / "pacs-root")
    store = tmp_path / "store"
    serve = ServeProcess(serve_run, store, "--forward", pacs.destination).start()
    study, later = head_ct_studies / "SYN0014", head_ct_studies / "SYN0015"
    uid = _study_uid(study)
    try:
        storescu(serve.port, study)

        def failed_once():
            row = _latest(status_rows(store), uid)
            return row is not None and row["state"] == "done" and row["send_attempts"] >= 1

        wait_for(failed_once, 60, "a failed send")
        assert "no association" in _latest(status_rows(store), uid)["send_error"]
        storescu(serve.port, later)  # reception goes on while PACS is down
        later_uid = _study_uid(later)
        assert _latest(status_rows(store), later_uid)["instances"] == len(_files(later))
    finally:
        serve.stop()
    pacs.start()
    serve.start()  # what was not sent is sent after a restart
    try:
        wait_for(lambda: _all_sent(store, [uid, later_uid]), 90, "results sent once PACS is up")
        assert _srs_in(pacs, uid) == 1 and _srs_in(pacs, later_uid) == 1
    finally:
        serve.stop()
        pacs.stop()
