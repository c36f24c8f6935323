#!/usr/bin/env bash
# Long-context benchmark of every attention variant (issue 4) against our softmax and PyTorch SDPA:
# builds build/attn, times causal forward and forward+backward of softmax, local (W = 4096),
# performer, polysketch (r = 32, b = 256, learned, exact diagonal), hyper (min_seq 4096, block 256,
# 256 samples) and polynomial (T <= 16k only: it is O(T²)) with `build/attn --bench --csv`, and
# SDPA flash / cuDNN with tests/bench/sdpa_long.py, at T = 1k .. 131k, d = 64, H = 12, bf16,
# B = max(1, 65536 / T) (B·T fixed; at 131k B = 1, twice the tokens, as shared/ANCHORS.md).
# Results: one CSV $OUT_DIR/variants.csv (impl,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,
# fwd_tflops,fwdbwd_tflops,peak_mib,status), markdown tables on stdout and $OUT_DIR/variants.md,
# the log-log plot $OUT_DIR/variants.png (tests/bench/plot_variants.py), logs in $OUT_DIR/logs.
#
# Time: the whole script (build included) stops starting runs once BUDGET_S (default 330) seconds
# have passed, and every run has a timeout (RUN_TIMEOUT, default 40 s, never past the budget). The
# runs go in order of importance: T = 32k for every variant first, then SDPA, then 131k, 64k, 16k,
# 8k, 4k, 2k, 1k. A variant that times out, runs out of memory or fails at some T is not run at
# any larger T, and one that timed out twice not at all any more. Inputs: drawn once per size
# with numpy into INPUT_DIR (/dev/shm when it has room) and read by every run with --in (drawing
# 200M normals on the host costs build/attn seconds per run); without numpy build/attn draws them.
#
# Usage: tests/bench/variants_bench.sh [--quick]      (--quick: T up to 8k)
# Environment (defaults): OUT_DIR (build/bench), DEVICE (cuda; cpu for a dry run of the logic),
#   T_LIST (the T values, in run order), VARIANTS (softmax local performer polysketch hyper
#   polynomial), HEADS (12), HEAD_DIM (64), TOKENS (65536), REPEATS (5), WARMUP (2),
#   RUN_TIMEOUT (40), BUDGET_S (330), POLY_MAX_T (16384), SDPA (1; 0 skips the PyTorch peer),
#   INPUT_DIR, MAKE_JOBS (nproc), BUILD (1; 0 uses build/attn as it is).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "variants_bench.sh: unknown argument '$arg' (only --quick)" >&2; exit 2 ;;
    esac
done

OUT_DIR=${OUT_DIR:-build/bench}
DEVICE=${DEVICE:-cuda}
HEADS=${HEADS:-12}
HEAD_DIM=${HEAD_DIM:-64}
TOKENS=${TOKENS:-65536}
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-2}
RUN_TIMEOUT=${RUN_TIMEOUT:-40}
BUDGET_S=${BUDGET_S:-330}
POLY_MAX_T=${POLY_MAX_T:-16384}
SDPA=${SDPA:-1}
VARIANTS=${VARIANTS:-softmax local performer polysketch hyper polynomial}
if [[ $QUICK == 1 ]]; then
    T_LIST=${T_LIST:-8192 4096 2048 1024}
else
    T_LIST=${T_LIST:-32768 131072 65536 16384 8192 4096 2048 1024}
fi
PRECISION=$([[ $DEVICE == cpu ]] && echo fp32 || echo bf16)  # build/attn's default on each device
FIRST_T=${T_LIST%% *}  # SDPA runs after every variant at this T

CSV="$OUT_DIR/variants.csv"
LOGS="$OUT_DIR/logs"
mkdir -p "$OUT_DIR" "$LOGS"
echo "impl,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,fwd_tflops,fwdbwd_tflops,peak_mib,status" > "$CSV"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
note() { echo "[$(printf '%4d' "$(elapsed)") s] $*" >&2; }

# ---- build
if [[ ${BUILD:-1} == 0 ]]; then
    note "BUILD=0: using the existing build/attn"
    [[ -x build/attn ]] || { echo "variants_bench.sh: build/attn is missing" >&2; exit 1; }
elif note "building build/attn" && ! make --no-print-directory -j"${MAKE_JOBS:-$(nproc)}" build/attn > "$LOGS/build.log" 2>&1; then
    tail -30 "$LOGS/build.log" >&2
    echo "variants_bench.sh: make build/attn failed (log: $LOGS/build.log)" >&2
    exit 1
fi

# ---- inputs: q.bin, k.bin, v.bin, do.bin float32 (B, H, T, d), one folder per element count
INPUT_DIR=${INPUT_DIR:-}
if [[ -z $INPUT_DIR ]]; then
    # two sets (B·T = TOKENS and the 2× one at 131k): 12 floats · tokens · H · d bytes
    need_kb=$(( 12 * TOKENS * HEADS * HEAD_DIM / 1024 + 65536 ))
    shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
    if [[ -n $shm_kb && $shm_kb -gt $need_kb ]]; then
        INPUT_DIR=$(mktemp -d /dev/shm/variants_bench.XXXXXX)
    else
        INPUT_DIR=$(mktemp -d "$OUT_DIR/inputs.XXXXXX")
    fi
    trap 'rm -rf "$INPUT_DIR"' EXIT
fi
HAVE_NUMPY=0
python3 -c "import numpy" 2>/dev/null && HAVE_NUMPY=1
[[ $HAVE_NUMPY == 1 ]] || note "numpy not found: build/attn draws its inputs itself (slower: seconds per run)"

# Prints the --in arguments for `numel` floats per tensor (drawing the files the first time), or
# nothing when they cannot be made.
input_args() {
    local numel=$1 dir="$INPUT_DIR/n$1"
    [[ $HAVE_NUMPY == 1 ]] || return 0
    if [[ ! -f $dir/done ]]; then
        mkdir -p "$dir"
        if ! python3 - "$dir" "$numel" <<'EOF' 2>> "$LOGS/inputs.log"
import sys
import numpy as np
d, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(1337)
for name in ("q", "k", "v", "do"):
    rng.standard_normal(n, dtype=np.float32).tofile(f"{d}/{name}.bin")
open(f"{d}/done", "w").close()
EOF
        then
            note "drawing inputs into $dir failed (see $LOGS/inputs.log); build/attn draws them itself"
            rm -rf "$dir"
            return 0
        fi
    fi
    echo "--in $dir"
}

variant_args() {
    case "$1" in
        local) echo "--attn-window 4096" ;;
        *) echo "" ;;
    esac
}

declare -A FAILED_AT  # variant -> smallest T where it timed out / ran out of memory / failed
declare -A TIMEOUTS   # variant -> how many of its runs timed out

# run_variant VARIANT T: one build/attn run, one CSV row
run_variant() {
    local v=$1 T=$2
    local B=$(( TOKENS / T )); (( B < 1 )) && B=1
    local prefix="$v,$DEVICE,$PRECISION,$B,$HEADS,$T,$HEAD_DIM"
    if [[ $v == polynomial && $T -gt $POLY_MAX_T ]]; then return; fi
    if [[ -n ${FAILED_AT[$v]:-} && $T -ge ${FAILED_AT[$v]} ]] || (( ${TIMEOUTS[$v]:-0} >= 2 )); then
        echo "$prefix,,,,,,skipped" >> "$CSV"
        note "$v T=$T: skipped (failed at T=${FAILED_AT[$v]}; ${TIMEOUTS[$v]:-0} timeouts)"
        return
    fi
    local remaining; remaining=$(left)
    if (( remaining < 10 )); then
        echo "$prefix,,,,,,budget" >> "$CSV"
        note "$v T=$T: not run, the ${BUDGET_S} s budget is spent"
        return
    fi
    local limit=$(( remaining < RUN_TIMEOUT ? remaining : RUN_TIMEOUT ))
    local log="$LOGS/${v}_T${T}"
    local in_args; in_args=$(input_args $(( B * HEADS * T * HEAD_DIM )))
    # shellcheck disable=SC2046
    timeout --kill-after=5 "$limit" build/attn --device "$DEVICE" --attention "$v" $(variant_args "$v") \
        --batch "$B" --heads "$HEADS" --seq "$T" --head-dim "$HEAD_DIM" --bench --csv \
        --repeats "$REPEATS" --warmup "$WARMUP" $in_args > "$log.out" 2> "$log.err"
    local rc=$?
    # the CSV line: 12 fields, B..d integers
    local line; line=$(awk -F, 'NF == 12 && $4 ~ /^[0-9]+$/ && $6 ~ /^[0-9]+$/ {l = $0} END {print l}' "$log.out")
    local status
    if (( rc == 0 )) && [[ -n $line ]]; then
        echo "$line,ok" >> "$CSV"
        note "$v T=$T B=$B: $(echo "$line" | awk -F, '{printf "fwd %.3f ms, f+b %.3f ms, peak %.0f MiB", $8, $9, $12}')"
        return
    elif (( rc == 124 || rc == 137 )); then
        status=timeout
        TIMEOUTS[$v]=$(( ${TIMEOUTS[$v]:-0} + 1 ))
    elif grep -qiE "out of memory|cudaErrorMemoryAllocation|bad_alloc" "$log.err"; then
        status=oom
    else
        status=error
    fi
    if [[ -z ${FAILED_AT[$v]:-} || $T -lt ${FAILED_AT[$v]} ]]; then FAILED_AT[$v]=$T; fi
    echo "$prefix,,,,,,$status" >> "$CSV"
    note "$v T=$T B=$B: $status (rc $rc, ${limit} s limit); larger T of $v skipped; $(tail -c 300 "$log.err" | tr '\n' ' ')"
}

run_sdpa() {
    if [[ $SDPA != 1 || $DEVICE != cuda ]]; then
        note "SDPA peer skipped (SDPA=$SDPA, DEVICE=$DEVICE)"
        return
    fi
    local remaining; remaining=$(left)
    if (( remaining < 20 )); then
        note "SDPA peer not run: the ${BUDGET_S} s budget is spent"
        return
    fi
    local limit=$(( remaining - 10 < 150 ? remaining - 10 : 150 ))
    note "SDPA peer (tests/bench/sdpa_long.py, ${limit} s limit)"
    # shellcheck disable=SC2086
    timeout --kill-after=5 "$limit" python3 tests/bench/sdpa_long.py --T $T_LIST --heads "$HEADS" \
        --head-dim "$HEAD_DIM" --tokens "$TOKENS" --repeats "$REPEATS" --warmup "$WARMUP" \
        --budget-s $(( limit - 30 > 10 ? limit - 30 : 10 )) > "$LOGS/sdpa.out" 2> "$LOGS/sdpa.err"
    local rc=$?
    grep -E '^sdpa_' "$LOGS/sdpa.out" >> "$CSV"
    (( rc == 0 )) || note "SDPA peer: rc $rc (log $LOGS/sdpa.err): $(tail -c 300 "$LOGS/sdpa.err" | tr '\n' ' ')"
}

# ---- the runs, most important first
for T in $T_LIST; do
    for v in $VARIANTS; do
        run_variant "$v" "$T"
    done
    [[ $T == "$FIRST_T" ]] && run_sdpa
done

# ---- tables and plot
note "done with the runs; CSV: $CSV"
python3 tests/bench/plot_variants.py "$CSV" --table | tee "$OUT_DIR/variants.md"
python3 tests/bench/plot_variants.py "$CSV" --plot "$OUT_DIR/variants.png" ||
    note "no plot (see the message above); the CSV and tables are complete"
note "total $(elapsed) s"
