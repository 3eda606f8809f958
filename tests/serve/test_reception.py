"""Reception under hostile or broken peers, without a model: the Storage SCP with its spool and
record in this process, dcmtk's storescu and echoscu, raw sockets and pynetdicom associations
on the other end. Each test is one fault that once went through, now refused or survived."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import RLELossless, generate_uid

from brainmets.serve.admission import Limits
from brainmets.serve.record import Record
from brainmets.serve.scp import StorageSCP
from brainmets.serve.spool import Spool

from .conftest import SERVE_AE, copy_study, ct_series_files, dcmtk, storescu, wait_for


@pytest.fixture
def reception(peers, tmp_path, caplog):
    """Start a Storage SCP with the given limits; every one started is stopped after."""
    caplog.set_level(logging.INFO, logger="brainmets.serve")
    started = []

    def start(**limits) -> SimpleNamespace:
        store = tmp_path / f"store{len(started)}"
        spool, record = Spool(store), Record(store)
        scp = StorageSCP(spool, record, ae_title=SERVE_AE, limits=Limits(**limits))
        node = SimpleNamespace(scp=scp, record=record, spool=store / "spool",
                               port=scp.start("127.0.0.1", 0))  # fmt: skip
        started.append(node)
        return node

    yield start
    for node in started:
        node.scp.stop()
        node.record.close()


def _said(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _spooled(node) -> set[str]:
    return {p.stem for p in node.spool.glob("*/*.dcm")}


def _association(port: int, ae_title: str = "MODALITY"):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=SERVE_AE)


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom, writing the bad files
def test_uids_that_are_not_uids_are_refused_at_receipt(reception, head_ct_studies, tmp_path):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0016")[:5]
    bad = {
        1: ("SOPInstanceUID", "1.2.826.0.1.3680043.8.498." + "7" * 50),  # 76 characters
        2: ("SOPInstanceUID", "1.2.826.0.1.3680043.8.498.01"),  # a leading zero
        3: ("SeriesInstanceUID", "1.2.826.0.1.3680043.8.498." + "1" * 40),  # 66 characters
        4: ("SOPInstanceUID", "1.2." + "9" * 296),  # once 0xA700: a file name too long
    }

    def corrupt(ds, i):
        if i in bad:
            keyword, uid = bad[i]
            setattr(ds, keyword, uid)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = uid

    sent = storescu(node.port, copy_study(files, tmp_path / "study", corrupt), check=False)
    said = _said(sent)
    assert said.count("CannotUnderstand") == 4, said
    assert "OutOfResources" not in said
    assert _spooled(node) == {pydicom.dcmread(files[0]).SOPInstanceUID}
    table = node.record.table()
    assert table["instances"].tolist() == [1]


def test_one_damaged_compressed_slice_is_that_instances_refusal(
    reception, head_ct_studies, tmp_path
):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0017")

    def compress(ds, i):
        ds.compress(RLELossless)
        if i == 4:  # its RLE segments cut in half: the header is intact, the pixels are not
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) // 2]])

    study = copy_study(files, tmp_path / "rle", compress)
    sent = storescu(node.port, study, check=False, options=["-xr"])  # RLE as it is on disk
    said = _said(sent)
    assert said.count("CannotUnderstand") == 1, said
    assert len(_spooled(node)) == len(files) - 1
    assert node.record.table()["instances"].tolist() == [len(files) - 1]


def test_idle_connections_and_associations_block_no_sender(
    reception, head_ct_studies, caplog, tmp_path
):
    node = reception(idle_seconds=2)
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(10)]
    idle = [_association(node.port) for _ in range(10)]
    assert all(a.is_established for a in idle)
    study = head_ct_studies / "SYN0018"
    start = time.monotonic()
    storescu(node.port, study)  # at once, beside twenty peers that hold a place and do nothing
    assert time.monotonic() - start < 2
    assert len(_spooled(node)) == len(list(study.rglob("*.dcm")))
    for sock in silent:  # each closed by the node within its request timeout
        sock.settimeout(10)
        assert sock.recv(16) == b""
        sock.close()
    wait_for(lambda: not any(a.is_established for a in idle), 10, "idle associations aborted")
    log = caplog.text
    assert "sent no association request" in log and "more like it" not in log.split("\n")[0]
    assert "no traffic for 2 s (--idle-seconds)" in log
    assert "Network timeout reached" not in log


def test_associations_past_the_limit_are_refused_with_the_reason(reception, caplog):
    node = reception(max_associations=2)
    held = [_association(node.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    echo = subprocess.run([dcmtk("echoscu"), "-aet", "MONITOR", "-aec", SERVE_AE, "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert echo.returncode != 0
    assert "Local Limit Exceeded" in _said(echo).title(), _said(echo)
    assert "2 connections open, the limit is 2 (--max-associations)" in caplog.text
    for assoc in held:
        assoc.release()
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", SERVE_AE, "127.0.0.1",
             str(node.port)], capture_output=True).returncode == 0, 10, "room again")  # fmt: skip


def test_below_the_free_space_floor_only_instances_already_held_are_acknowledged(
    reception, head_ct_studies, caplog
):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0019")
    assoc = _association(node.port)
    held = pydicom.dcmread(files[0])
    assert assoc.send_c_store(held).Status == 0
    node.scp.limits = Limits(min_free_bytes=1 << 60)  # more than any disk has: it is "full"
    # A sender that did not hear the acknowledgement sends the same instance again: it is held.
    assert assoc.send_c_store(held).Status == 0
    status = assoc.send_c_store(pydicom.dcmread(files[1]))
    assert status.Status == 0xA700 and "below the floor" in status.ErrorComment
    assoc.release()
    refused = subprocess.run([dcmtk("echoscu"), "-aec", SERVE_AE, "127.0.0.1", str(node.port)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.returncode != 0 and "Temporary Congestion" in _said(refused).title()
    assert "below the floor" in caplog.text and "--min-free-mb" in caplog.text
    assert _spooled(node) == {held.SOPInstanceUID}


def test_changed_content_under_a_known_uid_is_a_new_revision_and_said(
    reception, head_ct_studies, caplog
):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0020")
    assoc = _association(node.port)
    for path in files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    study = node.record.claim_next(0)  # scored and sent meanwhile
    node.record.finish(study.id, results=["sr.dcm"], probability=0.1, decision=0)
    again = pydicom.dcmread(files[3])
    assert assoc.send_c_store(again).Status == 0  # the same content: nothing new
    assert len(node.record.table()) == 1
    again.PixelData = bytes(len(again.PixelData))  # other pixels under the same SOP UID
    assert assoc.send_c_store(again).Status == 0
    assoc.release()
    table = node.record.table()
    assert table[["revision", "state"]].values.tolist() == [[0, "done"], [1, "received"]]
    kept = pydicom.dcmread(node.spool / study.study_uid / f"{again.SOPInstanceUID}.dcm")
    assert kept.PixelData == again.PixelData
    assert f"instance {again.SOPInstanceUID}" in caplog.text
    assert "sent again with other content" in caplog.text and "revision 1" in caplog.text


def test_a_database_error_at_receipt_is_a_temporary_failure(reception, head_ct_studies, caplog):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0021")
    with node.record._lock:  # the record refuses writes, as SQLite does on a full disk
        node.record._db.execute("PRAGMA query_only = ON")
    assoc = _association(node.port)
    status = assoc.send_c_store(pydicom.dcmread(files[0]))
    assert status.Status == 0xA700 and "readonly database" in status.ErrorComment
    with node.record._lock:
        node.record._db.execute("PRAGMA query_only = OFF")
    assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0  # the sender's retry
    assoc.release()
    assert node.record.table()["instances"].tolist() == [1]
    assert caplog.text.count("could not store instance") == 1


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom, writing the bad file
def test_reception_logs_each_association_and_study_with_counts_and_no_names(
    reception, head_ct_studies, caplog, tmp_path
):
    node = reception()
    files = ct_series_files(head_ct_studies / "SYN0022")
    uid = generate_uid()

    def identified(ds, i):
        ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19470312"
        if i == 0:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid + ".99999999999" * 4

    storescu(node.port, copy_study(files, tmp_path / "study", identified), check=False)
    log = caplog.text
    assert "association from AE 'STORESCU' ended after" in log
    assert f"{len(files) - 1} stored, 1 refused" in log
    assert "Doe" not in log and "19470312" not in log
