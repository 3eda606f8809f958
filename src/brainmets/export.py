"""The exporter: a trained run as ONNX, and a Triton model repository holding it.

``brainmets export RUN`` writes the slice network (a normalised slice ``[B, 1, S, S]`` in, its
logit ``[B]`` out, ``B`` free) as ``model.onnx``, checked by ``onnx.checker``, beside
``brainmets.json``: everything else a scorer needs, as JSON (preprocessing, input
normalisation, pooling, the operating threshold on the plain sigmoid, the Platt calibration,
the model id, the tensor names, the opset and the versions). ``--triton REPO`` also writes a
Triton Inference Server model repository holding the same graph, for Triton's ONNX Runtime
backend (a stock server) or, with ``--triton-backend python``, for its Python backend.

Outside the graph, on purpose:

- the patient pooling: patients have different slice counts, and the ragged max over a
  patient's slices is done by ``SliceScorer`` for every backend, from the same slice logits;
- the input normalisation (uint8 / 255, then z-score per slice or ``2x - 1``): it runs in
  ``brainmets.data.normalize``, the code training ran, so there is one implementation of it
  (with its rule for flat slices) and not a second one in the graph to keep equal to it. The
  graph stays a plain image classifier that optimisers and quantisers know; a Triton client
  normalises before sending, as the sidecar's ``scoring`` section says;
- Grad-CAM, which needs gradients: heatmaps come from the run's PyTorch weights.

Scoring with an export is :mod:`brainmets.backends`: it reads JSON and an ONNX protobuf
(nothing is unpickled) and refuses a graph or sidecar changed since export (the sidecar's
digest binds the two to the run's model id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from brainmets import rundir
from brainmets.backends.ensemble import EXPORT_FORMAT as ENSEMBLE_EXPORT_FORMAT
from brainmets.backends.ensemble import EXPORT_FORMAT_VERSION as ENSEMBLE_EXPORT_FORMAT_VERSION
from brainmets.backends.ensemble import export_digest as ensemble_export_digest
from brainmets.backends.ensemble import is_ensemble, load_members, read_ensemble
from brainmets.backends.exported import FORMAT, FORMAT_VERSION, INPUT, OUTPUT, export_digest
from brainmets.backends.onnx_runtime import session_from_bytes
from brainmets.inference import model_path
from brainmets.io import atomic_write, atomic_write_text, require_package
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.probability import Calibration
from brainmets.model.resnet import BrainMetsNet

log = logging.getLogger(__name__)

#: Opset 18 runs on onnxruntime >= 1.14, and so on the onnxruntime of Triton releases since 23.02.
OPSET = 18
QUANTIZATIONS = ("none", "int8")
#: Attention pooling weighs slices by scores computed from the features: it would need a second
#: output, and is not exported.
EXPORTABLE_POOLING = ("max", "mean", "lse")
DEFAULT_MAX_BATCH = 128
_TRITON_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ExportResult:
    onnx: Path
    sidecar: Path
    triton: Path | None  # REPO/NAME, when a Triton repository was written
    max_abs_diff: float  # |ONNX - PyTorch| slice logits on probe slices


class _SliceLogits(nn.Module):
    """The per-slice part of ``BrainMetsNet``: normalised slices [B, 1, S, S] -> logits [B]."""

    def __init__(self, model: BrainMetsNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.slice_outputs(x)[0]


# --------------------------------------------------------------------------- export


def export_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    triton: str | Path | None = None,
    name: str = "brainmets",
    max_batch: int = DEFAULT_MAX_BATCH,
    triton_backend: str = "onnxruntime",
    quantize: str = "none",
    opset: int = OPSET,
) -> ExportResult:
    """Export the run's model to ``out`` (default ``RUN/export``) and, with ``triton``, into the
    Triton model repository ``triton/name``, for Triton's ``triton_backend`` (see
    :func:`triton_config`)."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATIONS}")
    if triton is not None:
        _check_triton_args(name, max_batch, triton_backend)
    if is_ensemble(run):
        return export_ensemble(
            run, out, triton=triton, name=name, max_batch=max_batch,
            triton_backend=triton_backend, quantize=quantize, opset=opset,
        )  # fmt: skip
    onnx = require_package("onnx", "export")
    weights = model_path(run)
    model, meta = load_checkpoint(weights, map_location="cpu")
    if model.pooling not in EXPORTABLE_POOLING:
        raise ValueError(
            f"{weights}: pooling {model.pooling!r} cannot be exported (attention scores are a "
            f"second network output); exportable: {EXPORTABLE_POOLING}"
        )
    size = int(meta["preprocess"]["size"])
    proto = _onnx_model(_SliceLogits(model), size, opset)
    proto.metadata_props.add(key="brainmets.model_id", value=meta["model_id"])
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if quantize == "int8":
        data = _quantize_int8(data)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    max_abs_diff = _probe_difference(_SliceLogits(model), data, size)
    if quantize == "none" and not max_abs_diff <= 1e-3:
        raise RuntimeError(
            f"the ONNX graph of {weights} does not compute what the network does: slice "
            f"logits differ by up to {max_abs_diff:.3g} on probe slices"
        )
    sidecar = _sidecar(model, meta, data, quantize, opset, size, max_abs_diff)

    out = Path(out) if out is not None else weights.parent / rundir.EXPORT
    onnx_path, sidecar_path = _write_export(out, data, sidecar)
    repo_model = None
    if triton is not None:
        repo_model = write_triton_model(
            Path(triton) / name, data, sidecar, max_batch=max_batch, backend=triton_backend
        )
    return ExportResult(onnx_path, sidecar_path, repo_model, max_abs_diff)


def _onnx_model(network: nn.Module, size: int, opset: int):
    """A slice network (slices [B, 1, S, S] -> logits [B] or [B, members]) as an ONNX
    ModelProto with a free batch axis (torch.export based)."""
    # The exporter's own dependency: name it, not its traceback.
    require_package("onnxscript", "export")
    # The exporter's graph passes and optimiser log each step at INFO: noise in a command's
    # output.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Batch 2 as the example: a batch of 1 is a size torch.export may specialise on.
    example = torch.zeros(2, 1, size, size)
    program = torch.onnx.export(
        network.eval(),
        (example,),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    return program.model_proto


def _quantize_int8(data: bytes) -> bytes:
    """Dynamic int8 quantisation (weights int8 ahead of time, activations per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        fp32.write_bytes(data)
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        return int8.read_bytes()


def _probe_difference(network: nn.Module, data: bytes, size: int) -> float:
    """Largest |ONNX - PyTorch| slice logit on a few brain-like probe slices (a smooth blob
    with noise, z-scored): the export checks its graph before writing it."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = (1.0 - (yy**2 + xx**2)).clamp(min=0.0)
    probes = head + 0.1 * torch.rand(3, 1, size, size, generator=generator)
    probes = (probes - probes.mean(dim=(2, 3), keepdim=True)) / probes.std(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        expected = network.eval()(probes).numpy()
    session = session_from_bytes(data)
    got = session.run([OUTPUT], {INPUT: probes.numpy()})[0]
    return float(np.max(np.abs(got.astype(np.float64) - expected)))


def _sidecar(
    model: BrainMetsNet,
    meta: dict[str, Any],
    data: bytes,
    quantize: str,
    opset: int,
    size: int,
    max_abs_diff: float,
) -> dict[str, Any]:
    """Everything a scorer needs besides the graph; keys shared with ``model.json`` keep their
    meaning there, so ``TrainedModel`` reads either."""
    sha = meta["weights"]["sha256"]
    normalization = meta.get("normalization", "zscore")
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": meta["model_id"] + ("" if quantize == "none" else f"-{quantize}"),
        "weights": {"file": meta["weights"]["file"], "sha256": sha},
        "epoch": meta.get("epoch"),
        "architecture": meta["architecture"],
        "preprocess": meta["preprocess"],
        "normalization": normalization,
        "pooling": {"method": model.pooling, "lse_temperature": model.lse_temperature},
        "threshold": meta.get("threshold"),
        "calibration": Calibration.from_sidecar(meta).to_json(),
        "ranking": meta.get("ranking"),
        "onnx": {
            "file": rundir.EXPORT_ONNX,
            "sha256": hashlib.sha256(data).hexdigest(),
            "opset": opset,
            "quantization": quantize,
            "input": {"name": INPUT, "shape": [-1, 1, size, size], "dtype": "float32"},
            "output": {"name": OUTPUT, "shape": [-1], "dtype": "float32"},
            "max_abs_diff_vs_pytorch": max_abs_diff,
        },
        "scoring": {
            "slices": "the cached brain window of each slice, uint8 0..255 for 0..80 HU "
            "(preprocess), in order along the slice normal",
            "input": "x = uint8 / 255; then per slice "
            + (
                "x = (x - mean) / std over its pixels (population std; x = 0 where std <= 1e-6)"
                if normalization == "zscore"
                else "x = 2 x - 1"
            ),
            "patient_logit": f"{model.pooling} over the patient's slice logits",
            "decision": "positive when sigmoid(patient_logit) >= threshold",
            "probability": "sigmoid(calibration.slope * patient_logit + calibration.intercept)",
        },
        "versions": rundir.versions("onnx", "onnxscript", "onnxruntime"),
    }
    sidecar["digest"] = export_digest(sidecar)
    return sidecar


def _write_export(folder: Path, data: bytes, sidecar: dict[str, Any]) -> tuple[Path, Path]:
    # The graph first, the sidecar that describes it last.
    onnx_path = atomic_write(folder / rundir.EXPORT_ONNX, lambda fh: fh.write(data))
    sidecar_path = atomic_write_text(
        folder / rundir.EXPORT_SIDECAR, json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    )
    return onnx_path, sidecar_path


# --------------------------------------------------------------------------- ensembles


class _MemberSliceLogits(nn.Module):
    """Every member's slice logit: normalised slices [B, 1, S, S] -> [B, members]. The members'
    pooling and their average stay outside the graph, as one run's pooling does."""

    def __init__(self, members: list[BrainMetsNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member.slice_outputs(x)[0] for member in self.members], dim=1)


def export_ensemble(
    folder: str | Path,
    out: str | Path | None = None,
    *,
    triton: str | Path | None = None,
    name: str = "brainmets",
    max_batch: int = DEFAULT_MAX_BATCH,
    triton_backend: str = "onnxruntime",
    quantize: str = "none",
    opset: int = OPSET,
) -> ExportResult:
    """An ensemble as one ONNX graph holding every member (``docs/benchmarks.md``, Ensembles:
    one graph against a graph per member), beside its sidecar, in ``out`` (default
    ``FOLDER/export``) and, with ``triton``, in a Triton model repository."""
    onnx = require_package("onnx", "export")
    folder = Path(folder)
    meta = read_ensemble(folder)
    members = load_members(folder, meta)
    for member, record in zip(members, meta["members"], strict=True):
        if member.pooling not in EXPORTABLE_POOLING:
            raise ValueError(
                f"{folder / record['run']}: pooling {member.pooling!r} cannot be exported; "
                f"exportable: {EXPORTABLE_POOLING}"
            )
    size = int(meta["preprocess"]["size"])
    network = _MemberSliceLogits(members)
    proto = _onnx_model(network, size, opset)
    proto.metadata_props.add(key="brainmets.model_id", value=meta["model_id"])
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if quantize == "int8":
        data = _quantize_int8(data)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    max_abs_diff = _probe_difference(network, data, size)
    if quantize == "none" and not max_abs_diff <= 1e-3:
        raise RuntimeError(
            f"the ONNX graph of {folder} does not compute what its members do: slice logits "
            f"differ by up to {max_abs_diff:.3g} on probe slices"
        )
    sidecar = _ensemble_sidecar(meta, members, data, quantize, opset, max_abs_diff)
    out = Path(out) if out is not None else folder / rundir.EXPORT
    onnx_path, sidecar_path = _write_export(out, data, sidecar)
    repo_model = None
    if triton is not None:
        repo_model = write_triton_model(
            Path(triton) / name, data, sidecar, max_batch=max_batch, backend=triton_backend
        )
    return ExportResult(onnx_path, sidecar_path, repo_model, max_abs_diff)


def _ensemble_sidecar(
    meta: dict[str, Any],
    members: list[BrainMetsNet],
    data: bytes,
    quantize: str,
    opset: int,
    max_abs_diff: float,
) -> dict[str, Any]:
    size = int(meta["preprocess"]["size"])
    count = len(members)
    sidecar = {
        "format": ENSEMBLE_EXPORT_FORMAT,
        "format_version": ENSEMBLE_EXPORT_FORMAT_VERSION,
        "model_id": meta["model_id"] + ("" if quantize == "none" else f"-{quantize}"),
        **{k: meta[k] for k in ("members", "combine", "preprocess", "threshold", "calibration")},
        "normalization": meta.get("normalization", "zscore"),
        "ranking": meta.get("ranking"),
        "poolings": [{"method": m.pooling, "lse_temperature": m.lse_temperature} for m in members],
        "onnx": {
            "file": rundir.EXPORT_ONNX,
            "sha256": hashlib.sha256(data).hexdigest(),
            "opset": opset,
            "quantization": quantize,
            "input": {"name": INPUT, "shape": [-1, 1, size, size], "dtype": "float32"},
            "output": {"name": OUTPUT, "shape": [-1, count], "dtype": "float32"},
            "max_abs_diff_vs_pytorch": max_abs_diff,
        },
        "scoring": {
            "input": "as for a run's export (uint8 / 255, then the input normalisation)",
            "member_logit": f"column m of {OUTPUT}, pooled over the patient's slices with "
            "member m's pooling (poolings[m])",
            "patient_logit": "mean of the member logits"
            if meta["combine"] == "mean_logit"
            else "logit of the mean of sigmoid(member logit)",
            "decision": "positive when sigmoid(patient_logit) >= threshold",
            "probability": "sigmoid(calibration.slope * patient_logit + calibration.intercept)",
        },
        "versions": rundir.versions("onnx", "onnxscript", "onnxruntime"),
    }
    sidecar["digest"] = ensemble_export_digest(sidecar)
    return sidecar


# --------------------------------------------------------------------------- Triton

#: Triton backends a repository can be written for: ``onnxruntime`` (Triton's ONNX Runtime
#: backend runs model.onnx; what a stock Triton server has) and ``python`` (Triton's Python
#: backend runs model.py, which runs model.onnx with onnxruntime in the server's Python).
TRITON_BACKENDS = ("onnxruntime", "python")
_TRITON_PYTHON_MODEL = Path(__file__).parent / "backends" / "triton_python_model.py"


def write_triton_model(
    folder: Path,
    data: bytes,
    sidecar: dict[str, Any],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    backend: str = "onnxruntime",
) -> Path:
    """``folder`` (REPO/NAME) as a model of a Triton repository: ``config.pbtxt`` and the
    version folder ``1``, which is an export folder too (``predict --onnx REPO/NAME/1``)."""
    size = int(sidecar["preprocess"]["size"])
    members = len(sidecar["members"]) if "members" in sidecar else None  # an ensemble's
    config = triton_config(
        folder.name, size, max_batch, sidecar["model_id"], backend=backend, members=members
    )
    _write_export(folder / "1", data, sidecar)
    if backend == "python":
        atomic_write_text(folder / "1" / "model.py", _TRITON_PYTHON_MODEL.read_text())
    else:  # written over a python-backend model: its model.py would be stale
        (folder / "1" / "model.py").unlink(missing_ok=True)
    # The configuration last: a server polling the repository sees a complete model.
    atomic_write_text(folder / "config.pbtxt", config)
    return folder


def triton_config(
    name: str,
    size: int,
    max_batch: int,
    model_id: str = "",
    *,
    backend: str = "onnxruntime",
    members: int | None = None,
) -> str:
    """``config.pbtxt`` of the slice network for Triton's ``backend`` (``TRITON_BACKENDS``).

    With ``max_batch_size`` > 0 Triton adds the batch axis itself: ``dims`` leave it out, and
    the ONNX output of shape ``[batch]`` is declared as ``[1]`` reshaped to ``[]``, as Triton
    asks of tensors that are only a batch axis (clients see ``[batch, 1]``); an ensemble's
    ``[batch, members]`` is ``[members]``. Dynamic batching
    merges the requests of several clients (a request is one patient's slices, at most
    ``max_batch_size`` of them). The Python backend's model runs onnxruntime on the CPU.
    """
    _check_triton_args(name, max_batch, backend)
    output = f"dims: [ {members} ]" if members else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
    preferred = sorted({max(1, max_batch // 4), max(1, max_batch // 2), max_batch})
    tag = f"  # brainmets model {model_id}" if model_id else ""
    runs_on = (
        'platform: "onnxruntime_onnx"'
        if backend == "onnxruntime"
        else 'backend: "python"\ninstance_group [ { kind: KIND_CPU } ]'
    )
    return f"""name: "{name}"{tag}
{runs_on}
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ 1, {size}, {size} ]
  }}
]
output [
  {{
    name: "{OUTPUT}"
    data_type: TYPE_FP32
    {output}
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(n) for n in preferred)} ]
  max_queue_delay_microseconds: 1000
}}
"""


def _check_triton_args(name: str, max_batch: int, backend: str = "onnxruntime") -> None:
    if not _TRITON_NAME.match(name):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '.' and '-'")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if backend not in TRITON_BACKENDS:
        raise ValueError(
            f"Triton backend {backend!r} is not supported; choose one of {TRITON_BACKENDS}"
        )
