"""Slices per second of the real pipeline beside a plain model-only reference, same run.

Pipeline (what ``brainmets train`` runs each step): cached uint8 patients of varying slice
counts -> DataLoader + collate -> device -> class-conditional augmentation -> z-score ->
BrainMetsNet (frozen prefix under no_grad) -> max pooling -> loss -> clip -> AdamW. It is
measured through the trainer's own step (``Trainer.train_step``) on a cache written to a
temporary folder, per curriculum stage, with batches from the device-resident cohort
(``data.device_cache``, the default on CUDA) and from the DataLoader. Inference is
``evaluate``'s ``score_cache`` over the whole cache (chunked forward, eager and compiled).
From generated DICOM: decoding alone, ``prepare`` and ``predict``, each in a process pool over
all cores.

Reference: plain torchvision ResNet of the same architecture, one input channel, the
specified head, synthetic tensors already on the device, no data loading, frozen prefix run
under ``no_grad``, cuDNN autotuned (the shape of ``shared/reference/gpu_anchor.py``).

The workloads of a stage (and of inference) are timed in turn, ``--rounds`` times, and each
ratio is the median of the per-round ratios (``timing.py``).

    PYTHONPATH=src python benchmarks/pipeline_throughput.py --arch resnet18 --size 128 \\
        --patients 8 --steps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from model_throughput import PlainReference, device_name  # beside this script
from timing import Candidate, measure_in_turn, median_rate, paired_ratio
from torch import nn

from brainmets.config import PreprocessConfig, load_config
from brainmets.data.cache import PatientCache, build_cache_from_arrays
from brainmets.train.curriculum import trainable_blocks

# Children of a torchvision ResNet frozen in each stage (conv1 bn1 relu maxpool layer1..4).
FROZEN_CHILDREN = {1: 8, 2: 7, 3: 6}


# --------------------------------------------------------------------------- reference


def reference_model(arch: str) -> nn.Module:
    """The plain torchvision network of ``model_throughput`` (one channel, specified head)."""
    return PlainReference(arch).net


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


def reference_infer_step(args, device, slices: int, compiled: bool = False) -> Callable[[], int]:
    """One plain forward of ``slices`` fixed slices already on the device (compiled or not)."""
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

    return step


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


VARIANTS = {  # the trainer's batch paths: variant -> what it sets beyond the defaults
    "loader": "DataLoader workers and collate instead of the device-resident cohort",
    "resident": "the default on CUDA: batches gathered from the device-resident cohort",
    "static": "resident, plus train.pad_slices: one batch shape, cuDNN autotuned",
    "compiled": "static, plus train.compile: one compiled graph per stage",
}


def pipeline_trainer(args, device, cache_root: Path, run_root: Path, variant: str):
    """The ``Trainer`` of a ``variant`` (see ``VARIANTS``) on the cache."""
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
    if variant in ("static", "compiled"):
        overrides += [f"train.max_slices={args.static_slices}", "train.pad_slices=true"]
    if variant == "compiled":
        overrides.append("train.compile=true")
    return Trainer(load_config(None, overrides), run_root / f"run-{variant}")


def autotuned(variant: str) -> bool:
    """cuDNN autotuning as the trainer sets it: only where every batch has one shape."""
    return variant in ("static", "compiled")


def pipeline_step(trainer, stage: int) -> Callable[[], int]:
    """The trainer's own step in ``stage``, on batches as its epoch loop draws them."""
    trainer.enter_stage(stage)
    trainer.model.train()

    def batches():
        while True:
            if trainer.train_store is not None:
                yield from trainer.train_store.batches(trainer.sampler)
            else:
                yield from trainer.loader(trainer.train_set, batch_sampler=trainer.sampler)

    source = batches()

    def step() -> int:
        batch = next(source).to(trainer.device, non_blocking=True)
        trainer.train_step(batch)
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


def pipeline_infer_candidate(
    args, device, cache: PatientCache, run: Path, compiled: bool, logits: dict[str, np.ndarray]
) -> Candidate:
    """``evaluate``'s scoring of the whole cache (memory map -> reader thread -> device ->
    chunked forward -> max pooling, one batch in flight), compiled or not; each run leaves its
    patient logits in ``logits``."""
    from brainmets.inference import load_trained, score_cache

    # The cohort several times over: a pass over 160 patients lasts under a second on a GPU,
    # and the first batch (read before anything overlaps) would weigh as a cohort's would not.
    ids = cache.patient_ids * args.infer_passes
    slices = int(cache.index["num_slices"].sum()) * args.infer_passes
    trained = load_trained(run, str(device), compile=compiled, chunk=args.infer_slices)
    key = "compiled" if compiled else "eager"

    def run_once() -> int:
        table = score_cache(trained, cache, ids, batch_slices=8 * args.infer_slices,
                            progress=False)  # fmt: skip
        logits[key] = table["logit"].to_numpy()
        return slices

    return Candidate(run_once, run_once)


def _worker_init() -> None:
    from brainmets.data.workers import init_worker  # imports paid before the clock

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
    from multiprocessing import get_context

    from brainmets.data.series_index import index_dicom_root, series_files, write_index
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


def _repeated(step: Callable[[], int], times: int) -> Callable[[], int]:
    return lambda: sum(step() for _ in range(times))


def _stepped(
    step: Callable[[], int], args, *, autotune: bool, alone: bool = False, warmup: int | None = None
) -> Candidate:
    """The candidate that times ``--steps`` calls of ``step`` per run (``warmup`` calls, by
    default ``--warmup``, before the first)."""
    warmup = args.warmup if warmup is None else warmup
    return Candidate(_repeated(step, args.steps), _repeated(step, warmup), autotune, alone)


def train_rows(args, device, cache: PatientCache, root: Path) -> Iterator[tuple[str, dict]]:
    """Per stage, as each is measured: ``("stageN", row)``, the pipeline's variants beside the
    autotuned reference, in turn.

    ``pipeline`` is the default path (``resident``, or the first variant asked for) and
    ``ratio`` is its median per-round ratio to the reference; every variant's median rate and
    ratio are in the row too."""
    mean_slices = float(cache.index["num_slices"].mean())
    train_slices = round(args.patients * mean_slices)
    trainers = {}
    for variant in args.variants:
        trainer = _section(f"build {variant}", pipeline_trainer, args, device, cache.root,
                           root, variant)  # fmt: skip
        if trainer is not None:
            trainers[variant] = trainer
    default = "resident" if "resident" in args.variants else args.variants[0]
    # Autotuned workloads first (see Candidate): the reference as the was measured
    # (shared/reference/gpu_anchor.py), then the one-shape variants; the varying-shape
    # variants use cuDNN's heuristics, as the trainer does for them.
    order = sorted(trainers, key=lambda v: not autotuned(v))
    try:
        for s in (1, 2, 3):
            steps, candidates = {}, {}
            step = _section("build reference", reference_train_step, args, device, s,
                            train_slices)  # fmt: skip
            if step is not None:
                candidates["reference"] = _stepped(step, args, autotune=True)
            for variant in order:
                steps[variant] = _section(
                    f"stage {s}, {variant}", pipeline_step, trainers[variant], s
                )
                if steps[variant] is not None:
                    candidates[f"pipeline_{variant}"] = _stepped(
                        steps[variant],
                        args,
                        autotune=autotuned(variant),
                        # DataLoader workers prefetch while the others run: time it alone.
                        alone=variant == "loader" and args.workers > 0,
                    )
            started = time.perf_counter()
            rates = measure_in_turn(candidates, args.rounds, device)
            print(f"[stage {s}] done in {time.perf_counter() - started:.0f} s", flush=True)
            row: dict[str, object] = {name: median_rate(rates.get(name)) for name in candidates}
            for variant in order:
                measured = math.isfinite(median_rate(rates.get(f"pipeline_{variant}")))
                if variant != "loader" and measured:
                    torch.backends.cudnn.benchmark = autotuned(variant)
                    row[f"host_syncs_{variant}"] = _no_host_sync(steps[variant], device)
                paired = paired_ratio(rates, f"pipeline_{variant}", "reference")
                row[f"ratio_{variant}"] = paired["ratio"]
            row["pipeline"] = row.get(f"pipeline_{default}", math.nan)
            row.update(paired_ratio(rates, f"pipeline_{default}", "reference"))
            row["rates"] = rates
            for variant, trainer in trainers.items():
                assert trainer.model.trainable_blocks == trainable_blocks(s), variant
            yield f"stage{s}", row
    finally:
        for trainer in trainers.values():
            trainer.close()


def inference_rows(args, device, cache: PatientCache, run: Path) -> dict[str, dict]:
    """Scoring from the cache, eager (and compiled unless --no-compile), beside the reference,
    in turn. All autotuned, as ``load_trained`` sets it for scoring."""
    logits: dict[str, np.ndarray] = {}
    candidates = {}
    for compiled in [False, True] if args.compile else [False]:
        suffix = "_compiled" if compiled else ""
        step = _section(f"build reference{suffix}", reference_infer_step, args, device,
                        args.infer_slices, compiled)  # fmt: skip
        if step is not None:
            # The compiled reference warms up longer: its first calls compile.
            warmup = args.warmup + (3 if compiled else 0)
            candidates[f"reference{suffix}"] = _stepped(step, args, autotune=True, warmup=warmup)
        found = _section(f"build pipeline{suffix}", pipeline_infer_candidate, args, device,
                         cache, run, compiled, logits)  # fmt: skip
        if found is not None:
            candidates[f"pipeline{suffix}"] = found
    started = time.perf_counter()
    rates = measure_in_turn(candidates, args.rounds, device)
    print(f"[inference] done in {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for suffix in ["", "_compiled"] if args.compile else [""]:
        names = (f"pipeline{suffix}", f"reference{suffix}")
        results[f"inference{suffix}"] = {
            "pipeline": median_rate(rates.get(names[0])),
            "reference": median_rate(rates.get(names[1])),
            **paired_ratio(rates, *names),
            "rates": {name: rates[name] for name in names if name in rates},
        }
    if args.compile and {"eager", "compiled"} <= set(logits):
        results["inference_compiled"]["max_abs_logit_diff_vs_eager"] = float(
            np.abs(logits["compiled"] - logits["eager"]).max()
        )
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


def _variants(text: str) -> list[str]:
    variants = [v for v in text.split(",") if v]
    if not variants or set(variants) - set(VARIANTS) or len(set(variants)) < len(variants):
        raise argparse.ArgumentTypeError(
            f"choose among {', '.join(VARIANTS)}, each at most once; got {text!r}"
        )
    return variants


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
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed runs per workload, taken in turn with the others")  # fmt: skip
    parser.add_argument("--variants", type=_variants, default=["loader", "resident", "static"],
                        help="comma-separated trainer batch paths to time: "
                        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))  # fmt: skip
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


def _print_table(report: dict) -> None:
    settings = report["settings"]
    print(f"{settings['arch']}, {settings['size']}px, {report['device']}, torch {report['torch']}; "
          f"median of {settings['rounds']} rounds in turn, ratio = median per-round ratio "
          "[range]")  # fmt: skip
    print(f"{'workload':<20} {'pipeline/s':>11} {'reference/s':>12} {'ratio':>7}  range")
    for key, row in report["results"].items():
        print(
            f"{key:<20} {row['pipeline']:>11.1f} {row['reference']:>12.1f} "
            f"{row['ratio']:>6.2f}x  [{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]"
        )
        for variant in VARIANTS:
            if f"pipeline_{variant}" in row:
                syncs = row.get(f"host_syncs_{variant}")
                print(f"{'  ' + variant:<20} {row[f'pipeline_{variant}']:>11.1f} {'':>12} "
                      f"{row[f'ratio_{variant}']:>6.2f}x"
                      + (f"  host syncs in step: {syncs}" if syncs else ""))  # fmt: skip
    dicom = report["dicom"]
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


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if min(args.infer_passes, args.rounds, args.steps) < 1:
        parser.error("--infer-passes, --rounds and --steps must be at least 1")
    sections = set(args.sections.split(","))
    if unknown := sections - {"train", "inference", "dicom"}:
        parser.error(f"unknown sections {sorted(unknown)}")

    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": {},
        "dicom": None,
        "complete": False,
    }

    def save() -> None:
        # After every section: a run stopped by a time limit keeps what it measured.
        if args.json:
            pending = args.json.with_name(args.json.name + ".tmp")
            pending.write_text(json.dumps(report, indent=2) + "\n")
            pending.replace(args.json)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if sections & {"train", "inference"}:
            cache = make_cache(root / "cache", args)
        if "train" in sections:
            for key, row in train_rows(args, device, cache, root):
                report["results"][key] = row
                save()
        run = _saved_run(root, args)
        if "inference" in sections:
            report["results"].update(inference_rows(args, device, cache, run))
            save()
        if "dicom" in sections and args.dicom_patients:
            report["dicom"] = _section("DICOM", dicom_rates, args, root, run)
    report["complete"] = True
    save()
    _print_table(report)
    return report


if __name__ == "__main__":
    main()
