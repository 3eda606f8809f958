"""Patient split, class-balanced patient batch sampler, patient dataset and collate.

A batch item is a patient: all of its slices (images uint8 [N, 1, H, W]), its clinical features
(empty for the image-only model), its label and identifier. ``collate_patients`` flattens the
slices of a batch into one [S, 1, H, W] tensor plus the patient index of every slice, which is
what the model and the device-side augmentation consume. Images stay uint8 on the host: a
quarter of the bytes to copy; conversion to float happens on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from brainmets.data.labels import SPLITS

# --------------------------------------------------------------------------- split


def _stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number of every item: each class is shuffled and dealt round-robin over the folds,
    so every fold holds its share of each class (to within one patient)."""
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        # Continue dealing where the previous class stopped so small folds stay even in size.
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return assignment


def _stratified_holdout(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean validation mask with ``round(n_c * val_fraction)`` patients of every class c
    (at least one when the class has two or more, so validation can measure both classes)."""
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        is_val[members[:n_val]] = True
    return is_val


def split_patients(
    patient_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    folds: int = 1,
    fold: int = 0,
    given_split: Sequence[str] | Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Patient-level train / val (/ test) split, stratified by label and reproducible by seed.

    ``folds == 1``: a stratified hold-out of ``val_fraction``. ``folds > 1``: stratified
    k-fold, fold ``fold`` is validation (``val_fraction`` is then unused).
    ``given_split`` (the manifest's split column, aligned with ``patient_ids`` or keyed by
    patient id) is honoured: ``train``/``val`` patients keep their split, ``test`` patients
    are returned under ``"test"`` and never train or validate, and only patients with an empty
    split are assigned here. Each list keeps the order of ``patient_ids``.
    """
    ids = [str(p) for p in patient_ids]
    y = np.asarray(labels).astype(np.int64)
    if len(ids) != len(y):
        raise ValueError(f"{len(ids)} patient ids but {len(y)} labels")
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids are not unique; a patient would land in several splits")
    if folds > 1 and not 0 <= fold < folds:
        raise ValueError(f"fold={fold} must be in [0, {folds})")

    if given_split is None:
        given = [""] * len(ids)
    elif isinstance(given_split, Mapping):
        given = [str(given_split.get(p, "") or "") for p in ids]
    else:
        given = [str(s or "") for s in given_split]
        if len(given) != len(ids):
            raise ValueError(f"given_split has {len(given)} entries for {len(ids)} patients")
    unknown = sorted({s for s in given if s and s not in SPLITS})
    if unknown:
        raise ValueError(f"unknown split value(s) {unknown}; allowed: '', {', '.join(SPLITS)}")

    split = np.array([s if s else "" for s in given], dtype=object)
    free = np.flatnonzero(split == "")
    if len(free):
        rng = np.random.default_rng(seed)
        if folds > 1:
            is_val = _stratified_folds(y[free], folds, rng) == fold
        else:
            is_val = _stratified_holdout(y[free], val_fraction, rng)
        split[free] = np.where(is_val, "val", "train")

    result = {name: [p for p, s in zip(ids, split, strict=True) if s == name] for name in SPLITS}
    if not result["test"]:
        del result["test"]
    return result


# --------------------------------------------------------------------------- sampler


class PatientBatchSampler(Sampler[list[int]]):
    """Batches of patient indices with a fixed positive:negative mix (``pos_fraction``).

    Definition of an epoch: every batch holds ``n_pos = round(batch_size * pos_fraction)``
    positives and ``batch_size - n_pos`` negatives (at least one of each when both classes
    exist). The epoch has as many batches as it takes to show every patient of the class that
    needs more batches (normally the majority class) once. Each class is drawn from a stream of
    reshuffled passes: a fresh permutation of the class is consumed in order and, when used up,
    followed by another one. The minority class therefore cycles, and every minority patient
    appears before any of them repeats; the last batch is topped up the same way, so all
    batches are full.

    The order is a pure function of ``(seed, epoch)`` (``set_epoch``), new every epoch. With
    DDP each rank yields a disjoint share of every global batch (``batch[rank::world_size]``
    after a shuffle within the batch), and every rank yields the same number of batches.
    ``start_batch`` skips the first batches of the epoch, for resuming in the middle of it; it
    applies to the current epoch only and is reset by ``set_epoch``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        pos_fraction: float = 0.4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.labels = np.asarray(labels).astype(np.int64)
        if len(self.labels) == 0:
            raise ValueError("PatientBatchSampler needs at least one patient")
        if not 0.0 < pos_fraction < 1.0:
            raise ValueError(f"pos_fraction must be in (0, 1), got {pos_fraction}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} must be a positive multiple of world_size "
                f"{world_size} so that every rank holds the same number of patients"
            )
        self.batch_size = batch_size
        self.pos_fraction = pos_fraction
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self.positives = np.flatnonzero(self.labels == 1)
        self.negatives = np.flatnonzero(self.labels != 1)
        self.n_pos, self.n_neg = self._class_counts_per_batch()

    def _class_counts_per_batch(self) -> tuple[int, int]:
        if len(self.positives) == 0:
            return 0, self.batch_size
        if len(self.negatives) == 0:
            return self.batch_size, 0
        if self.batch_size < 2:
            raise ValueError("a batch of one patient cannot hold both classes")
        n_pos = int(round(self.batch_size * self.pos_fraction))
        n_pos = min(max(n_pos, 1), self.batch_size - 1)
        return n_pos, self.batch_size - n_pos

    def num_batches(self) -> int:
        """Batches in a whole epoch (before ``start_batch`` is applied)."""
        needed = []
        if self.n_pos:
            needed.append(math.ceil(len(self.positives) / self.n_pos))
        if self.n_neg:
            needed.append(math.ceil(len(self.negatives) / self.n_neg))
        return max(needed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def __len__(self) -> int:
        return max(self.num_batches() - self.start_batch, 0)

    @staticmethod
    def _stream(members: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` draws from consecutive reshuffled passes over ``members``."""
        if count == 0:
            return members[:0]
        passes = math.ceil(count / len(members))
        return np.concatenate([rng.permutation(members) for _ in range(passes)])[:count]

    def global_batches(self) -> list[np.ndarray]:
        """Every global batch of the current epoch, before the per-rank split."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.num_batches()
        pos = self._stream(self.positives, n * self.n_pos, rng).reshape(n, self.n_pos)
        neg = self._stream(self.negatives, n * self.n_neg, rng).reshape(n, self.n_neg)
        # Shuffle within the batch so each rank's share mixes both classes.
        return [rng.permutation(np.concatenate([p, q])) for p, q in zip(pos, neg, strict=True)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[self.rank :: self.world_size].tolist()


# --------------------------------------------------------------------------- dataset


class PatientDataset(Dataset):
    """Patients of a ``PatientCache``; item = (images uint8 [N,1,H,W], features float [0],
    label float, patient_id).

    In training, a patient with more than ``max_slices`` slices yields a random contiguous
    window of ``max_slices`` slices (deterministic per seed, epoch and patient, so resumed runs
    see the same windows); at validation every slice is kept, since the patient's decision is
    the max over all of them. With ``pad_slices`` a shorter patient is padded to ``max_slices``
    by repeating its first and last slices, so that every training batch has the same shape.
    Without augmentation the repeats leave a max-pooled patient logit unchanged (the config
    allows padding with max pooling only). They do change two things in training: the end
    slices weigh more in trainable BatchNorm statistics, and each copy draws its own
    augmentation noise, so the max over several noisy copies of an end slice runs a little
    higher. End slices (skull base, vertex) rarely hold the lesion, in either class.
    """

    def __init__(
        self,
        cache,
        patient_ids: Sequence[str],
        max_slices: int | None = None,
        train: bool = True,
        seed: int = 0,
        pad_slices: bool = False,
    ) -> None:
        self.cache = cache
        self.patient_ids = [str(p) for p in patient_ids]
        label_of = dict(
            zip(map(str, cache.patient_ids), np.asarray(cache.labels).tolist(), strict=True)
        )
        missing = [p for p in self.patient_ids if p not in label_of]
        if missing:
            raise KeyError(f"patients not in the cache: {missing[:5]}")
        self.labels = np.array([int(label_of[p]) for p in self.patient_ids], dtype=np.int64)
        self.max_slices = max_slices
        if pad_slices and max_slices is None:
            raise ValueError("pad_slices needs max_slices, the length to pad to")
        self.pad_slices = pad_slices
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.patient_ids)

    def slice_rows(self, num_slices: int, index: int) -> np.ndarray:
        """The slices (indices into the patient's volume) item ``index`` yields this epoch."""
        if not self.train or self.max_slices is None or num_slices == self.max_slices:
            return np.arange(num_slices)
        if num_slices < self.max_slices:
            if not self.pad_slices:
                return np.arange(num_slices)
            before = (self.max_slices - num_slices) // 2
            return np.clip(np.arange(self.max_slices) - before, 0, num_slices - 1)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = int(rng.integers(0, num_slices - self.max_slices + 1))
        return np.arange(start, start + self.max_slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float, str]:
        patient_id = self.patient_ids[index]
        volume = self.cache.load(patient_id)
        rows = self.slice_rows(volume.shape[0], index)
        # A contiguous run is one slice of the memory map; np.array then copies it into an
        # owned, writable buffer (fancy indexing for padded rows copies already).
        window = volume[rows[0] : rows[-1] + 1] if np.all(np.diff(rows) == 1) else volume[rows]
        images = torch.from_numpy(np.array(window, dtype=np.uint8)).unsqueeze(1)
        features = torch.zeros(0, dtype=torch.float32)
        return images, features, float(self.labels[index]), patient_id


@dataclass
class PatientBatch:
    """A batch of patients as one flat slice batch (what the model consumes)."""

    images: torch.Tensor  # uint8 [S, 1, H, W]
    patient_index: torch.Tensor  # long [S], the batch position of each slice's patient
    labels: torch.Tensor  # float [P]
    features: torch.Tensor  # float [P, F] (F = 0 for the image-only model)
    patient_ids: list[str]
    counts: torch.Tensor  # long [P], slices per patient

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    def pin_memory(self) -> PatientBatch:
        """Called by ``DataLoader(pin_memory=True)``: page-locked host memory makes the
        host-to-device copy asynchronous."""
        return PatientBatch(
            self.images.pin_memory(),
            self.patient_index.pin_memory(),
            self.labels.pin_memory(),
            self.features.pin_memory(),
            self.patient_ids,
            self.counts,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PatientBatch:
        return PatientBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.patient_index.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.features.to(device, non_blocking=non_blocking),
            self.patient_ids,
            self.counts,
        )


def collate_patients(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, float, str]],
) -> PatientBatch:
    """Concatenate the slices of all patients; ``patient_index[s]`` names the item of slice s."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    images, features, labels, patient_ids = zip(*items, strict=True)
    counts = torch.tensor([im.shape[0] for im in images], dtype=torch.long)
    if (counts == 0).any():
        empty = [p for p, c in zip(patient_ids, counts.tolist(), strict=True) if c == 0]
        raise ValueError(f"patients without slices: {empty}")
    return PatientBatch(
        images=torch.cat(images, dim=0),
        patient_index=torch.repeat_interleave(torch.arange(len(items)), counts),
        labels=torch.tensor(labels, dtype=torch.float32),
        features=torch.stack(features),
        patient_ids=list(patient_ids),
        counts=counts,
    )
