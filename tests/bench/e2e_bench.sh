#!/usr/bin/env bash
# End-to-end training throughput on the GPU machine: GPT-2 124M (d12), B=32, T=1024, bf16, AdamW,
# clip 1.0. Runs build/train on random token shards and the PyTorch peer (eager and
# torch.compile, tests/bench/torch_gpt2.py) in the same session; prints tokens/s (median step
# after warm-up), MFU against 989 TFLOP/s dense bf16, peak memory, and the ratios.
# Usage: tests/bench/e2e_bench.sh [B] [T] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-32}; T=${2:-1024}; STEPS=${3:-40}
WORK=${WORK:-/tmp/e2e_bench}
mkdir -p "$WORK/data"
make --no-print-directory build/train >/dev/null
python3 - "$WORK/data" <<'PY'
import numpy as np, sys
rng = np.random.default_rng(0)
for name, n in (("train_000000.bin", 20_000_000), ("val_000000.bin", 1_000_000)):
    h = np.zeros(256, np.int32); h[:3] = (20240520, 1, n)
    with open(f"{sys.argv[1]}/{name}", "wb") as f:
        f.write(h.tobytes()); f.write(rng.integers(0, 50257, n, dtype=np.uint16).tobytes())
PY
rm -rf "$WORK/out"
build/train --device cuda --model d12 --batch "$B" --seq "$T" --steps "$STEPS" --eval-every 0 --sample-every 0 \
    --ckpt-every 100000 --data "$WORK/data" --out "$WORK/out" > "$WORK/ours.txt" 2>&1 || { cat "$WORK/ours.txt"; exit 1; }
grep -E "memory plan|total|peak" "$WORK/ours.txt" || true
python3 - "$WORK/out/log.jsonl" "$WORK/ours.txt" "$B" "$T" <<'PY' > "$WORK/ours.csv"
import json, sys, re, statistics
steps = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
tok = statistics.median(s["tokens_per_s"] for s in steps[5:])
ms = statistics.median(s["ms"] for s in steps[5:])
peak = re.findall(r"peak device memory ([0-9.]+) GiB", open(sys.argv[2]).read())
print(f"ours,{sys.argv[3]},{sys.argv[4]},{ms:.2f},{tok:.0f},{peak[-1] if peak else 'nan'}")
PY
PYTHONUNBUFFERED=1 python3 tests/bench/torch_gpt2.py "$B" "$T" > "$WORK/peer.csv"
python3 - "$WORK/ours.csv" "$WORK/peer.csv" "$T" <<'PY'
import sys
rows = [l.strip().split(",") for f in sys.argv[1:3] for l in open(f) if l.strip()]
T = int(sys.argv[3]); L, C, N = 12, 768, 124_475_904
flops_per_token = 6 * N + 6 * L * C * T   # 6N + causal attention (12 L C T / 2)
ours = float(rows[0][4])
print(f"d12 B={rows[0][1]} T={T} bf16 | tokens/s | ms/step | MFU | peak GiB | ours / this")
for impl, B, T_, ms, tok, peak in rows:
    tok = float(tok)
    print(f"| {impl} | {tok:,.0f} | {float(ms):.1f} | {100 * tok * flops_per_token / 989e12:.1f}% | {peak} | {ours / tok:.2f} |")
PY
