"""An ensemble of fold runs, loaded for scoring as one run is.

``brainmets ensemble`` writes ``ensemble.json`` into a cross-validation folder: the members
(fold runs, by path relative to the folder and by model id), how their patient scores are
averaged (``brainmets.model.ensemble``), the threshold and calibration chosen on their
out-of-fold predictions, the ranking verdict, and the ensemble's own model id (a digest of all
of these, ``brainmets.model.identity.ensemble_id``). ``load_backend`` comes here when RUN is
such a folder (or the export of one), so an ensemble goes wherever a run goes:

- ``torch``: every member's weights, each checked against the id the ensemble recorded;
- ``onnxruntime`` / ``triton``: the ensemble's export, one ONNX graph holding every member
  (slice logits ``[batch, members]``), written by ``brainmets export`` of the folder.

The scorer runs all members on every chunk of slices; each member pools its own patient
logit, and the ensemble averages them. Grad-CAM of an ensemble is the members' maps averaged
(``brainmets.heatmaps``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from brainmets import rundir
from brainmets.backends.exported import OnnxSliceNetwork, check_graph, check_signature
from brainmets.backends.onnx_runtime import execution_providers, open_session
from brainmets.backends.triton import TritonSliceNetwork
from brainmets.device import resolve_device
from brainmets.inference import TrainedModel, model_path
from brainmets.io import read_format_json
from brainmets.model.checkpoint import load_checkpoint
from brainmets.model.ensemble import EnsembleNetwork, EnsembleScorer, MemberPooling
from brainmets.model.identity import checked_ensemble_id, digest, ensemble_fields, ensemble_id
from brainmets.model.resnet import BrainMetsNet

FORMAT = "brainmets-ensemble"
FORMAT_VERSION = 1
EXPORT_FORMAT = "brainmets-ensemble-onnx"
EXPORT_FORMAT_VERSION = 1


@dataclass
class EnsembleModel(TrainedModel):
    """A ``TrainedModel`` whose network is the ensemble's members; ``model`` is the
    :class:`EnsembleNetwork` of their PyTorch weights (None for an export scored without
    Grad-CAM)."""

    @property
    def model_id(self) -> str:
        return str(self.sidecar["model_id"])

    @property
    def members(self) -> list[str]:
        return [str(m["model_id"]) for m in self.sidecar["members"]]


def is_ensemble(path: str | Path) -> bool:
    """An ensemble folder, or an export folder of one."""
    path = Path(path)
    if (path / rundir.ENSEMBLE).is_file():
        return True
    sidecar = path / rundir.EXPORT_SIDECAR
    if not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("format") == EXPORT_FORMAT
    except (ValueError, AttributeError):
        return False  # the run loaders name what is wrong with it


def read_ensemble(folder: str | Path) -> dict[str, Any]:
    """``ensemble.json``, checked to be one and unedited since it was written."""
    path = Path(folder) / rundir.ENSEMBLE
    meta = read_format_json(path, fmt=FORMAT, version=FORMAT_VERSION, what="a brainmets ensemble",
                            again="combine the folds again (brainmets ensemble)")  # fmt: skip
    checked_ensemble_id(meta, path)
    return meta


def load_members(folder: str | Path, meta: dict[str, Any]) -> list[BrainMetsNet]:
    """The members' networks (CPU, eval mode). A member whose model is not the one the
    ensemble was combined from, or that preprocesses otherwise, is refused, naming it."""
    folder = Path(folder)
    networks = []
    for member in meta["members"]:
        run = folder / member["run"]
        network, sidecar = load_checkpoint(model_path(run), map_location="cpu")
        if sidecar["model_id"] != member["model_id"]:
            raise ValueError(
                f"{run} holds model {sidecar['model_id']}, but {folder / rundir.ENSEMBLE} was "
                f"combined from model {member['model_id']}: combine the folds again "
                f"(brainmets ensemble {folder})"
            )
        for key in ("preprocess", "normalization"):
            if sidecar.get(key) != meta.get(key):
                raise ValueError(f"{run}: its {key} differs from the ensemble's ({folder})")
        networks.append(network)
    return networks


def load_ensemble(
    folder: str | Path, spec, *, grad_cam: bool = False, chunk: int | None = None
) -> EnsembleModel:
    """The ensemble in ``folder`` on ``spec``'s backend (a ``BackendSpec``)."""
    folder = Path(folder)
    if not (folder / rundir.ENSEMBLE).is_file():  # an export folder alone
        return _load_export(folder, None, spec, grad_cam, chunk)
    meta = read_ensemble(folder)
    if spec.name != "torch":
        return _load_export(folder, meta, spec, grad_cam, chunk)
    device = resolve_device(spec.device)
    network = EnsembleNetwork(load_members(folder, meta), meta["combine"]).to(device).eval()
    if device.type == "cuda":
        network.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    scorer = EnsembleScorer(
        network,
        device,
        meta.get("normalization", "zscore"),
        chunk=chunk or (256 if device.type == "cuda" else 32),
        compile=spec.compile,
    )
    return EnsembleModel(network, meta, device, scorer)


# --------------------------------------------------------------------------- the export


def export_digest(sidecar: dict[str, Any]) -> str:
    """What binds an ensemble's export: the graph's checksum and all that decides."""
    return digest(
        {
            "onnx": sidecar["onnx"]["sha256"],
            "model_id": sidecar["model_id"],
            "poolings": sidecar["poolings"],
            "decisive": ensemble_fields(sidecar),
        }
    )


def read_export_sidecar(path: str | Path) -> dict[str, Any]:
    """An ensemble export's ``brainmets.json``, checked to be one and unedited since export."""
    path = Path(path)
    meta = read_format_json(path, fmt=EXPORT_FORMAT, version=EXPORT_FORMAT_VERSION,
                            what="a brainmets ensemble export",
                            again="export the ensemble again")  # fmt: skip
    quantization = meta.get("onnx", {}).get("quantization", "none")
    suffix = "" if quantization == "none" else f"-{quantization}"
    try:
        bound = export_digest(meta) == meta.get("digest") and (
            str(meta["model_id"]) == ensemble_id(meta) + suffix
        )
    except (KeyError, TypeError, ValueError):
        bound = False
    if not bound:
        raise ValueError(
            f"{path}: edited after export: its content does not match its digest (members, "
            "combination, threshold, calibration or preprocessing changed); export the "
            "ensemble again (brainmets export ENSEMBLE)"
        )
    return meta


def find_ensemble_export(folder: Path, onnx: str | Path | None) -> Path:
    """The graph to score with: ``onnx`` (a file, or a folder holding model.onnx), else the
    folder itself when it is an export, else ``FOLDER/export``."""
    if onnx is not None:
        onnx = Path(onnx)
        path = onnx / rundir.EXPORT_ONNX if onnx.is_dir() else onnx
    elif (folder / rundir.EXPORT_SIDECAR).is_file():
        path = folder / rundir.EXPORT_ONNX
    else:
        path = folder / rundir.EXPORT / rundir.EXPORT_ONNX
    if not path.is_file() or not (path.parent / rundir.EXPORT_SIDECAR).is_file():
        raise FileNotFoundError(
            f"{path}: no ONNX export of the ensemble here; write one with "
            f"`brainmets export {folder}`"
        )
    return path


class EnsembleOnnxNetwork(OnnxSliceNetwork):
    """The ensemble's graph under onnxruntime: slice logits [B, members], pooled per member."""

    def __init__(self, session, pooling: MemberPooling) -> None:
        super().__init__(session, "max")
        self.member_pooling = pooling

    def pool(self, slice_logits, patient_index, num_patients, scores=None):
        return self.member_pooling.pool(slice_logits, patient_index, num_patients, scores)


class EnsembleTritonNetwork(TritonSliceNetwork):
    """The ensemble's graph on a Triton server."""

    def __init__(self, url: str, model_name: str, size: int, pooling: MemberPooling) -> None:
        super().__init__(url, model_name, size, members=len(pooling.poolings))
        self.member_pooling = pooling

    def pool(self, slice_logits, patient_index, num_patients, scores=None):
        return self.member_pooling.pool(slice_logits, patient_index, num_patients, scores)


def _load_export(
    folder: Path, meta: dict[str, Any] | None, spec, grad_cam: bool, chunk: int | None
) -> EnsembleModel:
    path = find_ensemble_export(folder, spec.onnx)
    sidecar = read_export_sidecar(path.parent / rundir.EXPORT_SIDECAR)
    check_graph(path, sidecar)
    if meta is not None and ensemble_id(sidecar) != meta["model_id"]:
        raise ValueError(
            f"{path} was exported from ensemble {ensemble_id(sidecar)}, but {folder} holds "
            f"ensemble {meta['model_id']}: export it again (brainmets export {folder})"
        )
    if grad_cam and meta is None:
        raise ValueError(
            f"{folder}: Grad-CAM heatmaps need the members' PyTorch weights; an export folder "
            "alone scores without them"
        )
    model = None
    if grad_cam:
        model = EnsembleNetwork(load_members(folder, meta), meta["combine"]).eval()
    size = int(sidecar["preprocess"]["size"])
    members = len(sidecar["members"])
    pooling = MemberPooling(
        [(p["method"], float(p["lse_temperature"])) for p in sidecar["poolings"]],
        sidecar["combine"],
    )
    if spec.name == "onnxruntime":
        session = open_session(path, providers=execution_providers(spec.device))
        check_signature(session, path, size, members)
        network, chunk = EnsembleOnnxNetwork(session, pooling), chunk or 32
    else:
        network = EnsembleTritonNetwork(spec.url, spec.triton_model, size, pooling)
        chunk = min(chunk or 32, network.max_batch)
    host = torch.device("cpu")
    scorer = EnsembleScorer(network, host, sidecar["normalization"], chunk=chunk, amp=False)
    return EnsembleModel(model, meta or sidecar, host, scorer)
