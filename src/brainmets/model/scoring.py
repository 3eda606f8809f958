"""Slice scoring in fixed-size chunks: the inference path of ``predict`` and ``evaluate``.

Patients have different slice counts, so "all slices of these patients" has a new shape at
nearly every call. That defeats ``torch.compile`` (a recompile, or slower dynamic-shape
kernels) and cuDNN's per-shape autotuning. ``SliceScorer`` therefore runs the per-slice part of
the model (uint8 -> window units -> normalisation -> backbone -> head) over chunks of exactly
``chunk`` slices, padding the last chunk with blank slices whose outputs are dropped, and
pools per patient afterwards. In eval mode every slice is scored independently (BatchNorm uses
its running statistics, normalisation is per slice), so the padding changes nothing: the
patient logits equal those of the plain ``BrainMetsNet.forward`` (a test holds them equal in
fp32 on the CPU). One chunk shape means one compiled graph and one cuDNN plan per run.

The network is a seam (:class:`SliceNetwork`): ``BrainMetsNet`` under PyTorch, or the exported
ONNX graph under onnxruntime (``brainmets.export``). Chunking, normalisation and the patient
pooling stay here, so both backends pool the same slice logits the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from brainmets.data.normalize import normalize_slices, uint8_to_unit
from brainmets.device import to_device_async
from brainmets.model.resnet import BrainMetsNet, PatientOutput

K = TypeVar("K", bound=Hashable)


class PatientScore(NamedTuple):
    """One patient's scores, on the host."""

    logit: float
    slice_logits: np.ndarray
    """float32 [N], the patient's slices in cache order."""
    top_slice: int
    """Index of the slice that decided the patient (within the patient)."""


class SliceNetwork(Protocol):
    """What the scorer needs of a network: ``BrainMetsNet`` has it, so does an ONNX export."""

    def eval(self) -> SliceNetwork: ...

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def pool(
        self,
        slice_logits: Tensor,
        patient_index: Tensor,
        num_patients: int,
        scores: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]: ...


class SliceScorer:
    """Patient outputs of an eval-mode network from uint8 cache slices.

    Args:
        model: a ``BrainMetsNet`` (or another :class:`SliceNetwork`), already on ``device``
            (channels_last on CUDA is the caller's choice; inputs follow the model's format).
        normalization: the run's input normalisation (``zscore`` or ``minus_one_to_one``).
        chunk: slices per forward; the last chunk is padded up to it.
        compile: ``torch.compile`` the chunk forward (worth it for many patients on a GPU; the
            first chunk then takes tens of seconds).
        amp: bf16 autocast; ``None`` means on for CUDA, off elsewhere.
    """

    def __init__(
        self,
        model: BrainMetsNet | SliceNetwork,
        device: torch.device,
        normalization: str,
        *,
        chunk: int = 256,
        compile: bool = False,
        amp: bool | None = None,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.model = model.eval()
        self.device = device
        self.normalization = normalization
        self.chunk = chunk
        self.amp = device.type == "cuda" if amp is None else amp
        self.channels_last = device.type == "cuda"
        self._forward = torch.compile(self._chunk_outputs) if compile else self._chunk_outputs

    def network_inputs(self, images: Tensor) -> Tensor:
        """uint8 cache slices [S, H, W] on the device -> the network's input [S, 1, H, W]."""
        x = normalize_slices(uint8_to_unit(images).unsqueeze(1), self.normalization)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _chunk_outputs(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 [chunk, H, W] -> slice logits [chunk] (and attention scores) in float32."""
        x = self.network_inputs(images)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.amp
            else contextlib.nullcontext()
        )
        with autocast:
            return self.model.slice_outputs(x)

    @torch.inference_mode()
    def slice_outputs(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Slice logits [S] (and attention scores) for uint8 slices [S, H, W] on the device."""
        total = images.shape[0]
        logits, scores = [], []
        for start in range(0, total, self.chunk):
            part = images[start : start + self.chunk]
            short = self.chunk - part.shape[0]
            if short:
                part = torch.cat([part, part.new_zeros((short, *part.shape[1:]))])
            chunk_logits, chunk_scores = self._forward(part)
            # Clone: a compiled graph may reuse its output buffers on the next call.
            logits.append(chunk_logits[: self.chunk - short].clone())
            if chunk_scores is not None:
                scores.append(chunk_scores[: self.chunk - short].clone())
        flat_logits = torch.cat(logits) if logits else images.new_zeros(0, dtype=torch.float32)
        return flat_logits, (torch.cat(scores) if scores else None)

    @torch.inference_mode()
    def score_flat(self, images: Tensor, counts: Sequence[int]) -> PatientOutput:
        """Pooled outputs of patients whose uint8 slices are concatenated in ``images``
        [S, H, W] (host or device), ``counts[i]`` slices for patient i."""
        counts_t = torch.as_tensor(counts, dtype=torch.long)
        if counts_t.numel() == 0 or int(counts_t.min()) < 1:
            raise ValueError("every patient needs at least one slice")
        if int(counts_t.sum()) != images.shape[0]:
            raise ValueError(f"counts add up to {int(counts_t.sum())}, not {images.shape[0]}")
        # From pinned memory (concatenate_patients(pinned=True)) the copy is a DMA the host does
        # not wait for; the forward queued behind it waits. What overlaps with the device's
        # work is the next batch's reading, in score_cache's reader thread. The caller keeps
        # ``images`` alive until it reads the outputs back (which waits for the copy).
        slice_logits, scores = self.slice_outputs(images.to(self.device, non_blocking=True))
        patient_index = torch.repeat_interleave(torch.arange(len(counts_t)), counts_t)
        patient_logits, top = self.model.pool(
            slice_logits, to_device_async(patient_index, self.device), len(counts_t), scores
        )
        return PatientOutput(patient_logits, slice_logits, top)

    def score_batches(
        self, batches: Iterable[tuple[K, np.ndarray, Sequence[int]]]
    ) -> Iterator[tuple[K, list[PatientScore]]]:
        """Score ``(key, flat uint8 [S, H, W], counts)`` batches; yields ``(key, scores)`` in
        order, one :class:`PatientScore` per patient.

        One batch stays in flight: batch i + 1 is queued on the device (its copy, forward and
        pooling, then a copy of the results back) before batch i's results are read, so the
        device does not wait while the host turns results into rows and gathers the next
        batch. Reading batch i waits for batch i alone (a CUDA event), not for the queue.
        """
        in_flight = None
        for key, flat, counts in batches:
            launched = self._launch(key, flat, counts)
            if in_flight is not None:
                yield in_flight.key, in_flight.collect()
            in_flight = launched
        if in_flight is not None:
            yield in_flight.key, in_flight.collect()

    def _launch(self, key: K, flat: np.ndarray, counts: Sequence[int]) -> _InFlight:
        out = self.score_flat(torch.from_numpy(flat), counts)
        # From CUDA, non_blocking copies land in pinned memory and the event says when; other
        # devices copy back blocking.
        cuda = self.device.type == "cuda"
        host = [t.to("cpu", non_blocking=cuda) for t in out]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        # ``flat`` is held until the collect: its copy to the device may still be running.
        return _InFlight(key, flat, list(counts), host, event)

    def concatenate(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """``concatenate_patients`` into pinned memory when scoring on a GPU (the copy is then a
        DMA the host does not wait for), into ordinary memory otherwise."""
        return concatenate_patients(arrays, pinned=self.device.type == "cuda")

    def __call__(self, arrays: Sequence[np.ndarray]) -> PatientOutput:
        """Pooled outputs of several patients (uint8 [N_i, H, W] each), as the model's forward
        returns them: patient logits [P], slice logits [S], top slice (flat index) [P]."""
        flat, counts = concatenate_patients(arrays)  # score_flat checks the counts
        return self.score_flat(torch.from_numpy(flat), counts)


class _InFlight(NamedTuple):
    key: Hashable
    flat: np.ndarray
    counts: list[int]
    host: list[Tensor]  # patient logits, slice logits, top slices (flat indices)
    event: torch.cuda.Event | None

    def collect(self) -> list[PatientScore]:
        if self.event is not None:
            self.event.synchronize()
        patient_logits, slice_logits = (t.float().numpy() for t in self.host[:2])
        top = self.host[2].numpy()
        starts = np.cumsum([0, *self.counts])
        return [
            PatientScore(
                float(patient_logits[i]),
                slice_logits[starts[i] : starts[i + 1]],
                int(top[i] - starts[i]),
            )
            for i in range(len(self.counts))
        ]


def concatenate_patients(
    arrays: Sequence[np.ndarray], pinned: bool = False
) -> tuple[np.ndarray, list[int]]:
    """One uint8 [S, H, W] array of all patients' slices (one copy, also straight out of
    memory maps) and the slice count of each patient.

    ``pinned``: the array lives in page-locked memory (PyTorch's caching host allocator, so the
    buffer is recycled rather than allocated each time), from which the copy to a GPU is a
    DMA that runs while the host goes on.
    """
    for array in arrays:
        if array.dtype != np.uint8:
            raise TypeError(f"expected uint8 cache slices, got {array.dtype}")
    counts = [int(a.shape[0]) for a in arrays]
    if not pinned:
        return np.concatenate(arrays, axis=0), counts
    shape = (sum(counts), *arrays[0].shape[1:])
    buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
    np.concatenate(arrays, axis=0, out=buffer)
    return buffer, counts
