"""An exported run as the scorers read it: the ONNX graph beside its ``brainmets.json`` sidecar.

``brainmets export`` (:mod:`brainmets.export`) writes the pair; this module finds it, reads the
sidecar (JSON only: nothing is unpickled) and holds the two bound together. The sidecar
records the SHA-256 of the graph and a digest over that checksum and everything in the
sidecar that decides (model id, pooling, preprocessing, normalisation, threshold,
calibration). The loader recomputes both: a graph that is not the one exported, or a sidecar
edited after export (another threshold, say), is refused with one line naming the file, so
an export never makes decisions under a model id that did not make them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from brainmets import rundir
from brainmets.inference import TrainedModel, model_path
from brainmets.io import file_sha256, read_format_json
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.identity import checked_model_id, decisive_fields, digest, model_id
from brainmets.model.pooling import pool_patients
from brainmets.model.resnet import BrainMetsNet
from brainmets.model.scoring import SliceScorer

FORMAT = "brainmets-onnx"
#: 2: the sidecar carries a digest that binds it to its graph.
FORMAT_VERSION = 2
INPUT = "slices"
OUTPUT = "slice_logit"


def export_digest(sidecar: dict[str, Any]) -> str:
    """What binds an export: the graph's checksum and all in the sidecar that decides."""
    return digest(
        {
            "onnx": sidecar["onnx"]["sha256"],
            "model_id": sidecar["model_id"],
            "pooling": sidecar["pooling"],
            "decisive": decisive_fields(sidecar),
        }
    )


def base_model_id(sidecar: dict[str, Any]) -> str:
    """The run's model id an export was made from (its own id adds ``-int8`` when quantised)."""
    quantization = sidecar.get("onnx", {}).get("quantization", "none")
    suffix = "" if quantization == "none" else f"-{quantization}"
    return str(sidecar["model_id"]).removesuffix(suffix)


def read_export_sidecar(path: str | Path) -> dict[str, Any]:
    """``brainmets.json`` of an export, checked to be one and unedited since export."""
    path = Path(path)
    meta = read_format_json(path, fmt=FORMAT, version=FORMAT_VERSION,
                            what="a brainmets export sidecar", again="export the run again")  # fmt: skip
    try:
        bound = export_digest(meta) == meta.get("digest") and base_model_id(meta) == model_id(meta)
    except (KeyError, TypeError, ValueError):
        bound = False
    if not bound:
        raise ValueError(
            f"{path}: edited after export: its content does not match its digest (threshold, "
            "calibration, pooling, preprocessing or model id changed); export the run again "
            "(brainmets export RUN) rather than editing the sidecar"
        )
    return meta


def check_graph(path: Path, sidecar: dict[str, Any]) -> None:
    """The ONNX file must be the graph the sidecar was written for."""
    if file_sha256(path) != sidecar["onnx"]["sha256"]:
        raise ValueError(
            f"{path}: not the graph brainmets exported for model {sidecar['model_id']} (its "
            f"checksum differs from the one {rundir.EXPORT_SIDECAR} records); export the run "
            "again, with --quantize for an int8 graph"
        )


def check_signature(session, path: Path | str, size: int, members: int | None = None) -> None:
    """Refuse an ONNX model that is not a slice network for ``size`` x ``size`` slices: one
    float input ``slices`` [batch, 1, size, size] and one float output ``slice_logit`` [batch]
    (an ensemble's: [batch, members]), the batch axis free."""
    problems = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_in, expected_out = [1, size, size], [members] if members else []
    for kind, args, name, rest in (
        ("input", inputs, INPUT, expected_in),
        ("output", outputs, OUTPUT, expected_out),
    ):
        found = ", ".join(f"{a.name} {a.type} {list(a.shape)}" for a in args) or "none"
        if len(args) != 1:
            problems.append(f"{len(args)} {kind}s ({found})")
            continue
        arg = args[0]
        shape = list(arg.shape)
        if arg.name != name:
            problems.append(f"{kind} named {arg.name!r}, not {name!r}")
        if arg.type != "tensor(float)":
            problems.append(f"{kind} of type {arg.type}, not tensor(float)")
        if len(shape) != 1 + len(rest) or shape[1:] != rest:
            problems.append(f"{kind} of shape {shape}, not [batch, {', '.join(map(str, rest))}]")
        elif isinstance(shape[0], int):
            problems.append(f"{kind} with a fixed batch of {shape[0]}, not a free batch axis")
    if problems:
        raise ValueError(
            f"{path}: not the slice network of this export ({'; '.join(problems)}); expected "
            f"input {INPUT!r} float32 [batch, 1, {size}, {size}] and output {OUTPUT!r} float32 "
            + (f"[batch, {members}]" if members else "[batch]")
        )


def find_export(run: str | Path, onnx: str | Path | None = None) -> Path:
    """The ONNX file to score with: ``onnx`` (a file, or a folder holding model.onnx), else
    RUN itself when it is an export folder, else ``RUN/export``."""
    run = Path(run)
    if onnx is not None:
        onnx = Path(onnx)
        path = onnx / rundir.EXPORT_ONNX if onnx.is_dir() else onnx
    elif (run / rundir.EXPORT_SIDECAR).is_file():
        path = run / rundir.EXPORT_ONNX
    else:
        path = run / rundir.EXPORT / rundir.EXPORT_ONNX
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no ONNX export here; write one with `brainmets export {run}`"
        )
    if not (path.parent / rundir.EXPORT_SIDECAR).is_file():
        raise FileNotFoundError(
            f"{path.parent / rundir.EXPORT_SIDECAR}: missing; an ONNX file is scored with the "
            f"{rundir.EXPORT_SIDECAR} that `brainmets export` writes beside it"
        )
    return path


class OnnxSliceNetwork:
    """An exported slice network behind a session (onnxruntime's, or a server's), with the
    run's pooling: what ``SliceScorer`` needs of a network (``slice_outputs``, ``pool``)."""

    def __init__(self, session, pooling: str, lse_temperature: float = 1.0) -> None:
        self.session = session
        self.pooling = pooling
        self.lse_temperature = lse_temperature

    def eval(self) -> OnnxSliceNetwork:
        return self

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, None]:
        logits = self.session.run([OUTPUT], {INPUT: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)), None

    def pool(
        self,
        slice_logits: Tensor,
        patient_index: Tensor,
        num_patients: int,
        scores: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        return pool_patients(
            slice_logits,
            patient_index,
            num_patients,
            self.pooling,
            temperature=self.lse_temperature,
        )


@dataclass
class ExportedModel(TrainedModel):
    """A ``TrainedModel`` whose slice logits come from an ONNX export; ``model`` holds the
    run's PyTorch network only where Grad-CAM needs it (else None)."""

    @property
    def model_id(self) -> str:
        return str(self.sidecar["model_id"])


def export_of(
    run: str | Path, onnx: str | Path | None, grad_cam: bool
) -> tuple[Path, dict[str, Any], BrainMetsNet | None]:
    """The export's ONNX path and checked sidecar, and the run's network when Grad-CAM needs
    it. An export of other weights than the run's is refused."""
    path = find_export(run, onnx)
    sidecar = read_export_sidecar(path.parent / rundir.EXPORT_SIDECAR)
    check_graph(path, sidecar)
    run = Path(run)
    run_sidecar = run / rundir.MODEL_SIDECAR
    if run_sidecar.is_file():
        run_id = checked_model_id(json.loads(run_sidecar.read_text()), run_sidecar)
        if run_id != base_model_id(sidecar):
            raise ValueError(
                f"{path} was exported from model {base_model_id(sidecar)}, but {run} holds "
                f"model {run_id}: export it again (brainmets export {run})"
            )
        if grad_cam:
            return path, sidecar, load_checkpoint(model_path(run), map_location="cpu")[0]
        return path, sidecar, None
    if grad_cam:
        raise ValueError(
            f"{run}: Grad-CAM heatmaps need the run's PyTorch weights ({rundir.MODEL}); an "
            "export folder alone scores without them"
        )
    return path, sidecar, None


def exported_model(network, sidecar: dict[str, Any], model, chunk: int) -> ExportedModel:
    """A scorer around ``network``: normalisation on the host, the backend copies to its
    device."""
    host = torch.device("cpu")
    scorer = SliceScorer(network, host, sidecar["normalization"], chunk=chunk, amp=False)
    return ExportedModel(model, sidecar, host, scorer)
