"""Slices per second of the real pipeline beside a plain model-only reference, same run.

Pipeline (what ``brainmets train`` runs each step): cached uint8 patients of varying slice
counts -> DataLoader + collate -> device -> class-conditional augmentation -> z-score ->
BrainMetsNet (frozen prefix under no_grad) -> max pooling -> loss -> clip -> AdamW. It is
measured through the trainer's own step (``Trainer._train_step``) on a cache written to a
temporary folder, per curriculum stage. Inference is ``predict.score_patients`` from the cache.
``prepare`` is measured from generated DICOM, in a process pool over all cores.

Reference: plain torchvision ResNet of the same architecture, one input channel, the
specified head, synthetic tensors already on the device, no data loading, frozen prefix run
under ``no_grad`` (the shape of ``shared/reference/gpu_anchor.py``).

    PYTHONPATH=src python benchmarks/pipeline_throughput.py --arch resnet18 --size 128 \\
        --patients 8 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from brainmets.config import PreprocessConfig, load_config
from brainmets.data.cache import PatientCache, build_cache_from_arrays
from brainmets.train.curriculum import trainable_blocks

# Children of a torchvision ResNet frozen in each stage (conv1 bn1 relu maxpool layer1..4).
FROZEN_CHILDREN = {1: 8, 2: 7, 3: 6}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], int], steps: int, warmup: int, device: torch.device) -> float:
    """Median slices/s over ``steps`` calls; ``step`` returns the slices it processed."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        slices = step()
        _sync(device)
        rates.append(slices / (time.perf_counter() - start))
    return statistics.median(rates)


# --------------------------------------------------------------------------- reference


def reference_model(arch: str) -> nn.Module:
    m = getattr(torchvision.models, arch)(weights=None)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    m.fc = nn.Sequential(
        nn.Linear(m.fc.in_features, 512), nn.ReLU(), nn.Dropout(0.4), nn.Linear(512, 1)
    )
    return m


def reference_train_rate(args, device, stage: int, slices: int) -> float:
    m = reference_model(args.arch).to(device).train()
    kids = list(m.children())
    prefix = nn.Sequential(*kids[: FROZEN_CHILDREN[stage]]).eval()
    for p in prefix.parameters():
        p.requires_grad_(False)
    rest, head = nn.Sequential(*kids[FROZEN_CHILDREN[stage] : -1]), kids[-1]
    x = torch.randn(slices, 1, args.size, args.size, device=device)
    y = (torch.rand(slices, device=device) > 0.5).float()
    cuda = device.type == "cuda"
    if cuda:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> int:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                h = prefix(x)
            logits = head(rest(h).flatten(1)).squeeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return slices

    return _rate(step, args.steps, args.warmup, device)


def reference_infer_rate(args, device, slices: int) -> float:
    m = reference_model(args.arch).to(device).eval()
    x = torch.randn(slices, 1, args.size, args.size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> int:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            m(x)
        return slices

    return _rate(step, args.steps, args.warmup, device)


# --------------------------------------------------------------------------- pipeline


def make_cache(root: Path, args) -> PatientCache:
    rng = np.random.default_rng(0)
    patients = []
    for i in range(args.cohort):
        n = int(rng.integers(args.min_slices, args.max_slices + 1))
        array = rng.integers(0, 256, (n, args.size, args.size), dtype=np.uint8)
        patients.append((f"B{i:05d}", i % 5 < 2, array))  # 40 % positive
    return build_cache_from_arrays(root, patients, PreprocessConfig(size=args.size))


def pipeline_train_rates(args, device, cache_root: Path, run_root: Path) -> dict[int, float]:
    from brainmets.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"model.arch={args.arch}",
            f"data.cache={cache_root}",
            f"train.batch_patients={args.patients}",
            f"train.device={device}",
            f"data.num_workers={args.workers}",
            "data.val_fraction=0.1",
        ],
    )
    trainer = Trainer(cfg, run_root / "run")
    rates = {}
    try:
        for stage in (1, 2, 3):
            trainer._enter_stage(stage)
            trainer.model.train()
            batches = iter(trainer._loader(trainer.train_set, batch_sampler=trainer.sampler))

            def step() -> int:
                nonlocal batches
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(
                        trainer._loader(trainer.train_set, batch_sampler=trainer.sampler)
                    )
                    batch = next(batches)
                batch = batch.to(trainer.device, non_blocking=True)
                trainer._train_step(batch)
                return int(batch.images.shape[0])

            rates[stage] = _rate(step, args.steps, args.warmup, device)
            assert trainer.model.trainable_blocks == trainable_blocks(stage)
    finally:
        trainer.close()
    return rates


def pipeline_infer_rate(args, device, cache: PatientCache, run_root: Path) -> float:
    from brainmets.model.resnet import BrainMetsNet
    from brainmets.predict import TrainedModel, batch_by_slices, score_patients

    model = BrainMetsNet(args.arch).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trained = TrainedModel(model, {"preprocess": cache.preprocess.model_dump()}, device)
    ids = cache.patient_ids
    sizes = [int(cache.row(p)["num_slices"]) for p in ids]
    batches = list(batch_by_slices(ids, sizes, args.infer_slices))

    def step() -> int:
        batch = batches[step.i % len(batches)]
        step.i += 1
        arrays = [np.asarray(cache.load(p)) for p in batch]
        score_patients(trained, arrays)
        return sum(a.shape[0] for a in arrays)

    step.i = 0
    return _rate(step, args.steps, args.warmup, device)


def prepare_rate(args, root: Path) -> dict[str, float]:
    """Slices/s of prepare from generated DICOM, all cores, plus the decode-only rate."""
    from brainmets.data.cache import prepare_cache
    from brainmets.data.dicom import load_series
    from brainmets.data.manifest import index_dicom_root, read_labels, series_files
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort
    from brainmets.data.volume import preprocess_volume

    cohort = root / "dicom-cohort"
    labels = read_labels(
        write_synthetic_cohort(
            cohort, SynthConfig(num_patients=args.dicom_patients, matrix=512), progress=False
        )
    )
    index = index_dicom_root(cohort / "dicom", progress=False)
    chosen = index.series[index.series["chosen"]]
    slices = int(chosen["num_slices"].sum())
    start = time.perf_counter()
    volumes = [load_series(series_files(index, uid)) for uid in chosen["series_uid"]]
    decode = slices / (time.perf_counter() - start)
    start = time.perf_counter()
    for volume in volumes:
        preprocess_volume(volume)
    resample = slices / (time.perf_counter() - start)
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    prepare_cache(labels, root / "prep", PreprocessConfig(), series_index=index,
                  workers=workers, progress=False)  # fmt: skip
    return {
        "prepare_slices_per_s": slices / (time.perf_counter() - start),
        "decode_one_core_slices_per_s": decode,
        "slab_window_resize_one_core_slices_per_s": resample,
        "workers": workers,
        "slices": slices,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet34", "resnet18"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cohort", type=int, default=40, help="patients in the temporary cache")
    parser.add_argument("--patients", type=int, default=4, help="patients per training batch")
    parser.add_argument("--min-slices", type=int, default=24)
    parser.add_argument("--max-slices", type=int, default=40)
    parser.add_argument("--infer-slices", type=int, default=256, help="slices per inference batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--dicom-patients", type=int, default=8, help="0 skips prepare")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = make_cache(root / "cache", args)
        mean_slices = float(cache.index["num_slices"].mean())
        train_slices = round(args.patients * mean_slices)
        pipe = pipeline_train_rates(args, device, root / "cache", root)
        results = {
            f"stage{s}": {
                "pipeline": pipe[s],
                "reference": reference_train_rate(args, device, s, train_slices),
            }
            for s in (1, 2, 3)
        }
        results["inference"] = {
            "pipeline": pipeline_infer_rate(args, device, cache, root),
            "reference": reference_infer_rate(args, device, args.infer_slices),
        }
        prepare = prepare_rate(args, root) if args.dicom_patients else None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({torch.get_num_threads()} threads)"
    )  # fmt: skip
    print(f"{args.arch}, {args.size}px, {name}, torch {torch.__version__}")
    print(f"{'workload':<12} {'pipeline/s':>11} {'reference/s':>12} {'ratio':>7}")
    for key, pair in results.items():
        ratio = pair["pipeline"] / pair["reference"]
        pair["ratio"] = ratio
        print(f"{key:<12} {pair['pipeline']:>11.1f} {pair['reference']:>12.1f} {ratio:>6.2f}x")
    if prepare:
        print(
            f"prepare from DICOM (512^2, {prepare['workers']} processes): "
            f"{prepare['prepare_slices_per_s']:.0f} slices/s (process start-up included); "
            f"on one core: decode+HU {prepare['decode_one_core_slices_per_s']:.0f} slices/s, "
            f"slabs+window+resize {prepare['slab_window_resize_one_core_slices_per_s']:.0f} slices/s"
        )
    report = {
        "device": name,
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        "prepare": prepare,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
