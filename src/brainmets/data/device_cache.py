"""The patients of a dataset held on the training device as uint8: batches without a loader.

At the early curriculum stages a GPU scores ~10,000 slices/s; feeding that from memory-mapped
files through DataLoader workers costs a host copy, a pinned copy and a transfer per slice, and
per-patient Python in the workers. A cohort of 1,000 patients x 40 slices at 256^2 is 2.6 GB as
uint8, which fits beside a ResNet-50 on any training GPU. ``DeviceSliceStore`` copies every
patient once into one uint8 tensor on the device; a batch is then a single ``index_select`` of
the rows the sampler and the dataset's slice windows name. Batches are the same as the
DataLoader path's (same patients, order, windows and labels), so the choice changes speed only.

``data.device_cache``: ``auto`` uses it on CUDA when the cohort takes at most
``AUTO_FRACTION`` of the free device memory; ``on`` forces it (also on the CPU, where it keeps
the cohort in RAM); ``off`` always uses the DataLoader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from brainmets.data.dataset import PatientBatch, PatientDataset
from brainmets.device import to_device_async

log = logging.getLogger(__name__)

AUTO_FRACTION = 0.25
"""``auto``: the largest share of free device memory the resident cohort may take."""


def cohort_bytes(dataset: PatientDataset) -> int:
    """Bytes of every slice of the dataset's patients as uint8."""
    rows = dataset.cache.index.set_index("patient_id").loc[dataset.patient_ids]
    size = int(dataset.cache.preprocess.size)
    return int(rows["num_slices"].sum()) * size * size


def use_device_cache(mode: str, datasets: Sequence[PatientDataset], device: torch.device) -> bool:
    """Resolve ``data.device_cache`` (``auto`` / ``on`` / ``off``) for these datasets."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"data.device_cache must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    needed = sum(cohort_bytes(d) for d in datasets)
    free, _ = torch.cuda.mem_get_info(device)
    fits = needed <= AUTO_FRACTION * free
    log.info(
        "device cache %s: cohort %.2f GB, free device memory %.2f GB",
        "on" if fits else "off (too large)",
        needed / 1e9,
        free / 1e9,
    )
    return fits


class DeviceSliceStore:
    """Every slice of a ``PatientDataset``'s patients in one uint8 [S_total, H, W] tensor."""

    def __init__(self, dataset: PatientDataset, device: torch.device) -> None:
        self.dataset = dataset
        self.device = device
        cache = dataset.cache
        # Slice counts from the index, then one patient's file open at a time: keeping every
        # memory map until the copy ran out of file handles at ~1,000 patients (ulimit -n).
        counts = [int(cache.row(pid)["num_slices"]) for pid in dataset.patient_ids]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        size = int(cache.preprocess.size)
        self.images = torch.empty(
            (int(self.offsets[-1]), size, size), dtype=torch.uint8, device=device
        )
        for pid, start, count in zip(dataset.patient_ids, self.offsets[:-1], counts, strict=True):
            volume = cache.load(pid)  # checked against the index there, the file named
            # One patient at a time: the host never holds a second copy of the cohort.
            block = torch.from_numpy(np.array(volume, dtype=np.uint8))  # owned, writable
            self.images[start : start + count].copy_(block)
            del volume  # closes its memory map before the next patient's opens
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.float32, device=device)

    def batch(self, indices: Sequence[int]) -> PatientBatch:
        """The batch the DataLoader path would collate for these dataset indices."""
        rows, counts = [], []
        for index in indices:
            n = int(self.offsets[index + 1] - self.offsets[index])
            patient_rows = self.dataset.slice_rows(n, index)
            rows.append(patient_rows + self.offsets[index])
            counts.append(len(patient_rows))
        counts_t = torch.tensor(counts, dtype=torch.long)
        selected = torch.from_numpy(np.concatenate(rows))
        patient_index = torch.repeat_interleave(torch.arange(len(indices)), counts_t)
        # The three index vectors travel as one pinned copy (one transfer per step, not three).
        on_device = to_device_async(
            torch.cat([selected, patient_index, torch.tensor(list(indices), dtype=torch.long)]),
            self.device,
        )
        selected, patient_index, patients = on_device.split(
            [len(selected), len(patient_index), len(indices)]
        )
        return PatientBatch(
            images=self.images.index_select(0, selected).unsqueeze(1),
            patient_index=patient_index,
            labels=self.labels.index_select(0, patients),
            features=torch.zeros((len(indices), 0), dtype=torch.float32, device=self.device),
            patient_ids=[self.dataset.patient_ids[i] for i in indices],
            counts=counts_t,
        )

    def batches(self, batch_indices: Iterable[Sequence[int]]) -> Iterator[PatientBatch]:
        for indices in batch_indices:
            yield self.batch(indices)
