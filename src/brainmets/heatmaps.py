"""Grad-CAM heatmaps of the slices that drove a patient's score.

Grad-CAM comes from the maintained ``pytorch-grad-cam`` package; what is ours is the seam:
the network scores one slice with one logit, so the target is that logit, and the layer is
the last bottleneck of layer4 (the last spatial feature map before the global pool).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from brainmets import rundir
from brainmets.data.cache import patient_stem
from brainmets.inference import TrainedModel
from brainmets.io import atomic_write, atomic_write_csv
from brainmets.model.resnet import BrainMetsNet

HEATMAP_COLUMNS = ["file", "patient_id", "rank", "slice_index", "slice_logit", "probability"]
"""``heatmaps.csv`` beside the PNGs: which patient, rank and slice each shows, and the
patient's probability, so that the report can show the highest-scoring patients first."""


class _SliceLogits(nn.Module):
    """[S, 1, H, W] -> [S, 1] slice logits, the shape Grad-CAM expects of a classifier."""

    def __init__(self, model: BrainMetsNet):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x)).unsqueeze(1)


def grad_cam(model: BrainMetsNet, slices: Tensor) -> np.ndarray:
    """Grad-CAM maps [S, H, W] in [0, 1] for normalised slices [S, 1, H, W].

    An ensemble (``brainmets.model.ensemble.EnsembleNetwork``) gets its members' maps averaged:
    its score is the average of theirs, so its evidence is the average of their evidence; a
    region every member looks at stays at full strength, one only a single member sees
    shows at 1/K of it (the top member's map alone would show one K-th of the decision as all
    of it)."""
    members = getattr(model, "members", None)
    if members is not None:
        return np.mean([grad_cam(member, slices) for member in members], axis=0)
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), GradCAM(_SliceLogits(model), [model.layer4[-1]]) as cam:
            targets = [BinaryClassifierOutputTarget(1)] * slices.shape[0]
            maps = cam(input_tensor=slices.float(), targets=targets)
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def save_overlay(slice_u8: np.ndarray, cam: np.ndarray, path: Path, title: str) -> Path:
    """The windowed slice in grey with the heatmap over it, written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3), dpi=100)
    for ax in axes:
        ax.imshow(slice_u8, cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
    axes[1].imshow(cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
    axes[0].set_title("brain window (0-80 HU)", fontsize=9)
    axes[1].set_title("Grad-CAM", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def write_heatmaps(
    trained: TrainedModel,
    patient_id: str,
    array: np.ndarray,
    slice_logits: np.ndarray,
    out_dir: Path,
    top_k: int,
) -> list[dict]:
    """Grad-CAM of the ``top_k`` highest-scoring slices, over the windowed slice, as PNGs.

    Returns one row per image for ``heatmaps.csv`` (file name, patient, rank, slice, logit).
    """
    order = np.argsort(slice_logits)[::-1][:top_k]
    images = torch.from_numpy(np.ascontiguousarray(array[order])).to(trained.device)
    cams = grad_cam(trained.model, trained.scorer.network_inputs(images))
    paths = []
    # An ensemble's slice logit is its members' mean, and its patient score their mean score.
    ensemble = getattr(trained.model, "members", None) is not None
    for rank, (slice_index, cam) in enumerate(zip(order, cams, strict=True), start=1):
        path = out_dir / f"{patient_stem(patient_id)}_rank{rank}_slice{int(slice_index)}.png"
        logit = float(slice_logits[slice_index])
        title = f"{patient_id}  slice {int(slice_index)}  {'mean ' * ensemble}logit {logit:.2f}"
        if rank == 1 and not ensemble:  # the max slice logit is the score; p is calibrated for it
            title += f" = patient score, p={float(trained.probability(logit)):.2f}"
        if not np.any(cam > 0):  # an all-zero map is a finding, not a rendering fault
            title += "  (Grad-CAM flat: no positive evidence)"
        save_overlay(array[slice_index], cam, path, title)
        paths.append(
            {
                "file": path.name,
                "patient_id": patient_id,
                "rank": rank,
                "slice_index": int(slice_index),
                "slice_logit": logit,
            }
        )
    return paths


def update_heatmap_index(
    heat_dir: Path, rows: list[dict], name: str = rundir.HEATMAP_INDEX
) -> None:
    """Add this call's heatmaps to the folder's index (a folder may collect several calls).

    A patient predicted again replaces its earlier heatmaps: their rows go, and so do their
    PNGs that this call did not write over, so the report shows one study per patient.
    ``name``: the index file (a predict shard keeps its own until the shards are merged).
    """
    path = heat_dir / name
    table = pd.DataFrame(rows, columns=HEATMAP_COLUMNS)
    if path.is_file():
        old = pd.read_csv(path, dtype={"patient_id": str, "file": str})
        replaced = old["patient_id"].isin(table["patient_id"]) | old["file"].isin(table["file"])
        for name in set(old.loc[replaced, "file"]) - set(table["file"]):
            (heat_dir / name).unlink(missing_ok=True)
        table = pd.concat([old[~replaced], table], ignore_index=True)
    atomic_write_csv(path, table.sort_values(["patient_id", "rank"], kind="stable"))
