#!/usr/bin/env bash
# Side-by-side attention benchmark on the GPU machine: builds build/bench/flash_bench, runs it and
# the PyTorch SDPA peer (tests/bench/sdpa_peer.py) on the same configs in the same session, and
# prints one table with our forward and forward+backward TFLOP/s and the ratios ours/flash and
# ours/cuDNN (> 1: we are faster). Raw CSVs are kept in $OUT_DIR (default build/bench).
# Usage: tests/bench/attention_bench.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-build/bench}
mkdir -p "$OUT_DIR"

make --no-print-directory build/bench/flash_bench
echo "# ours: build/bench/flash_bench $*" >&2
build/bench/flash_bench "$@" | tee "$OUT_DIR/flash_ours.csv"
echo "# peer: tests/bench/sdpa_peer.py $*" >&2
if ! python3 tests/bench/sdpa_peer.py "$@" | tee "$OUT_DIR/flash_peer.csv"; then
    echo "warning: the PyTorch peer failed (is torch with CUDA installed?); table shows ours only" >&2
fi

python3 - "$OUT_DIR/flash_ours.csv" "$OUT_DIR/flash_peer.csv" <<'EOF'
import csv, sys
rows = {}
for path in sys.argv[1:]:
    try:
        for r in csv.DictReader(open(path)):
            rows[(r["impl"], int(r["d"]), int(r["T"]))] = r
    except FileNotFoundError:
        pass
def tf(impl, d, T, col):
    r = rows.get((impl, d, T))
    return float(r[col]) if r else None
def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"
def num(x):
    return f"{x:.0f}" if x else "-"
print()
print("causal, bf16, B*T = 65536; d=64: H=16, d=128: H=8; TFLOP/s (fwd = 4BHT^2d/2, f+b = 3.5x)")
hdr = ["d", "T", "B", "ours fwd", "flash fwd", "cudnn fwd", "ours f+b", "flash f+b", "cudnn f+b",
       "f+b ours/flash", "f+b ours/cudnn", "fwd ours/cudnn"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---:|" * len(hdr))
for (impl, d, T), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2])):
    if impl != "ours":
        continue
    of, ob = tf("ours", d, T, "fwd_tflops"), tf("ours", d, T, "fwdbwd_tflops")
    ff, fb = tf("torch_flash", d, T, "fwd_tflops"), tf("torch_flash", d, T, "fwdbwd_tflops")
    cf, cb = tf("cudnn", d, T, "fwd_tflops"), tf("cudnn", d, T, "fwdbwd_tflops")
    cells = [d, T, r["B"], num(of), num(ff), num(cf), num(ob), num(fb), num(cb),
             ratio(ob, fb), ratio(ob, cb), ratio(of, cf)]
    print("| " + " | ".join(str(c) for c in cells) + " |")
EOF
