#!/usr/bin/env bash
# One call on the GPU machine: build everything for the GPU present, run the GPU test suite, then
# the benchmarks. Logs go to $OUT (the device tool brings them back) or build/session.
# Usage: tests/bench/gpu_session.sh [tests|attn|e2e|all]...
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/session}
mkdir -p "$OUT"
what=${*:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
time make -j16 all build/test_gpu > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
for w in $what; do
  case $w in
    tests|all) timeout 400 build/test_gpu --gtest_brief=1 2>&1 | tee "$OUT/test_gpu.log" | grep -vE "^\[ +(RUN|OK) " | tail -60 ;;&
    attn|all) OUT_DIR="$OUT" timeout 300 tests/bench/attention_bench.sh ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attn_bench.log" | tail -30 ;;&
    e2e|all) timeout 400 tests/bench/e2e_bench.sh 2>&1 | tee "$OUT/e2e_bench.log" | tail -12 ;;
  esac
done
