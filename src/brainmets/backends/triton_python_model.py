"""The slice network for Triton's Python backend: ``model.onnx`` of the version folder run by
onnxruntime inside the server.

``brainmets export --triton REPO --triton-backend python`` copies this file to
``REPO/NAME/1/model.py``, for servers without Triton's ONNX Runtime backend (the
``tritonserver`` of PyPI's nvidia-pytriton has only the Python one). The server's Python
environment needs numpy and onnxruntime; nothing of brainmets is imported here.

Tensors cross the backend by DLPack: ``Tensor.as_numpy()`` and ``Tensor(name, array)`` of the
backends built against numpy 1 read a numpy 2 array's item size wrongly (all-equal inputs,
empty outputs). The requests the dynamic batcher hands over in one call are run as one batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

INPUT = "slices"
OUTPUT = "slice_logit"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime

        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        _quiet_renamed_capsules()

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        given = [
            np.from_dlpack(pb_utils.get_input_tensor_by_name(request, INPUT))
            for request in requests
        ]
        slices = given[0] if len(given) == 1 else np.concatenate(given)
        logits = self.session.run([OUTPUT], {INPUT: slices})[0].astype(np.float32)
        ends = np.cumsum([len(x) for x in given])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor.from_dlpack(OUTPUT, np.ascontiguousarray(part))]
            )
            for part in np.split(logits, ends[:-1])
        ]


def _quiet_renamed_capsules() -> None:
    """The backend takes over an output's DLPack capsule and renames it ``used_dlpack``, not
    the ``used_dltensor`` of the DLPack convention; numpy's capsule destructor then reports
    "PyCapsule_GetPointer called with incorrect name" for every response, though the backend
    frees the tensor itself. That one report is dropped; every other one is kept."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        message = str(unraisable.exc_value)
        if not (isinstance(unraisable.exc_value, ValueError) and "incorrect name" in message):
            default(unraisable)

    sys.unraisablehook = hook
