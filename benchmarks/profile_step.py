"""Where a training step's time goes: the trainer's step beside the plain reference, profiled.

``pipeline_throughput.py`` says how far the pipeline is from the reference; this says why.
For each curriculum stage it runs ``--steps`` steps of each under ``torch.profiler`` after a
warm-up, and prints per step: wall time, the device's busy time (kernels summed; one stream,
so they do not overlap), the host's time inside the step function, kernel launches and
operator calls (device events count kernels, copies and memsets alike), then the operators that cost the most device time (CPU time on a CPU) for
the pipeline. A device busy well under the wall time with a host time near it means the host
cannot queue work fast enough (launch-bound); busy ≈ wall with more kernel time than the
reference means extra or slower kernels, named in the table. Chrome traces (open in
chrome://tracing or Perfetto) go to ``--out``.

    PYTHONPATH=src python benchmarks/profile_step.py --stages 1 2 3 --out profile/
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from pipeline_throughput import (  # beside this script
    VARIANTS,
    autotuned,
    build_parser,
    make_cache,
    pipeline_step,
    pipeline_trainer,
    reference_train_step,
)
from timing import sync
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def profile_steps(step, steps: int, warmup: int, device: torch.device, trace: Path) -> dict:
    """Per-step figures of ``steps`` calls of ``step`` under the profiler."""
    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    host = 0.0
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            host += time.perf_counter() - begin
        sync(device)
        wall = time.perf_counter() - start
    prof.export_chrome_trace(str(trace))
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    operators = [
        e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
    ]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {
        "wall_ms": 1e3 * wall / steps,
        "host_ms": 1e3 * host / steps,
        "device_busy_ms": busy_us / 1e3 / steps if kernels else None,
        "kernels": len(kernels) / steps,
        "aten_calls": len(operators) / steps,
        "calls": {a.key: a.count / steps for a in prof.key_averages()},
        "table": prof.key_averages().table(
            sort_by="self_cuda_time_total" if kernels else "self_cpu_time_total", row_limit=15
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--variant", default="resident", choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("profile"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = autotuned(args.variant)  # as the trainer sets it

    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = make_cache(root / "cache", args)
        slices = round(args.patients * float(cache.index["num_slices"].mean()))
        trainer = pipeline_trainer(args, device, cache.root, root, args.variant)
        try:
            for stage in args.stages:
                steps = {
                    "pipeline": pipeline_step(trainer, stage),
                    "reference": reference_train_step(args, device, stage, slices),
                }
                for name, step in steps.items():
                    trace = args.out / f"stage{stage}-{name}.json"
                    found = profile_steps(step, args.steps, args.warmup, device, trace)
                    report[f"stage{stage}/{name}"] = found
        finally:
            trainer.close()

    print(f"{args.arch}, {args.size}px, {device}, torch {torch.__version__}, per step:")
    print(f"{'':<20} {'wall ms':>8} {'host ms':>8} {'busy ms':>8} {'dev ops':>8} {'aten':>6}")
    for key, found in report.items():
        busy = found["device_busy_ms"]
        print(
            f"{key:<20} {found['wall_ms']:>8.2f} {found['host_ms']:>8.2f} "
            f"{busy if busy is not None else float('nan'):>8.2f} {found['kernels']:>8.0f} "
            f"{found['aten_calls']:>6.0f}"
        )
    for stage in args.stages:
        pipeline, reference = report[f"stage{stage}/pipeline"], report[f"stage{stage}/reference"]
        print(f"\nstage {stage}, pipeline, the costliest operators over {args.steps} steps:")
        print(pipeline["table"])
        extra = {
            name: count - reference["calls"].get(name, 0.0)
            for name, count in pipeline["calls"].items()
        }
        top = sorted(extra.items(), key=lambda item: -item[1])[:15]
        print(f"stage {stage}, calls per step the pipeline makes beyond the reference's:")
        print("\n".join(f"  {count:+7.1f}  {name}" for name, count in top if count > 0))
    summary = {k: {m: v for m, v in f.items() if m != "table"} for k, f in report.items()}
    (args.out / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
