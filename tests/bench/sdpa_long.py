# PyTorch peer of the long-context attention-variant benchmark (tests/bench/variants_bench.sh):
# SDPA causal attention with the flash and the cuDNN backend (torch.nn.attention.sdpa_kernel) at
# the benchmark's shapes: bf16, contiguous (B, H, T, d), H = 12, d = 64, B = max(1, 65536 / T)
# (B·T fixed; at T = 131,072 B = 1, twice the tokens, as shared/ANCHORS.md). Timed like
# build/attn --bench: `warmup` untimed forward+backward runs, then the median of `repeats` forward
# runs and of `repeats` forward+backward runs, each between two CUDA events. Peak memory: the
# allocator's peak from just before the inputs are made to the end of the timed runs (inputs,
# output, gradients and the backends' scratch: what build/attn's peak_mib counts).
# FLOPs as build/attn: causal forward 4·B·H·T²·d/2, forward+backward 3.5×.
# Output on stdout, one CSV line per (backend, T) in the benchmark's combined format
#   impl,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,fwd_tflops,fwdbwd_tflops,peak_mib,status
# with impl sdpa_flash / sdpa_cudnn and status ok, oom or error (then the numbers are empty).
# T values run in the order given (the caller puts the most important first); --budget-s stops
# starting new shapes after that many seconds.
# Usage: python3 tests/bench/sdpa_long.py [--T 32768 1024 ...] [--quick] [--heads 12] [--head-dim 64]
#        [--tokens 65536] [--repeats 5] [--warmup 2] [--budget-s 120] [--header]
import argparse
import sys
import time

from cuda_timing import median_ms

HEADER = "impl,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,fwd_tflops,fwdbwd_tflops,peak_mib,status"
DEFAULT_T = [32768, 131072, 65536, 16384, 8192, 4096, 2048, 1024]


def bench_one(torch, F, backend, B, H, T, d, repeats, warmup):
    """(fwd_ms, fwdbwd_ms, peak_mib) of one backend at one shape."""
    from torch.nn.attention import sdpa_kernel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tensors = []  # q, k, v, do: released in `finally` whatever fails
    try:
        for _ in range(3):
            tensors.append(torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True))
        tensors.append(torch.randn_like(tensors[0]))
        q, k, v, do = tensors
        with sdpa_kernel([backend]):
            def fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                o.backward(do)

            for _ in range(warmup):
                fwd_bwd()
            fwd_ms = median_ms(torch, fwd, repeats)
            fb_ms = median_ms(torch, fwd_bwd, repeats)
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 1048576.0
        return fwd_ms, fb_ms, peak_mib
    finally:
        tensors.clear()
        q = k = v = do = None
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description="SDPA flash / cuDNN peer of tests/bench/variants_bench.sh")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths, in run order")
    ap.add_argument("--quick", action="store_true", help="T up to 8192 only")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65536, help="B = max(1, tokens / T)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=0, help="start no new shape after this many seconds (0: no limit)")
    ap.add_argument("--header", action="store_true", help="print the CSV header first")
    args = ap.parse_args()
    t_list = args.T or DEFAULT_T
    if args.quick:
        t_list = [T for T in t_list if T <= 8192]
    if args.header:
        print(HEADER, flush=True)

    t0 = time.monotonic()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend
    except ImportError as ex:
        print(f"sdpa_long.py: PyTorch with torch.nn.attention is needed ({ex}); no SDPA numbers", file=sys.stderr)
        return 1

    if not torch.cuda.is_available():
        print("sdpa_long.py: no CUDA device visible to torch; nothing to measure", file=sys.stderr)
        return 1
    H, d = args.heads, args.head_dim
    backends = (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))
    for T in t_list:
        if args.budget_s and time.monotonic() - t0 > args.budget_s:
            print(f"sdpa_long.py: budget of {args.budget_s:.0f} s spent; skipping T={T}", file=sys.stderr, flush=True)
            continue
        B = max(1, args.tokens // T)
        flops = 4.0 * B * H * T * T * d / 2
        for name, backend in backends:
            prefix = f"{name},cuda,bf16,{B},{H},{T},{d}"
            try:
                fwd_ms, fb_ms, peak = bench_one(torch, F, backend, B, H, T, d, args.repeats, args.warmup)
                print(f"{prefix},{fwd_ms:.6f},{fb_ms:.6f},{flops / fwd_ms / 1e9:.6f},"
                      f"{3.5 * flops / fb_ms / 1e9:.6f},{peak:.3f},ok", flush=True)
            except Exception as ex:  # a backend missing on this machine, or out of memory: say so, go on
                status = "oom" if "out of memory" in str(ex).lower() else "error"
                print(f"{prefix},,,,,,{status}", flush=True)
                print(f"sdpa_long.py: {name} T={T}: {status}: {str(ex)[:200]}", file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
