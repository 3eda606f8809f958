"""``brainmets serve`` between real peers: dcmtk's storescu sends generated head CT studies,
Orthanc receives the results; what arrives there is read back through its REST API."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from brainmets.dicom_results import read_result
from brainmets.predict import predict

from .conftest import (
    ORTHANC_AE,
    Orthanc,
    ServeProcess,
    ct_series_files,
    dcmtk,
    status_rows,
    storescu,
    wait_for,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ROUTING_LUA = Path(__file__).resolve().parents[2] / "docs" / "orthanc" / "route-ct-to-brainmets.lua"


@pytest.fixture(scope="module")
def node(peers, orthanc, serve_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("node") / "store"
    serve = ServeProcess(
        serve_run, store, "--forward", orthanc.destination, "--allow", "STORESCU", "ECHOSCU",
        "--incomplete-seconds", "2",
    ).start()  # fmt: skip
    yield serve
    serve.stop()


def _results_in(orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The objects PACS holds for a study, by modality (SR, OT for secondary captures)."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for item in orthanc.instances():
        if item.get("StudyInstanceUID") != study_uid:
            continue
        ds = pydicom.dcmread(io.BytesIO(orthanc.file(item["id"])))
        found.setdefault(str(ds.Modality), []).append(ds)
    return found


def test_a_study_goes_in_and_its_results_reach_pacs(
    node, orthanc, head_ct_studies, serve_run, tmp_path
):
    studies = [head_ct_studies / "SYN0001", head_ct_studies / "SYN0002"]
    storescu(node.port, *studies)
    wait_for(
        lambda: (t := status_rows(node.store)).shape[0] == 2 and set(t["state"]) == {"sent"},
        90,
        "both studies scored and sent",
    )
    table = status_rows(node.store).set_index("patient_id")
    expected = predict(serve_run, studies, out_csv=tmp_path / "p.csv", progress=False, workers=1)
    expected = expected.table.set_index("patient_id")
    for pid, study in zip(("SYN0001", "SYN0002"), studies, strict=True):
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_series_files(study)]
        source = sources[0]
        row = table.loc[pid]
        # One scoring path: the record holds exactly what predict reports for the study.
        assert row["probability"] == pytest.approx(expected.loc[pid, "probability"], abs=1e-9)
        assert row["decision"] == expected.loc[pid, "decision"]
        assert row["series_uid"] == expected.loc[pid, "series_uid"] == source.SeriesInstanceUID
        results = _results_in(orthanc, source.StudyInstanceUID)
        assert sorted(results) == ["OT", "SR"] and len(results["SR"]) == 1
        assert len(results["OT"]) == 2  # --top-k 2
        sr = results["SR"][0]
        reported = read_result(sr)  # as a TID 1500 reader parses it
        assert reported.probability == pytest.approx(expected.loc[pid, "probability"], abs=1e-6)
        assert reported.threshold == pytest.approx(expected.loc[pid, "threshold"], abs=1e-6)
        assert reported.present == bool(expected.loc[pid, "decision"])
        assert reported.model_id == expected.loc[pid, "model"]
        # The references name real instances of the scored series.
        source_uids = {ds.SOPInstanceUID for ds in sources}
        referenced = [uid for uid, _ in reported.source_images]
        assert len(referenced) == 2 and set(referenced) <= source_uids
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert {s.SeriesInstanceUID for s in evidence} == {source.SeriesInstanceUID}
        for ds in [sr, *results["OT"]]:
            assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
        for capture in results["OT"]:
            pixels = capture.pixel_array
            assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
            assert pixels.std() > 1  # a slice with its heatmap, not a blank image
            assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID in source_uids
        sr_file = tmp_path / f"{pid}_sr.dcm"
        sr.save_as(sr_file)
        dump = subprocess.run([dcmtk("dsrdump"), str(sr_file)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert '"Probability")=' in dump.stdout
    log = node.log_text()
    for pid in ("SYN0001", "SYN0002"):  # identifiers yes, names never
        name = str(pydicom.dcmread(ct_series_files(head_ct_studies / pid)[0]).PatientName)
        assert name and name not in log


def _copy_as(files, out, *, edit) -> None:
    out.mkdir(parents=True)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        edit(ds, i)
        ds.save_as(out / path.name)


def test_what_cannot_be_scored_is_a_clear_row_without_results(
    node, orthanc, head_ct_studies, tmp_path
):
    # An MR study: refused instance by instance, with a DIMSE status that says why.
    mr_files = ct_series_files(head_ct_studies / "SYN0003")
    mr_study = generate_uid()

    def as_mr(ds, i):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.Modality = mr_study, "MR"

    _copy_as(mr_files, tmp_path / "mr", edit=as_mr)
    refused = storescu(node.port, tmp_path / "mr", check=False)
    said = refused.stdout + refused.stderr
    assert said.count("Refused: SOPClassNotSupported") == len(mr_files), said
    # A CT study with four slices: nothing a head CT volume can be made of.
    few = ct_series_files(head_ct_studies / "SYN0004")[:4]
    shutil.copytree(few[0].parent, tmp_path / "few", ignore=lambda d, names: [
        n for n in names if d == str(few[0].parent) and (few[0].parent / n) not in few
    ])  # fmt: skip
    storescu(node.port, tmp_path / "few")
    # A malformed instance (its pixel data shorter than its header says) among good ones, in
    # the middle of the series: refused alone, it leaves a gap the result is marked for.
    good = sorted(
        ct_series_files(head_ct_studies / "SYN0005"),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )

    def truncate_one(ds, i):
        if i == len(good) // 2:
            ds.Rows = ds.Rows * 2

    _copy_as(good, tmp_path / "malformed", edit=truncate_one)
    sent = storescu(node.port, tmp_path / "malformed", check=False)
    said = sent.stdout + sent.stderr
    assert said.count("CannotUnderstand") == 1, said

    few_study = pydicom.dcmread(few[0], stop_before_pixels=True).StudyInstanceUID
    good_study = pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID

    def settled():
        table = status_rows(node.store).set_index("study_uid")
        wanted = {mr_study, few_study, good_study}
        if not wanted <= set(table.index):
            return None
        states = table.loc[list(wanted), "state"]
        return set(states) <= {"failed", "sent"}

    wait_for(settled, 90, "the three studies settled")
    table = status_rows(node.store).set_index("study_uid")
    assert table.loc[mr_study, "state"] == "failed"
    assert "MR Image Storage" in table.loc[mr_study, "error"]
    assert table.loc[few_study, "state"] == "failed"
    assert "too few slices" in table.loc[few_study, "error"]
    assert table.loc[good_study, "state"] == "sent"
    assert table.loc[good_study, "instances"] == len(good) - 1  # all but the malformed one
    assert "slices missing between" in table.loc[good_study, "partial"]
    assert _results_in(orthanc, mr_study) == {}
    assert _results_in(orthanc, few_study) == {}
    assert sorted(_results_in(orthanc, good_study)) == ["OT", "SR"]
    assert "refused" in node.log_text()


def test_a_calling_ae_title_not_allowed_is_refused(node):
    ok = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "BRAINMETS", "127.0.0.1",
                         str(node.port)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "BRAINMETS", "127.0.0.1",
                              str(node.port)], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr
    wait_for(lambda: "INTRUDER" in node.log_text(), 10, "the refusal in the log")


def test_status_prints_the_model_verdict_and_the_record(node, capsys):
    from brainmets.cli import main

    wait_for(lambda: not status_rows(node.store).empty, 60, "a study in the record")
    assert main(["-q", "serve", "--status", str(node.store)]) == 0
    model, *table = capsys.readouterr().out.splitlines()
    assert model.startswith("model ") and ": ranks" in model and "allow-chance" not in model
    assert "state" in table[0] and "probability" in table[0]


def test_a_second_serve_on_the_same_store_is_refused_naming_the_first(node, serve_run, capsys):
    from brainmets.cli import main

    rc = main(["-q", "serve", str(serve_run), "--store", str(node.store), "--port", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"in use by another brainmets process (PID {node.process.pid}" in err
    assert node.process.poll() is None  # the first goes on


@pytest.mark.slow  # a second serve process, an export and Grad-CAM: ~40 s on two busy cores
def test_serve_scores_with_onnxruntime_as_predict_does_with_pytorch(
    peers, serve_run, head_ct_studies, tmp_path
):
    pytest.importorskip("onnxruntime")
    from brainmets.export import export_run

    export = export_run(serve_run, tmp_path / "export").onnx.parent
    # A study whose headers carry a name and a birth date: neither may reach the log.
    files = ct_series_files(head_ct_studies / "SYN0006")
    study = tmp_path / "study"

    def identified(ds, i):
        ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19470312"

    _copy_as(files, study, edit=identified)
    store = tmp_path / "store"
    serve = ServeProcess(serve_run, store, "--backend", "onnxruntime", "--onnx", str(export))
    serve.start()
    try:
        storescu(serve.port, study)
        wait_for(lambda: set(status_rows(store)["state"]) == {"done"}, 90, "the study scored")
    finally:
        serve.stop()
    row = status_rows(store).iloc[0]
    expected = predict(serve_run, [study], out_csv=tmp_path / "p.csv", progress=False, workers=1)
    expected = expected.table.iloc[0]
    assert row["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert row["decision"] == expected["decision"] and row["model"] == expected["model"]
    log = serve.log_text()
    assert "on onnxruntime" in log
    assert "Doe" not in log and "19470312" not in log


@pytest.mark.slow  # its own Orthanc and serve: ~30 s
def test_orthanc_routes_ct_to_serve_with_the_documented_lua_and_keeps_the_results(
    peers, serve_run, head_ct_studies, tmp_path
):
    """The deployment the README describes: a modality sends to Orthanc, the Lua script in
    docs/orthanc routes the CT to serve, serve sends its results back to Orthanc; the results
    are not routed again."""
    pacs = Orthanc(tmp_path / "orthanc")
    store = tmp_path / "store"
    serve = ServeProcess(serve_run, store, "--forward", pacs.destination, "--allow", ORTHANC_AE)
    pacs.serve_port, pacs.lua_scripts = serve.port, [ROUTING_LUA]
    study = head_ct_studies / "SYN0007"
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in study.rglob("*.dcm")]
    study_uid = headers[0].StudyInstanceUID
    serve.start()
    pacs.start()
    try:
        storescu(pacs.dicom_port, study)  # the scanner sends to PACS only
        wait_for(
            lambda: (
                sorted(_results_in(pacs, study_uid)) == ["CT", "OT", "SR"]
                and set(status_rows(store)["state"]) == {"sent"}
            ),
            90,
            "the results back in Orthanc",
        )
        time.sleep(2)  # time for a wrongly routed result to reach serve
        records = status_rows(store)
        log = serve.log_text()
    finally:
        serve.stop()
        pacs.stop()
    assert len(records) == 1 and records.iloc[0]["study_uid"] == study_uid
    # Every CT instance of the study (the localizer too) was routed, and nothing else.
    assert records.iloc[0]["instances"] == sum(ds.Modality == "CT" for ds in headers)
    assert "refused" not in log  # no SR or capture came back to serve
