"""Patient split, balanced batch sampler, dataset and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainmets.config import PreprocessConfig
from brainmets.data.cache import build_cache_from_arrays
from brainmets.data.dataset import (
    PatientBatchSampler,
    PatientDataset,
    collate_patients,
    split_patients,
)

IDS = [f"P{i:03d}" for i in range(50)]
LABELS = np.array([1 if i % 5 < 2 else 0 for i in range(50)])  # 20 positives, 30 negatives


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_holdout_split_is_disjoint_complete_and_stratified(seed):
    splits = split_patients(IDS, LABELS, val_fraction=0.2, seed=seed)
    train, val = set(splits["train"]), set(splits["val"])
    assert not train & val
    assert train | val == set(IDS)
    label = dict(zip(IDS, LABELS, strict=True))
    assert sum(label[p] for p in val) == 4  # 20% of the 20 positives
    assert len(val) == 10


def test_split_is_reproducible_by_seed_and_changes_with_it():
    a = split_patients(IDS, LABELS, val_fraction=0.2, seed=3)
    assert a == split_patients(IDS, LABELS, val_fraction=0.2, seed=3)
    assert a != split_patients(IDS, LABELS, val_fraction=0.2, seed=4)


def test_kfold_validation_sets_partition_the_cohort():
    vals = [
        split_patients(IDS, LABELS, val_fraction=0.2, seed=0, folds=5, fold=k)["val"]
        for k in range(5)
    ]
    flat = [p for v in vals for p in v]
    assert sorted(flat) == sorted(IDS)  # every patient validates exactly once
    label = dict(zip(IDS, LABELS, strict=True))
    assert [sum(label[p] for p in v) for v in vals] == [4] * 5


def test_given_split_is_honoured_and_test_patients_never_train_or_validate():
    given = [""] * 50
    given[0], given[1], given[2], given[3] = "test", "test", "val", "train"
    splits = split_patients(IDS, LABELS, val_fraction=0.2, seed=0, given_split=given)
    assert splits["test"] == ["P000", "P001"]
    assert "P002" in splits["val"] and "P003" in splits["train"]
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    assert len(splits["train"]) + len(splits["val"]) == 48


@pytest.mark.parametrize(
    ("ids", "given", "match"),
    [(["a", "a"], None, "unique"), (["a", "b"], ["train", "holdout"], "holdout")],
)
def test_split_rejects_bad_input(ids, given, match):
    with pytest.raises(ValueError, match=match):
        split_patients(ids, [0, 1], val_fraction=0.5, seed=0, given_split=given)


# --------------------------------------------------------------------------- sampler


def _sampler(labels=LABELS, **kw) -> PatientBatchSampler:
    return PatientBatchSampler(labels, kw.pop("batch_size", 10), pos_fraction=0.4, seed=11, **kw)


def test_every_batch_has_the_specified_class_mix():
    sampler = _sampler()
    batches = list(sampler)
    assert all(len(b) == 10 and LABELS[b].sum() == 4 for b in batches)  # 4:6 = 1:1.5


def test_epoch_is_one_pass_over_the_majority_and_minority_cycles_without_early_repeats():
    labels = np.array([1] * 6 + [0] * 30)  # 6 positives, 30 negatives; 4 pos + 6 neg per batch
    sampler = _sampler(labels)
    batches = list(sampler)
    assert len(batches) == sampler.num_batches() == 5  # 30 negatives / 6 per batch
    negatives = [i for b in batches for i in b if labels[i] == 0]
    assert sorted(negatives) == list(range(6, 36))  # each negative exactly once
    # 20 positive draws from reshuffled passes over 6 patients: each 3 or 4 times, and the
    # first two batches (8 draws) already hold every positive.
    counts = np.bincount([i for b in batches for i in b if labels[i] == 1], minlength=6)
    assert counts.sum() == 20 and counts.max() - counts.min() <= 1
    assert {i for b in batches[:2] for i in b if labels[i] == 1} == set(range(6))


def test_order_is_new_every_epoch_and_deterministic_per_seed_and_epoch():
    sampler = _sampler()
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    again = _sampler()
    again.set_epoch(1)
    assert list(again) == second


def test_ddp_ranks_get_disjoint_equal_shares_of_each_global_batch():
    ranks = [_sampler(rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1])
    whole = _sampler()
    whole.set_epoch(3)
    for a, b, full in zip(shares[0], shares[1], whole, strict=True):
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(full)
        assert len(a) == len(b) == 5


def test_start_batch_resumes_mid_epoch_and_is_reset_by_set_epoch():
    sampler = _sampler()
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.start_batch = 3
    assert len(sampler) == len(full) - 3
    assert list(sampler) == full[3:]
    sampler.set_epoch(2)
    assert list(sampler) == full


def test_sampler_rejects_a_batch_that_cannot_be_split_evenly_over_ranks():
    with pytest.raises(ValueError, match="multiple of world_size"):
        _sampler(batch_size=9, world_size=2)


# --------------------------------------------------------------------------- dataset + collate


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    patients = [
        (f"P{i}", i % 2, rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8))
        for i, n in enumerate([3, 5, 8, 2])
    ]
    return build_cache_from_arrays(
        tmp_path_factory.mktemp("cache"), patients, PreprocessConfig(size=16)
    )


def test_dataset_item_holds_all_slices_of_one_patient(cache):
    dataset = PatientDataset(cache, ["P2", "P0"])
    images, features, label, patient_id = dataset[0]
    assert patient_id == "P2" and label == 0.0
    assert images.dtype == torch.uint8 and images.shape == (8, 1, 16, 16)
    assert features.shape == (0,)
    np.testing.assert_array_equal(images[:, 0].numpy(), cache.load("P2"))


def test_max_slices_takes_a_contiguous_window_in_training_only(cache):
    volume = cache.load("P2")
    train = PatientDataset(cache, ["P2"], max_slices=3, train=True, seed=0)
    windows = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        images = train[0][0][:, 0].numpy()
        start = next(s for s in range(6) if np.array_equal(volume[s : s + 3], images))
        windows.add(start)
    assert len(windows) > 1  # the window moves between epochs
    val = PatientDataset(cache, ["P2"], max_slices=3, train=False)
    assert val[0][0].shape[0] == 8


def test_pad_slices_gives_every_training_patient_the_same_length(cache):
    dataset = PatientDataset(cache, ["P0", "P2", "P3"], max_slices=6, train=True, pad_slices=True)
    shapes = [dataset[i][0].shape[0] for i in range(3)]
    assert shapes == [6, 6, 6]
    short = dataset[0][0][:, 0].numpy()  # P0 has 3 slices: padded 1 before, 2 after
    volume = cache.load("P0")
    np.testing.assert_array_equal(short, volume[[0, 0, 1, 2, 2, 2]])
    two = dataset[2][0][:, 0].numpy()  # P3 has 2 slices: only its two slices, repeated
    assert all(any(np.array_equal(s, v) for v in cache.load("P3")) for s in two)
    # Validation keeps every slice, unpadded; padding needs a length.
    val = PatientDataset(cache, ["P0"], max_slices=6, train=False, pad_slices=True)
    assert val[0][0].shape[0] == 3
    with pytest.raises(ValueError, match="max_slices"):
        PatientDataset(cache, ["P0"], pad_slices=True)


def test_padding_leaves_the_max_pooled_patient_logit_unchanged(cache):
    from brainmets.data.normalize import normalize_slices, uint8_to_unit
    from brainmets.model.resnet import BrainMetsNet

    torch.manual_seed(0)
    model = BrainMetsNet("resnet18").eval()
    padded = PatientDataset(cache, ["P0", "P3"], max_slices=7, train=True, pad_slices=True)
    plain = PatientDataset(cache, ["P0", "P3"], train=False)
    logits = []
    for dataset in (padded, plain):
        batch = collate_patients([dataset[0], dataset[1]])
        x = normalize_slices(uint8_to_unit(batch.images), "zscore")
        with torch.no_grad():
            logits.append(model(x, batch.patient_index, 2).patient_logits)
    assert collate_patients([padded[0], padded[1]]).images.shape[0] == 14
    torch.testing.assert_close(logits[0], logits[1])


def test_collate_flattens_slices_with_patient_index(cache):
    dataset = PatientDataset(cache, ["P0", "P1", "P3"])
    batch = collate_patients([dataset[i] for i in range(3)])
    assert batch.images.shape == (10, 1, 16, 16) and batch.images.dtype == torch.uint8
    assert batch.patient_index.tolist() == [0] * 3 + [1] * 5 + [2] * 2
    assert batch.counts.tolist() == [3, 5, 2]
    assert batch.labels.tolist() == [0.0, 1.0, 1.0]
    assert batch.features.shape == (3, 0)
    assert batch.patient_ids == ["P0", "P1", "P3"]
    np.testing.assert_array_equal(batch.images[3:8, 0].numpy(), cache.load("P1"))


def test_dataset_rejects_unknown_patients(cache):
    with pytest.raises(KeyError, match="not in the cache"):
        PatientDataset(cache, ["P0", "nobody"])
