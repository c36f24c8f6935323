#!/usr/bin/env bash
# Training runs on the GPU machine, on the default corpus (DATA, prepared elsewhere and carried):
#   1. `make train` exactly as a user runs it (GPU default model d6);
#   2. GPT-2 124M (d12): 60 steps straight, and 30 + stop + resume to 60: logs must agree bitwise;
#   3. every attention variant on d6 for STEPS steps with validation (falling val loss);
#   4. long: the linear and near-linear variants on d6 with RoPE at T = 131,072 (B = 1), LONG_STEPS
#      steps (no validation: the validation split is shorter than one sequence); memory plan,
#      peak memory, train loss and tokens/s of each.
# Logs land in $OUT/<run>.jsonl; a summary table is printed last.
# Usage: DATA=.data/brown tests/bench/train_runs.sh [default] [d12] [variants] [long]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/runs}
DATA=${DATA:-.data/brown}
STEPS=${STEPS:-150}
mkdir -p "$OUT"
what=${*:-default d12 variants}
summary() {  # name log: first/last train loss, first/last val loss ("-" without), median tok/s
    python3 - "$1" "$2" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
tr = [r for r in rows if "loss" in r]; va = [r for r in rows if "val_loss" in r]
tok = statistics.median(r["tokens_per_s"] for r in tr[3:]) if len(tr) > 3 else float("nan")
val = (f"{va[0]['val_loss']:.3f} -> {va[-1]['val_loss']:.3f} (min {min(r['val_loss'] for r in va):.3f})"
       if va else "-")
print(f"| {sys.argv[1]} | {len(tr)} | {tr[0]['loss']:.3f} -> {tr[-1]['loss']:.3f} | {val} | {tok:,.0f} |")
PY
}
table=""
for w in $what; do case $w in
default)
    rm -rf /tmp/run_default
    timeout 300 make train DATA="$DATA" OUT=/tmp/run_default > "$OUT/make_train.txt" 2>&1; echo "make train: exit $?"
    grep -E "memory plan|total|model:|batch:|val loss|peak" "$OUT/make_train.txt" | head -20
    grep -A3 -- "---- sample" "$OUT/make_train.txt" | tail -8
    cp /tmp/run_default/log.jsonl "$OUT/default.jsonl" && table+="$(summary default-d6 "$OUT/default.jsonl")"$'\n' ;;
d12)
    rm -rf /tmp/d12a /tmp/d12b
    args="--model d12 --batch 16 --seq 1024 --steps 60 --eval-every 20 --eval-batches 4 --sample-every 60 --ckpt-every 30 --keep 1 --lr 6e-4 --data $DATA"
    timeout 300 build/train $args --out /tmp/d12a > "$OUT/d12a.txt" 2>&1; echo "d12 straight: exit $?"
    timeout 300 build/train $args --out /tmp/d12b --stop-at 30 > "$OUT/d12b.txt" 2>&1; echo "d12 first half: exit $?"
    timeout 300 build/train $args --out /tmp/d12b --resume >> "$OUT/d12b.txt" 2>&1; echo "d12 resumed: exit $?"
    grep -E "val loss|peak|resuming" "$OUT/d12a.txt" "$OUT/d12b.txt"
    python3 - /tmp/d12a/log.jsonl /tmp/d12b/log.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p) if '"loss"' in l or '"val_loss"' in l] for p in sys.argv[1:3])
strip = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in rows]
print("d12 resume bit-exact:", strip(a) == strip(b), f"({len(a)} records)")
PY
    cmp /tmp/d12a/ckpt_00000060/model.bin /tmp/d12b/ckpt_00000060/model.bin && echo "d12 final weights identical"
    cp /tmp/d12a/log.jsonl "$OUT/d12.jsonl" && table+="$(summary d12 "$OUT/d12.jsonl")"$'\n' ;;
variants)
    for v in ${TRAIN_VARIANTS:-softmax local performer polynomial polysketch hyper}; do
        extra=""; [ $v = local ] && extra="--attn-window 128"; [ $v = hyper ] && extra="--attn-min-seq 128 --attn-block 64 --attn-samples 64"
        rm -rf /tmp/var_$v
        timeout 120 build/train --model d6 --attention $v $extra --batch 16 --seq 512 --steps "$STEPS" --eval-every 25 \
            --eval-batches 4 --sample-every 0 --ckpt-every 0 --data "$DATA" --out /tmp/var_$v > "$OUT/var_$v.txt" 2>&1
        echo "variant $v: exit $?"; tail -2 "$OUT/var_$v.txt" | grep -E "error" || true
        [ -f /tmp/var_$v/log.jsonl ] && cp /tmp/var_$v/log.jsonl "$OUT/var_$v.jsonl" && table+="$(summary $v "$OUT/var_$v.jsonl")"$'\n'
    done ;;
long)
    for v in ${LONG_VARIANTS:-performer local polysketch hyper}; do
        rm -rf /tmp/long_$v
        timeout 240 build/train --model d6 --pos rope --max-seq 131072 --attention $v --batch 1 --seq 131072 \
            --steps "${LONG_STEPS:-12}" --warmup 2 --lr 1e-3 --eval-every 0 --sample-every 0 --ckpt-every 0 \
            --data "$DATA" --out /tmp/long_$v > "$OUT/long_$v.txt" 2>&1
        echo "long $v (T=131072): exit $?"; grep -iE "memory plan|total|peak|error" "$OUT/long_$v.txt" | head -6
        [ -f /tmp/long_$v/log.jsonl ] && cp /tmp/long_$v/log.jsonl "$OUT/long_$v.jsonl" &&
            table+="$(summary "long $v" "$OUT/long_$v.jsonl")"$'\n'
    done ;;
esac; done
echo; echo "| run | steps | train loss | val loss | tokens/s |"; echo "|---|---:|---|---|---:|"; printf "%s" "$table"
