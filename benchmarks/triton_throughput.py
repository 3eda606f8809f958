"""Slices/s of predict through a Triton server beside local onnxruntime, on the same slices in
one run.

Both score the same export through ``SliceScorer`` (uint8 slices -> normalisation -> network,
in predict's chunks of 32), so the figures are what ``predict`` gets from ``--backend
onnxruntime`` and from ``--backend triton --url``. The server is nvidia-pytriton's
``tritonserver`` on loopback, on the same CPU, serving ``export --triton --triton-backend
python`` (Triton's Python backend runs the same model.onnx in onnxruntime, default threads as
the local session). The workloads are timed in turn, round by round (``timing.measure_in_turn``),
and the ratio is the median of the per-round ratios to local onnxruntime, with its range.

    PYTHONPATH=src python benchmarks/triton_throughput.py --arch resnet50 --size 256 \\
        --json benchmarks/results/cpu_triton.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The server launcher the Triton tests use.
sys.path.insert(0, str(HERE.parent / "tests" / "backends"))

from onnx_throughput import head_slices, random_run  # noqa: E402
from timing import Candidate, measure_in_turn, median_rate, paired_ratio  # noqa: E402
from triton_server import TritonServer, missing  # noqa: E402

from brainmets.backends.onnx_runtime import load_exported  # noqa: E402
from brainmets.backends.triton import load_triton  # noqa: E402
from brainmets.export import export_run  # noqa: E402
from brainmets.inference import load_trained  # noqa: E402

REFERENCE = "onnxruntime (local)"
SERVED = "triton (gRPC, loopback)"


def throughput(args, tmp: Path) -> dict:
    run = random_run(tmp / "run", args.arch, args.size)
    repo = tmp / "repo"
    export_run(run, tmp / "export", triton=repo, triton_backend="python", max_batch=args.max_batch)
    rng = np.random.default_rng(0)
    cohort = [head_slices(args.slices, args.size, rng) for _ in range(args.patients)]
    total = sum(len(a) for a in cohort)

    with TritonServer(repo, tmp / "tritonserver") as server:
        models = {
            REFERENCE: load_exported(run, tmp / "export", device="cpu"),
            SERVED: load_triton(run, server.url, onnx=repo / "brainmets" / "1"),
        }

        def candidate(model) -> Candidate:
            def run_once() -> int:
                model.scorer(cohort)
                return total

            return Candidate(run_once, run_once)

        outputs = {name: model.scorer(cohort).slice_logits for name, model in models.items()}
        plain = load_trained(run, "cpu").scorer(cohort).slice_logits
        agreement = {
            f"{SERVED} vs {REFERENCE}": float((outputs[SERVED] - outputs[REFERENCE]).abs().max()),
            f"{SERVED} vs pytorch": float((outputs[SERVED] - plain).abs().max()),
        }
        rates = measure_in_turn(
            {name: candidate(m) for name, m in models.items()}, args.rounds, torch.device("cpu")
        )
    results = {}
    for name in models:
        row = {"slices_per_s": median_rate(rates[name]), "rates": rates[name]}
        measured = [r for r in rates[name] if math.isfinite(r)]
        row["min"], row["max"] = (min(measured), max(measured)) if measured else (math.nan,) * 2
        if name != REFERENCE:
            row.update(paired_ratio(rates, name, REFERENCE))
        results[name] = row
    return {"results": results, "max_abs_diff_slice_logit": agreement}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patients", type=int, default=4, help="patients per timed run")
    parser.add_argument("--slices", type=int, default=16, help="slices per patient")
    parser.add_argument("--max-batch", type=int, default=128, help="the export's --max-batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="add the results to this file (by --arch/size)")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        parser.error(f"no Triton server can run here: {reason}")

    from importlib.metadata import version

    import onnxruntime

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {platform.processor() or platform.machine()}, server on the same CPU",
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tritonclient": version("tritonclient"),
            "nvidia-pytriton": version("nvidia-pytriton"),
        },
        "arch": args.arch,
        "size": args.size,
        "patients": args.patients,
        "slices_per_patient": args.slices,
        "max_batch": args.max_batch,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp:
        report.update(throughput(args, Path(tmp)))
    for name, row in report["results"].items():
        ratio = (
            f"  x{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
            if "ratio" in row
            else ""
        )
        print(f"{name:30s} {row['slices_per_s']:8.1f} slices/s{ratio}")
    print("max |slice logit difference|:", report["max_abs_diff_slice_logit"])
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.is_file() else {}
        existing[f"{args.arch}@{args.size}"] = report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(existing, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
