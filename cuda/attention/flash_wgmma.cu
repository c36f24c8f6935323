// Flash attention forward on Hopper warpgroup MMA (wgmma, sm_90a), the bf16 path of flash.cu on
// compute capability 9.0. Same algorithm and outputs as flash_forward_bf16 (flash.cu): online
// softmax over key tiles in the log2 domain, O and the natural-log LSE written at the end.
//
// One block of two warpgroups (256 threads) per (query tile of 128 rows, h, b), heaviest tiles
// first; warpgroup g owns rows 64g..64g+63. Q (128 x d) is loaded once into a 128-byte-swizzled
// shared tile; K and V tiles of 128 keys are double-buffered with cp.async (wgmma.cuh's tile
// layout, fence.proxy.async before the barrier). Per key tile each warpgroup runs
//   S = Q·Kᵀ    wgmma m64n128k16, both operands from shared memory (K-major), d/16 slices;
//   the mask (diagonal and window-edge tiles only) and the online softmax in registers: the
//   wgmma accumulator layout is mma.sync's per warp (warp w of the group owns rows 16w..16w+15),
//   so online_softmax_tile of flash_traits.cuh serves as is;
//   O += P·V    wgmma m64n{d}k16 with P from registers (the S accumulators rounded to bf16) and
//   V from shared memory (MN-major), 8 slices.
// No warp specialisation, TMA or intra-warpgroup overlap yet (FA3's next steps: WGMMA.md); the
// two warpgroups of a block interleave on the SM.
#include "cuda/attention/flash_wgmma.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "check.h"
#include "cuda/attention/strided.cuh"
#include "cuda/attention/wgmma.cuh"
#include "cuda/common.cuh"

namespace {

constexpr int kThreads = 256;  // two warpgroups
constexpr int kBr = 128;       // query rows per block (64 per warpgroup)
constexpr int kBc = 128;       // keys per tile
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct WgmmaFwd {
    using QTile = wgmma::SwizzledTile<kBr, D>;
    using KVTile = wgmma::SwizzledTile<kBc, D>;
    static constexpr int kSmem = QTile::kBytes + 4 * KVTile::kBytes;  // Q, 2 stages of K and of V
};

template <bool kWindow>
__device__ __forceinline__ bool masked(int query, int key, int window) {
    return key > query || (kWindow && key < query - window + 1);
}

// The two products of both kernels, by one warpgroup (wgmma.cuh's synchronisation recipe).
// acc (64 x N) = A·Bᵀ over the D/16 k16 slices: A the warpgroup's 64 rows of a K-major tile
// (desc_a), B the N rows of a K-major tile (desc_b). Issued only: the caller zeroes and fences the
// accumulators before, and commits, waits and fences after (several products share one group).
template <int N, int D, class ATile, class BTile>
__device__ __forceinline__ void issue_abt(float (&acc)[N / 2], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wgmma::mma_ss<N, 0, 0>(acc, wgmma::desc_advance(desc_a, wgmma::k_major_slice_bytes<ATile>(kk)),
                               wgmma::desc_advance(desc_b, wgmma::k_major_slice_bytes<BTile>(kk)), kk > 0);
}
// acc (64 x D) += bf16(P)·B, complete: P (64 x K) the fp32 accumulators p, rounded to bf16 A
// fragments in registers; B (K x D) a row-major tile read as the MN-major operand (desc_b).
template <int D, int K>
__device__ __forceinline__ void accumulate_pb(float (&acc)[D / 2], const float (&p)[K / 2], uint64_t desc_b) {
    uint32_t a[K / 16][4];
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        wgmma::acc_to_a(a[kk], p, kk);
        wgmma::fence_operand(a[kk]);
    }
    wgmma::fence_operand(acc);
    wgmma::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
        wgmma::mma_rs<D, 1>(acc, a[kk], wgmma::desc_advance(desc_b, wgmma::mn_major_slice_bytes(kk)), 1);
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operand(acc);
}

template <int D, bool kWindow>
__global__ void __launch_bounds__(kThreads)
    flash_forward_wgmma_kernel(Strided O, Strided Q, Strided K, Strided V, float* lse, int H, int T,
                               int window, float scale_log2) {
    using QTile = typename WgmmaFwd<D>::QTile;
    using KVTile = typename WgmmaFwd<D>::KVTile;
    extern __shared__ __align__(1024) unsigned char smem[];
    bf16* s_q = reinterpret_cast<bf16*>(smem);
    bf16* s_k = reinterpret_cast<bf16*>(smem + QTile::kBytes);                       // 2 stages
    bf16* s_v = reinterpret_cast<bf16*>(smem + QTile::kBytes + 2 * KVTile::kBytes);  // 2 stages
    constexpr int kStage = KVTile::kBytes / 2;  // elements per stage

    const int q_tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int q0 = q_tile * kBr, q_end = q0 + kBr - 1;
    const int kt_first = kWindow ? max(0, q0 - window + 1) / kBc : 0;
    const int kt_last = min(q_end, T - 1) / kBc;

    const bf16* q_base = head_slice<const bf16>(Q, b, h);
    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    wgmma::load_tile_async<QTile, kThreads>(s_q, q_base + (int64_t)q0 * Q.st, Q.st, T - q0, tid);
    auto load_kv = [&](int kt, int stage) {
        const int k0 = kt * kBc;
        wgmma::load_tile_async<KVTile, kThreads>(s_k + stage * kStage, k_base + (int64_t)k0 * K.st, K.st, T - k0, tid);
        wgmma::load_tile_async<KVTile, kThreads>(s_v + stage * kStage, v_base + (int64_t)k0 * V.st, V.st, T - k0, tid);
    };
    load_kv(kt_first, 0);
    cp_async_commit();

    // this thread's rows: r_lo = wg_row0 + 16·warp + g and r_lo + 8
    const int wg_row0 = q0 + 64 * wg, wg_row_end = wg_row0 + 63;
    const int r_lo = wg_row0 + 16 * warp + g;
    float o[1][D / 8][4] = {};  // unnormalised O (the wgmma accumulator layout = o[0][j][e])
    float m_run[1][2] = {{-INFINITY, -INFINITY}}, l_run[1][2] = {{0.f, 0.f}};
    const uint64_t desc_q = wgmma::desc_k_major(smem_addr(s_q), 64 * wg);
    auto& o_flat = reinterpret_cast<float(&)[D / 2]>(o);

    for (int kt = kt_first; kt <= kt_last; ++kt) {
        const int stage = (kt - kt_first) & 1;
        cp_async_next_stage(kt < kt_last, [&] { load_kv(kt + 1, stage ^ 1); });
        wgmma::fence_proxy_async();
        __syncthreads();
        const uint64_t desc_k = wgmma::desc_k_major(smem_addr(s_k + stage * kStage));
        const uint64_t desc_v = wgmma::desc_mn_major<KVTile>(smem_addr(s_v + stage * kStage));
        const int k0 = kt * kBc, k_end = k0 + kBc - 1;
        // every warpgroup runs every tile (wgmma is warpgroup-wide); rows that see no key of it
        // get -inf scores and an unchanged state
        float s[1][kBc / 8][4];
        auto& s_flat = reinterpret_cast<float(&)[kBc / 2]>(s);
#pragma unroll
        for (int i = 0; i < kBc / 2; ++i) s_flat[i] = 0.f;
        wgmma::fence_operand(s_flat);
        wgmma::warpgroup_fence();
        issue_abt<kBc, D, QTile, KVTile>(s_flat, desc_q, desc_k);  // S = Q·Kᵀ
        wgmma::commit_group();
        wgmma::wait_group<0>();
        wgmma::fence_operand(s_flat);

        const bool edge = k_end > wg_row0 || (kWindow && k0 < wg_row_end - window + 1);
        if (edge) {
#pragma unroll
            for (int j = 0; j < kBc / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (masked<kWindow>(r_lo + (e & 2) * 4, k0 + 8 * j + 2 * c + (e & 1), window))
                        s[0][j][e] = -INFINITY;
        }
        online_softmax_tile<D, kBc, 1>(s, m_run, l_run, o, scale_log2);

        accumulate_pb<D, kBc>(o_flat, s_flat, desc_v);  // O += P·V
        __syncthreads();  // the stage read here is overwritten by the next prefetch
    }

    // O /= l; LSE = (m + log2 l)·ln 2; a row without keys gives O = 0, LSE = -inf
    bf16* o_base = head_slice<bf16>(O, b, h);
    float* lse_base = lse + ((int64_t)b * H + h) * T;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float l = l_run[0][half];
        l += __shfl_xor_sync(kFullMask, l, 1);
        l += __shfl_xor_sync(kFullMask, l, 2);
        const int row = r_lo + 8 * half;
        if (row >= T) continue;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* o_row = o_base + (int64_t)row * O.st;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<__nv_bfloat162*>(o_row + dn * 8 + 2 * c) =
                __floats2bfloat162_rn(o[0][dn][2 * half] * inv, o[0][dn][2 * half + 1] * inv);
        if (c == 0) lse_base[row] = l > 0.f ? (m_run[0][half] + log2f(l)) * kLn2 : -INFINITY;
    }
}

// ============================================================================ dQ
// dq (B,H,T,d) = scale·Σ_j dS_ij·K_j with dS = P∘(dO·Vᵀ − Δ), P = exp2(S·scale_log2 − LSE₂): the
// mma.sync flash_backward_dq_bf16 of flash.cu on wgmma. One block of two warpgroups per query tile
// of 128 rows (64 per warpgroup); Q and dO loaded once, K and V tiles of kBcDq keys double-buffered.
// Per key tile: S = Q·Kᵀ and dP = dO·Vᵀ (both SS, K-major, one commit group), dS in registers
// (masked entries 0), dQ += dS·K (RS, K as the MN-major operand of the same shared tile).
template <int D>
struct WgmmaDq {
    static constexpr int kBc = D == 64 ? 128 : 64;  // keys per tile: S, dP and dQ fit the registers
    using QTile = wgmma::SwizzledTile<kBr, D>;
    using KVTile = wgmma::SwizzledTile<kBc, D>;
    static constexpr int kSmem = 2 * QTile::kBytes + 4 * KVTile::kBytes;  // Q, dO, 2 stages of K and of V
};

template <int D, bool kWindow>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dq_wgmma_kernel(Strided dQ, Strided Q, Strided K, Strided V, Strided dO, const float* lse,
                                   const float* delta, int H, int T, int window, float scale_log2, float scale) {
    using Cfg = WgmmaDq<D>;
    using QTile = typename Cfg::QTile;
    using KVTile = typename Cfg::KVTile;
    constexpr int Bc = Cfg::kBc;
    extern __shared__ __align__(1024) unsigned char smem[];
    bf16* s_q = reinterpret_cast<bf16*>(smem);
    bf16* s_do = reinterpret_cast<bf16*>(smem + QTile::kBytes);
    bf16* s_k = reinterpret_cast<bf16*>(smem + 2 * QTile::kBytes);                       // 2 stages
    bf16* s_v = reinterpret_cast<bf16*>(smem + 2 * QTile::kBytes + 2 * KVTile::kBytes);  // 2 stages
    constexpr int kStage = KVTile::kBytes / 2;

    const int q_tile = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int q0 = q_tile * kBr, q_end = q0 + kBr - 1;
    const int kt_first = kWindow ? max(0, q0 - window + 1) / Bc : 0;
    const int kt_last = min(q_end, T - 1) / Bc;

    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    wgmma::load_tile_async<QTile, kThreads>(s_q, head_slice<const bf16>(Q, b, h) + (int64_t)q0 * Q.st, Q.st,
                                            T - q0, tid);
    wgmma::load_tile_async<QTile, kThreads>(s_do, head_slice<const bf16>(dO, b, h) + (int64_t)q0 * dO.st, dO.st,
                                            T - q0, tid);
    auto load_kv = [&](int kt, int stage) {
        const int k0 = kt * Bc;
        wgmma::load_tile_async<KVTile, kThreads>(s_k + stage * kStage, k_base + (int64_t)k0 * K.st, K.st, T - k0, tid);
        wgmma::load_tile_async<KVTile, kThreads>(s_v + stage * kStage, v_base + (int64_t)k0 * V.st, V.st, T - k0, tid);
    };
    load_kv(kt_first, 0);
    cp_async_commit();

    // this thread's rows r_lo, r_lo + 8: their LSE (log2 units) and Δ
    const int wg_row0 = q0 + 64 * wg, wg_row_end = wg_row0 + 63;
    const int r_lo = wg_row0 + 16 * warp + g;
    const int64_t bh = (int64_t)b * H + h;
    float lse2[2], dlt[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r_lo + 8 * half;
        lse2[half] = lse_log2_or_inf(lse + bh * T, row, T);
        dlt[half] = row < T ? delta[bh * T + row] : 0.f;
    }
    float dq[D / 2] = {};
    const uint64_t desc_q = wgmma::desc_k_major(smem_addr(s_q), 64 * wg);
    const uint64_t desc_do = wgmma::desc_k_major(smem_addr(s_do), 64 * wg);

    for (int kt = kt_first; kt <= kt_last; ++kt) {
        const int stage = (kt - kt_first) & 1;
        cp_async_next_stage(kt < kt_last, [&] { load_kv(kt + 1, stage ^ 1); });
        wgmma::fence_proxy_async();
        __syncthreads();
        const uint32_t k_addr = smem_addr(s_k + stage * kStage);
        const uint64_t desc_k = wgmma::desc_k_major(k_addr);
        const uint64_t desc_kmn = wgmma::desc_mn_major<KVTile>(k_addr);
        const uint64_t desc_v = wgmma::desc_k_major(smem_addr(s_v + stage * kStage));
        const int k0 = kt * Bc, k_end = k0 + Bc - 1;
        float s[Bc / 2], dp[Bc / 2];  // S, then P, then dS; dP
#pragma unroll
        for (int i = 0; i < Bc / 2; ++i) s[i] = dp[i] = 0.f;
        wgmma::fence_operand(s);
        wgmma::fence_operand(dp);
        wgmma::warpgroup_fence();
        issue_abt<Bc, D, QTile, KVTile>(s, desc_q, desc_k);    // S = Q·Kᵀ
        issue_abt<Bc, D, QTile, KVTile>(dp, desc_do, desc_v);  // dP = dO·Vᵀ
        wgmma::commit_group();
        wgmma::wait_group<0>();
        wgmma::fence_operand(s);
        wgmma::fence_operand(dp);

        const bool edge = k_end > wg_row0 || (kWindow && k0 < wg_row_end - window + 1);
#pragma unroll
        for (int j = 0; j < Bc / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 4 * j + e, half = e >> 1;
                const float p = exp2f(fmaf(s[i], scale_log2, -lse2[half]));
                s[i] = p * (dp[i] - dlt[half]);
                if (edge && masked<kWindow>(r_lo + 8 * half, k0 + 8 * j + 2 * c + (e & 1), window))
                    s[i] = 0.f;  // dS = 0 where masked (P would be exactly 0 there)
            }
        accumulate_pb<D, Bc>(dq, s, desc_kmn);  // dQ += dS·K
        __syncthreads();  // the stage read here is overwritten by the next prefetch
    }

    bf16* dq_base = head_slice<bf16>(dQ, b, h);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r_lo + 8 * half;
        if (row >= T) continue;
        bf16* dq_row = dq_base + (int64_t)row * dQ.st;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<__nv_bfloat162*>(dq_row + dn * 8 + 2 * c) =
                __floats2bfloat162_rn(dq[4 * dn + 2 * half] * scale, dq[4 * dn + 2 * half + 1] * scale);
    }
}

// ============================================================================ dK, dV
// dv (B,H,T,d) = Σ_i P_ij·dO_i, dk = scale·Σ_i dS_ij·Q_i: the mma.sync flash_backward_dkdv_bf16 of
// flash.cu on wgmma. One block of two warpgroups per key tile of 128 keys (warpgroup g owns keys
// 64g..64g+63; the lowest key tiles, which see the most queries, first); K and V loaded once, the
// query tiles of 64 rows of the band (Q, dO, their LSE and Δ) double-buffered. Per query tile:
// Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (SS, K-major), Pᵀ and dSᵀ in registers (masked entries 0), then
// dV += Pᵀ·dO and dK += dSᵀ·Q (RS, dO and Q as the MN-major operands of their row-major tiles).
constexpr int kBcKv = 128;  // keys per block
constexpr int kBrKv = 64;   // queries per inner tile
template <int D>
struct WgmmaDkv {
    using KTile = wgmma::SwizzledTile<kBcKv, D>;
    using QTile = wgmma::SwizzledTile<kBrKv, D>;
    // K, V; 2 stages of Q and of dO; then 2 stages of the LSE (log2) and Δ of the query tile
    static constexpr int kTiles = 2 * KTile::kBytes + 4 * QTile::kBytes;
    static constexpr int kSmem = kTiles + 2 * 2 * kBrKv * (int)sizeof(float);
};

template <int D, bool kWindow>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dkdv_wgmma_kernel(Strided dK, Strided dV, Strided Q, Strided K, Strided V, Strided dO,
                                     const float* lse, const float* delta, int H, int T, int window, float scale_log2,
                                     float scale) {
    using Cfg = WgmmaDkv<D>;
    using KTile = typename Cfg::KTile;
    using QTile = typename Cfg::QTile;
    constexpr int Br = kBrKv;
    extern __shared__ __align__(1024) unsigned char smem[];
    bf16* s_k = reinterpret_cast<bf16*>(smem);
    bf16* s_v = reinterpret_cast<bf16*>(smem + KTile::kBytes);
    bf16* s_q = reinterpret_cast<bf16*>(smem + 2 * KTile::kBytes);                      // 2 stages
    bf16* s_do = reinterpret_cast<bf16*>(smem + 2 * KTile::kBytes + 2 * QTile::kBytes);  // 2 stages
    float* s_lse = reinterpret_cast<float*>(smem + Cfg::kTiles);  // 2 stages of (Br), log2 units
    float* s_delta = s_lse + 2 * Br;                              // 2 stages of (Br)
    constexpr int kStage = QTile::kBytes / 2;

    const int k_tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const int k0 = k_tile * kBcKv, k_end = k0 + kBcKv - 1;
    const int qt_first = k0 / Br;
    const int q_last = kWindow ? min(T - 1, min(k_end, T - 1) + window - 1) : T - 1;
    const int qt_last = q_last / Br;

    const int64_t bh = (int64_t)b * H + h;
    const bf16* q_base = head_slice<const bf16>(Q, b, h);
    const bf16* do_base = head_slice<const bf16>(dO, b, h);
    auto load_query_tile = [&](int qt, int stage) {
        const int q0 = qt * Br;
        wgmma::load_tile_async<QTile, kThreads>(s_q + stage * kStage, q_base + (int64_t)q0 * Q.st, Q.st, T - q0, tid);
        wgmma::load_tile_async<QTile, kThreads>(s_do + stage * kStage, do_base + (int64_t)q0 * dO.st, dO.st, T - q0,
                                                tid);
        for (int i = tid; i < Br; i += kThreads) {
            const int t = q0 + i;
            s_lse[stage * Br + i] = lse_log2_or_inf(lse + bh * T, t, T);
            s_delta[stage * Br + i] = t < T ? delta[bh * T + t] : 0.f;
        }
    };
    wgmma::load_tile_async<KTile, kThreads>(s_k, head_slice<const bf16>(K, b, h) + (int64_t)k0 * K.st, K.st, T - k0,
                                            tid);
    wgmma::load_tile_async<KTile, kThreads>(s_v, head_slice<const bf16>(V, b, h) + (int64_t)k0 * V.st, V.st, T - k0,
                                            tid);
    load_query_tile(qt_first, 0);
    cp_async_commit();

    // this warpgroup's keys wg_k0 .. wg_k0 + 63; this thread's keys kr_lo and kr_lo + 8
    const int wg_k0 = k0 + 64 * wg, wg_k_end = wg_k0 + 63;
    const int kr_lo = wg_k0 + 16 * warp + g;
    float dk[D / 2] = {}, dv[D / 2] = {};
    const uint64_t desc_k = wgmma::desc_k_major(smem_addr(s_k), 64 * wg);
    const uint64_t desc_v = wgmma::desc_k_major(smem_addr(s_v), 64 * wg);

    for (int qt = qt_first; qt <= qt_last; ++qt) {
        const int stage = (qt - qt_first) & 1;
        cp_async_next_stage(qt < qt_last, [&] { load_query_tile(qt + 1, stage ^ 1); });
        wgmma::fence_proxy_async();
        __syncthreads();
        const uint32_t q_addr = smem_addr(s_q + stage * kStage), do_addr = smem_addr(s_do + stage * kStage);
        const float* tile_lse = s_lse + stage * Br;
        const float* tile_delta = s_delta + stage * Br;
        const int i0 = qt * Br, i_end = i0 + Br - 1;
        // every warpgroup runs every tile (wgmma is warpgroup-wide); keys no query of it sees get P = 0
        float st[Br / 2], dpt[Br / 2];  // Sᵀ then Pᵀ; dPᵀ then dSᵀ (64 keys x Br queries)
#pragma unroll
        for (int i = 0; i < Br / 2; ++i) st[i] = dpt[i] = 0.f;
        wgmma::fence_operand(st);
        wgmma::fence_operand(dpt);
        wgmma::warpgroup_fence();
        issue_abt<Br, D, KTile, QTile>(st, desc_k, wgmma::desc_k_major(q_addr));    // Sᵀ = K·Qᵀ
        issue_abt<Br, D, KTile, QTile>(dpt, desc_v, wgmma::desc_k_major(do_addr));  // dPᵀ = V·dOᵀ
        wgmma::commit_group();
        wgmma::wait_group<0>();
        wgmma::fence_operand(st);
        wgmma::fence_operand(dpt);

        const bool edge = wg_k_end > i0 || (kWindow && wg_k0 < i_end - window + 1);
#pragma unroll
        for (int j = 0; j < Br / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 4 * j + e, col = 8 * j + 2 * c + (e & 1);  // query within the tile
                const float p = exp2f(fmaf(st[i], scale_log2, -tile_lse[col]));
                st[i] = p;
                dpt[i] = p * (dpt[i] - tile_delta[col]);
                if (edge && masked<kWindow>(i0 + col, kr_lo + 8 * (e >> 1), window))
                    st[i] = dpt[i] = 0.f;  // P = dS = 0 where masked (overwrites any inf/NaN there)
            }
        accumulate_pb<D, Br>(dv, st, wgmma::desc_mn_major<QTile>(do_addr));  // dV += Pᵀ·dO
        accumulate_pb<D, Br>(dk, dpt, wgmma::desc_mn_major<QTile>(q_addr));  // dK += dSᵀ·Q
        __syncthreads();  // the stage read here is overwritten by the next prefetch
    }

    bf16* dk_base = head_slice<bf16>(dK, b, h);
    bf16* dv_base = head_slice<bf16>(dV, b, h);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = kr_lo + 8 * half;
        if (key >= T) continue;
        bf16* dk_row = dk_base + (int64_t)key * dK.st;
        bf16* dv_row = dv_base + (int64_t)key * dV.st;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            *reinterpret_cast<__nv_bfloat162*>(dk_row + dn * 8 + 2 * c) =
                __floats2bfloat162_rn(dk[4 * dn + 2 * half] * scale, dk[4 * dn + 2 * half + 1] * scale);
            *reinterpret_cast<__nv_bfloat162*>(dv_row + dn * 8 + 2 * c) =
                __floats2bfloat162_rn(dv[4 * dn + 2 * half], dv[4 * dn + 2 * half + 1]);
        }
    }
}

template <int D, bool kWindow>
void launch_dkdv(Strided dk, Strided dv, Strided q, Strided k, Strided v, Strided d_o, const float* lse,
                 const float* delta, int B, int H, int T, int window, float scale_log2, float scale) {
    constexpr int smem = WgmmaDkv<D>::kSmem;
    auto kernel = flash_backward_dkdv_wgmma_kernel<D, kWindow>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(ceil_div(T, kBcKv), H, B);
    kernel<<<grid, kThreads, smem>>>(dk, dv, q, k, v, d_o, lse, delta, H, T, window, scale_log2, scale);
    CUDA_LAUNCH_CHECK();
}

template <int D, bool kWindow>
void launch_dq(Strided dq, Strided q, Strided k, Strided v, Strided d_o, const float* lse, const float* delta,
               int B, int H, int T, int window, float scale_log2, float scale) {
    constexpr int smem = WgmmaDq<D>::kSmem;
    auto kernel = flash_backward_dq_wgmma_kernel<D, kWindow>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(ceil_div(T, kBr), H, B);
    kernel<<<grid, kThreads, smem>>>(dq, q, k, v, d_o, lse, delta, H, T, window, scale_log2, scale);
    CUDA_LAUNCH_CHECK();
}

template <int D, bool kWindow>
void launch(Strided o, Strided q, Strided k, Strided v, float* lse, int B, int H, int T, int window,
            float scale_log2) {
    constexpr int smem = WgmmaFwd<D>::kSmem;
    auto kernel = flash_forward_wgmma_kernel<D, kWindow>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const dim3 grid(ceil_div(T, kBr), H, B);
    kernel<<<grid, kThreads, smem>>>(o, q, k, v, lse, H, T, window, scale_log2);
    CUDA_LAUNCH_CHECK();
}

}  // namespace

bool flash_wgmma_supported() {
    int dev = 0, major = 0, minor = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    return major == 9 && minor == 0;
}

void flash_forward_wgmma(int d, bool windowed, Strided o, Strided q, Strided k, Strided v, float* lse,
                         int B, int H, int T, int window, float scale_log2) {
    CHECK(d == 64 || d == 128, "flash attention (wgmma): head dim %d is not 64 or 128", d);
    if (d == 64)
        windowed ? launch<64, true>(o, q, k, v, lse, B, H, T, window, scale_log2)
                 : launch<64, false>(o, q, k, v, lse, B, H, T, window, scale_log2);
    else
        windowed ? launch<128, true>(o, q, k, v, lse, B, H, T, window, scale_log2)
                 : launch<128, false>(o, q, k, v, lse, B, H, T, window, scale_log2);
}

void flash_backward_dq_wgmma(int d, bool windowed, Strided dq, Strided q, Strided k, Strided v, Strided d_o,
                             const float* lse, const float* delta, int B, int H, int T, int window, float scale_log2,
                             float scale) {
    CHECK(d == 64 || d == 128, "flash attention (wgmma): head dim %d is not 64 or 128", d);
    if (d == 64)
        windowed ? launch_dq<64, true>(dq, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale)
                 : launch_dq<64, false>(dq, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale);
    else
        windowed ? launch_dq<128, true>(dq, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale)
                 : launch_dq<128, false>(dq, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale);
}

void flash_backward_dkdv_wgmma(int d, bool windowed, Strided dk, Strided dv, Strided q, Strided k, Strided v,
                               Strided d_o, const float* lse, const float* delta, int B, int H, int T, int window,
                               float scale_log2, float scale) {
    CHECK(d == 64 || d == 128, "flash attention (wgmma): head dim %d is not 64 or 128", d);
    if (d == 64)
        windowed ? launch_dkdv<64, true>(dk, dv, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale)
                 : launch_dkdv<64, false>(dk, dv, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale);
    else
        windowed ? launch_dkdv<128, true>(dk, dv, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale)
                 : launch_dkdv<128, false>(dk, dv, q, k, v, d_o, lse, delta, B, H, T, window, scale_log2, scale);
}
