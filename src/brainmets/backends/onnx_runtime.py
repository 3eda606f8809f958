"""The onnxruntime backend: a run's ONNX export scored on the CPU or a CUDA device."""

from __future__ import annotations

from pathlib import Path

from brainmets.backends.exported import (
    ExportedModel,
    OnnxSliceNetwork,
    check_signature,
    export_of,
    exported_model,
)
from brainmets.io import require_package


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
    come from the run's current model) or an export folder. ``grad_cam`` also loads the run's
    PyTorch weights, for heatmaps. ``threads``: onnxruntime's intra-op threads (default: its
    own choice, one per physical core); ``optimization``: its graph optimisation level
    (``disable``, ``basic``, ``extended``, ``all``).
    """
    path, sidecar, model = export_of(run, onnx, grad_cam)
    session = open_session(
        path, providers=execution_providers(device), threads=threads, optimization=optimization
    )
    check_signature(session, path, int(sidecar["preprocess"]["size"]))
    pooling = sidecar["pooling"]
    network = OnnxSliceNetwork(session, pooling["method"], float(pooling["lse_temperature"]))
    return exported_model(network, sidecar, model, chunk or 32)


def open_session(
    path: Path,
    *,
    providers: list | None = None,
    threads: int | None = None,
    optimization: str = "all",
):
    """An onnxruntime session of ``path``; a file onnxruntime cannot load is named."""
    ort = require_package("onnxruntime", "the onnxruntime backend")
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


def session_from_bytes(data: bytes):
    """A CPU session of a graph in memory (the exporter's check before it writes)."""
    ort = require_package("onnxruntime", "the export check")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def execution_providers(device: str) -> list:
    """onnxruntime's execution providers for ``--device``."""
    ort = require_package("onnxruntime", "the onnxruntime backend")
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
