#!/usr/bin/env bash
# Compares the polysketch GPU-vs-CPU errors of this tree with those of another commit (REF,
# default main), case by case, on the GPU machine: builds build/test_gpu, then a second test binary
# whose polysketch object is compiled from REF's cuda/attention/polysketch.cu and
# polysketch_sketch_tc.cuh (the tests and everything else from this tree), runs the bf16
# polysketch cases REPEATS times (fresh seeds) with each, and prints per case the largest error
# seen of o, saved, dq, dk, dv, dparams (the tests print them) and how many runs failed.
# REF's two files come from git into REF_DIR (default build/cmp/ref); where there is no git history
# (the GPU machine gets a copy of the working tree), extract them first with PREP_ONLY=1 and carry
# that folder.
# Usage: [REF=main] [REPEATS=6] [FILTER='*PolySketchCudaVsCpu*bf16*'] tests/bench/compare_polysketch_errors.sh
#        PREP_ONLY=1 [REF=main] tests/bench/compare_polysketch_errors.sh   (extract REF's files, stop)
set -uo pipefail
cd "$(dirname "$0")/../.."
REF=${REF:-main}; REPEATS=${REPEATS:-6}; FILTER=${FILTER:-'*PolySketchCudaVsCpu*bf16*'}
OUT=${OUT:-build/cmp}; REF_DIR=${REF_DIR:-$OUT/ref}
mkdir -p "$OUT" "$REF_DIR"
if [ ! -f "$REF_DIR/polysketch.cu" ]; then
    git show "$REF:cuda/attention/polysketch.cu" > "$REF_DIR/polysketch.cu" &&
        git show "$REF:cuda/attention/polysketch_sketch_tc.cuh" > "$REF_DIR/polysketch_sketch_tc.cuh" ||
        { echo "cannot read $REF's polysketch sources (set REF_DIR)" >&2; exit 1; }
fi
sed -i "s#\"cuda/attention/polysketch_sketch_tc.cuh\"#\"$REF_DIR/polysketch_sketch_tc.cuh\"#" "$REF_DIR/polysketch.cu"
[ -n "${PREP_ONLY:-}" ] && { echo "$REF's polysketch sources in $REF_DIR"; exit 0; }
make -j"$(nproc)" build/test_gpu > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
compile=$(make -n -B build/obj/cuda/attention/polysketch.o | grep nvcc)
link=$(make -n -B build/test_gpu | grep -E "^g\+\+ .*-o build/test_gpu")
compile=${compile//build\/obj\/cuda\/attention\/polysketch.o/$OUT/ref_polysketch.o}
eval "${compile//cuda\/attention\/polysketch.cu/$REF_DIR/polysketch.cu}" |& tail -3
${link//build\/obj\/cuda\/attention\/polysketch.o/$OUT/ref_polysketch.o} -o "$OUT/test_gpu_ref" 2>&1 | tail -3
[ -x "$OUT/test_gpu_ref" ] || { echo "building the $REF binary failed" >&2; exit 1; }
for b in build/test_gpu "$OUT/test_gpu_ref"; do
    log="$OUT/$(basename "$b").log"
    "$b" --gtest_filter="$FILTER" --gtest_repeat="$REPEATS" > "$log" 2>&1
    echo "== $b: $(grep -c '^\[  FAILED  \] Cases' "$log") failed case runs"
    python3 - "$log" <<'PY'
import sys, re, collections
cur, rows = None, collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r'\[ RUN +\] .*/(\S+)', line)
    if m: cur = m.group(1)
    m = re.match(r'  errors: o (\S+)  saved (\S+)  dq (\S+)  dk (\S+)  dv (\S+)  dparams (\S+)', line)
    if m and cur: rows[cur].append([float(x) for x in m.groups()])
for case, r in rows.items():
    mx = [max(x[i] for x in r) for i in range(6)]
    print("%-56s n=%d  o %.1e saved %.1e dq %.1e dk %.1e dv %.1e dparams %.1e" % ((case[:56], len(r)) + tuple(mx)))
PY
done
