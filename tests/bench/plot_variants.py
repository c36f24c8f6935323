# Tables and plot of the long-context attention-variant benchmark (tests/bench/variants_bench.sh).
# Input: its combined CSV
#   impl,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,fwd_tflops,fwdbwd_tflops,peak_mib,status
# (impl: our variants softmax, local, performer, polynomial, polysketch, hyper; the PyTorch peers
# sdpa_flash, sdpa_cudnn; status ok, timeout, oom, error, skipped, or "budget" = not run for lack
# of time). Rows of one (impl, T) seen twice: the last one counts.
# --table prints markdown tables on stdout, rows T:
#   1. forward+backward ms and peak MiB of every variant and peer;
#   2. forward+backward speed-up of every variant over our softmax (softmax ms / variant ms) and of
#      our softmax over SDPA flash and cuDNN (their ms / ours: > 1, ours is faster);
#   3. forward-only ms.
# --plot PNG draws forward+backward ms against T on log-log axes, one line per variant and peer
# (needs matplotlib; without it the tables still print and the plot is skipped with a message).
# Usage: python3 tests/bench/plot_variants.py CSV [--table] [--plot OUT.png]
import argparse
import csv
import sys

VARIANTS = ["softmax", "local", "performer", "polynomial", "polysketch", "hyper"]
PEERS = ["sdpa_flash", "sdpa_cudnn"]


def load(path):
    """{(impl, T): row} with floats for the numeric columns (None when empty), in file order."""
    rows = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if not r.get("impl") or not r.get("T"):
                continue
            for col in ("fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "peak_mib"):
                v = (r.get(col) or "").strip()
                try:
                    r[col] = float(v) if v else None
                except ValueError:
                    r[col] = None
            r["T"] = int(r["T"])
            r["status"] = (r.get("status") or "ok").strip() or "ok"
            rows[(r["impl"], r["T"])] = r
    return rows


def impls_of(rows):
    present = {impl for impl, _ in rows}
    known = [i for i in VARIANTS + PEERS if i in present]
    return known + sorted(present - set(known))


def value(rows, impl, T, col):
    r = rows.get((impl, T))
    if r is None or r["status"] != "ok":
        return None
    return r[col]


def cell_ms(rows, impl, T, col="fwdbwd_ms", with_mem=True):
    r = rows.get((impl, T))
    if r is None:
        return ""
    if r["status"] != "ok" or r[col] is None:
        return r["status"] if r["status"] != "ok" else "-"
    x = r[col]
    text = f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"
    if with_mem and r["peak_mib"] is not None:
        text += f" / {r['peak_mib']:.0f}"
    return text


def ratio(num, den):
    return f"{num / den:.2f}×" if num and den else "-"


def print_table(title, header, body):
    print()
    print(title)
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for cells in body:
        print("| " + " | ".join(str(c) for c in cells) + " |")


def tables(rows):
    impls = impls_of(rows)
    ts = sorted({T for _, T in rows})
    if not ts:
        print("no results")
        return
    any_row = next(iter(rows.values()))
    shape = f"H={any_row['H']}, d={any_row['d']}, {any_row['precision']}, {any_row['device']}"
    print_table(f"Causal attention forward+backward: ms / peak MiB ({shape}; B·T fixed, B >= 1)",
                ["T", "B"] + impls,
                [[T, next((rows[(i, T)]["B"] for i in impls if (i, T) in rows), "")] +
                 [cell_ms(rows, i, T) for i in impls] for T in ts])
    ours = [i for i in impls if i not in PEERS]
    peers = [p for p in PEERS if p in impls]
    header = ["T"] + [f"{i} vs softmax" for i in ours if i != "softmax"]
    header += [f"softmax vs {p}" for p in peers]
    body = []
    for T in ts:
        sm = value(rows, "softmax", T, "fwdbwd_ms")
        cells = [T] + [ratio(sm, value(rows, i, T, "fwdbwd_ms")) for i in ours if i != "softmax"]
        cells += [ratio(value(rows, p, T, "fwdbwd_ms"), sm) for p in peers]
        body.append(cells)
    print_table("Forward+backward speed-up (> 1: faster): each variant over our softmax; our softmax over SDPA",
                header, body)
    print_table("Causal attention forward only: ms", ["T"] + impls,
                [[T] + [cell_ms(rows, i, T, "fwd_ms", with_mem=False) for i in impls] for T in ts])


def plot(rows, out_png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot_variants.py: matplotlib is not installed, so {out_png} was not drawn "
              "(pip install matplotlib, or apt-get install python3-matplotlib); the tables above are complete",
              file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for impl in impls_of(rows):
        pts = sorted((T, r["fwdbwd_ms"]) for (i, T), r in rows.items()
                     if i == impl and r["status"] == "ok" and r["fwdbwd_ms"])
        if not pts:
            continue
        style = "--" if impl in PEERS else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=4, label=impl)
    ax.set_xscale("log", base=2)
    ts = sorted({T for _, T in rows})
    ax.set_xticks(ts)
    ax.set_xticklabels([f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T) for T in ts])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward+backward time (ms)")
    any_row = next(iter(rows.values()))
    ax.set_title(f"Causal attention, H={any_row['H']}, d={any_row['d']}, {any_row['precision']}: "
                 "B·T fixed (B >= 1)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    print(f"plot_variants.py: wrote {out_png}", file=sys.stderr)
    return True


def main():
    ap = argparse.ArgumentParser(description="tables and plot of tests/bench/variants_bench.sh's CSV")
    ap.add_argument("csv")
    ap.add_argument("--table", action="store_true", help="print the markdown tables")
    ap.add_argument("--plot", metavar="PNG", help="draw forward+backward ms vs T (log-log) into PNG")
    args = ap.parse_args()
    rows = load(args.csv)
    if args.table or not args.plot:
        tables(rows)
    if args.plot and rows:
        return 0 if plot(rows, args.plot) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
