"""Slices/s of the onnxruntime backend beside PyTorch eager, on the same slices in one run.

Both score through ``SliceScorer`` (uint8 cache slices -> normalisation -> network, in chunks),
so the figures are what ``predict`` gets from ``--backend torch`` and ``--backend onnxruntime``.
The workloads are timed in turn, round by round (``timing.measure_in_turn``), and each ratio is
the median of the per-round ratios to PyTorch, with its range (the reference in each round is PyTorch at the better of its thread
counts): on a CPU shared with other work
only a paired ratio means anything. Variants: onnxruntime's graph optimisation level, its
intra-op threads, and the dynamic int8 export (``brainmets export --quantize int8``).

With ``--run RUN --cache CACHE`` it also scores the held-out patients of CACHE (``--split``)
with the run's model under PyTorch, the fp32 export and the int8 export, and reports each AUC,
the largest patient-logit difference from PyTorch and the decisions that changed.

    PYTHONPATH=src python benchmarks/onnx_throughput.py --arch resnet50 --size 256 \\
        --json benchmarks/results/cpu_onnx.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Candidate, measure_in_turn, median_rate, paired_ratio  # noqa: E402

from brainmets.backends.exported import OnnxSliceNetwork  # noqa: E402
from brainmets.backends.onnx_runtime import load_exported, open_session  # noqa: E402
from brainmets.config import PreprocessConfig  # noqa: E402
from brainmets.export import export_run  # noqa: E402
from brainmets.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from brainmets.model.resnet import BrainMetsNet  # noqa: E402
from brainmets.model.scoring import SliceScorer  # noqa: E402


def head_slices(count: int, size: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """uint8 slices like the cache's: a bright-rimmed disc of brain-window noise on air
    (``seed``: a seed, or a generator to draw several cohorts' slices from one stream)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    radius = np.hypot(yy, xx)
    slices = rng.integers(60, 140, size=(count, size, size)).astype(np.uint8)
    slices[:, radius > 0.85] = 0
    slices[:, (radius > 0.8) & (radius <= 0.85)] = 255
    return slices


def random_run(folder: Path, arch: str, size: int) -> Path:
    """A run folder with randomly initialised weights: speed does not depend on the values."""
    torch.manual_seed(0)
    model = BrainMetsNet(arch).eval()
    preprocess = PreprocessConfig(size=size).model_dump(mode="json")
    save_checkpoint(
        model,
        folder / "model.safetensors",
        {"preprocess": preprocess, "normalization": "zscore", "threshold": 0.5},
    )
    return folder


def throughput(args, tmp: Path) -> dict:
    run = random_run(tmp / "run", args.arch, args.size)
    fp32 = export_run(run, tmp / "fp32")
    exports = {"fp32": fp32.onnx}
    if args.int8:
        exports["int8"] = export_run(run, tmp / "int8", quantize="int8").onnx
    model, _ = load_checkpoint(run / "model.safetensors")
    slices = torch.from_numpy(head_slices(args.slices, args.size))
    cpu = torch.device("cpu")

    def candidate(network, torch_threads: int = 0) -> Candidate:
        scorer = SliceScorer(network, cpu, "zscore", chunk=args.chunk, amp=False)

        def run_once() -> int:
            # torch's intra-op threads are process-wide: set for this workload, then put back.
            default = torch.get_num_threads()
            torch.set_num_threads(torch_threads or default)
            try:
                scorer.slice_outputs(slices)
            finally:
                torch.set_num_threads(default)
            return slices.shape[0]

        return Candidate(run_once, run_once)

    candidates = {
        f"pytorch threads={threads or 'default'}": candidate(model, threads)
        for threads in args.torch_threads
    }
    variants = {}
    for level in args.levels:
        for threads in args.threads:
            name = f"onnxruntime opt={level} threads={threads or 'default'}"
            variants[name] = (exports["fp32"], level, threads)
    if args.int8:
        variants["onnxruntime int8 opt=all threads=default"] = (exports["int8"], "all", 0)
    for name, (path, level, threads) in variants.items():
        session = open_session(path, threads=threads or None, optimization=level)
        candidates[name] = candidate(OnnxSliceNetwork(session, "max"))

    # Agreement on these slices (fp32 must be float noise; int8 is what it is).
    with torch.inference_mode():
        reference = SliceScorer(model, cpu, "zscore", chunk=args.chunk).slice_outputs(slices)[0]
    agreement = {}
    for name, path in exports.items():
        session = open_session(path)
        got = SliceScorer(OnnxSliceNetwork(session, "max"), cpu, "zscore", chunk=args.chunk)
        diff = (got.slice_outputs(slices)[0] - reference).abs().max().item()
        agreement[name] = diff

    rates = measure_in_turn(candidates, args.rounds, cpu)
    # The reference of each round: PyTorch at its best thread count in that round (on a busy
    # CPU, PyTorch's spinning OpenMP threads can lose badly to one thread).
    torch_names = [name for name in candidates if name.startswith("pytorch")]
    rates["best pytorch"] = [max(r) for r in zip(*(rates[n] for n in torch_names), strict=True)]
    results = {}
    for name in [*candidates, "best pytorch"]:
        row = {"slices_per_s": median_rate(rates[name]), "rates": rates[name]}
        measured = [r for r in rates[name] if math.isfinite(r)]
        row["min"], row["max"] = (min(measured), max(measured)) if measured else (math.nan,) * 2
        if not name.endswith("pytorch") and not name.startswith("pytorch"):
            row.update(paired_ratio(rates, name, "best pytorch"))
        results[name] = row
    return {"results": results, "max_abs_diff_slice_logit": agreement}


def quality(args, tmp: Path) -> dict:
    """AUC of the held-out patients under PyTorch, the fp32 and the int8 export."""
    from sklearn.metrics import roc_auc_score

    from brainmets.data.cache import PatientCache
    from brainmets.inference import load_trained, score_cache

    cache = PatientCache(args.cache)
    index = cache.index
    pids = index.loc[index["split"] == args.split, "patient_id"].tolist() if args.split else None
    pids = pids or cache.patient_ids
    models = {"pytorch": load_trained(args.run, "cpu")}
    for quantize in ("none", "int8"):
        folder = tmp / f"quality-{quantize}"
        export_run(args.run, folder, quantize=quantize)
        models["onnxruntime " + ("fp32" if quantize == "none" else "int8")] = load_exported(
            args.run, folder, device="cpu"
        )
    scored = {name: score_cache(m, cache, pids, progress=False) for name, m in models.items()}
    base = scored["pytorch"]
    out = {
        "patients": len(pids),
        "split": args.split or "all",
        "positives": int(base["label"].sum()),
    }
    for name, table in scored.items():
        decisions = models[name].decision(table["logit"])
        out[name] = {
            "auc": float(roc_auc_score(table["label"], table["logit"])),
            "max_abs_diff_patient_logit": float(np.abs(table["logit"] - base["logit"]).max()),
            "decisions_changed": int(
                (decisions != models["pytorch"].decision(base["logit"])).sum()
            ),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64, help="slices per timed run")
    parser.add_argument("--chunk", type=int, default=32, help="slices per forward (predict's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--levels", nargs="+", default=["all", "basic"],
                        choices=["disable", "basic", "extended", "all"])  # fmt: skip
    parser.add_argument("--threads", nargs="+", type=int, default=[0, 1],
                        help="onnxruntime intra-op threads (0: its default)")  # fmt: skip
    parser.add_argument("--torch-threads", nargs="+", type=int, default=[0, 1],
                        help="PyTorch intra-op threads (0: its default)")  # fmt: skip
    parser.add_argument("--no-int8", dest="int8", action="store_false")
    parser.add_argument("--run", type=Path, help="a trained run, for the AUC comparison")
    parser.add_argument("--cache", type=Path, help="held-out cache, for the AUC comparison")
    parser.add_argument("--split", default="test", help="patients of this split ('' for all)")
    parser.add_argument("--no-throughput", dest="throughput", action="store_false",
                        help="only the AUC comparison of --run on --cache")  # fmt: skip
    parser.add_argument("--json", type=Path, help="add the results to this file (by --arch/size)")
    args = parser.parse_args(argv)

    import onnxruntime

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "arch": args.arch,
        "size": args.size,
        "slices": args.slices,
        "chunk": args.chunk,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.throughput:
            report.update(throughput(args, Path(tmp)))
        if args.run and args.cache:
            report["quality"] = quality(args, Path(tmp))
    for name, row in report.get("results", {}).items():
        ratio = (
            f"  x{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
            if "ratio" in row
            else ""
        )
        print(f"{name:45s} {row['slices_per_s']:8.1f} slices/s{ratio}")
    if "max_abs_diff_slice_logit" in report:
        print("max |slice logit - PyTorch|:", report["max_abs_diff_slice_logit"])
    if "quality" in report:
        print(json.dumps(report["quality"], indent=2))
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if args.throughput:
            existing[f"{args.arch}@{args.size}"] = {
                k: v for k, v in report.items() if k != "quality"
            }
        if "quality" in report:
            keep = ("date", "device", "versions")
            existing["int8_quality"] = {
                **{k: report[k] for k in keep},
                "run": str(args.run),
                "cache": str(args.cache),
                **report["quality"],
            }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(existing, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
