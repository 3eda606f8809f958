#!/usr/bin/env bash
# One prepared call for a lent GPU: the throughput harness, the step profile and the per-core
# preprocessing figures, written under $OUT (default ./gpu-results). Not yet timed as a whole;
# the harness alone took a few minutes on an H200. `set -e` stops at the first failing script,
# so run the CPU suite first. Needs the package's dependencies importable (pip install -e .).
set -euo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python benchmarks/pipeline_throughput.py --dicom-patients 64 --json "$out/pipeline.json" \
    2>&1 | tee "$out/pipeline.log"
python benchmarks/profile_step.py --steps 10 --out "$out/profile" 2>&1 | tee "$out/profile.log"
python benchmarks/preprocess_throughput.py --json "$out/preprocess.json" \
    2>&1 | tee "$out/preprocess.log"
