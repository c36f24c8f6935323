#!/usr/bin/env bash
# One call on the GPU machine: build everything for the GPU present, run the GPU test suite, then
# the benchmarks. Logs go to $OUT (the device tool brings them back) or build/session.
# Usage: tests/bench/gpu_session.sh [tests|attn|e2e|all|variants|train]...
#   all = tests attn e2e; variants = tests/bench/variants_bench.sh (every attention variant,
#   T = 1k..131k, ~4 min); train = tests/bench/train_runs.sh d12 variants long on DATA
#   (default .data/brown, prepared elsewhere and carried; ~5 min).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/session}
mkdir -p "$OUT"
what=${*:-all}
for w in $what; do
  case $w in tests|attn|e2e|all|variants|train) ;;
    *) echo "gpu_session.sh: unknown part '$w' (tests, attn, e2e, all, variants, train)" >&2; exit 2 ;; esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
time make -j16 all build/test_gpu > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
for w in $what; do
  case $w in
    tests|all) timeout 400 build/test_gpu --gtest_brief=1 2>&1 | tee "$OUT/test_gpu.log" | grep -vE "^\[ +(RUN|OK) " | tail -60 ;;&
    attn|all) OUT_DIR="$OUT" timeout 300 tests/bench/attention_bench.sh ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attn_bench.log" | tail -30 ;;&
    e2e|all) timeout 400 tests/bench/e2e_bench.sh 2>&1 | tee "$OUT/e2e_bench.log" | tail -12 ;;
    variants) OUT_DIR="$OUT/variants" BUILD=0 timeout 400 tests/bench/variants_bench.sh 2>&1 |
        tee "$OUT/variants_bench.log" | tail -40 ;;
    train) OUT="$OUT/runs" DATA=${DATA:-.data/brown} timeout 600 tests/bench/train_runs.sh d12 variants long 2>&1 |
        tee "$OUT/train_runs.log" | tail -16 ;;
  esac
done
