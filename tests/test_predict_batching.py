"""How predict and evaluate group whole patients into scoring batches."""

from __future__ import annotations

import itertools

from brainmets.inference import batch_by_slices


def test_batches_keep_patients_whole_within_the_budget():
    sizes = {"a": 3, "b": 4, "c": 2, "d": 9, "e": 1}
    batches = list(batch_by_slices(sizes, 7, size=sizes.__getitem__))
    # d (9 slices) is larger than the budget: a batch of its own, never split.
    assert batches == [["a", "b"], ["c"], ["d"], ["e"]]
    assert list(batch_by_slices([], 7, size=len)) == []


def test_batches_are_formed_as_patients_arrive():
    """predict feeds patients as its workers finish them: the first batch must come out
    without waiting for the stream to end (here it never ends)."""
    endless = (f"p{i}" for i in itertools.count())
    first, second = itertools.islice(batch_by_slices(endless, 10, size=lambda _: 4), 2)
    assert first == ["p0", "p1"] and second == ["p2", "p3"]


def test_a_second_input_with_the_same_patient_id_is_named_by_its_folder():
    """Two studies of one patient given in one predict call: the output has one row per
    patient id, so the second is an error row; it must name the folder the user gave (not a
    series UID) and the first one's, and say how to score it."""
    from brainmets.data.prepare import PatientJob, _unique_patients

    first = PatientJob("P1", 0, files=["/data/P1/2019/CT/1.dcm", "/data/P1/2019/CT/2.dcm"],
                       series_uid="1.2.3")  # fmt: skip
    again = PatientJob("P1", 0, files=list(first.files), series_uid="1.2.3")
    second = PatientJob("P1", 0, kind="dicom_dir", path="/data/P1/2021")
    errors: list[dict] = []
    assert _unique_patients([first, again, second], errors) == [first]
    assert errors == [
        {
            "patient_id": "P1",
            "source": "/data/P1/2021",
            "error": "patient id already predicted from /data/P1/2019/CT (one row per patient "
            "id: predict this input on its own to score it)",
        }
    ]


def test_a_patient_predicted_again_replaces_its_heatmaps(tmp_path):
    """Another study of the same patient id into the same --heatmaps folder: the report must
    show one study per patient, so the old rows and PNGs go (other patients' stay)."""
    import pandas as pd

    from brainmets.heatmaps import update_heatmap_index

    def row(pid, rank, slice_index, p):
        name = f"{pid}_rank{rank}_slice{slice_index}.png"
        (tmp_path / name).write_bytes(b"png")
        return {"file": name, "patient_id": pid, "rank": rank, "slice_index": slice_index,
                "slice_logit": 0.0, "probability": p}  # fmt: skip

    update_heatmap_index(tmp_path, [row("P1", 1, 3, 0.4), row("P1", 2, 4, 0.4),
                                     row("P2", 1, 7, 0.9)])  # fmt: skip
    update_heatmap_index(tmp_path, [row("P1", 1, 5, 0.6), row("P1", 2, 4, 0.6)])
    index = pd.read_csv(tmp_path / "heatmaps.csv", dtype={"patient_id": str})
    assert sorted(index["file"]) == ["P1_rank1_slice5.png", "P1_rank2_slice4.png",
                                     "P2_rank1_slice7.png"]  # fmt: skip
    assert set(index.loc[index["patient_id"] == "P1", "probability"]) == {0.6}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(index["file"])
