# Peer side of the attention benchmark: PyTorch SDPA causal attention with the flash and cuDNN
# backends on exactly the configs of tests/bench/flash_bench.cu (bf16, contiguous (B, H, T, d),
# B·T = 65,536 tokens, d = 64 with H = 16 and d = 128 with H = 8), timed the same way: CUDA events
# around each run, 3 warmup runs, median of 25. FLOPs: causal forward 4·B·H·T²·d/2, backward 2.5×.
# Output: the same CSV as flash_bench (impl,d,T,B,H,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops);
# a backend that fails prints nothing for that config (its error goes to stderr).
# Usage: python3 tests/bench/sdpa_peer.py [--quick]
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import median_ms


def main():
    quick = "--quick" in sys.argv
    tokens = 65536
    print("impl,d,T,B,H,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops", flush=True)
    for d in (64, 128):
        H = 16 if d == 64 else 8
        for T in (1024, 4096, 16384, 32768, 65536):
            if quick and T > 4096:
                continue
            B = tokens // T
            q, k, v = [torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3)]
            do = torch.randn_like(q)
            flops = 4 * B * H * T * T * d / 2
            for name, backend in (("torch_flash", SDPBackend.FLASH_ATTENTION),
                                  ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        def fwd():
                            with torch.no_grad():
                                F.scaled_dot_product_attention(q, k, v, is_causal=True)

                        def fwd_bwd():
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                            q.grad = k.grad = v.grad = None
                            o.backward(do)

                        fwd_ms = median_ms(torch, fwd, reps=25, warmup=3)
                        fb_ms = median_ms(torch, fwd_bwd, reps=25, warmup=3)
                    print(f"{name},{d},{T},{B},{H},{fwd_ms:.3f},{flops / fwd_ms / 1e9:.1f},"
                          f"{fb_ms:.3f},{3.5 * flops / fb_ms / 1e9:.1f}", flush=True)
                except Exception as ex:  # a backend missing on this machine: say so, go on
                    print(f"{name} d={d} T={T}: failed: {str(ex)[:120]}", file=sys.stderr, flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
