"""Slices per second of the real pipeline beside a plain model-only reference, same run.

Pipeline (what ``brainmets train`` runs each step): cached uint8 patients of varying slice
counts -> DataLoader + collate -> device -> class-conditional augmentation -> z-score ->
BrainMetsNet (frozen prefix under no_grad) -> max pooling -> loss -> clip -> AdamW. It is
measured through the trainer's own step (``Trainer._train_step``) on a cache written to a
temporary folder, per curriculum stage, with batches from the device-resident cohort
(``data.device_cache``, the default on CUDA) and from the DataLoader. Inference is
``evaluate``'s ``score_cache`` over the whole cache (chunked forward, eager and compiled).
From generated DICOM: decoding alone, ``prepare`` and ``predict``, each in a process pool over
all cores.

Reference: plain torchvision ResNet of the same architecture, one input channel, the
specified head, synthetic tensors already on the device, no data loading, frozen prefix run
under ``no_grad`` (the shape of ``shared/reference/gpu_anchor.py``).

    PYTHONPATH=src python benchmarks/pipeline_throughput.py --arch resnet18 --size 128 \\
        --patients 8 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from model_throughput import PlainReference, device_name  # beside this script
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
    """Slices/s of ``steps`` consecutive calls timed as one run (``step`` returns the slices it
    processed), median of three runs. The device is synchronised only around each run, as in
    training, where the host queues the next step while the device computes this one; a sync
    after every step would instead add the host's own time per step to every figure."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        slices = sum(step() for _ in range(steps))
        _sync(device)
        rates.append(slices / (time.perf_counter() - start))
    return statistics.median(rates)


# --------------------------------------------------------------------------- reference


def reference_model(arch: str) -> nn.Module:
    """The plain torchvision network of ``model_throughput`` (one channel, specified head)."""
    return PlainReference(arch).net


def reference_train_rate(args, device, stage: int, slices: int) -> float:
    return _rate(reference_train_step(args, device, stage, slices), args.steps, args.warmup, device)


def reference_train_step(args, device, stage: int, slices: int) -> Callable[[], int]:
    """One plain training step of ``stage`` on fixed tensors already on the device."""
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

    return step


def reference_infer_rate(args, device, slices: int, compiled: bool = False) -> float:
    m = reference_model(args.arch).to(device).eval()
    x = torch.randn(slices, 1, args.size, args.size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    forward = torch.compile(m) if compiled else m

    def step() -> int:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            forward(x)
        return slices

    return _rate(step, args.steps, args.warmup + (3 if compiled else 0), device)


# --------------------------------------------------------------------------- pipeline


def make_cache(root: Path, args) -> PatientCache:
    rng = np.random.default_rng(0)
    patients = []
    for i in range(args.cohort):
        n = int(rng.integers(args.min_slices, args.max_slices + 1))
        array = rng.integers(0, 256, (n, args.size, args.size), dtype=np.uint8)
        patients.append((f"B{i:05d}", i % 5 < 2, array))  # 40 % positive
    return build_cache_from_arrays(root, patients, PreprocessConfig(size=args.size))


def _no_host_sync(step: Callable[[], int], device: torch.device) -> str:
    """Runs ``step`` twice with CUDA's sync debug mode set to raise; "none" if nothing synced."""
    if device.type != "cuda":
        return "not checked (CPU)"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
        return "none"
    except RuntimeError as err:
        return f"synchronised: {str(err).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def pipeline_train_rates(
    args, device, cache_root: Path, run_root: Path, variant: str
) -> dict[str, dict]:
    """The trainer's step per stage. ``variant``: ``loader`` (DataLoader batches),
    ``resident`` (``data.device_cache=on``) or ``static`` (resident, plus
    ``train.pad_slices`` to ``--max-slices``: one batch shape, cuDNN autotuned)."""
    rates, syncs = {}, {}
    trainer = pipeline_trainer(args, device, cache_root, run_root, variant)
    try:
        for stage in (1, 2, 3):
            step = pipeline_step(trainer, stage)
            rates[stage] = _rate(step, args.steps, args.warmup, device)
            if variant != "loader":
                syncs[stage] = _no_host_sync(step, device)
            assert trainer.model.trainable_blocks == trainable_blocks(stage)
    finally:
        trainer.close()
    return {"rates": rates, "host_syncs": syncs}


def pipeline_trainer(args, device, cache_root: Path, run_root: Path, variant: str):
    """The ``Trainer`` of a ``variant`` (see ``pipeline_train_rates``) on the cache."""
    from brainmets.train.trainer import Trainer

    overrides = [
        f"model.arch={args.arch}",
        f"data.cache={cache_root}",
        f"train.batch_patients={args.patients}",
        f"train.device={device}",
        f"data.num_workers={args.workers}",
        f"data.device_cache={'off' if variant == 'loader' else 'on'}",
        "data.val_fraction=0.1",
    ]
    if variant == "static":
        overrides += [f"train.max_slices={args.static_slices}", "train.pad_slices=true"]
    return Trainer(load_config(None, overrides), run_root / f"run-{variant}")


def pipeline_step(trainer, stage: int) -> Callable[[], int]:
    """The trainer's own step in ``stage``, on batches as its epoch loop draws them."""
    trainer._enter_stage(stage)
    trainer.model.train()

    def batches():
        while True:
            if trainer.train_store is not None:
                yield from trainer.train_store.batches(trainer.sampler)
            else:
                yield from trainer._loader(trainer.train_set, batch_sampler=trainer.sampler)

    source = batches()

    def step() -> int:
        batch = next(source).to(trainer.device, non_blocking=True)
        trainer._train_step(batch)
        return int(batch.images.shape[0])

    return step


def _saved_run(root: Path, args) -> Path:
    """A run folder with a randomly initialised model: enough for predict and evaluate."""
    from brainmets.model.checkpoint import save_checkpoint
    from brainmets.model.resnet import BrainMetsNet

    run = root / "saved-run"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sidecar = {
        "threshold": 0.5,
        "normalization": "zscore",
        "preprocess": PreprocessConfig(size=args.size).model_dump(),
    }
    save_checkpoint(BrainMetsNet(args.arch), run / "model.safetensors", sidecar)
    return run


def pipeline_infer_rates(args, device, cache: PatientCache, run: Path) -> dict[str, float]:
    """``evaluate``'s scoring of the whole cache (memory map -> reader thread -> device ->
    chunked forward -> max pooling, one batch in flight), eager and compiled; the second run
    of each is timed."""
    from brainmets.evaluate.evaluation import score_cache
    from brainmets.predict import load_trained

    # The cohort several times over: a pass over 160 patients lasts under a second on a GPU,
    # and the first batch (read before anything overlaps) would weigh as a cohort's would not.
    ids = cache.patient_ids * args.infer_passes
    slices = int(cache.index["num_slices"].sum()) * args.infer_passes
    out: dict[str, float] = {}
    logits = {}
    for compiled in [False, True] if args.compile else [False]:
        trained = load_trained(run, str(device), compile=compiled, chunk=args.infer_slices)
        for timed in (False, True):
            _sync(device)
            start = time.perf_counter()
            table = score_cache(trained, cache, ids, batch_slices=8 * args.infer_slices,
                                progress=False)  # fmt: skip
            _sync(device)
            if timed:
                key = "compiled" if compiled else "eager"
                out[key] = slices / (time.perf_counter() - start)
                logits[key] = table["logit"].to_numpy()
    if "compiled" in logits:
        out["compiled_vs_eager_max_abs_logit_diff"] = float(
            np.abs(logits["compiled"] - logits["eager"]).max()
        )
    return out


def _worker_init() -> None:
    from brainmets.data.cache import init_worker  # imports paid before the clock

    init_worker()  # as prepare's workers: one thread, freed memory kept


def _warm(_: int) -> None:
    time.sleep(0.2)  # holds each worker long enough that the pool starts all of them


def _decode_count(files: list[str]) -> int:
    """Decode one series to HU: the floor every DICOM path pays. Returns its slices."""
    from brainmets.data.dicom import load_series

    return int(load_series(files).hu.shape[0])


def _decode_preprocess_count(files: list[str], size: int) -> int:
    """Decode + slabs + window + resize + uint8: prepare's and predict's CPU work per series."""
    from brainmets.data.dicom import load_series
    from brainmets.data.volume import preprocess_volume

    volume = load_series(files)
    preprocess_volume(volume, size=size)
    return int(volume.hu.shape[0])


def _cli_seconds(*command) -> float:
    """Wall time of ``brainmets COMMAND`` in a new process (start-up included)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "brainmets", *map(str, command)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"brainmets {command[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def dicom_rates(args, root: Path, run: Path) -> dict[str, float]:
    """Slices/s from generated 512^2 DICOM on all cores.

    Steady state, in a started pool: decoding alone (the floor) against decoding plus
    preprocessing (the CPU work of ``prepare`` and ``predict``). End to end, as a user runs
    them, process start-up included: ``prepare`` and ``predict``.
    """
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    from brainmets.data.manifest import index_dicom_root, series_files, write_index
    from brainmets.data.synthetic import SynthConfig, write_synthetic_cohort

    cores = os.cpu_count() or 1
    cohort = root / "dicom-cohort"
    synth = SynthConfig(num_patients=args.dicom_patients, matrix=512)
    labels = write_synthetic_cohort(cohort, synth, progress=False, workers=cores)
    index = index_dicom_root(cohort / "dicom", progress=False, workers=cores)
    write_index(index, root / "index")
    chosen = index.series[index.series["chosen"]]
    series = [series_files(index, uid) for uid in chosen["series_uid"]]
    slices = int(chosen["num_slices"].sum())
    workers = min(cores, len(series))

    context = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
        list(pool.map(_warm, range(2 * workers)))
        list(pool.map(_decode_count, series))  # untimed: lazy imports, file cache
        start = time.perf_counter()
        assert sum(pool.map(_decode_count, series)) == slices
        decode = slices / (time.perf_counter() - start)
        start = time.perf_counter()
        assert sum(pool.map(partial(_decode_preprocess_count, size=args.size), series)) == slices
        preprocess = slices / (time.perf_counter() - start)

    from brainmets.data.dicom import load_series

    few = series[: min(4, len(series))]
    start = time.perf_counter()
    one_core = sum(load_series(files).hu.shape[0] for files in few)
    decode_one_core = one_core / (time.perf_counter() - start)

    # As a user runs them: the CLI in a new process, whose workers import only what the CLI
    # needs (inside this script they would also import this script's torch and models).
    prepare_all = slices / _cli_seconds(
        "prepare", "--labels", labels, "--index", root / "index", "--out", root / "prep",
        "--workers", workers, "--set", f"preprocess.size={args.size}",
    )  # fmt: skip
    predictions = root / "predictions.csv"
    predict_all = slices / _cli_seconds(
        "predict", run, cohort / "dicom", "--out", predictions, "--device", args.device
    )
    errors = pd.read_csv(predictions, keep_default_na=False)["error"]
    assert (errors == "").all(), errors.tolist()
    return {
        "decode_slices_per_s": decode,
        "decode_preprocess_slices_per_s": preprocess,
        "preprocess_vs_decode": preprocess / decode,
        "prepare_end_to_end_slices_per_s": prepare_all,
        "predict_end_to_end_slices_per_s": predict_all,
        "decode_one_core_slices_per_s": decode_one_core,
        "workers": workers,
        "usable_cores": len(os.sched_getaffinity(0)),
        "slices": slices,
    }


def train_rows(args, device, cache: PatientCache, root: Path) -> dict[str, dict]:
    """Per stage: the pipeline's variants beside the reference, with and without autotuning."""
    mean_slices = float(cache.index["num_slices"].mean())
    train_slices = round(args.patients * mean_slices)
    # The trainer's default: cuDNN picks algorithms by heuristics, since the slice count
    # of a training batch changes every step (autotuning would rerun for each new count).
    variants = {}
    for variant in ("loader", "resident", "static"):
        measured = _section(f"train, {variant}", pipeline_train_rates, args, device,
                            cache.root, root, variant)  # fmt: skip
        variants[variant] = measured or {"rates": {}, "host_syncs": {}}
    results = {}
    for s in (1, 2, 3):
        row = {f"pipeline_{v}": variants[v]["rates"].get(s, math.nan) for v in variants}
        row["host_syncs_in_step"] = variants["static"]["host_syncs"].get(s)
        torch.backends.cudnn.benchmark = False  # the heuristics, as for variable shapes
        row["reference_heuristics"] = _section(
            f"reference stage {s}, heuristics", reference_train_rate, args, device, s,
            train_slices) or math.nan  # fmt: skip
        torch.backends.cudnn.benchmark = True  # autotuned, as gpu_anchor.py
        row["reference"] = _section(f"reference stage {s}", reference_train_rate, args,
                                    device, s, train_slices) or math.nan  # fmt: skip
        row["pipeline"] = row["pipeline_resident"]  # the default path; static is extra
        results[f"stage{s}"] = row
    return results


def inference_rows(args, device, cache: PatientCache, run: Path) -> dict[str, dict]:
    """Scoring from the cache, eager (and compiled unless --no-compile), beside the reference."""
    results = {}
    infer = _section("inference", pipeline_infer_rates, args, device, cache, run) or {}
    results["inference"] = {
        "pipeline": infer.get("eager", math.nan),
        "reference": _section(
            "reference inference", reference_infer_rate, args, device, args.infer_slices
        )
        or math.nan,  # fmt: skip
    }
    if args.compile:
        results["inference_compiled"] = {
            "pipeline": infer.get("compiled", math.nan),
            "reference": _section(
                "reference inference compiled",
                reference_infer_rate,
                args,
                device,
                args.infer_slices,
                True,
            )
            or math.nan,  # fmt: skip
            "max_abs_logit_diff_vs_eager": infer.get(
                "compiled_vs_eager_max_abs_logit_diff", math.nan
            ),
        }
    return results


def _section(name: str, fn: Callable, *args):
    """Run one measurement; a failure is printed and leaves NaN, the others still run."""
    started = time.perf_counter()
    try:
        value = fn(*args)
    except Exception:  # a benchmark reports what it could measure
        traceback.print_exc()
        print(f"[{name}] FAILED", flush=True)
        return None
    print(f"[{name}] done in {time.perf_counter() - started:.0f} s", flush=True)
    return value


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The workload options (also those of ``profile_step.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet34", "resnet18"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cohort", type=int, default=160, help="patients in the temporary cache")
    parser.add_argument("--patients", type=int, default=4, help="patients per training batch")
    parser.add_argument("--min-slices", type=int, default=24)
    parser.add_argument("--max-slices", type=int, default=40)
    parser.add_argument("--infer-slices", type=int, default=256, help="inference chunk (slices)")
    parser.add_argument("--infer-passes", type=int, default=6,
                        help="passes over the cohort per timed inference run")  # fmt: skip
    parser.add_argument("--static-slices", type=int, default=32,
                        help="train.max_slices of the static variant (pad_slices)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run (3 runs)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--dicom-patients", type=int, default=32, help="0 skips DICOM figures")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled inference figures")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sections", default="train,inference,dicom",
                        help="comma-separated subset of train, inference, dicom")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.infer_passes < 1:
        parser.error("--infer-passes must be at least 1")
    sections = set(args.sections.split(","))
    if unknown := sections - {"train", "inference", "dicom"}:
        parser.error(f"unknown sections {sorted(unknown)}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {}
        if sections & {"train", "inference"}:
            cache = make_cache(root / "cache", args)
        if "train" in sections:
            results.update(train_rows(args, device, cache, root))
        run = _saved_run(root, args)
        if "inference" in sections:
            results.update(inference_rows(args, device, cache, run))
        dicom = None
        if "dicom" in sections and args.dicom_patients:
            dicom = _section("DICOM", dicom_rates, args, root, run)
    name = device_name(device)
    print(f"{args.arch}, {args.size}px, {name}, torch {torch.__version__}")
    print(f"{'workload':<20} {'pipeline/s':>11} {'reference/s':>12} {'ratio':>7}")
    for key, pair in results.items():
        ratio = pair["pipeline"] / pair["reference"]
        pair["ratio"] = ratio
        print(f"{key:<20} {pair['pipeline']:>11.1f} {pair['reference']:>12.1f} {ratio:>6.2f}x")
        for variant in ("loader", "resident", "static"):
            if f"pipeline_{variant}" in pair:
                rate = pair[f"pipeline_{variant}"]
                print(f"{'  ' + variant:<20} {rate:>11.1f}")
        if "reference_heuristics" in pair:
            print(f"{'  ref. no autotune':<20} {'':>11} {pair['reference_heuristics']:>12.1f}")
        if pair.get("host_syncs_in_step"):
            print(f"{'  host syncs':<20} {pair['host_syncs_in_step']}")
    if dicom:
        print(
            f"from 512^2 DICOM, {dicom['workers']} processes, {dicom['slices']} slices: "
            f"decode {dicom['decode_slices_per_s']:.0f}/s, decode+preprocess "
            f"{dicom['decode_preprocess_slices_per_s']:.0f}/s "
            f"({dicom['preprocess_vs_decode']:.2f}x decode; one core decodes "
            f"{dicom['decode_one_core_slices_per_s']:.0f}/s); end to end with process start-up: "
            f"prepare {dicom['prepare_end_to_end_slices_per_s']:.0f}/s, predict "
            f"{dicom['predict_end_to_end_slices_per_s']:.0f}/s"
        )
    report = {
        "device": name,
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        "dicom": dicom,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
