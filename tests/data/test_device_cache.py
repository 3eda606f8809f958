"""The device-resident cohort yields exactly the batches of the DataLoader path."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brainmets.config import PreprocessConfig
from brainmets.data.cache import CacheError, PatientCache, build_cache_from_arrays
from brainmets.data.dataset import PatientBatchSampler, PatientDataset, collate_patients
from brainmets.data.device_cache import DeviceSliceStore, cohort_bytes, use_device_cache

SIZE = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> PatientCache:
    rng = np.random.default_rng(0)
    patients = [
        (f"P{i:02d}", int(i % 3 == 0), rng.integers(0, 256, (int(rng.integers(2, 9)), SIZE, SIZE),
                                                     dtype=np.uint8))
        for i in range(11)
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("cache")
    build_cache_from_arrays(root, patients, PreprocessConfig(size=SIZE))
    return PatientCache(root)


@pytest.mark.parametrize("pad", [False, True])
def test_batches_equal_the_loader_batches_with_slice_windows(cache, pad):
    ids = cache.patient_ids[1:]  # a subset, so dataset indices differ from cache order
    dataset = PatientDataset(cache, ids, max_slices=4, train=True, seed=5, pad_slices=pad)
    sampler = PatientBatchSampler(dataset.labels, 4, seed=5)
    store = DeviceSliceStore(dataset, torch.device("cpu"))
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_patients)
        pairs = list(zip(loader, store.batches(sampler), strict=True))
        assert len(pairs) == sampler.num_batches()
        for plain, resident in pairs:
            assert resident.patient_ids == plain.patient_ids
            assert torch.equal(resident.images, plain.images)
            assert torch.equal(resident.patient_index, plain.patient_index)
            assert torch.equal(resident.labels, plain.labels)
            assert torch.equal(resident.counts, plain.counts)
            assert resident.features.shape == plain.features.shape
    longer = {p for p in ids if int(cache.row(p)["num_slices"]) > 4}
    assert longer  # some patients are longer than the window, and they were really cut:
    cut = [c for b, _ in pairs for p, c in zip(b.patient_ids, b.counts.tolist(), strict=True)
           if p in longer]  # fmt: skip
    assert cut and all(c == 4 for c in cut)
    assert all(b.images.shape[0] == 4 * 4 for b, _ in pairs) == pad  # padding: one shape


def test_cohort_bytes_and_mode_resolution(cache):
    dataset = PatientDataset(cache, cache.patient_ids, train=False)
    assert cohort_bytes(dataset) == int(cache.index["num_slices"].sum()) * SIZE * SIZE
    cpu = torch.device("cpu")
    assert use_device_cache("on", [dataset], cpu) is True
    assert use_device_cache("off", [dataset], cpu) is False
    assert use_device_cache("auto", [dataset], cpu) is False  # auto means CUDA only
    with pytest.raises(ValueError, match="device_cache"):
        use_device_cache("yes", [dataset], cpu)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_the_store_holds_one_patient_file_open_at_a_time(tmp_path):
    """Real cohorts have more patients than a process may open files (ulimit -n, often 1024):
    the copy to the device must not keep every patient's memory map open until the end."""
    import resource

    patients = [(f"P{i:03d}", i % 2, np.full((2, SIZE, SIZE), i, np.uint8)) for i in range(60)]
    build_cache_from_arrays(tmp_path, patients, PreprocessConfig(size=SIZE))
    dataset = PatientDataset(PatientCache(tmp_path), [p for p, _, _ in patients], train=False)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 30, hard))  # fewer than 60 patients
    try:
        store = DeviceSliceStore(dataset, torch.device("cpu"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert store.images.shape == (120, SIZE, SIZE)
    assert store.images[::2, 0, 0].tolist() == list(range(60))  # each patient in its own rows


def test_a_volume_that_disagrees_with_the_index_is_named(tmp_path):
    build_cache_from_arrays(tmp_path, [("P1", 1, np.zeros((3, SIZE, SIZE), np.uint8))],
                            PreprocessConfig(size=SIZE))  # fmt: skip
    cache = PatientCache(tmp_path)
    path = tmp_path / "patients" / cache.row("P1")["file"]
    np.save(path, np.zeros((2, SIZE, SIZE), np.uint8))  # the file changed behind the index
    with pytest.raises(CacheError, match=r"P1\.npy: damaged cache array: uint8 \[2, 16, 16\], "
                       r"expected uint8 \[3, 16, 16\]"):  # fmt: skip
        DeviceSliceStore(PatientDataset(cache, ["P1"], train=False), torch.device("cpu"))
