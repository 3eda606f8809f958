"""A trained run, loaded once for scoring on the backend the user chose.

``BackendSpec`` is what the command line says about the backend (which one, the device, the
export or server to use); ``load_backend`` turns it and a run folder into a ``TrainedModel``
that ``predict``, ``evaluate`` and ``serve`` score with alike:

- ``torch``: the run's own weights (``brainmets.inference.load_trained``);
- ``onnxruntime``: the run's ONNX export (:mod:`brainmets.backends.onnx_runtime`);
- ``triton``: the same export served by a Triton Inference Server
  (:mod:`brainmets.backends.triton`).

RUN may also be an ensemble of fold runs (``brainmets ensemble``), or its export: it loads on
all three backends alike (:mod:`brainmets.backends.ensemble`).

Every backend gives the scorer slice logits; normalisation, the pooling over a patient's slices,
the threshold and the calibration stay in brainmets (``brainmets.model.scoring``), the same
code for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from brainmets.inference import TrainedModel, load_trained

BACKENDS = ("torch", "onnxruntime", "triton")


@dataclass(frozen=True)
class BackendSpec:
    """How to score: the backend and what it needs, checked when made (before any work)."""

    name: str = "torch"
    device: str = "auto"
    compile: bool = False  # torch only: torch.compile the chunked forward
    onnx: Path | None = None  # onnxruntime/triton: the export (default RUN/export)
    url: str | None = None  # triton: the server's gRPC host:port
    triton_model: str = "brainmets"  # triton: the model's name on the server

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend {self.name!r} is not supported; choose one of {BACKENDS}")
        if self.compile and self.name != "torch":
            raise ValueError("--compile applies to the torch backend only")
        if self.name == "triton" and not self.url:
            raise ValueError("the triton backend needs the server's --url (host:port of its gRPC)")

    def __str__(self) -> str:
        where = {"torch": self.device, "onnxruntime": self.device, "triton": self.url}[self.name]
        return f"{self.name} ({where})"


def load_backend(
    run: str | Path, spec: BackendSpec | None = None, *, grad_cam: bool = False
) -> TrainedModel:
    """The run's model on ``spec``'s backend (default: PyTorch on the best device).
    ``grad_cam``: an export-based backend also loads the run's PyTorch weights, for heatmaps."""
    spec = spec or BackendSpec()
    from brainmets.backends.ensemble import is_ensemble, load_ensemble

    if is_ensemble(run):
        return load_ensemble(run, spec, grad_cam=grad_cam)
    if spec.name == "torch":
        return load_trained(run, spec.device, compile=spec.compile)
    if spec.name == "onnxruntime":
        from brainmets.backends.onnx_runtime import load_exported

        return load_exported(run, spec.onnx, device=spec.device, grad_cam=grad_cam)
    from brainmets.backends.triton import load_triton

    return load_triton(run, spec.url, spec.triton_model, spec.onnx, grad_cam=grad_cam)
