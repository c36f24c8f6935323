#!/usr/bin/env bash
# Where an attention variant spends its time: runs one forward+backward of build/attn under
# Nsight Compute (one metric: kernel duration) and prints the time per kernel name, largest first.
# RAW=FILE keeps ncu's CSV.
# Usage: tests/bench/profile_attn.sh VARIANT [build/attn options...]
#   e.g. tests/bench/profile_attn.sh polysketch --batch 2 --heads 12 --seq 32768
set -uo pipefail
cd "$(dirname "$0")/../.."
variant=$1; shift
csv=$(mktemp)
ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    build/attn --device cuda --attention "$variant" "$@" --bench --repeats 1 --warmup 0 > "$csv" 2>/dev/null
python3 - "$csv" "$variant" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: sys.exit("no ncu rows: " + open(sys.argv[1]).read()[-2000:])
head = rows[0]; rows = rows[1:]
iname, ival, iunit = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows:
    try: v = float(r[ival].replace(",", "")) * scale[r[iunit]]
    except (ValueError, KeyError): continue
    k = r[iname].split("(")[0][:90]; tot[k] += v; cnt[k] += 1
# --bench with repeats 1 runs fwd once, then fwd+bwd once (and warmups 0): all kernels counted.
s = sum(tot.values())
print(f"{sys.argv[2]}: {s/1e6:.2f} ms in {sum(cnt.values())} launches (fwd + fwd+bwd passes)")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {v/1e6:9.3f} ms  {100*v/s:5.1f}%  x{cnt[k]:<5d} {k}")
PY
[ -n "${RAW:-}" ] && cp "$csv" "$RAW"
rm -f "$csv"
