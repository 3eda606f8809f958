#!/usr/bin/env bash
# One prepared call on a GPU machine: the throughput harness (the default and one-shape training
# paths, inference, DICOM), then compiled training, the step profile and the per-core
# preprocessing figures, written under $OUT (default ./gpu-results), most important first.
#
# Each step has its own time limit and a failing or slow step does not stop the next one, so
# that one call of at most ~9 minutes brings back whatever it measured (the limits add up to
# 510 s; the harness writes its JSON after every stage, so a step cut short keeps its stages).
# The package's dependencies must be importable; on a machine without them, point WHEELS at a
# folder of wheels for its Python (`pip download` them here beforehand): they are installed
# into /tmp/site without touching the machine's environment.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -n "${WHEELS:-}" ]]; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
py=${PYTHON:-python3}
start=$(date +%s)
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log it, say how it ended
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee "$out/$name.log"
    echo "$name: rc=${PIPESTATUS[0]} at $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
# The targets: every stage and inference beside the reference. The DataLoader variant, known
# to be ~3x slower than the device-resident cohort, is left out to save device time.
step pipeline 240 "$py" benchmarks/pipeline_throughput.py --dicom-patients 64 \
    --variants resident,static --json "$out/pipeline.json"
# Compiled training (one shape, train.compile) beside the eager reference; each stage
# compiles anew (tens of seconds for ResNet-50), so fewer rounds.
step train_compiled 180 "$py" benchmarks/pipeline_throughput.py --sections train \
    --variants compiled --rounds 3 --json "$out/train_compiled.json"
step profile 60 "$py" benchmarks/profile_step.py --steps 10 --out "$out/profile"
step preprocess 30 "$py" benchmarks/preprocess_throughput.py --patients 4 \
    --json "$out/preprocess.json"
