"""Slices per second of BrainMetsNet beside a plain torchvision ResNet-50 with the same head.

Measured in the same run, on the same input, for inference and for one training step
(forward, BCE on patient logits, backward, gradient clipping, AdamW) in each curriculum stage.
The reference freezes the same blocks the plain way (``requires_grad=False``, BatchNorm in
eval) but runs the whole backbone under autograd; BrainMetsNet runs the frozen prefix under
``no_grad``. On CUDA both run in bf16 autocast with channels_last (``--compile`` adds
``torch.compile``); on CPU in float32.

    PYTHONPATH=src python benchmarks/model_throughput.py --size 128 --batch 8 --iters 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from brainmets.model.resnet import BrainMetsNet

# Trainable blocks per curriculum stage (the specification's "Training").
STAGES = {
    "stage1": ("head",),
    "stage2": ("layer4", "head"),
    "stage3": ("layer3", "layer4", "head"),
}
_REFERENCE_BLOCKS = {
    "stem": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "head": ("fc",),
}


class PlainReference(nn.Module):
    """torchvision ResNet-50, one input channel, the specified head as ``fc``, max pooling."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.net = getattr(torchvision.models, arch)(weights=None)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        features = self.net.fc.in_features
        self.net.fc = nn.Sequential(
            nn.Linear(features, 512), nn.ReLU(inplace=True), nn.Dropout(0.4), nn.Linear(512, 1)
        )
        self.frozen: tuple[str, ...] = ()

    def set_trainable(self, blocks: tuple[str, ...]) -> None:
        self.frozen = tuple(b for b in _REFERENCE_BLOCKS if b not in blocks)
        for block, names in _REFERENCE_BLOCKS.items():
            for name in names:
                getattr(self.net, name).requires_grad_(block in blocks)

    def train(self, mode: bool = True) -> PlainReference:
        super().train(mode)
        for block in self.frozen:
            for name in _REFERENCE_BLOCKS[block]:
                getattr(self.net, name).eval()
        return self

    def forward(self, x: Tensor, patient_index: Tensor, num_patients: int) -> Tensor:
        slice_logits = self.net(x).squeeze(-1).float()
        empty = slice_logits.new_full((num_patients,), float("-inf"))
        return empty.scatter_reduce(0, patient_index, slice_logits, reduce="amax")


def _patient_logits(model: nn.Module, x: Tensor, index: Tensor, num_patients: int) -> Tensor:
    out = model(x, index, num_patients)
    return out if isinstance(out, Tensor) else out.patient_logits


def _time(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(model, mode, batch, args, device) -> dict[str, float]:
    x, index, num_patients, labels = batch
    use_cuda = device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    )
    runner = torch.compile(model) if args.compile else model
    if mode == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                _patient_logits(runner, x, index, num_patients)

    else:
        model.set_trainable(STAGES[mode])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=1e-5)

        def step() -> None:
            with autocast:
                logits = _patient_logits(runner, x, index, num_patients)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()

    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _time(step, args.iters, args.warmup, device)
    result = {"slices_per_s": x.shape[0] / seconds}
    if use_cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _batch(args, device):
    generator = torch.Generator().manual_seed(0)
    per_patient = -(-args.batch // args.patients)
    index = torch.arange(args.patients).repeat_interleave(per_patient)[: args.batch]
    num_patients = int(index.max()) + 1
    x = torch.randn(args.batch, 1, args.size, args.size, generator=generator)
    labels = (torch.arange(num_patients) % 2).float()
    x = x.to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, index.to(device), num_patients, labels.to(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet34", "resnet18"])
    parser.add_argument("--batch", type=int, default=32, help="slices per step")
    parser.add_argument("--patients", type=int, default=4, help="patients per step")
    parser.add_argument("--size", type=int, default=256, help="slice height and width")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--modes", nargs="+", default=["inference", *STAGES])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True

    models = {"brainmets": BrainMetsNet(args.arch), "reference": PlainReference(args.arch)}
    for name, model in models.items():
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        models[name] = model
    batch = _batch(args, device)

    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in args.modes:
        # Alternate the two models per mode so drift (thermal, other jobs) hits both alike.
        results[mode] = {name: _measure(m, mode, batch, args, device) for name, m in models.items()}

    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "float32"
    title = f"{args.arch} on {device_name(device)}, {precision}"
    title += f", compile={args.compile}, batch {args.batch} x {args.size}px, median of {args.iters}"
    print(title)
    header = f"{'mode':<10} {'brainmets/s':>12} {'reference/s':>12} {'ratio':>7}"
    if device.type == "cuda":
        header += f" {'MiB ours':>9} {'MiB ref':>9}"
    print(header)
    for mode, pair in results.items():
        ours, ref = pair["brainmets"], pair["reference"]
        ratio = ours["slices_per_s"] / ref["slices_per_s"]
        row = (
            f"{mode:<10} {ours['slices_per_s']:>12.1f} {ref['slices_per_s']:>12.1f} {ratio:>6.2f}x"
        )
        if device.type == "cuda":
            row += f" {ours['peak_mib']:>9.0f} {ref['peak_mib']:>9.0f}"
        print(row)

    report = {
        "title": title,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "device": device_name(device),
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
