"""Thirteen studies as a hospital sends them, with headers as de-identified data has them, to
serve forwarding to a real Orthanc: every scorable study gets an SR in PACS with predict's
probability; what cannot be scored gets a row saying why and nothing in PACS."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from brainmets.predict import predict

from .conftest import (
    ServeProcess,
    copy_study,
    ct_series_files,
    status_rows,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.slow  # its own Orthanc and serve, 13 studies: ~60 s

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# Type 2 attributes de-identification tools and some exports remove rather than empty.
REMOVED = ("PatientSex", "PatientBirthDate", "AccessionNumber", "StudyDate", "StudyTime",
           "StudyID", "ReferringPhysicianName", "SeriesDate", "SeriesTime")  # fmt: skip


def _deidentified(ds: pydicom.Dataset) -> None:
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName = ds.PatientID  # a pseudonym


def _files(study):
    return sorted(p for p in study.rglob("*") if p.is_file())


def _hospital_cohort(head_ct_studies, root):
    """Eleven scorable CT studies (soft-tissue and bone series, localizers, stray files), an
    MR study and a CT study with nothing a volume can be made of."""
    scorable = []
    for n in range(1, 12):
        source = head_ct_studies / f"SYN{n:04d}"
        study = root / source.name
        copy_study(_files(source), study / "as-sent",
                   lambda ds, i: _deidentified(ds))  # fmt: skip
        bone_series = generate_uid()

        def bone(ds, i, series=bone_series):
            _deidentified(ds)
            ds.SeriesInstanceUID, ds.SeriesNumber = series, int(ds.SeriesNumber) + 100
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ConvolutionKernel, ds.SeriesDescription = "BONE", "HEAD 5mm BONE"

        copy_study(ct_series_files(source), study / "bone", bone)
        (study / "README.txt").write_text("exported by a viewer")
        (study / "bone" / "thumbnail.json").write_text("{}")
        scorable.append(study)
    mr_study = generate_uid()

    def as_mr(ds, i):
        _deidentified(ds)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.Modality = mr_study, "MR"

    copy_study(ct_series_files(head_ct_studies / "SYN0012"), root / "MR", as_mr)
    few = _files(head_ct_studies / "SYN0013")[:3]
    copy_study(few, root / "FEW", lambda ds, i: _deidentified(ds))
    return scorable, mr_study, pydicom.dcmread(few[0]).StudyInstanceUID


def test_thirteen_studies_with_real_headers_reach_pacs_with_predicts_probability(
    peers, orthanc, serve_run, head_ct_studies, tmp_path
):
    from brainmets.dicom_results import read_result

    scorable, mr_study, few_study = _hospital_cohort(head_ct_studies, tmp_path / "sent")
    store = tmp_path / "store"
    serve = ServeProcess(serve_run, store, "--forward", orthanc.destination).start()
    try:
        storescu(serve.port, tmp_path / "sent", check=False)  # MR and stray files refused
        uids = {
            pydicom.dcmread(
                ct_series_files(s / "as-sent")[0], stop_before_pixels=True
            ).StudyInstanceUID: s
            for s in scorable
        }

        def settled():
            table = status_rows(store)
            latest = table.sort_values("revision").groupby("study_uid").last()
            wanted = set(uids) | {mr_study, few_study}
            return wanted <= set(latest.index) and set(latest.loc[list(wanted), "state"]) <= {
                "sent", "failed"
            }  # fmt: skip

        wait_for(settled, 150, "every study scored and sent, or failed")
        log = serve.log_text()
    finally:
        serve.stop()
    expected = predict(serve_run, scorable, out_csv=tmp_path / "p.csv", progress=False, workers=1)
    expected = expected.table.set_index("patient_id")
    table = status_rows(store).set_index("study_uid")
    srs = {}
    for item in orthanc.instances():
        if item.get("Modality") == "SR":
            ds = pydicom.dcmread(io.BytesIO(orthanc.file(item["id"])))
            srs.setdefault(ds.StudyInstanceUID, []).append(ds)
    for uid, study in uids.items():
        row = table.loc[uid]
        assert row["state"] == "sent", row["error"]
        want = expected.loc[study.name]  # the generated patient id names the folder
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-9)
        assert len(srs[uid]) == 1
        reported = read_result(srs[uid][0])
        assert reported.complete
        assert reported.probability == pytest.approx(want["probability"], abs=1e-6)
        assert reported.present == bool(want["decision"])
        assert srs[uid][0].PatientID == row["patient_id"] == study.name
    assert (
        table.loc[mr_study, "state"] == "failed"
        and "MR Image Storage" in table.loc[mr_study, "error"]
    )
    assert table.loc[few_study, "state"] == "failed"
    assert set(srs) == set(uids)  # nothing in PACS for what could not be scored
    assert "Traceback" not in log
