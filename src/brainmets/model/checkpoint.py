"""Self-contained model checkpoints: safetensors weights + a JSON sidecar.

``model.safetensors`` holds the tensors (no pickle: loading it runs no code) and
``model.json`` everything needed to use them: the architecture arguments, whatever the caller
adds (preprocessing, normalisation, threshold, config hash) and the versions that wrote it. So
``predict`` needs nothing but the pair.

Both files are written atomically (temporary name, then ``os.replace``), so an interrupted save
never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import brainmets
from brainmets import rundir
from brainmets.io import atomic_write, atomic_write_text, file_sha256, safe_reason
from brainmets.model.identity import checked_model_id, model_id
from brainmets.model.resnet import BrainMetsNet

# Bump when the sidecar or the state dict keys change incompatibly.
FORMAT_VERSION = 1
_RESERVED_KEYS = ("format_version", "architecture", "versions", "weights", "model_id")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(model: nn.Module, path: Path, sidecar: dict[str, Any]) -> Path:
    """Write ``path`` (safetensors) and its JSON sidecar ``path.with_suffix('.json')``.

    Args:
        model: a :class:`BrainMetsNet`, possibly wrapped by DDP and/or ``torch.compile``.
        path: the weights file, conventionally ``…/model.safetensors``.
        sidecar: JSON-serialisable metadata from the caller (preprocessing, normalisation,
            threshold, config hash ...); the architecture, format version, versions and weights
            checksum are added here and may not be passed.

    Returns:
        The sidecar path.
    """
    from safetensors.torch import save

    path = Path(path)
    network = unwrap_model(model)
    if not isinstance(network, BrainMetsNet):
        raise TypeError(f"save_checkpoint expects a BrainMetsNet, got {type(network).__name__}")
    clashes = sorted(set(sidecar) & set(_RESERVED_KEYS))
    if clashes:
        raise ValueError(f"sidecar keys {clashes} are reserved and written by save_checkpoint")

    # safetensors wants contiguous tensors that share no storage; channels_last weights are not
    # contiguous in the default sense, so store a plain copy.
    tensors = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    data = save(tensors, metadata={"format_version": str(FORMAT_VERSION)})
    # The pair changes in three renames, so that a kill at any point leaves a pair that loads:
    # new weights beside the old pair, then the new sidecar, then the new weights into place.
    # Killed before the last, the sidecar's checksum names PATH.new, and loading completes it.
    pending = _pending(path)
    atomic_write(pending, lambda fh: fh.write(data))

    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": network.architecture(),
        "weights": {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()},
        "versions": rundir.versions("safetensors"),
        **sidecar,
    }
    meta["model_id"] = model_id(meta)
    try:
        text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"sidecar for {path} is not JSON-serialisable: {error}") from error
    json_path = sidecar_path(path)
    try:
        atomic_write_text(json_path, text + "\n")
    except OSError:
        # The old pair stands; new weights no sidecar names would only hold the disk's space.
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, path)
    return json_path


def _pending(weights: Path) -> Path:
    return weights.with_name(weights.name + ".new")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[BrainMetsNet, dict[str, Any]]:
    """Rebuild the network from ``path`` (the weights or the sidecar) and return it in eval mode
    with the sidecar.

    Raises:
        FileNotFoundError: the weights or the sidecar is missing.
        ValueError: an incompatible ``format_version``, a sidecar edited after it was written
            (its content no longer gives its model id), a weights file that does not match its
            sidecar, or weights that do not fit the recorded architecture.
    """
    from safetensors.torch import load_file

    path = Path(path)
    weights = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    json_path = sidecar_path(weights)
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {json_path}")
    meta = json.loads(json_path.read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        written_by = meta.get("versions", {}).get("brainmets", "an unknown version")
        raise ValueError(
            f"{json_path}: checkpoint format_version {version!r} (written by brainmets "
            f"{written_by}) is not supported by brainmets {brainmets.__version__}, which reads "
            f"format_version {FORMAT_VERSION}; load it with the brainmets version that wrote it "
            "or retrain"
        )
    checked_model_id(meta, json_path)
    expected = meta.get("weights", {}).get("sha256")
    pending = _pending(weights)
    if expected is not None and pending.is_file() and file_sha256(pending) == expected:
        # A save stopped between its last two renames: finish it.
        os.replace(pending, weights)
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {weights}")
    if expected is not None and expected != file_sha256(weights):
        raise ValueError(
            f"{weights}: checksum does not match its sidecar {json_path.name}; the pair was "
            "mixed up or the weights file is damaged"
        )
    model = BrainMetsNet(**meta["architecture"])
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as error:  # SafetensorError: a header that does not parse
        raise ValueError(
            f"{weights}: not a readable safetensors file ({safe_reason(error)}); the weights "
            "file is damaged or of another format"
        ) from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{weights}: weights do not fit the recorded architecture: {error}"
        ) from error
    return model.to(map_location).eval(), meta


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``, a failure of which is a ValueError naming the file.

    torch's message for a file holding other objects than tensors advises loading it with
    ``weights_only=False``, i.e. unpickling it: never for a file of unknown origin."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # UnpicklingError, a damaged zip archive, ...
        raise ValueError(
            f"{path}: not readable as tensors ({safe_reason(error)}); the file is damaged or "
            "was not written by brainmets, so it is not loaded"
        ) from error
