// The Hopper (sm_90) kernels of flash attention (cuda/attention/flash_wgmma.cu, built for sm_90a
// only) as seen by flash.cu: whether this GPU runs them, and their launchers (the forward and the
// backward's dQ). flash.cu picks them for bf16 on compute capability 9.0 unless FLASH_KERNELS=mma
// asks for the mma.sync kernels (the path of every other GPU; tests and benchmarks compare them).
#pragma once

struct Strided;  // cuda/attention/strided.cuh (this header is included by host-only tests too)

// true on a compute-capability-9.0 GPU (the current device)
bool flash_wgmma_supported();

// o (B,H,T,d) bf16, lse (B,H,T) fp32 natural log <- q, k, v bf16 (B,H,T,d); d = 64 or 128;
// window > 0 with windowed: query i sees keys i-W+1 .. i, else causal. Same outputs as
// flash.cu's flash_forward_bf16 up to summation order.
void flash_forward_wgmma(int d, bool windowed, Strided o, Strided q, Strided k, Strided v, float* lse,
                         int B, int H, int T, int window, float scale_log2);

// dq (B,H,T,d) bf16 <- q, k, v, dO bf16, lse (B,H,T) natural log, delta (B,H,T) = Σ dO·O: flash.cu's
// flash_backward_dq_bf16 up to summation order.
void flash_backward_dq_wgmma(int d, bool windowed, Strided dq, Strided q, Strided k, Strided v, Strided d_o,
                             const float* lse, const float* delta, int B, int H, int T, int window, float scale_log2,
                             float scale);

// dk, dv (B,H,T,d) bf16 <- q, k, v, dO, lse, delta as above: flash.cu's flash_backward_dkdv_bf16 up
// to summation order.
void flash_backward_dkdv_wgmma(int d, bool windowed, Strided dk, Strided dv, Strided q, Strided k, Strided v,
                               Strided d_o, const float* lse, const float* delta, int B, int H, int T, int window,
                               float scale_log2, float scale);
