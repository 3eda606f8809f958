"""K-fold assignment: stratified, disjoint, covering every non-test patient, test never touched,
the same in every process that computes it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainmets.train.folds import (
    assignment_digest,
    fold_assignment,
    fold_splits,
    is_cross_validation,
    read_assignment,
    write_assignment,
)


def _index(n: int = 53, seed: int = 0) -> pd.DataFrame:
    """A cache index: 53 patients, ~35% positive, a manifest split with train, val and test."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(int)
    split = rng.choice(["train", "val", "test", ""], size=n, p=[0.5, 0.15, 0.2, 0.15])
    return pd.DataFrame(
        {"patient_id": [f"P{i:03d}" for i in range(n)], "label": labels, "split": split}
    )


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_are_stratified_disjoint_and_cover_every_non_test_patient(folds):
    index = _index()
    table = fold_assignment(index, folds, seed=7)
    non_test = index[index["split"] != "test"]
    # Every non-test patient once (the manifest's train and val are pooled), no test patient.
    assert sorted(table["patient_id"]) == sorted(non_test["patient_id"])
    assert not table["patient_id"].duplicated().any()
    assert set(table["fold"]) == set(range(folds))
    # Stratified: each fold holds its share of each class, to within one patient.
    for label in (0, 1):
        per_fold = table[table["label"] == label]["fold"].value_counts().reindex(range(folds))
        assert per_fold.max() - per_fold.min() <= 1, per_fold.tolist()
    sizes = table["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    # Labels are the index's.
    merged = table.merge(index, on="patient_id", suffixes=("", "_index"))
    assert (merged["label"] == merged["label_index"]).all()


def test_a_fold_validates_on_its_patients_and_trains_on_the_others():
    index = _index()
    table = fold_assignment(index, 5, seed=1)
    for fold in range(5):
        splits = fold_splits(index, table, fold)
        assert set(splits["val"]) == set(table.loc[table["fold"] == fold, "patient_id"])
        assert set(splits["train"]) == set(table.loc[table["fold"] != fold, "patient_id"])
        assert set(splits["test"]) == set(index.loc[index["split"] == "test", "patient_id"])
        assert splits["val"] == [p for p in index["patient_id"] if p in set(splits["val"])]


def test_the_same_seed_gives_the_same_folds_in_any_process_and_the_digest_ignores_order():
    index = _index()
    a, b = fold_assignment(index, 5, seed=3), fold_assignment(index.copy(), 5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert assignment_digest(a) == assignment_digest(a.sample(frac=1.0, random_state=0))
    other = fold_assignment(index, 5, seed=4)
    assert not other["fold"].equals(a["fold"])
    assert assignment_digest(other) != assignment_digest(a)


def test_a_recorded_assignment_reads_back_identical(tmp_path):
    table = fold_assignment(_index(), 4, seed=0)
    write_assignment(tmp_path / "folds.csv", table)
    back = read_assignment(tmp_path / "folds.csv")
    assert assignment_digest(back) == assignment_digest(table)
    (tmp_path / "other.csv").write_text("patient_id,split\nA,train\n")
    with pytest.raises(ValueError, match="other.csv: not a fold assignment"):
        read_assignment(tmp_path / "other.csv")


def test_too_few_patients_of_a_class_for_the_folds_is_refused_with_the_counts():
    index = pd.DataFrame(
        {"patient_id": list("ABCDEFGH"), "label": [1, 1, 1, 0, 0, 0, 0, 0], "split": [""] * 8}
    )
    with pytest.raises(ValueError, match="3 positive and 5 negative .* at most 3 folds"):
        fold_assignment(index, 4, seed=0)


def test_a_folder_of_fold_runs_is_a_cross_validation_and_a_run_is_not(tmp_path):
    (tmp_path / "cv" / "fold-0").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last_state.pt").write_bytes(b"")
    assert is_cross_validation(tmp_path / "cv")
    assert not is_cross_validation(tmp_path / "run")
    assert not is_cross_validation(tmp_path / "cv" / "fold-0")
