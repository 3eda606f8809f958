"""Run every benchmark and write one JSON file.

    PYTHONPATH=src python benchmarks/run_all.py --out benchmarks.json            # GPU defaults
    PYTHONPATH=src python benchmarks/run_all.py --cpu-small --out benchmarks.json  # 2-core CPU

``--cpu-small`` shrinks every workload so the whole run takes a few minutes on two cores; the
figures are then CPU figures, not the GPU targets in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_throughput  # noqa: E402
import pipeline_throughput  # noqa: E402
import preprocess_throughput  # noqa: E402

CPU_SMALL = {
    "model": ["--size", "128", "--batch", "8", "--iters", "3", "--warmup", "1"],
    "pipeline": [
        "--arch", "resnet18", "--size", "128", "--cohort", "12", "--patients", "4",
        "--min-slices", "10", "--max-slices", "14", "--steps", "3", "--warmup", "1", "--rounds", "3",
        "--workers", "0", "--dicom-patients", "4", "--infer-slices", "32", "--infer-passes", "1", "--no-compile",
        "--static-slices", "12",
    ],
    "preprocess": ["--patients", "4", "--repeats", "3"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-small", action="store_true")
    args = parser.parse_args()
    extra = CPU_SMALL if args.cpu_small else {"model": [], "pipeline": [], "preprocess": []}
    report = {
        "model_throughput": model_throughput.main(extra["model"]),
        "pipeline_throughput": pipeline_throughput.main(extra["pipeline"]),
        "preprocess_throughput": preprocess_throughput.main(extra["preprocess"]),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
