"""Portable inference: a trained run as ONNX, scored with onnxruntime or served by Triton.

``brainmets export RUN`` writes the slice network (a normalised slice ``[B, 1, S, S]`` in, its
logit ``[B]`` out, ``B`` free) as ``model.onnx``, checked by ``onnx.checker``, beside
``brainmets.json``: everything else a scorer needs, as JSON (preprocessing, input
normalisation, pooling, the operating threshold on the plain sigmoid, the Platt calibration,
the model id, the tensor names, the opset and the versions). ``--triton REPO`` also writes a
Triton Inference Server model repository holding the same graph.

Outside the graph, on purpose:

- the patient pooling: patients have different slice counts, and the ragged max over a
  patient's slices is done by ``SliceScorer`` for every backend, from the same slice logits;
- the input normalisation (uint8 / 255, then z-score per slice or ``2x - 1``): it runs in
  ``brainmets.data.normalize``, the code training ran, so there is one implementation of it
  (with its rule for flat slices) and not a second one in the graph to keep equal to it. The
  graph stays a plain image classifier that optimisers and quantisers know; a Triton client
  normalises before sending, as the sidecar's ``scoring`` section says;
- Grad-CAM, which needs gradients: heatmaps come from the run's PyTorch weights.

Loading an export reads JSON and an ONNX protobuf: nothing is unpickled. An ONNX file that
is not the one exported (an optimised or quantised variant) is used when its input and output
signature is the one the sidecar names, and refused, naming the file, when it is not.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import brainmets
from brainmets import rundir
from brainmets.inference import TrainedModel, load_trained, model_path
from brainmets.io import MissingPackageError, atomic_write, atomic_write_text, file_sha256
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.pooling import pool_patients
from brainmets.model.probability import Calibration
from brainmets.model.resnet import BrainMetsNet
from brainmets.model.scoring import SliceScorer

log = logging.getLogger(__name__)

FORMAT = "brainmets-onnx"
FORMAT_VERSION = 1
INPUT = "slices"
OUTPUT = "slice_logit"
#: Opset 18 runs on onnxruntime >= 1.14, and so on the onnxruntime of Triton releases since 23.02.
OPSET = 18
BACKENDS = ("torch", "onnxruntime", "triton")
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
    quantize: str = "none",
    opset: int = OPSET,
) -> ExportResult:
    """Export the run's model to ``out`` (default ``RUN/export``) and, with ``triton``, into the
    Triton model repository ``triton/name``."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATIONS}")
    if triton is not None:
        _check_triton_args(name, max_batch)
    onnx = _require("onnx", "export")
    weights = model_path(run)
    model, meta = load_checkpoint(weights, map_location="cpu")
    if model.pooling not in EXPORTABLE_POOLING:
        raise ValueError(
            f"{weights}: pooling {model.pooling!r} cannot be exported (attention scores are a "
            f"second network output); exportable: {EXPORTABLE_POOLING}"
        )
    size = int(meta["preprocess"]["size"])
    proto = _onnx_model(model, size, opset)
    proto.metadata_props.add(key="brainmets.model_id", value=meta["weights"]["sha256"][:12])
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if quantize == "int8":
        data = _quantize_int8(data)
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    max_abs_diff = _probe_difference(model, data, size)
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
        repo_model = Path(triton) / name
        # The version folder is an export folder too: predict --onnx REPO/NAME/1 scores with it.
        _write_export(repo_model / "1", data, sidecar)
        atomic_write_text(
            repo_model / "config.pbtxt", triton_config(name, size, max_batch, sidecar["model_id"])
        )
    return ExportResult(onnx_path, sidecar_path, repo_model, max_abs_diff)


def _onnx_model(model: BrainMetsNet, size: int, opset: int):
    """The slice network as an ONNX ModelProto with a free batch axis (torch.export based)."""
    _require("onnxscript", "export")  # the exporter's own dependency: name it, not its traceback
    # The exporter's graph passes log each step at INFO: noise in a command's output.
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    # Batch 2 as the example: a batch of 1 is a size torch.export may specialise on.
    example = torch.zeros(2, 1, size, size)
    program = torch.onnx.export(
        _SliceLogits(model).eval(),
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


def _probe_difference(model: BrainMetsNet, data: bytes, size: int) -> float:
    """Largest |ONNX - PyTorch| slice logit on a few brain-like probe slices (a smooth blob
    with noise, z-scored): the export checks its graph before writing it."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = (1.0 - (yy**2 + xx**2)).clamp(min=0.0)
    probes = head + 0.1 * torch.rand(3, 1, size, size, generator=generator)
    probes = (probes - probes.mean(dim=(2, 3), keepdim=True)) / probes.std(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        expected = model.slice_outputs(probes)[0].numpy()
    session = _session_from_bytes(data)
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
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": sha[:12] + ("" if quantize == "none" else f"-{quantize}"),
        "weights": {"file": meta["weights"]["file"], "sha256": sha},
        "epoch": meta.get("epoch"),
        "architecture": meta["architecture"],
        "preprocess": meta["preprocess"],
        "normalization": normalization,
        "pooling": {"method": model.pooling, "lse_temperature": model.lse_temperature},
        "threshold": meta.get("threshold"),
        "calibration": Calibration.from_sidecar(meta).to_json(),
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
        "versions": _versions(),
    }


def _write_export(folder: Path, data: bytes, sidecar: dict[str, Any]) -> tuple[Path, Path]:
    # The graph first, the sidecar that describes it last.
    onnx_path = atomic_write(folder / rundir.EXPORT_ONNX, lambda fh: fh.write(data))
    sidecar_path = atomic_write_text(
        folder / rundir.EXPORT_SIDECAR, json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    )
    return onnx_path, sidecar_path


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "brainmets": brainmets.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


# --------------------------------------------------------------------------- Triton


def triton_config(name: str, size: int, max_batch: int, model_id: str = "") -> str:
    """``config.pbtxt`` of the slice network for Triton's onnxruntime backend.

    With ``max_batch_size`` > 0 Triton adds the batch axis itself: ``dims`` leave it out, and
    the ONNX output of shape ``[batch]`` is declared as ``[1]`` reshaped to ``[]``, as Triton
    asks of tensors that are only a batch axis. Dynamic batching merges the requests of
    several clients (a request is one patient's slices, at most ``max_batch_size`` of them).
    """
    _check_triton_args(name, max_batch)
    preferred = sorted({max(1, max_batch // 4), max(1, max_batch // 2), max_batch})
    tag = f"  # brainmets model {model_id}" if model_id else ""
    return f"""name: "{name}"{tag}
platform: "onnxruntime_onnx"
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
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(n) for n in preferred)} ]
  max_queue_delay_microseconds: 1000
}}
"""


def _check_triton_args(name: str, max_batch: int) -> None:
    if not _TRITON_NAME.match(name):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '.' and '-'")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")


# --------------------------------------------------------------------------- scoring


class OnnxSliceNetwork:
    """The exported slice network under onnxruntime, with the run's pooling: what
    ``SliceScorer`` needs of a network (``slice_outputs``, ``pool``)."""

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


def read_export_sidecar(path: str | Path) -> dict[str, Any]:
    """``brainmets.json`` of an export, checked to be one (JSON only: nothing is unpickled)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a brainmets export sidecar ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f'{path}: not a brainmets export sidecar (no "format": "{FORMAT}")')
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format_version {meta.get('format_version')!r} is not supported by "
            f"brainmets {brainmets.__version__} (reads {FORMAT_VERSION}); export the run again"
        )
    return meta


def check_signature(session, path: Path | str, size: int) -> None:
    """Refuse an ONNX model that is not a slice network for ``size`` x ``size`` slices: one
    float input ``slices`` [batch, 1, size, size] and one float output ``slice_logit`` [batch],
    the batch axis free."""
    problems = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_in, expected_out = [1, size, size], []
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
            "[batch]"
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


def load_backend(
    run: str | Path,
    backend: str = "torch",
    *,
    device: str = "auto",
    compile: bool = False,
    onnx: str | Path | None = None,
    url: str | None = None,
    triton_model: str = "brainmets",
    grad_cam: bool = False,
) -> TrainedModel:
    """The run's model on the chosen backend: PyTorch (``load_trained``), onnxruntime
    (``load_exported``) or a Triton server (``load_triton``); all three score alike."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported; choose one of {BACKENDS}")
    if compile and backend != "torch":
        raise ValueError("--compile applies to the torch backend only")
    if backend == "torch":
        return load_trained(run, device, compile=compile)
    if backend == "onnxruntime":
        return load_exported(run, onnx, device=device, grad_cam=grad_cam)
    if url is None:
        raise ValueError("the triton backend needs the server's --url (host:port of its gRPC)")
    return load_triton(run, url, triton_model, onnx, grad_cam=grad_cam)


def load_exported(
    run: str | Path,
    onnx: str | Path | None = None,
    *,
    device: str = "auto",
    chunk: int | None = None,
    threads: int | None = None,
    optimization: str = "all",
    grad_cam: bool = False,
) -> ExportedModel:
    """A run's ONNX export under onnxruntime, scoring like ``load_trained``'s model.

    ``run`` is a run folder (its export is ``RUN/export`` unless ``onnx`` names one, and must
    come from the run's current weights) or an export folder. ``grad_cam`` also loads the run's
    PyTorch weights, for heatmaps. ``threads``: onnxruntime's intra-op threads (default: its
    own choice, one per physical core); ``optimization``: its graph optimisation level
    (``disable``, ``basic``, ``extended``, ``all``).
    """
    path, sidecar, model = _export_of(run, onnx, grad_cam)
    session = open_session(
        path, providers=_providers(device), threads=threads, optimization=optimization
    )
    check_signature(session, path, int(sidecar["preprocess"]["size"]))
    if file_sha256(path) != sidecar["onnx"]["sha256"]:
        log.warning(
            "%s is not the file brainmets exported (its checksum differs); its signature fits, "
            "so it scores, as model %s",
            path,
            sidecar["model_id"],
        )
    pooling = sidecar["pooling"]
    network = OnnxSliceNetwork(session, pooling["method"], float(pooling["lse_temperature"]))
    return _scoring(network, sidecar, model, chunk or 32)


def load_triton(
    run: str | Path,
    url: str,
    model_name: str = "brainmets",
    onnx: str | Path | None = None,
    *,
    chunk: int | None = None,
    grad_cam: bool = False,
) -> ExportedModel:
    """Score through a Triton Inference Server serving the run's export as ``model_name``
    (``brainmets export --triton``): the sidecar is read here, the slices go to the server."""
    path, sidecar, model = _export_of(run, onnx, grad_cam)
    network = TritonSliceNetwork(url, model_name, sidecar)
    # A request larger than the model's max_batch_size is refused by the server.
    return _scoring(network, sidecar, model, min(chunk or 32, network.max_batch))


def _export_of(
    run: str | Path, onnx: str | Path | None, grad_cam: bool
) -> tuple[Path, dict[str, Any], BrainMetsNet | None]:
    """The export's ONNX path and sidecar, and the run's network when Grad-CAM needs it."""
    path = find_export(run, onnx)
    sidecar = read_export_sidecar(path.parent / rundir.EXPORT_SIDECAR)
    run = Path(run)
    run_sidecar = run / rundir.MODEL_SIDECAR
    if run_sidecar.is_file():
        run_sha = json.loads(run_sidecar.read_text()).get("weights", {}).get("sha256", "")
        if run_sha != sidecar["weights"]["sha256"]:
            raise ValueError(
                f"{path} was exported from model {sidecar['weights']['sha256'][:12]}, but {run} "
                f"holds model {run_sha[:12]}: export it again (brainmets export {run})"
            )
        if grad_cam:
            return path, sidecar, load_checkpoint(model_path(run), map_location="cpu")[0]
    elif grad_cam:
        raise ValueError(
            f"{run}: Grad-CAM heatmaps need the run's PyTorch weights ({rundir.MODEL}); an "
            "export folder alone scores without them"
        )
    return path, sidecar, None


def _scoring(network, sidecar: dict[str, Any], model, chunk: int) -> ExportedModel:
    host = torch.device("cpu")  # normalisation on the host; the backend copies to its device
    scorer = SliceScorer(network, host, sidecar["normalization"], chunk=chunk, amp=False)
    return ExportedModel(model, sidecar, host, scorer)


class TritonSliceNetwork(OnnxSliceNetwork):
    """The slice network on a Triton server (gRPC): one request per chunk of slices."""

    def __init__(self, url: str, model_name: str, sidecar: dict[str, Any]) -> None:
        grpc = _require("tritonclient.grpc", "the triton backend", extra="triton")
        pooling = sidecar["pooling"]
        super().__init__(None, pooling["method"], float(pooling["lse_temperature"]))
        self._grpc = grpc
        self.client = grpc.InferenceServerClient(url)
        self.model_name = model_name
        where = f"Triton model {model_name!r} at {url}"
        try:
            metadata = self.client.get_model_metadata(model_name)
            config = self.client.get_model_config(model_name).config
        except Exception as error:  # InferenceServerException: unreachable, no such model
            raise ValueError(f"{where}: {error}") from error
        check_signature(_TritonSignature(metadata), where, int(sidecar["preprocess"]["size"]))
        if config.max_batch_size < 1:
            raise ValueError(f"{where}: max_batch_size {config.max_batch_size}, no batching")
        self.max_batch = int(config.max_batch_size)

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, None]:
        slices = x.detach().cpu().numpy()
        given = self._grpc.InferInput(INPUT, list(slices.shape), "FP32")
        given.set_data_from_numpy(slices)
        wanted = [self._grpc.InferRequestedOutput(OUTPUT)]
        result = self.client.infer(self.model_name, [given], outputs=wanted)
        logits = result.as_numpy(OUTPUT).reshape(-1).astype(np.float32)
        return torch.from_numpy(logits), None


class _TritonSignature:
    """Triton's model metadata in the shape of an onnxruntime session's signature."""

    class _Arg(NamedTuple):
        name: str
        type: str
        shape: list

    def __init__(self, metadata) -> None:
        def args(tensors):
            return [
                self._Arg(
                    t.name,
                    "tensor(float)" if t.datatype == "FP32" else t.datatype,
                    [int(d) if d >= 0 else "batch" for d in t.shape],
                )
                for t in tensors
            ]

        self._inputs, self._outputs = args(metadata.inputs), args(metadata.outputs)

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs


def open_session(
    path: Path,
    *,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
):
    """An onnxruntime session of ``path``; a file onnxruntime cannot load is named."""
    ort = _require("onnxruntime", "the onnxruntime backend")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization={optimization!r}; choose one of {tuple(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime's own exception types are not importable API
        raise ValueError(f"{path}: onnxruntime cannot load it: {error}") from error


def _session_from_bytes(data: bytes):
    ort = _require("onnxruntime", "the export check")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _providers(device: str) -> list[str]:
    ort = _require("onnxruntime", "the onnxruntime backend")
    available = ort.get_available_providers()
    if device in ("auto", "cpu"):
        cuda = device == "auto" and "CUDAExecutionProvider" in available
        return (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        )
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"--device {device}: this onnxruntime has no CUDA execution provider (install "
                "onnxruntime-gpu)"
            )
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"--device {device}: choose auto, cpu, cuda or cuda:N")


def _require(package: str, what: str, extra: str = "onnx"):
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise MissingPackageError(
            f"{what} needs the {package} package: pip install 'brainmets[{extra}]'"
        ) from error
