// Benchmark of our flash attention (cuda/attention/flash.cu), causal softmax, bf16, contiguous
// (B, H, T, d): forward and forward+backward time and TFLOP/s for T in 1k..64k with B·T = 65,536
// tokens, d = 64 with H = 16 and d = 128 with H = 8 (model width 1024 either way). CUDA events,
// 3 warmup runs, median of 25 timed runs. FLOPs as in ATTENTION.md: causal forward
// 4·B·H·T²·d/2, backward 2.5× that, so forward+backward counts 3.5×.
// Output: CSV, one line per config, same columns as tests/bench/sdpa_peer.py:
//   impl,d,T,B,H,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops
// Usage: build/bench/flash_bench [--quick]   (--quick: T <= 4k, for a smoke run)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

#include "attention.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/common.cuh"

namespace {

// x[i] ~ roughly N(0, 1) from a hash of (seed, i): cheap to fill gigabytes on the device.
__global__ void fill_random(bf16* x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        // sum of two uniforms in [-1, 1): unit-ish spread, symmetric
        const float u = (h & 0xFFFF) / 32768.f - 1.f, w = (h >> 16) / 32768.f - 1.f;
        x[i] = __float2bfloat16_rn(1.2f * (u + w));
    }
}

template <typename Fn>
float median_ms(Fn fn, int warmup = 3, int reps = 25) {
    for (int i = 0; i < warmup; i++) fn();
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> times;
    for (int i = 0; i < reps; i++) {
        CUDA_CHECK(cudaEventRecord(start));
        fn();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

void bench_one(int d, int H, int T, int B) {
    const AttnShape s{B, H, T, d};
    const size_t n = s.rows() * d;
    std::unique_ptr<Attention> attn = make_cuda_softmax_attention(AttnConfig{});
    bf16* buf = nullptr;  // q, k, v, o, dout, dq, dk, dv: each (B, H, T, d)
    float *lse = nullptr, *work = nullptr;
    CUDA_CHECK(cudaMalloc(&buf, 8 * n * sizeof(bf16)));
    CUDA_CHECK(cudaMalloc(&lse, attn->saved_size(s) * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&work, attn->workspace_bytes(s)));
    fill_random<<<1024, 256>>>(buf, 5 * n, 1234u + T + d);
    CUDA_LAUNCH_CHECK();
    auto view = [&](int i) { return head_tensor_bhtd(buf + i * n, DType::BF16, H, T, d); };
    const HeadTensor q = view(0), k = view(1), v = view(2), o = view(3), dout = view(4);
    const HeadTensor dq = view(5), dk = view(6), dv = view(7);

    auto fwd = [&] { attn->forward(s, AttnContext{}, o, q, k, v, lse, Tensor{}, work); };
    auto fwd_bwd = [&] {
        fwd();
        attn->backward(s, AttnContext{}, dq, dk, dv, Tensor{}, dout, q, k, v, o, lse, Tensor{}, work);
    };
    const float fwd_ms = median_ms(fwd);
    const float fb_ms = median_ms(fwd_bwd);
    CUDA_CHECK(cudaDeviceSynchronize());
    const double flops = 4.0 * B * H * (double)T * T * d / 2;
    std::printf("ours,%d,%d,%d,%d,%.3f,%.1f,%.3f,%.1f\n", d, T, B, H, fwd_ms, flops / fwd_ms / 1e9,
                fb_ms, 3.5 * flops / fb_ms / 1e9);
    std::fflush(stdout);
    CUDA_CHECK(cudaFree(buf));
    CUDA_CHECK(cudaFree(lse));
    CUDA_CHECK(cudaFree(work));
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
        const int tokens = 65536;
        std::printf("impl,d,T,B,H,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops\n");
        for (int d : {64, 128}) {
            const int H = d == 64 ? 16 : 8;
            for (int T : {1024, 4096, 16384, 32768, 65536}) {
                if (quick && T > 4096) continue;
                bench_one(d, H, T, tokens / T);
            }
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
