#!/usr/bin/env bash
# One prepared GPU check of the training hot path (issue 7), meant to finish within 8 minutes on one H200 (about 5).
#
#   benchmarks/gpu_check.sh [OUT]                      # on a CUDA machine; OUT defaults to benchmarks/results/gpu-check
#   benchmarks/gpu_check.sh --device cpu --small [OUT] # dry run on a CPU: the same steps at toy sizes (Triton in its
#                                                     # interpreter), to know the script works up to the CUDA calls
#
# Steps, each under its own time limit so that the whole stays inside the budget, each writing into OUT:
#   1. tests: the CUDA tests of the kernels, the hot path and host reads      -> OUT/tests.log
#   2. kernel strategies at Llama-7B shapes, densities 0.3/1/2.3 %, one
#      reselection and SpIEL-MA growth of 28 projections (Triton and the
#      threshold search per matrix, and batched)                              -> OUT/bench_kernels_*.{json,md,png}
#   3. a 2-layer model with Llama-7B layer shapes: LoRA r=64 vs SpIEL-AG/-MA/-random,
#      one process per method (step time, peak memory)                        -> OUT/train/results.*
#      and all methods interleaved update by update (step-time ratios)        -> OUT/train/interleaved.*
#   4. cProfile of the updates that start SpIEL-AG's second estimation phase
#      and make the second reselection; random growth by generator device    -> OUT/profile/prof.{txt,json}
# OUT/summary.md lists what ran, each step's exit status and wall time, the GPU (nvidia-smi) and package versions.
# Needs torch with CUDA, Triton, pytest, matplotlib and peft-sparse's dependencies (peft, transformers, aenum;
# bitsandbytes for the NF4 tests and benchmark) importable; peft-sparse itself is taken from src/.
# A step that fails or runs out of time is recorded and the next one still runs; the exit status is 1 if any failed.
set -u -o pipefail

DEVICE=cuda
SMALL=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --small) SMALL=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) OUT="$1"; shift ;;
    esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU image has only python3

if [ "$DEVICE" = cuda ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: CUDA is not available; for a dry run use: $0 --device cpu --small" >&2
        exit 2
    fi
    TESTS=(tests/kernels/test_kernels.py tests/kernels/test_hotpath.py tests/kernels/test_dequantize_nf4.py
           tests/test_host_reads.py tests/test_device.py)
    TEST_FILTER="cuda or test_hotpath"
    STOP_AT_FIRST=()  # one device session: see every failure
    KERNEL_ARGS=(--device cuda --tokens 2048,8192 --densities 0.003,0.01,0.023 --repeats 10 --budget-s 1)
    TRAIN_ARGS=(--preset gpu-7b-2layer --methods lora,spiel-ag,spiel-ma,spiel-random --gradient-checkpointing off)
    PROFILE_ARGS=(--preset gpu-7b-2layer --steps 27 --updates 21,25)
    LIMITS=(100 120 130 60 70)
else
    if [ "$SMALL" != 1 ]; then
        echo "gpu_check: --device cpu needs --small (a dry run at toy sizes)" >&2
        exit 2
    fi
    export TRITON_INTERPRET=1
    TESTS=(tests/kernels/test_hotpath.py)
    TEST_FILTER="sddmm_strateg or merged or threshold or batched or cuda"
    STOP_AT_FIRST=(-x)
    KERNEL_ARGS=(--device cpu --small --densities 0.01,0.1)
    TRAIN_ARGS=(--preset cpu-tiny --methods lora,spiel-ag,spiel-ma --gradient-checkpointing off --steps 4
                --pretrain-steps 0 --repeats 1 --profile none --base-dir "$OUT/train-base")
    PROFILE_ARGS=(--preset cpu-tiny --steps 6 --updates 5 --pretrain-steps 0 --base-dir "$OUT/train-base"
                  --grow-random-numel 200000)
    LIMITS=(300 300 300 300 300)
fi

SUMMARY="$OUT/summary.md"
FAILED=0
{
    echo "# gpu_check ($DEVICE$([ "$SMALL" = 1 ] && echo ', dry run at toy sizes'))"
    echo
    echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo
    if command -v nvidia-smi > /dev/null 2>&1; then
        echo '```'
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
        echo '```'
        echo
    fi
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib, platform
names = ("torch", "triton", "transformers", "peft", "bitsandbytes")
versions = []
for name in names:
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:  # report and go on: the steps below say what it breaks
        versions.append(f"{name} not importable ({type(error).__name__})")
print(f"Python {platform.python_version()}; " + ", ".join(versions) + ".")
PYEOF
    echo
    echo "| step | exit status | seconds | limit (s) |"
    echo "|---|---|---|---|"
} > "$SUMMARY"

step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to OUT/NAME.log, add a summary row
    local name="$1" limit="$2"
    shift 2
    local began=$SECONDS status
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    [ $status -ne 0 ] && FAILED=1
    [ $status -eq 124 ] && status="124 (time limit)"
    echo "| $name | $status | $((SECONDS - began)) | $limit |" >> "$SUMMARY"
    tail -n 3 "$OUT/$name.log"
}

step tests "${LIMITS[0]}" "$PY" -m pytest -q "${STOP_AT_FIRST[@]}" -p no:cacheprovider "${TESTS[@]}" -k "$TEST_FILTER"
step kernels "${LIMITS[1]}" "$PY" benchmarks/bench_kernels.py "${KERNEL_ARGS[@]}" --out "$OUT"
step train_processes "${LIMITS[2]}" "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUT/train"
step train_interleaved "${LIMITS[3]}" "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --interleave-steps \
    --out "$OUT/train"
step profile "${LIMITS[4]}" "$PY" benchmarks/profile_updates.py "${PROFILE_ARGS[@]}" --out "$OUT/profile"

{
    echo
    echo "Finished $(date -u +%Y-%m-%dT%H:%M:%SZ). Logs: \`$OUT/*.log\`; kernel tables: \`$OUT/bench_kernels_*.md\`;"
    echo "training: \`$OUT/train/results.md\` (per process, memory) and \`$OUT/train/interleaved.md\` (ratios);"
    echo "profiled updates: \`$OUT/profile/prof.txt\`."
    for f in "$OUT"/train/interleaved.md; do
        [ -f "$f" ] && { echo; sed -n '/^| method/,$p' "$f"; }
    done
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
