// Flash-tiled exact causal softmax attention (FlashAttention-2 scheme), forward and backward, and
// its sliding-window twin `local` (query i sees keys i-W+1 .. i: W keys including itself, i.e.
// flash-attn's window_size = (W-1, 0)). The mask kind is a template parameter, so `softmax` never
// pays for the window test. Math: ../../shared/ATTENTION.md §1-2; tiles: flash_traits.cuh.
//
// bf16 path (tensor cores, mma.sync m16n8k16, fp32 accumulators and statistics):
//   forward   one block per (query tile, h, b); streams the key/value tiles of the band with
//             cp.async double buffering; online softmax in the log2 domain (log2(e) folded into
//             the scale, exp2f); masks only the diagonal and window-edge tiles; writes O and
//             LSE (natural log, fp32, (B,H,T)).
//   backward  Δ_i = Σ dO_i·O_i (fp32 workspace), then a dK/dV kernel (one block per key tile,
//             each warp owns 16 keys and loops over the query tiles of the band) and a separate
//             dQ kernel (one block per query tile looping over key tiles): every sum runs in a
//             fixed order, no atomics, so the backward is bitwise deterministic.
// fp32 path (`--precision fp32`, for checking): the same algorithm with one warp per row and fp32
// FMAs instead of tensor cores; simple and slow.
// Memory is O(B·H·T): nothing of size T² exists anywhere.
//
// Tiling (v2, flash_traits.cuh): every warp owns 32 rows (two m16 tiles) wherever the registers
// allow it (forward, dQ; dK/dV at d = 64), so each ldmatrix'd B fragment feeds 4 mma instead of 2;
// fragment addresses are per-lane offsets XOR per-call constants (no spills, 255 registers max);
// warps skip key/query tiles their rows cannot see; fwd Br = 128 (Q in registers at d = 64),
// exp2 with scale·log2e folded into one FFMA.
// v2 beat v1 (16 rows per warp) on the H100 (bf16, causal, B·T = 65,536, TFLOP/s, fwd = 2·B·H·T²·d,
// f+b = 3.5x fwd): d=64 T=16k fwd 224 -> 245, f+b 187 -> 208; d=128 T=16k fwd 250 -> 273,
// f+b 204 -> 219 (torch flash 305/286 and 336/320 in the same runs; tests/bench/RESULTS.md).
// An ordered (deterministic) dQ accumulation inside the dK/dV kernel, 5 matmuls instead of 7,
// measured the same f+b (208 at d=64, 16k) and was dropped: the extra matmuls are not the limit.
// v3 (Hopper): on compute capability 9.0 the bf16 forward, dQ and dK/dV kernels are the wgmma ones
// of flash_wgmma.cu (use_wgmma below); these mma.sync ones serve every other GPU and FLASH_KERNELS=mma.
// On the H100 at T = 32k: fwd 246 -> 325 (d=64), 284 -> 426 (d=128) TFLOP/s; f+b 212 -> 239 and
// 225 -> 275 with forward and dQ on wgmma (0.82× and 0.86× torch flash, session 4), -> 269 and 355
// with dK/dV too (0.92× and 1.10× torch flash; tests/bench/RESULTS.md, session 5).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "attention.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/attention/flash_traits.cuh"
#include "cuda/attention/flash_wgmma.cuh"
#include "cuda/common.cuh"
#include "cuda/attention/strided.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Which keys a query sees. Causal: j <= i. Window: i - W + 1 <= j <= i.
enum class Mask { Causal, Window };


template <Mask kMask>
__device__ __forceinline__ bool masked(int query, int key, int window) {
    return key > query || (kMask == Mask::Window && key < query - window + 1);
}

// ============================================================================ bf16 forward
// o (B,H,T,d), lse (B,H,T) <- q, k, v (B,H,T,d). Grid (query tiles, H, B); the heaviest tiles
// (the last ones, with the most keys) start first. Every warp owns 16·kM consecutive query rows;
// a warp whose rows see no key of the current tile skips it (its result would be unchanged).
template <int D, Mask kMask>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    flash_forward_bf16(Strided O, Strided Q, Strided K, Strided V, float* lse, int H, int T,
                       int window, float scale_log2) {
    using Tr = FlashTraits<D>;
    constexpr int Br = Tr::kBrF, Bc = Tr::kBcF, kM = Tr::kFwdM;
    extern __shared__ __align__(16) unsigned char flash_smem[];
    bf16* s_q = reinterpret_cast<bf16*>(flash_smem);  // (Br, D)
    bf16* s_k = s_q + Br * D;                         // 2 stages of (Bc, D)
    bf16* s_v = s_k + 2 * Bc * D;                     // 2 stages of (Bc, D)

    const int q_tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int q0 = q_tile * Br, q_end = q0 + Br - 1;  // tile rows (rows >= T are padding)
    const int kt_first = kMask == Mask::Window ? max(0, q0 - window + 1) / Bc : 0;
    const int kt_last = min(q_end, T - 1) / Bc;

    const bf16* q_base = head_slice<const bf16>(Q, b, h);
    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    load_tile_async<Br, D, Tr::kThreads>(s_q, q_base, Q.st, q0, T, tid);
    auto load_kv = [&](int kt, int stage) {  // K and V tile kt into stage
        load_tile_async<Bc, D, Tr::kThreads>(s_k + stage * Bc * D, k_base, K.st, kt * Bc, T, tid);
        load_tile_async<Bc, D, Tr::kThreads>(s_v + stage * Bc * D, v_base, V.st, kt * Bc, T, tid);
    };
    load_kv(kt_first, 0);
    cp_async_commit();

    // the warp's rows w0 .. w_end; this thread's rows: row(m, half) = w0 + 16m + 8half + g
    const int w_first = warp * 16 * kM;  // within the tile
    const int w0 = q0 + w_first, w_end = w0 + 16 * kM - 1;
    float o_acc[kM][D / 8][4] = {};  // unnormalised O of the warp's rows
    float m_run[kM][2], l_run[kM][2];  // running max of the scaled (log2) scores; this thread's
#pragma unroll                         // part of the running sum
    for (int m = 0; m < kM; ++m) m_run[m][0] = m_run[m][1] = -INFINITY, l_run[m][0] = l_run[m][1] = 0.f;
    uint32_t q_frag[kM][D / 16][4];  // used when Tr::kFwdQInRegs

    for (int kt = kt_first; kt <= kt_last; ++kt) {
        const int stage = (kt - kt_first) & 1;
        cp_async_next_stage(kt < kt_last, [&] { load_kv(kt + 1, stage ^ 1); });
        __syncthreads();
        if constexpr (Tr::kFwdQInRegs)
            if (kt == kt_first)
#pragma unroll
                for (int m = 0; m < kM; ++m)
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk)
                        load_frag_a<D>(q_frag[m][kk], s_q, w_first + 16 * m, kk * 16, lane);
        const bf16* tile_k = s_k + stage * Bc * D;
        const bf16* tile_v = s_v + stage * Bc * D;
        const int k0 = kt * Bc, k_end = k0 + Bc - 1;
        const bool warp_sees_tile =
            k0 <= w_end && (kMask != Mask::Window || k_end >= w0 - window + 1);
        if (warp_sees_tile) {
            // S = Q·Kᵀ (16·kM x Bc per warp), unscaled; masked entries -inf
            float s[kM][Bc / 8][4] = {};
            if constexpr (Tr::kFwdQInRegs)
                warp_gemm_abt_regs_m<D, Bc, kM>(s, q_frag, tile_k, lane);
            else
                warp_gemm_abt_m<D, Bc, kM>(s, s_q, w_first, tile_k, lane);
            const bool edge = k_end > w0 || (kMask == Mask::Window && k0 < w_end - window + 1);
#pragma unroll
            for (int m = 0; m < kM; ++m)
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (edge && masked<kMask>(w0 + 16 * m + g + (e & 2) * 4,
                                                  k0 + nt * 8 + 2 * c + (e & 1), window))
                            s[m][nt][e] = -INFINITY;

            online_softmax_tile<D, Bc, kM>(s, m_run, l_run, o_acc, scale_log2);
            warp_gemm_pv_m<D, Bc, kM>(o_acc, s, tile_v, lane);
        }
        __syncthreads();  // the stage read here is overwritten by the next prefetch
    }

    // O /= l; LSE = (m + log2 l)·ln 2; a row without keys gives O = 0, LSE = -inf
    bf16* o_base = head_slice<bf16>(O, b, h);
    float* lse_base = lse + ((int64_t)b * H + h) * T;
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = l_run[m][half];
            l += __shfl_xor_sync(kFullMask, l, 1);
            l += __shfl_xor_sync(kFullMask, l, 2);
            const int row = w0 + 16 * m + 8 * half + g;
            if (row >= T) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            bf16* o_row = o_base + row * O.st;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn)
                *reinterpret_cast<__nv_bfloat162*>(o_row + dn * 8 + 2 * c) = __floats2bfloat162_rn(
                    o_acc[m][dn][2 * half] * inv, o_acc[m][dn][2 * half + 1] * inv);
            if (c == 0) lse_base[row] = l > 0.f ? (m_run[m][half] + log2f(l)) * kLn2 : -INFINITY;
        }
}

// ============================================================================ backward pre-pass
// delta (B,H,T) fp32 = Σ_i dO·O per row; one warp per row.
template <typename T>
__global__ void flash_backward_delta(float* delta, Strided dO, Strided O, int H, int Tn, int D,
                                     int64_t rows) {
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const int lane = threadIdx.x % 32;
    const int t = (int)(r % Tn), h = (int)((r / Tn) % H), b = (int)(r / ((int64_t)Tn * H));
    const T* do_row = head_slice<const T>(dO, b, h) + t * dO.st;
    const T* o_row = head_slice<const T>(O, b, h) + t * O.st;
    float acc = 0.f;
    for (int i = lane; i < D; i += 32) acc += to_f32(do_row[i]) * to_f32(o_row[i]);
    acc = warp_sum(acc);
    if (lane == 0) delta[r] = acc;
}


// ============================================================================ bf16 dQ
// dq (B,H,T,d) = scale·Σ_j dS_ij·K_j with dS = P∘(dO·Vᵀ - Δ), P = exp(S - LSE). One block per
// query tile; every warp owns 16·kM query rows and loops over the key tiles of the band in
// order (skipping those its rows do not see, which add nothing).
template <int D, Mask kMask>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    flash_backward_dq_bf16(Strided dQ, Strided Q, Strided K, Strided V, Strided dO,
                           const float* lse, const float* delta, int H, int T, int window,
                           float scale_log2, float scale) {
    using Tr = FlashTraits<D>;
    constexpr int Br = Tr::kBrQ, Bc = Tr::kBcQ, kM = Tr::kDqM;
    extern __shared__ __align__(16) unsigned char flash_smem[];
    bf16* s_q = reinterpret_cast<bf16*>(flash_smem);  // (Br, D)
    bf16* s_do = s_q + Br * D;                        // (Br, D)
    bf16* s_k = s_do + Br * D;                        // 2 stages of (Bc, D)
    bf16* s_v = s_k + 2 * Bc * D;                     // 2 stages of (Bc, D)
    float* s_lse = reinterpret_cast<float*>(s_v + 2 * Bc * D);  // (Br)
    float* s_delta = s_lse + Br;                                // (Br)

    const int q_tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int q0 = q_tile * Br, q_end = q0 + Br - 1;
    const int kt_first = kMask == Mask::Window ? max(0, q0 - window + 1) / Bc : 0;
    const int kt_last = min(q_end, T - 1) / Bc;

    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    load_tile_async<Br, D, Tr::kThreads>(s_q, head_slice<const bf16>(Q, b, h), Q.st, q0, T, tid);
    load_tile_async<Br, D, Tr::kThreads>(s_do, head_slice<const bf16>(dO, b, h), dO.st, q0, T, tid);
    auto load_kv = [&](int kt, int stage) {  // K and V tile kt into stage
        load_tile_async<Bc, D, Tr::kThreads>(s_k + stage * Bc * D, k_base, K.st, kt * Bc, T, tid);
        load_tile_async<Bc, D, Tr::kThreads>(s_v + stage * Bc * D, v_base, V.st, kt * Bc, T, tid);
    };
    load_kv(kt_first, 0);
    cp_async_commit();

    // the warp's rows w0 .. w_end; this thread's rows: w0 + 16m + 8half + g
    const int w_first = warp * 16 * kM;
    const int w0 = q0 + w_first, w_end = w0 + 16 * kM - 1;
    const int64_t bh = (int64_t)b * H + h;
    // LSE (log2 units) and Δ of the tile's rows wait in shared memory (registers are short)
    for (int i = tid; i < Br; i += Tr::kThreads) {
        s_lse[i] = lse_log2_or_inf(lse + bh * T, q0 + i, T);
        s_delta[i] = q0 + i < T ? delta[bh * T + q0 + i] : 0.f;
    }  // visible after the first __syncthreads of the loop
    float dq_acc[kM][D / 8][4] = {};

    for (int kt = kt_first; kt <= kt_last; ++kt) {
        const int stage = (kt - kt_first) & 1;
        cp_async_next_stage(kt < kt_last, [&] { load_kv(kt + 1, stage ^ 1); });
        __syncthreads();
        const bf16* tile_k = s_k + stage * Bc * D;
        const bf16* tile_v = s_v + stage * Bc * D;
        const int k0 = kt * Bc, k_end = k0 + Bc - 1;
        const bool warp_sees_tile =
            k0 <= w_end && (kMask != Mask::Window || k_end >= w0 - window + 1);
        if (warp_sees_tile) {
            float s[kM][Bc / 8][4] = {};   // S = Q·Kᵀ, then P, then dS
            float dp[kM][Bc / 8][4] = {};  // dP = dO·Vᵀ
            warp_gemm_abt_m<D, Bc, kM>(s, s_q, w_first, tile_k, lane);
            warp_gemm_abt_m<D, Bc, kM>(dp, s_do, w_first, tile_v, lane);
            const bool edge = k_end > w0 || (kMask == Mask::Window && k0 < w_end - window + 1);
#pragma unroll
            for (int m = 0; m < kM; ++m)
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = w_first + 16 * m + 8 * (e >> 1) + g;  // within the tile
                        const float p = exp2f(fmaf(s[m][nt][e], scale_log2, -s_lse[row]));
                        s[m][nt][e] = p * (dp[m][nt][e] - s_delta[row]);
                    }
            if (edge)  // dS = 0 where masked (P would be exactly 0 there)
#pragma unroll
                for (int m = 0; m < kM; ++m)
#pragma unroll
                    for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (masked<kMask>(w0 + 16 * m + 8 * (e >> 1) + g,
                                              k0 + nt * 8 + 2 * c + (e & 1), window))
                                s[m][nt][e] = 0.f;
            warp_gemm_pv_m<D, Bc, kM>(dq_acc, s, tile_k, lane);  // dQ += dS·K
        }
        __syncthreads();
    }

    bf16* dq_base = head_slice<bf16>(dQ, b, h);
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = w0 + 16 * m + 8 * half + g;
            if (row >= T) continue;
            bf16* dq_row = dq_base + row * dQ.st;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn)
                *reinterpret_cast<__nv_bfloat162*>(dq_row + dn * 8 + 2 * c) = __floats2bfloat162_rn(
                    dq_acc[m][dn][2 * half] * scale, dq_acc[m][dn][2 * half + 1] * scale);
        }
}

// ============================================================================ bf16 dK, dV
// dv (B,H,T,d) = Σ_i P_ij·dO_i, dk = scale·Σ_i dS_ij·Q_i. One block per key tile; every warp owns
// 16·kM keys and computes the transposed score tiles Sᵀ = K·Qᵀ, whose accumulators are directly
// the A operands of Pᵀ·dO and dSᵀ·Q. The block walks the query tiles of the band in order; a
// warp skips the query tiles none of its keys is seen by (they add nothing).
template <int D, Mask kMask>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    flash_backward_dkdv_bf16(Strided dK, Strided dV, Strided Q, Strided K, Strided V, Strided dO,
                             const float* lse, const float* delta, int H, int T, int window,
                             float scale_log2, float scale) {
    using Tr = FlashTraits<D>;
    constexpr int Bc = Tr::kBcKV, Br = Tr::kBrKV, kM = Tr::kKvM;
    extern __shared__ __align__(16) unsigned char flash_smem[];
    bf16* s_k = reinterpret_cast<bf16*>(flash_smem);  // (Bc, D)
    bf16* s_v = s_k + Bc * D;                         // (Bc, D)
    bf16* s_q = s_v + Bc * D;                         // 2 stages of (Br, D)
    bf16* s_do = s_q + 2 * Br * D;                    // 2 stages of (Br, D)
    float* s_lse = reinterpret_cast<float*>(s_do + 2 * Br * D);  // 2 stages of (Br), log2 units
    float* s_delta = s_lse + 2 * Br;                             // 2 stages of (Br)

    const int k_tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;  // low key tiles are heaviest
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int k0 = k_tile * Bc, k_end = k0 + Bc - 1;
    const int qt_first = k0 / Br;
    const int q_last = kMask == Mask::Window ? min(T - 1, min(k_end, T - 1) + window - 1) : T - 1;
    const int qt_last = q_last / Br;

    const int64_t bh = (int64_t)b * H + h;
    const bf16* q_base = head_slice<const bf16>(Q, b, h);
    const bf16* do_base = head_slice<const bf16>(dO, b, h);
    auto load_query_tile = [&](int qt, int stage) {
        load_tile_async<Br, D, Tr::kThreads>(s_q + stage * Br * D, q_base, Q.st, qt * Br, T, tid);
        load_tile_async<Br, D, Tr::kThreads>(s_do + stage * Br * D, do_base, dO.st, qt * Br, T, tid);
        for (int i = tid; i < Br; i += Tr::kThreads) {
            const int t = qt * Br + i;
            s_lse[stage * Br + i] = lse_log2_or_inf(lse + bh * T, t, T);
            s_delta[stage * Br + i] = t < T ? delta[bh * T + t] : 0.f;
        }
    };
    load_tile_async<Bc, D, Tr::kThreads>(s_k, head_slice<const bf16>(K, b, h), K.st, k0, T, tid);
    load_tile_async<Bc, D, Tr::kThreads>(s_v, head_slice<const bf16>(V, b, h), V.st, k0, T, tid);
    load_query_tile(qt_first, 0);
    cp_async_commit();

    // the warp's keys wk0 .. wk_end; this thread's keys: wk0 + 16m + 8half + g
    const int w_first = warp * 16 * kM;
    const int wk0 = k0 + w_first, wk_end = wk0 + 16 * kM - 1;
    float dk_acc[kM][D / 8][4] = {}, dv_acc[kM][D / 8][4] = {};

    for (int qt = qt_first; qt <= qt_last; ++qt) {
        const int stage = (qt - qt_first) & 1;
        cp_async_next_stage(qt < qt_last, [&] { load_query_tile(qt + 1, stage ^ 1); });
        __syncthreads();
        const bf16* tile_q = s_q + stage * Br * D;
        const bf16* tile_do = s_do + stage * Br * D;
        const float* tile_lse = s_lse + stage * Br;
        const float* tile_delta = s_delta + stage * Br;
        const int i0 = qt * Br, i_end = i0 + Br - 1;
        const bool warp_seen =
            i_end >= wk0 && (kMask != Mask::Window || i0 - window + 1 <= wk_end);
        if (warp_seen) {
            float st[kM][Br / 8][4] = {};   // Sᵀ = K·Qᵀ (16·kM keys x Br queries), then Pᵀ
            float dpt[kM][Br / 8][4] = {};  // dPᵀ = V·dOᵀ, then dSᵀ
            warp_gemm_abt_m<D, Br, kM>(st, s_k, w_first, tile_q, lane);
            warp_gemm_abt_m<D, Br, kM>(dpt, s_v, w_first, tile_do, lane);
            const bool edge = wk_end > i0 || (kMask == Mask::Window && wk0 < i_end - window + 1);
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + 2 * c + (e & 1);  // query within the tile
                    const float lse_col = tile_lse[col], delta_col = tile_delta[col];
#pragma unroll
                    for (int m = 0; m < kM; ++m) {
                        const float p = exp2f(fmaf(st[m][nt][e], scale_log2, -lse_col));
                        st[m][nt][e] = p;
                        dpt[m][nt][e] = p * (dpt[m][nt][e] - delta_col);
                    }
                }
            if (edge)  // P = dS = 0 where masked (overwrites any inf/NaN computed there)
#pragma unroll
                for (int m = 0; m < kM; ++m)
#pragma unroll
                    for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (masked<kMask>(i0 + nt * 8 + 2 * c + (e & 1),
                                              wk0 + 16 * m + 8 * (e >> 1) + g, window))
                                st[m][nt][e] = dpt[m][nt][e] = 0.f;
            warp_gemm_pv_m<D, Br, kM>(dv_acc, st, tile_do, lane);  // dV += Pᵀ·dO
            warp_gemm_pv_m<D, Br, kM>(dk_acc, dpt, tile_q, lane);  // dK += dSᵀ·Q
        }
        __syncthreads();
    }

    bf16* dk_base = head_slice<bf16>(dK, b, h);
    bf16* dv_base = head_slice<bf16>(dV, b, h);
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = wk0 + 16 * m + 8 * half + g;
            if (key >= T) continue;
            bf16* dk_row = dk_base + key * dK.st;
            bf16* dv_row = dv_base + key * dV.st;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                *reinterpret_cast<__nv_bfloat162*>(dk_row + dn * 8 + 2 * c) = __floats2bfloat162_rn(
                    dk_acc[m][dn][2 * half] * scale, dk_acc[m][dn][2 * half + 1] * scale);
                *reinterpret_cast<__nv_bfloat162*>(dv_row + dn * 8 + 2 * c) =
                    __floats2bfloat162_rn(dv_acc[m][dn][2 * half], dv_acc[m][dn][2 * half + 1]);
            }
        }
}

// ============================================================================ fp32 path
// One warp per row, each lane holding D/32 elements; dot products reduce across the warp.
constexpr int kRowsPerBlock = 4;  // warps per block in the row-per-warp kernels

template <int E>
__device__ __forceinline__ float warp_dot(const float (&x)[E], const float* y, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc += x[e] * y[lane + 32 * e];
    return warp_sum(acc);
}

__device__ __forceinline__ bool row_of_warp(int64_t rows, int H, int T, int& b, int& h, int& t) {
    const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    if (r >= rows) return false;
    t = (int)(r % T);
    h = (int)((r / T) % H);
    b = (int)(r / ((int64_t)T * H));
    return true;
}

template <int D, Mask kMask>
__global__ void flash_forward_f32(Strided O, Strided Q, Strided K, Strided V, float* lse, int H,
                                  int T, int window, float scale_log2, int64_t rows) {
    constexpr int E = D / 32;
    int b, h, i;
    if (!row_of_warp(rows, H, T, b, h, i)) return;
    const int lane = threadIdx.x % 32;
    const float* q_row = head_slice<const float>(Q, b, h) + i * Q.st;
    const float* k_base = head_slice<const float>(K, b, h);
    const float* v_base = head_slice<const float>(V, b, h);
    float q[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        q[e] = q_row[lane + 32 * e] * scale_log2;
        acc[e] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    const int j_first = kMask == Mask::Window ? max(0, i - window + 1) : 0;
    for (int j = j_first; j <= i; ++j) {
        const float x = warp_dot(q, k_base + j * K.st, lane);
        const float m_new = fmaxf(m, x);
        const float alpha = exp2f(m - m_new), p = exp2f(x - m_new);
        l = l * alpha + p;
        const float* v_row = v_base + j * V.st;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + p * v_row[lane + 32 * e];
        m = m_new;
    }
    float* o_row = head_slice<float>(O, b, h) + i * O.st;
#pragma unroll
    for (int e = 0; e < E; ++e) o_row[lane + 32 * e] = acc[e] / l;  // l >= 1: key i is always seen
    if (lane == 0) lse[((int64_t)b * H + h) * T + i] = (m + log2f(l)) * kLn2;
}

// dq: one warp per query row i, over keys j of its band
template <int D, Mask kMask>
__global__ void flash_backward_dq_f32(Strided dQ, Strided Q, Strided K, Strided V, Strided dO,
                                      const float* lse, const float* delta, int H, int T,
                                      int window, float scale_log2, float scale, int64_t rows) {
    constexpr int E = D / 32;
    int b, h, i;
    if (!row_of_warp(rows, H, T, b, h, i)) return;
    const int lane = threadIdx.x % 32;
    const int64_t r = ((int64_t)b * H + h) * T + i;
    const float lse2 = lse_log2_or_inf(lse + r - i, i, T), delta_i = delta[r];
    const float* q_row = head_slice<const float>(Q, b, h) + i * Q.st;
    const float* do_row = head_slice<const float>(dO, b, h) + i * dO.st;
    const float* k_base = head_slice<const float>(K, b, h);
    const float* v_base = head_slice<const float>(V, b, h);
    float q[E], d_o[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        q[e] = q_row[lane + 32 * e] * scale_log2;
        d_o[e] = do_row[lane + 32 * e];
        acc[e] = 0.f;
    }
    const int j_first = kMask == Mask::Window ? max(0, i - window + 1) : 0;
    for (int j = j_first; j <= i; ++j) {
        const float* k_row = k_base + j * K.st;
        const float p = exp2f(warp_dot(q, k_row, lane) - lse2);
        const float ds = p * (warp_dot(d_o, v_base + j * V.st, lane) - delta_i);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += ds * k_row[lane + 32 * e];
    }
    float* dq_row = head_slice<float>(dQ, b, h) + i * dQ.st;
#pragma unroll
    for (int e = 0; e < E; ++e) dq_row[lane + 32 * e] = acc[e] * scale;
}

// dk, dv: one warp per key row j, over the queries i of its band
template <int D, Mask kMask>
__global__ void flash_backward_dkdv_f32(Strided dK, Strided dV, Strided Q, Strided K, Strided V,
                                        Strided dO, const float* lse, const float* delta, int H,
                                        int T, int window, float scale_log2, float scale,
                                        int64_t rows) {
    constexpr int E = D / 32;
    int b, h, j;
    if (!row_of_warp(rows, H, T, b, h, j)) return;
    const int lane = threadIdx.x % 32;
    const int64_t bh = (int64_t)b * H + h;
    const float* k_row = head_slice<const float>(K, b, h) + j * K.st;
    const float* v_row = head_slice<const float>(V, b, h) + j * V.st;
    const float* q_base = head_slice<const float>(Q, b, h);
    const float* do_base = head_slice<const float>(dO, b, h);
    float k[E], v[E], dk[E], dv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        k[e] = k_row[lane + 32 * e] * scale_log2;
        v[e] = v_row[lane + 32 * e];
        dk[e] = dv[e] = 0.f;
    }
    const int i_last = kMask == Mask::Window ? min(T - 1, j + window - 1) : T - 1;
    for (int i = j; i <= i_last; ++i) {
        const float* q_row = q_base + i * Q.st;
        const float* do_row = do_base + i * dO.st;
        const float p = exp2f(warp_dot(k, q_row, lane) - lse_log2_or_inf(lse + bh * T, i, T));
        const float ds = p * (warp_dot(v, do_row, lane) - delta[bh * T + i]);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            dv[e] += p * do_row[lane + 32 * e];
            dk[e] += ds * q_row[lane + 32 * e];
        }
    }
    float* dk_row = head_slice<float>(dK, b, h) + j * dK.st;
    float* dv_row = head_slice<float>(dV, b, h) + j * dV.st;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        dk_row[lane + 32 * e] = dk[e] * scale;
        dv_row[lane + 32 * e] = dv[e];
    }
}

// ============================================================================ launchers
// Kernels with more than 48 KiB of dynamic shared memory must opt in once per instantiation.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

struct FlashArgs {
    AttnShape s;
    int window;  // effective window, clamped to T (causal: T)
    float scale, scale_log2;
};

// The bf16 forward and dQ kernels: the Hopper wgmma ones (flash_wgmma.cu) on compute capability
// 9.0, else the mma.sync ones; FLASH_KERNELS=mma (or wgmma) in the environment forces one kind
// (tests, benchmarks).
bool use_wgmma() {
    const char* env = std::getenv("FLASH_KERNELS");
    if (env && std::string(env) == "mma") return false;
    if (env && std::string(env) == "wgmma") {
        CHECK(flash_wgmma_supported(), "FLASH_KERNELS=wgmma: this GPU is not compute capability 9.0; unset it");
        return true;
    }
    static const bool supported = flash_wgmma_supported();
    return supported;
}

template <int D, Mask kMask>
void launch_forward(const FlashArgs& a, DType dt, Strided o, Strided q, Strided k, Strided v,
                    float* lse) {
    if (dt == DType::BF16 && use_wgmma()) {
        flash_forward_wgmma(D, kMask == Mask::Window, o, q, k, v, lse, a.s.B, a.s.H, a.s.T, a.window,
                            a.scale_log2);
        return;
    }
    if (dt == DType::BF16) {
        using Tr = FlashTraits<D>;
        auto kernel = flash_forward_bf16<D, kMask>;
        set_smem(kernel, Tr::kFwdSmem);
        dim3 grid(ceil_div(a.s.T, Tr::kBrF), a.s.H, a.s.B);
        kernel<<<grid, Tr::kThreads, Tr::kFwdSmem>>>(o, q, k, v, lse, a.s.H, a.s.T, a.window,
                                                     a.scale_log2);
    } else {
        const int64_t rows = (int64_t)a.s.rows();
        flash_forward_f32<D, kMask><<<ceil_div(rows, kRowsPerBlock), 32 * kRowsPerBlock>>>(
            o, q, k, v, lse, a.s.H, a.s.T, a.window, a.scale_log2, rows);
    }
    CUDA_LAUNCH_CHECK();
}

template <int D, Mask kMask>
void launch_backward(const FlashArgs& a, DType dt, Strided dq, Strided dk, Strided dv, Strided d_o,
                     Strided q, Strided k, Strided v, Strided o, const float* lse, float* delta) {
    const int64_t rows = (int64_t)a.s.rows();
    const int H = a.s.H, T = a.s.T;
    const int delta_blocks = ceil_div(rows, kRowsPerBlock);
    if (dt == DType::BF16) {
        using Tr = FlashTraits<D>;
        flash_backward_delta<bf16><<<delta_blocks, 32 * kRowsPerBlock>>>(delta, d_o, o, H, T, D, rows);
        CUDA_LAUNCH_CHECK();
        if (use_wgmma()) {
            const bool windowed = kMask == Mask::Window;
            flash_backward_dkdv_wgmma(D, windowed, dk, dv, q, k, v, d_o, lse, delta, a.s.B, H, T, a.window,
                                      a.scale_log2, a.scale);
            flash_backward_dq_wgmma(D, windowed, dq, q, k, v, d_o, lse, delta, a.s.B, H, T, a.window, a.scale_log2,
                                    a.scale);
            return;
        }
        auto dkdv = flash_backward_dkdv_bf16<D, kMask>;
        set_smem(dkdv, Tr::kDkvSmem);
        dkdv<<<dim3(ceil_div(T, Tr::kBcKV), H, a.s.B), Tr::kThreads, Tr::kDkvSmem>>>(
            dk, dv, q, k, v, d_o, lse, delta, H, T, a.window, a.scale_log2, a.scale);
        CUDA_LAUNCH_CHECK();
        auto dq_kernel = flash_backward_dq_bf16<D, kMask>;
        set_smem(dq_kernel, Tr::kDqSmem);
        dq_kernel<<<dim3(ceil_div(T, Tr::kBrQ), H, a.s.B), Tr::kThreads, Tr::kDqSmem>>>(
            dq, q, k, v, d_o, lse, delta, H, T, a.window, a.scale_log2, a.scale);
        CUDA_LAUNCH_CHECK();
    } else {
        flash_backward_delta<float><<<delta_blocks, 32 * kRowsPerBlock>>>(delta, d_o, o, H, T, D, rows);
        CUDA_LAUNCH_CHECK();
        flash_backward_dkdv_f32<D, kMask><<<delta_blocks, 32 * kRowsPerBlock>>>(
            dk, dv, q, k, v, d_o, lse, delta, H, T, a.window, a.scale_log2, a.scale, rows);
        CUDA_LAUNCH_CHECK();
        flash_backward_dq_f32<D, kMask><<<delta_blocks, 32 * kRowsPerBlock>>>(
            dq, q, k, v, d_o, lse, delta, H, T, a.window, a.scale_log2, a.scale, rows);
        CUDA_LAUNCH_CHECK();
    }
}

// ============================================================================ the module
class CudaFlashAttention : public Attention {
public:
    // window <= 0: causal softmax; otherwise the sliding window of W keys
    CudaFlashAttention(std::string name, int window) : name_(std::move(name)), window_(window) {}

    std::string name() const override { return name_; }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // LSE (B,H,T)
    size_t workspace_bytes(const AttnShape& s) const override {
        return s.rows() * sizeof(float);  // Δ (B,H,T) fp32
    }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"o", o}, {"q", q}, {"k", k}, {"v", v}});
        CHECK(saved != nullptr, "%s attention: forward needs the saved buffer (%zu floats)",
              name_.c_str(), saved_size(s));
        const FlashArgs a = args(s);
        dispatch(s.d, [&](auto d_tag, auto mask_tag) {
            launch_forward<decltype(d_tag)::value, decltype(mask_tag)::value>(
                a, dt, strided(o), strided(q), strided(k), strided(v), saved);
        });
    }

    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                  HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k,
                  HeadTensor v, HeadTensor o, const float* saved, Tensor params,
                  void* workspace) override {
        const DType dt = check_tensors(s, {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dout", dout},
                                           {"q", q}, {"k", k}, {"v", v}, {"o", o}});
        CHECK(saved != nullptr && workspace != nullptr,
              "%s attention: backward needs the saved LSE and a workspace of %zu bytes",
              name_.c_str(), workspace_bytes(s));
        const FlashArgs a = args(s);
        float* delta = static_cast<float*>(workspace);
        dispatch(s.d, [&](auto d_tag, auto mask_tag) {
            launch_backward<decltype(d_tag)::value, decltype(mask_tag)::value>(
                a, dt, strided(dq), strided(dk), strided(dv), strided(dout), strided(q),
                strided(k), strided(v), strided(o), saved, delta);
        });
    }

private:
    template <int V> using IntTag = std::integral_constant<int, V>;
    template <Mask V> using MaskTag = std::integral_constant<Mask, V>;

    // Calls fn(IntTag<D>, MaskTag<M>) for the head dim and mask of this variant.
    template <typename Fn>
    void dispatch(int d, Fn&& fn) const {
        const bool window = window_ > 0;
        if (d == 64 && !window) fn(IntTag<64>{}, MaskTag<Mask::Causal>{});
        else if (d == 64) fn(IntTag<64>{}, MaskTag<Mask::Window>{});
        else if (!window) fn(IntTag<128>{}, MaskTag<Mask::Causal>{});
        else fn(IntTag<128>{}, MaskTag<Mask::Window>{});
    }

    FlashArgs args(const AttnShape& s) const {
        FlashArgs a;
        a.s = s;
        a.window = window_ > 0 ? std::min(window_, s.T) : s.T;
        a.scale = 1.f / std::sqrt((float)s.d);
        a.scale_log2 = a.scale * kLog2e;
        return a;
    }

    // All tensors share one dtype; bf16 tiles are read with 16-byte copies, so their rows must
    // be 16-byte aligned. Returns the dtype.
    DType check_tensors(const AttnShape& s,
                        std::initializer_list<std::pair<const char*, HeadTensor>> ts) const {
        CHECK(s.d == 64 || s.d == 128,
              "%s attention (CUDA flash): head dim d=%d is not supported; use n_embd/n_head = 64 "
              "or 128", name_.c_str(), s.d);
        CHECK(s.B >= 1 && s.H >= 1 && s.T >= 1 && s.H <= 65535 && s.B <= 65535,
              "%s attention: bad shape B=%d H=%d T=%d", name_.c_str(), s.B, s.H, s.T);
        return attention_dtype(name_.c_str(), ts, true);
    }

    std::string name_;
    int window_;
};

}  // namespace

std::unique_ptr<Attention> make_cuda_softmax_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaFlashAttention>("softmax", 0);
}

std::unique_ptr<Attention> make_cuda_local_attention(const AttnConfig& cfg) {
    CHECK(cfg.window >= 1, "--window %d: the local attention window must be >= 1 key", cfg.window);
    return std::make_unique<CudaFlashAttention>("local", cfg.window);
}
