"""Series index: walking a DICOM root, choosing the series, index files, labels.csv."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from brainmets.data.labels import read_labels
from brainmets.data.series_index import (
    ERROR_COLUMNS,
    FILE_COLUMNS,
    SERIES_COLUMNS,
    SeriesIndex,
    choose_series,
    classify_orientation,
    index_dicom_root,
    kernel_class,
    read_index,
    series_files,
    write_index,
)

PHILIPS = "dcm_qa_ct/In/Philips"


@pytest.fixture(scope="module")
def philips_index(corpus):
    return index_dicom_root(corpus / PHILIPS, progress=False)


def by_description(index, description):
    (row,) = index.series[index.series["description"] == description].itertuples()
    return row


def test_philips_chooses_axial_5mm_brain(philips_index):
    series = philips_index.series
    assert list(series.columns) == SERIES_COLUMNS
    chosen = series[series["chosen"]]
    assert len(chosen) == 1  # one patient (PLASTIC) across both studies
    assert chosen.iloc[0]["description"] == "STD BRAIN 5MM"
    assert chosen.iloc[0]["num_slices"] == 28
    assert chosen.iloc[0]["directory"].endswith("S21570/S2010")
    assert (
        "localizer" in series.loc[series["image_type"].str.contains("LOCALIZER"), "reason"].iloc[0]
    )
    summary = by_description(philips_index, "Exam Summary")
    assert not summary.chosen and "Secondary Capture" in summary.reason
    thin = by_description(philips_index, "STD BRAIN 1MM, iDose")
    assert not thin.chosen and thin.reason.startswith("eligible, not chosen")


def test_directories_skipped_without_error(philips_index, corpus):
    assert philips_index.errors.empty
    paths = set(philips_index.files["path"])
    assert not any(Path(p).name in ("DICOMDIR", "DIRFILE") for p in paths)
    image_files = [p for p in (corpus / PHILIPS).rglob("I*") if p.is_file()]
    assert len(paths) == len(image_files)


def test_orientation_and_tilt_in_table(philips_index):
    series = philips_index.series
    stereotaxis = series[series["description"] == "STEREOTAXIS"]
    assert (stereotaxis["orientation"] == "axial").all()  # tilted -18.5 / +16.5 deg
    assert set(series.loc[series["image_type"].str.contains("LOCALIZER"), "orientation"]) == {
        "sagittal"
    }


def test_pin_overrides_choice(philips_index):
    thin = by_description(philips_index, "STD BRAIN 1MM, iDose")
    pinned = choose_series(philips_index.series, pins={"PLASTIC": thin.series_uid})
    assert pinned.loc[pinned["chosen"], "series_uid"].tolist() == [thin.series_uid]
    thick = choose_series(philips_index.series, target_mm=1.0)
    assert thick.loc[thick["chosen"], "description"].tolist() == ["STD BRAIN 1MM, iDose"]


def test_parallel_index_equals_serial(philips_index, corpus):
    parallel = index_dicom_root(corpus / PHILIPS, workers=2, progress=False)
    pd.testing.assert_frame_equal(parallel.series, philips_index.series)
    pd.testing.assert_frame_equal(parallel.files, philips_index.files)


def test_write_read_round_trip(philips_index, tmp_path):
    write_index(philips_index, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["files.csv", "index_errors.csv", "series.csv"]
    back = read_index(tmp_path)
    pd.testing.assert_frame_equal(back.series, philips_index.series, check_dtype=False)
    assert back.series["chosen"].dtype == bool
    uid = back.series.loc[back.series["chosen"], "series_uid"].iloc[0]
    assert sorted(series_files(back, uid)) == sorted(series_files(philips_index, uid))
    assert len(series_files(back, uid)) == 28


def test_no_patient_names_in_outputs(corpus, tmp_path):
    index = index_dicom_root(corpus / "dcm_qa_ct/In", progress=False)
    write_index(index, tmp_path)
    text = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "PLASTIC" in text  # PatientID is the manifest's key
    assert "HEAD" not in text  # Philips PatientName
    assert "REMOVED" not in text  # GE PatientName


def test_bad_files_recorded_and_rest_indexed(corpus, tmp_path):
    source = corpus / PHILIPS / "S21570/S2010"
    for p in source.iterdir():
        os.symlink(p, tmp_path / p.name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/empty.dcm").write_bytes(b"")
    (tmp_path / "sub/notes.dcm").write_text("hello\n")
    data = (source / "I10").read_bytes()
    (tmp_path / "sub/truncated").write_bytes(data[:300])
    index = index_dicom_root(tmp_path, progress=False)
    reasons = dict(
        zip(index.errors["path"].map(lambda p: Path(p).name), index.errors["reason"], strict=True)
    )
    assert set(reasons) == {"empty.dcm", "notes.dcm", "truncated"}
    assert reasons["empty.dcm"].startswith("empty file")
    assert reasons["notes.dcm"] == "not a DICOM file, although named as one (.dcm)"
    assert "truncated" in reasons["truncated"]
    assert index.series["chosen"].sum() == 1 and index.series["num_slices"].iloc[0] == 28


# --------------------------------------------------------------------------------------------
# Choice rule on constructed tables
# --------------------------------------------------------------------------------------------


def series_row(uid, **overrides):
    row = dict.fromkeys(SERIES_COLUMNS, "")
    row.update(
        patient_id="P1",
        series_uid=uid,
        modality="CT",
        sop_class="CT Image Storage",
        image_type="ORIGINAL\\PRIMARY\\AXIAL",
        orientation="axial",
        num_slices=30,
        slice_thickness_mm=5.0,
        kernel="H31s",
        chosen=False,
    )
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # soft-tissue kernel beats bone even at a worse thickness
        (
            [
                series_row("bone", kernel="BONE"),
                series_row("soft", kernel="SOFT", slice_thickness_mm=1.0),
            ],
            "soft",
        ),
        ([series_row("lung", kernel="B70f"), series_row("brain", kernel="J30s")], "brain"),
        # same kernel: thickness nearest the target
        (
            [series_row("1mm", slice_thickness_mm=1.0), series_row("3mm", slice_thickness_mm=3.0)],
            "3mm",
        ),
        # same kernel and thickness: more slices
        ([series_row("a", num_slices=20), series_row("b", num_slices=40)], "b"),
        # ineligible series never chosen
        (
            [
                series_row("mr", modality="MR"),
                series_row("sc", sop_class="Secondary Capture Image Storage"),
                series_row("loc", image_type="ORIGINAL\\PRIMARY\\LOCALIZER"),
                series_row("cor", orientation="coronal"),
                series_row("few", num_slices=3),
                series_row("ok", kernel="BONE", slice_thickness_mm=0.6),
            ],
            "ok",
        ),
        ([series_row("mr", modality="MR")], None),
    ],
)
def test_choice_rule(rows, expected):
    table = choose_series(pd.DataFrame(rows, columns=SERIES_COLUMNS))
    chosen = table.loc[table["chosen"], "series_uid"].tolist()
    assert chosen == ([expected] if expected else [])
    assert (table["reason"] != "").all()


def test_choice_is_per_patient():
    rows = [
        series_row("a1"),
        series_row("b1", patient_id="P2"),
        series_row("b2", patient_id="P2", num_slices=99),
    ]
    table = choose_series(pd.DataFrame(rows))
    assert sorted(table.loc[table["chosen"], "series_uid"]) == ["a1", "b2"]


def test_missing_pin_chooses_nothing():
    table = choose_series(pd.DataFrame([series_row("a")]), pins={"P1": "nope"})
    assert not table["chosen"].any() and "not found" in table["reason"].iloc[0]


def test_a_pin_overrides_the_ranking_not_eligibility():
    """A pinned localizer (one slice) must not become the patient's volume: the pin picks among
    eligible series, and the plan says why the pinned one cannot be used, once."""
    from brainmets.data.prepare import plan_jobs

    series = pd.DataFrame(
        [
            series_row("scout", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", num_slices=1),
            series_row("thin", slice_thickness_mm=1.0, num_slices=150),
            series_row("std"),
        ]
    )
    table = choose_series(series, pins={"P1": "scout"})
    assert not table["chosen"].any()
    assert table.set_index("series_uid").loc["scout", "reason"] == (
        "pinned in the manifest but not eligible: localizer"
    )
    assert choose_series(series, pins={"P1": "thin"}).query("chosen")["series_uid"].tolist() == [
        "thin"
    ]  # an eligible pin still beats the 5 mm series the rule would choose

    index = SeriesIndex(series=series, files=pd.DataFrame(columns=FILE_COLUMNS),
                        errors=pd.DataFrame(columns=ERROR_COLUMNS))  # fmt: skip
    for pin, reason in [
        ("scout", "no usable series: scout: pinned in the manifest but not eligible: localizer"),
        ("1.2.3", "no usable series: pinned series 1.2.3 not found (series: scout, thin, std)"),
    ]:
        labels = pd.DataFrame([{"patient_id": "P1", "label": 1, "series_uid": pin}])
        jobs, errors = plan_jobs(labels, index)
        assert not jobs and [e["reason"] for e in errors] == [reason]


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], "axial"),
        ([1, 0, 0, 0, 0.9483237, -0.3173047], "axial"),  # 18.5 deg gantry tilt
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0.707, -0.707], "oblique"),
        (None, ""),
    ],
)
def test_classify_orientation(iop, expected):
    assert classify_orientation(iop) == expected


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("UB", 0),
        ("STANDARD", 0),
        ("H31s", 0),
        ("Hr40", 0),
        ("BONE", 2),
        ("LUNG", 2),
        ("B70f", 2),
        ("FC52", 1),
        ("", 1),
    ],
)
def test_kernel_class(kernel, expected):
    assert kernel_class(kernel) == expected


# --------------------------------------------------------------------------------------------
# labels.csv
# --------------------------------------------------------------------------------------------


def test_read_labels_with_optional_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("patient_id,label,split,series_uid\n007,1,train,1.2.3\nP2,0,val,\n")
    labels = read_labels(path)
    assert labels["patient_id"].tolist() == ["007", "P2"]  # ids stay strings (leading zero)
    assert labels["label"].tolist() == [1, 0] and labels["label"].dtype.kind == "i"
    assert labels["series_uid"].tolist() == ["1.2.3", ""]


def test_relative_label_paths_are_read_from_the_labels_folder(tmp_path, monkeypatch):
    """A manifest kept beside its images works from any working directory; absolute paths
    and empty cells stay as they are."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    (folder / "labels.csv").write_text(
        "patient_id,label,path\nA,1,dicom/A\nB,0,/abs/B.nii.gz\nC,0,\n"
    )
    monkeypatch.chdir(tmp_path)
    labels = read_labels("cohort/labels.csv")
    assert labels["path"].tolist() == [str(Path("cohort") / "dicom" / "A"), "/abs/B.nii.gz", ""]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("patient,label\nA,1\n", "missing column"),
        ("patient_id,label\nA,1\nB,2\n", "line 3: label must be 0 or 1"),
        ("patient_id,label\nA,1\nB,yes\n", "line 3: label must be 0 or 1"),
        ("patient_id,label\nA,1\nA,0\n", "line 3: duplicate patient_id 'A'"),
        ("patient_id,label,split\nA,1,training\n", "line 2: split must be one of"),
        ("patient_id,label\n,1\n", "line 2: empty patient_id"),
    ],
)
def test_read_labels_rejects(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_labels(path)
    assert str(path) in str(err.value)


def test_round_trip_keeps_missing_thickness(tmp_path):
    """A localizer has no SliceThickness: the empty cell reads back as NaN, not an error."""
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    write_synthetic_cohort(tmp_path / "c", SynthConfig(num_patients=2, matrix=64), progress=False)
    index = index_dicom_root(tmp_path / "c" / "dicom", progress=False)
    assert index.series["slice_thickness_mm"].isna().any()
    write_index(index, tmp_path / "idx")
    back = read_index(tmp_path / "idx")
    pd.testing.assert_frame_equal(back.series, index.series, check_dtype=False)


def test_empty_optional_cells_from_the_python_api_are_no_value():
    """A labels DataFrame built in pandas has NaN in empty optional cells, where read_labels
    gives "": a NaN path or split must not become the text "nan" (a folder named nan, an
    unknown split) and a NaN pin pins nothing."""
    import numpy as np

    from brainmets.data.prepare import plan_jobs

    series = pd.DataFrame([series_row("std")])
    index = SeriesIndex(series=series, files=pd.DataFrame(columns=FILE_COLUMNS),
                        errors=pd.DataFrame(columns=ERROR_COLUMNS))  # fmt: skip
    labels = pd.DataFrame(
        [
            {"patient_id": "P1", "label": 1, "split": np.nan, "path": np.nan, "series_uid": np.nan},
            {"patient_id": "P2", "label": 0, "split": "test", "path": "/data/P2", "series_uid": ""},
        ]
    )
    jobs, errors = plan_jobs(labels, index)
    assert errors == []
    by_id = {job.patient_id: job for job in jobs}
    assert (by_id["P1"].kind, by_id["P1"].split, by_id["P1"].series_uid) == ("dicom", "", "std")
    assert (by_id["P2"].kind, by_id["P2"].path, by_id["P2"].split) == (
        "dicom_dir",
        "/data/P2",
        "test",
    )
