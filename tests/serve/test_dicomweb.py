"""DICOMweb in and out, against Orthanc with its DICOMweb plugin: results posted by STOW-RS (serve
--forward URL, predict --dicom-out URL) are those C-STORE delivers, and a study put into the
archive is pulled (QIDO-RS, WADO-RS) through the same receipt checks, each instance once."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from brainmets.backends import BackendSpec
from brainmets.dicom_results import read_result
from brainmets.serve.forward import SendError, StowDestination, parse_destination
from brainmets.serve.node import Node, NodeConfig
from brainmets.serve.pull import Puller, PullSource
from brainmets.serve.record import Record, status_text
from brainmets.serve.spool import Spool

from .conftest import (
    ServeProcess,
    copy_study,
    ct_series_files,
    free_port,
    status_rows,
    storescu,
    wait_for,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def start_node(peers, tmp_path, caplog, one_thread):
    """In-process nodes with short windows, stopped after the test."""
    caplog.set_level(logging.INFO, logger="brainmets.serve")
    started = []

    def start(run, store, **options) -> Node:
        config = {"port": 0, "stable_seconds": 0.3, "poll_seconds": 0.1, "top_k": 2,
                  "backend": BackendSpec(device="cpu"), **options}  # fmt: skip
        node = Node(run, store, NodeConfig(**config))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def _sent(store) -> bool:
    table = status_rows(store)
    return len(table) > 0 and set(table["state"]) == {"sent"}


def _study_uid(files) -> str:
    return pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID


def _polled(store) -> float:
    """When the node last polled its DICOMweb server (the record's pull mark row)."""
    db = sqlite3.connect(f"file:{store / 'serve.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT MAX(polled_at) FROM pull_sources").fetchone()
    finally:
        db.close()
    return row[0] or 0.0


def _sop_uids(files) -> set[str]:
    return {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


# ------------------------------------------------------------------------------- out


def test_results_posted_by_stow_are_those_sent_by_c_store(
    start_node, orthanc, serve_run, head_ct_studies, tmp_path
):
    orthanc.clear()
    study = head_ct_studies / "SYN0013"
    study_uid = _study_uid(ct_series_files(study))
    received = {}
    for how, forward in (("dimse", orthanc.destination), ("dicomweb", orthanc.dicomweb)):
        node = start_node(serve_run, tmp_path / how, forward=parse_destination(forward))
        storescu(node.port, study)
        wait_for(lambda n=node: _sent(n.store), 60, f"the results sent by {how}")
        node.stop()
        received[how] = orthanc.results(study_uid)
        orthanc.clear()
    dimse, web = received["dimse"], received["dicomweb"]
    assert sorted(web) == sorted(dimse) == ["OT", "SR"] and len(web["OT"]) == 2
    # The same objects (their UIDs come from the study, the series and the model), with the
    # same finding, probability, references and captures.
    for modality in ("SR", "OT"):
        by_uid = {ds.SOPInstanceUID: ds for ds in dimse[modality]}
        assert set(by_uid) == {ds.SOPInstanceUID for ds in web[modality]}
        for ds in web[modality]:
            other = by_uid[ds.SOPInstanceUID]
            if modality == "OT":
                assert ds.PixelData == other.PixelData
    web_sr, dimse_sr = read_result(web["SR"][0]), read_result(dimse["SR"][0])
    assert web_sr.probability == dimse_sr.probability
    assert (web_sr.present, web_sr.threshold, web_sr.model_id, web_sr.source_images) == (
        dimse_sr.present, dimse_sr.threshold, dimse_sr.model_id, dimse_sr.source_images,
    )  # fmt: skip
    assert web["SR"][0].ContentSequence == dimse["SR"][0].ContentSequence


def test_a_stow_destination_that_refuses_says_why(peers, orthanc, head_ct_studies):
    sr = ct_series_files(head_ct_studies / "SYN0020")[0]
    with pytest.raises(SendError, match=r"HTTP 404"):
        StowDestination.parse(f"{orthanc.url}/no-such-service").send([str(sr)], calling_ae="X")
    with pytest.raises(SendError, match=r"ConnectionError"):
        StowDestination.parse(f"http://127.0.0.1:{free_port()}/dicom-web").send(
            [str(sr)], calling_ae="X"
        )
    with pytest.raises(ValueError, match="credentials in the URL"):
        parse_destination("https://user:secret@pacs/dicom-web")


def test_predict_posts_its_dicom_results_to_a_stow_url(
    peers, orthanc, serve_run, head_ct_studies, tmp_path, capsys
):
    from brainmets.cli import main

    orthanc.clear()
    study = head_ct_studies / "SYN0014"
    out = tmp_path / "dicom"
    rc = main(["-q", "predict", str(serve_run), str(study), "--out", str(tmp_path / "p.csv"),
               "--device", "cpu", "--top-k", "1", "--dicom-out", orthanc.dicomweb,
               "--dicom-out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    written = {pydicom.dcmread(p).SOPInstanceUID for p in out.rglob("*.dcm")}
    held = orthanc.results(_study_uid(ct_series_files(study)))
    assert sorted(held) == ["OT", "SR"] and len(written) == 2  # the SR and one capture
    assert {ds.SOPInstanceUID for objects in held.values() for ds in objects} == written
    # A server that cannot be reached: the patient's row says so and the exit code is 1.
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    rc = main(["-q", "predict", str(serve_run), str(study), "--out", str(tmp_path / "q.csv"),
               "--device", "cpu", "--top-k", "1", "--dicom-out", dead])  # fmt: skip
    assert rc == 1
    assert f"DICOM results: DicomwebError: {dead}: ConnectionError" in capsys.readouterr().err


# ------------------------------------------------------------------------------- in


class _Counting:
    """Counts the instances a puller fetches by WADO-RS, one by one or by series (the real
    requests go through); ``fail_after`` drops the connection after that many, once."""

    def __init__(self, puller: Puller, fail_after: int | None = None):
        import requests

        self.fetched: list[str] = []
        self.one_by_one: list[str] = []
        session = puller.session
        one, series = session.retrieve_instance, session.iter_series

        def count(sop):
            if fail_after is not None and len(self.fetched) == fail_after:
                self.fetched.append("dropped")
                raise requests.ConnectionError("connection reset by peer")
            self.fetched.append(sop)

        def retrieve(study, series_uid, sop, **kw):
            count(sop)
            self.one_by_one.append(sop)
            return one(study, series_uid, sop, **kw)

        def stream(study, series_uid, **kw):
            for ds in series(study, series_uid, **kw):
                count(ds.SOPInstanceUID)
                yield ds

        session.retrieve_instance, session.iter_series = retrieve, stream


def _puller(store, orthanc, fail_after=None, **options) -> tuple[Puller, Record, _Counting]:
    record = Record(store)
    source = PullSource(orthanc.dicomweb, page=options.pop("page", 2), since="20200101")
    puller = Puller(source, Spool(store), record, **options)
    return puller, record, _Counting(puller, fail_after)


def test_the_archive_is_pulled_a_page_at_a_time_each_instance_once(
    peers, orthanc, head_ct_studies, tmp_path, caplog
):
    orthanc.clear()
    first = sorted(p for p in (head_ct_studies / "SYN0015").rglob("*") if p.is_file())
    second = ct_series_files(head_ct_studies / "SYN0016")
    mr_study, mr_series = generate_uid(), generate_uid()

    def as_mr(ds, i):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = mr_study, mr_series, "MR"

    mr = sorted(copy_study(second[:3], tmp_path / "mr", as_mr).iterdir())

    def truncated(ds, i):  # a transfer cut short, archived as it came
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    (damaged,) = copy_study(second[:1], tmp_path / "damaged", truncated).iterdir()
    orthanc.upload(*first, *second, *mr, damaged)
    store = tmp_path / "store"
    puller, record, spy = _puller(store, orthanc)
    assert puller.poll() == len(first) + len(second)
    table = status_rows(store).set_index("study_uid")
    assert table.loc[_study_uid(first), "instances"] == len(first)
    assert table.loc[_study_uid(second), "instances"] == len(second)
    assert mr_study not in table.index  # listed as MR: not looked at
    spooled = {p.stem for p in (store / "spool").rglob("*.dcm")}
    assert spooled == _sop_uids(first) | _sop_uids(second)
    damaged_uid = pydicom.dcmread(damaged, stop_before_pixels=True).SOPInstanceUID
    assert damaged_uid in spy.fetched and damaged_uid not in spooled
    assert damaged_uid in record.fetched_instances(_study_uid(second))  # refused for good
    assert f"refused instance {damaged_uid} pulled from" in caplog.text
    assert "pixel data has" in caplog.text
    assert len(spy.fetched) == len(first) + len(second) + 1
    assert record.pull_mark(orthanc.dicomweb) == "20200101"
    assert f"pulling from {orthanc.dicomweb}: studies dated from 20200101 on" in status_text(store)
    # Polled again, and after a restart: nothing is fetched again, the damaged one included.
    assert puller.poll() == 0
    record.close()
    puller, record, spy = _puller(store, orthanc)
    assert puller.poll() == 0 and spy.fetched == []
    # The study gains an instance after it was taken for scoring: only that one is fetched,
    # and it opens the next revision, as a late C-STORE instance does.
    assert record.claim_next(0) is not None and record.claim_next(0) is not None
    late = pydicom.dcmread(second[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.save_as(tmp_path / "late.dcm")
    orthanc.upload(tmp_path / "late.dcm")
    assert puller.poll() == 1 and spy.fetched == [late.SOPInstanceUID]
    rows = status_rows(store)
    rows = rows[rows["study_uid"] == _study_uid(second)]
    assert rows[["revision", "state"]].values.tolist() == [[0, "processing"], [1, "received"]]
    record.close()


def test_the_mark_never_passes_today(peers, orthanc, head_ct_studies, tmp_path):
    orthanc.clear()

    def in_the_future(ds, i):  # a scanner whose clock is set wrong
        ds.StudyDate = "20991231"

    files = sorted(copy_study(ct_series_files(head_ct_studies / "SYN0017")[:3],
                              tmp_path / "future", in_the_future).iterdir())  # fmt: skip
    orthanc.upload(*files)
    puller, record, _ = _puller(tmp_path / "store", orthanc, today=lambda: dt.date(2024, 5, 1))
    assert puller.poll() == 3
    assert record.pull_mark(orthanc.dicomweb) == "20240501"
    record.close()


def test_a_server_that_fails_mid_study_is_asked_again_at_the_next_poll(
    peers, orthanc, head_ct_studies, tmp_path
):
    orthanc.clear()
    files = ct_series_files(head_ct_studies / "SYN0018")
    orthanc.upload(*files)
    puller, record, spy = _puller(tmp_path / "store", orthanc, fail_after=4)
    assert puller.poll() == 4  # the series stream breaks after four instances
    assert record.listed(orthanc.dicomweb, _study_uid(files)) is None  # not pulled in full
    assert puller.poll() == len(files) - 4  # the rest, one by one
    assert spy.fetched[4] == "dropped" and len(spy.fetched) == len(files) + 1
    assert len(set(spy.fetched)) == len(files) + 1  # none fetched twice
    assert status_rows(tmp_path / "store")["instances"].tolist() == [len(files)]
    record.close()


def test_a_series_the_server_will_not_send_whole_is_fetched_one_by_one(
    peers, orthanc, head_ct_studies, tmp_path
):
    orthanc.clear()
    files = ct_series_files(head_ct_studies / "SYN0020")
    other_study = generate_uid()

    def same_series_elsewhere(ds, i):  # as an anonymiser that keeps series UIDs leaves it
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = other_study

    copies = sorted(copy_study(files[:3], tmp_path / "copy", same_series_elsewhere).iterdir())
    orthanc.upload(*files, *copies)
    puller, record, spy = _puller(tmp_path / "store", orthanc)
    # Orthanc answers the series of one of the two studies with 404 ("inexistent series"),
    # and sends its instances one at a time.
    assert puller.poll() == len(files) + 3
    assert spy.one_by_one and len(spy.fetched) == len(set(spy.fetched)) == len(files) + 3
    assert sorted(status_rows(tmp_path / "store")["instances"]) == [3, len(files)]
    record.close()


@pytest.mark.slow  # a serve process started twice, two revisions scored: ~40 s, 90 s under load
def test_a_study_in_the_archive_is_pulled_scored_and_posted_back_once_across_a_kill(
    peers, orthanc, serve_run, head_ct_studies, tmp_path
):
    orthanc.clear()
    files = sorted(  # along the slice normal (axial: z)
        ct_series_files(head_ct_studies / "SYN0019"),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    # The top two slices are archived later: the study gains instances after it was fetched
    # (slices missing at an end leave no gap, so the first part is scored as complete).
    held_back = files[-2:]
    orthanc.upload(*files[:-2])
    study_uid = _study_uid(files)
    store = tmp_path / "store"
    serve = ServeProcess(
        serve_run, store, "--pull", orthanc.dicomweb, "--pull-since", "20200101",
        "--pull-every", "1", "--forward", orthanc.dicomweb, "--no-listen", stable=3.0,
    )  # fmt: skip
    serve.start()
    try:
        spool = store / "spool" / study_uid
        wait_for(lambda: len(list(spool.glob("*.dcm"))) == len(files) - 2, 60, "the study pulled")
        serve.kill()  # pulled, not scored yet (it is stable only after 3 s)
        assert set(status_rows(store)["state"]) == {"received"}
        serve.start()
        wait_for(lambda: _sent(store), 90, "the study scored and posted back")
        first = orthanc.results(study_uid)
        assert len(first["SR"]) == 1 and len(first["CT"]) == len(files) - 2
        # The results posted back changed the study's instance count in the archive: it is
        # listed again at each poll, and nothing of it fetched. Then the rest arrives there.
        orthanc.upload(*held_back)
        wait_for(lambda: len(status_rows(store)) == 2 and _sent(store), 90, "the next revision")
        sent = time.time()  # then a few polls: nothing more is pulled or posted
        wait_for(lambda: _polled(store) > sent + 2, 30, "three more polls")
    finally:
        serve.stop()
    table = status_rows(store)
    assert table[["revision", "state"]].values.tolist() == [[0, "sent"], [1, "sent"]]
    assert table["instances"].tolist() == [len(files) - 2, len(files)]
    held = orthanc.results(study_uid)
    assert (len(held["SR"]), len(held["OT"]), len(held["CT"])) == (2, 4, len(files))
    (replaced,) = [ds for ds in held["SR"] if not read_result(ds).predecessors]
    (current,) = [read_result(ds) for ds in held["SR"] if read_result(ds).predecessors]
    assert current.predecessors == [replaced.SOPInstanceUID]
    spooled = sorted(p.stem for p in (store / "spool" / study_uid).glob("*.dcm"))
    assert spooled == sorted(_sop_uids(files))
    log = serve.log_text()  # the first part once (none again after the kill), then the rest
    assert log.count(f"pulled {len(files) - 2} instances") == 1
    assert log.count("pulled 2 instances") == 1 and log.count("pulled ") == 2
