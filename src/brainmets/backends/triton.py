"""The triton backend: a run's export served by a Triton Inference Server, reached by gRPC.

The sidecar is read here (and checked against the run, as for onnxruntime); the slices go to
the server in chunks no larger than the model's ``max_batch_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from brainmets.backends.exported import (
    INPUT,
    OUTPUT,
    ExportedModel,
    OnnxSliceNetwork,
    check_signature,
    export_of,
    exported_model,
)
from brainmets.io import require_package


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
    (``brainmets export --triton``)."""
    _, sidecar, model = export_of(run, onnx, grad_cam)
    pooling = sidecar["pooling"]
    size = int(sidecar["preprocess"]["size"])
    network = TritonSliceNetwork(
        url, model_name, size, pooling["method"], float(pooling["lse_temperature"])
    )
    # A request larger than the model's max_batch_size is refused by the server.
    return exported_model(network, sidecar, model, min(chunk or 32, network.max_batch))


class TritonSliceNetwork(OnnxSliceNetwork):
    """The slice network on a Triton server (gRPC): one request per chunk of slices.
    ``members``: an ensemble's graph, whose output holds one slice logit per member."""

    def __init__(
        self,
        url: str,
        model_name: str,
        size: int,
        pooling: str = "max",
        lse_temperature: float = 1.0,
        *,
        members: int | None = None,
    ) -> None:
        grpc = require_package("tritonclient.grpc", "the triton backend", extra="triton")
        super().__init__(None, pooling, lse_temperature)
        self.members = members
        self._grpc = grpc
        self.client = grpc.InferenceServerClient(url)
        self.model_name = model_name
        where = f"Triton model {model_name!r} at {url}"
        try:
            metadata = self.client.get_model_metadata(model_name)
            config = self.client.get_model_config(model_name).config
        except Exception as error:  # InferenceServerException: unreachable, no such model
            raise ValueError(f"{where}: {error}") from error
        check_signature(_TritonSignature(metadata, config), where, size, members)
        if config.max_batch_size < 1:
            raise ValueError(f"{where}: max_batch_size {config.max_batch_size}, no batching")
        self.max_batch = int(config.max_batch_size)

    def slice_outputs(self, x: Tensor) -> tuple[Tensor, None]:
        slices = x.detach().cpu().numpy()
        given = self._grpc.InferInput(INPUT, list(slices.shape), "FP32")
        given.set_data_from_numpy(slices)
        wanted = [self._grpc.InferRequestedOutput(OUTPUT)]
        result = self.client.infer(self.model_name, [given], outputs=wanted)
        logits = result.as_numpy(OUTPUT).reshape(len(slices), -1).astype(np.float32)
        return torch.from_numpy(logits if self.members else logits[:, 0]), None


class _TritonSignature:
    """Triton's model metadata in the shape of an onnxruntime session's signature: the shapes
    the model itself sees. Metadata gives the shapes clients send and receive, the batch axis
    first; a tensor whose configuration declares a ``reshape`` reaches the model as the batch
    axis followed by that shape (the slice logits: ``[batch, 1]`` to clients, ``[batch]`` in
    the graph)."""

    class _Arg(NamedTuple):
        name: str
        type: str
        shape: list

    def __init__(self, metadata, config) -> None:
        reshaped = {
            t.name: list(t.reshape.shape)
            for t in [*config.input, *config.output]
            if t.HasField("reshape")
        }

        def args(tensors):
            found = []
            for t in tensors:
                shape = [int(d) if d >= 0 else "batch" for d in t.shape]
                if t.name in reshaped and config.max_batch_size > 0:
                    shape = shape[:1] + reshaped[t.name]
                datatype = "tensor(float)" if t.datatype == "FP32" else t.datatype
                found.append(self._Arg(t.name, datatype, shape))
            return found

        self._inputs, self._outputs = args(metadata.inputs), args(metadata.outputs)

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs
