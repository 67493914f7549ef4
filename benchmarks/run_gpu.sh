#!/usr/bin/env bash
# UniMedVL's full-size inference benchmark on one GPU (an H100 80GB; an H200 runs it the same way) in at most 8 minutes.
#
# Prepare, on a machine with network access, in the repository root:   bash ../shared/tools/device_wheels.sh
# Run on the GPU machine, in the repository root, with .whl/ carried:   bash benchmarks/run_gpu.sh
# Check without a GPU:  bash benchmarks/run_gpu.sh --dry-run   (prints every command, runs none)
#                       bash benchmarks/run_gpu.sh --tiny      (the same phases on the CPU with the tiny model)
#
# Phases, in order of importance, each under a timeout that keeps the whole run within BUDGET_S (470 s); every figure
# is written as a JSON line the moment it is measured, so a phase cut short keeps what it measured:
#   1. bf16, random weights built on the GPU: copy bandwidth and bf16 matmul throughput (the limits), then decode
#      batch 1 / 8 / 32 (256 tokens) eager (dynamic cache) and compiled (static cache, `compile_config`, CUDA graphs),
#      image-to-image 512², text-to-image 1024² and 512² (50 steps) eager and with the denoising step compiled,
#      prefill, peak memory                                                                  -> $OUT/bf16.jsonl
#   2. the same model with 4-bit NF4 linear layers: decode batch 1, text-to-image 512², peak memory -> $OUT/nf4.jsonl
#   3. the headline rows with their limits, ratios and the targets               -> $OUT/summary.jsonl
# Every timed row carries `limit_seconds` (from the bandwidth and throughput measured in the same run) and `ratio`.
set -uo pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --tiny) MODE=tiny ;;
    *) echo "run_gpu.sh: unknown argument $arg (use --dry-run or --tiny)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-outputs/gpu_benchmark}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"

run() {  # run TIMEOUT_S COMMAND...: prints the command; runs it (not in --dry-run) under a timeout cut to the budget
  local limit=$1; shift
  local left=$((BUDGET_S - SECONDS - 10))
  ((limit > left)) && limit=$left
  echo "+ [${limit}s] $*"
  [[ $MODE == dry ]] && return 0
  if ((limit <= 0)); then echo "run_gpu.sh: no time left for: $*" >&2; return 1; fi
  timeout --signal=TERM --kill-after=15 "$limit" "$@"
  local status=$?
  ((status == 124)) && echo "run_gpu.sh: cut at ${limit}s (partial results kept): $*" >&2
  return $status
}

if [[ $MODE == tiny ]]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  COMMON=(--tiny --device cpu --compile-backend eager --repeats 1)
else
  PYTHON=python3
  COMMON=(--repeats 2 --compile-dynamic)
  # The GPU machine has torch 2.11 and no network: install the wheels of ../shared/tools/device_wheels.sh first.
  if [[ $MODE == gpu ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl \
      && export PYTHONPATH=$PWD/.whl/site:$PWD || exit
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
  else
    echo "+ python3 -m pip install ... --target .whl/site .whl/*.whl && export PYTHONPATH=\$PWD/.whl/site:\$PWD"
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run 300 "$PYTHON" -m benchmarks.bench_inference "${COMMON[@]}" --variants eager compiled \
  --only decode image_to_image text_to_image prefill --output "$OUT/bf16.jsonl"
run 110 "$PYTHON" -m benchmarks.bench_inference "${COMMON[@]}" --quantization nf4 --variants eager \
  --only decode text_to_image --decode-batches 1 --t2i-sizes "$([[ $MODE == tiny ]] && echo 64 || echo 512)" \
  --output "$OUT/nf4.jsonl"
run 30 "$PYTHON" -m benchmarks.gpu_summary "$OUT/bf16.jsonl" "$OUT/nf4.jsonl" --output "$OUT/summary.jsonl"
echo "run_gpu.sh: ${SECONDS}s; results in $OUT"
