"""Grad-CAM heatmaps of the slices that drove a patient's score.

Grad-CAM comes from the maintained ``pytorch-grad-cam`` package; what is ours is the seam:
the network scores one slice with one logit, so the target is that logit, and the layer is
the last bottleneck of layer4 (the last spatial feature map before the global pool).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from brainmets.io import atomic_write
from brainmets.model.resnet import BrainMetsNet


class _SliceLogits(nn.Module):
    """[S, 1, H, W] -> [S, 1] slice logits, the shape Grad-CAM expects of a classifier."""

    def __init__(self, model: BrainMetsNet):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x)).unsqueeze(1)


def grad_cam(model: BrainMetsNet, slices: Tensor) -> np.ndarray:
    """Grad-CAM maps [S, H, W] in [0, 1] for normalised slices [S, 1, H, W]."""
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
