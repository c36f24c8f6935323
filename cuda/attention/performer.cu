// `performer` on CUDA: FAVOR+ causal linear attention with positive orthogonal random features
// (../../shared/ATTENTION.md §3), forward and exact backward. The definition is that of the CPU
// reference (src/attention/performer.cpp, formulas in src/attention/performer_features.h): the
// same Ω (performer_features(cfg, layer, step, d), drawn on the host and uploaded when the draw
// index changes), x̃ = d^(-1/4)·x, φ = m^(-1/2)·(exp(ω·x̃ − ‖x̃‖²/2 − c) + ε) with cq_i the query's
// own max and ck_j the running max over keys ≤ j, w_ij = (φq_i·φk_j)·exp(ck_j − ck_i) for j ≤ i,
// o_i = Σ w_ij v_j / R_i with R_i = Σ w_ij (o_i = 0, no gradient, where R_i ≤ 1e-30).
//
// Per (b, h) the positions are cut into chunks of kChunk = 64 (the CPU's kPerformerChunk); every
// per-position array of the workspace is padded to Tp = nc·64 rows per head (zero rows past T),
// so that chunk z = bh·nc + c of every array sits at a fixed stride and each product below is ONE
// strided-batched cuBLAS GEMM over all chunks of all heads. The operands of those GEMMs are
// materialised in the storage type E (bf16 for bf16 inputs: tensor cores, fp32 accumulation;
// fp32 for fp32 inputs: fp32 without TF32, the checking path).
//   forward   1. logits a = x̃·Ωᵀ − ‖x̃‖²/2 of q and k (one fp32 GEMM, operands augmented with
//                −‖x̃‖²/2 and a ones column) and their maxima per 64-feature tile
//             2. cq (row max), ck (running max: a block scan)                        -> saved
//             3. Φq, Φk from the logits, Φk' = ρ∘Φk (ρ_j = exp(ck_j − ck_last(c))), V1 = [v | 1 | 1]
//             4. U_c = Φk'_cᵀ·V1_c (m × (d+2) per chunk), exclusive prefix over chunks in fixed
//                order (frame ck_last(c−1)): S_c
//             5. W_c = tril(Φq_c·Φk_cᵀ ∘ exp(ck_j − ck_i))                                  (64 × 64)
//             6. out_i = r_i·(Φq_i·S_c) + (W_c·V1_c)_i,  r_i = exp(ck_last(c−1) − ck_i) (0 in chunk 0)
//             7. o = out[:d]/R (guarded), R = out[d] saved
//   backward  the logits and operands again, and Φq' = (r/R)∘Φq; D_i = dO_i·o_i (fp32) and the
//             rows [dO | −D] (g_i = [dO_i | −D_i]/R_i is the gradient of out_i); S_c as in the
//             forward; suffix states G_c = Σ_{i after chunk c} exp(ck_last(c) − ck_i)·φq_i·g_iᵀ
//             (local Φq'_cᵀ·[dO | −D]_c, then a reverse scan); W'_ij = W_ij/R_i and
//             M_ij = exp(ck_j − ck_i)·(dO_i·v_j − D_i)/R_i; then
//             dφq = (r/R)∘([dO | −D]·S_cᵀ) + M·Φk,   dφk = ρ∘(V1·G_cᵀ) + Mᵀ·Φq,   dv = Φk'·G_c + W'ᵀ·dO,
//             and through the feature map: da = dφ·m^(-1/2)·exp(a − c) in fp32 from the logits,
//             dx = d^(-1/4)·(Ωᵀ·da − x̃·Σ_f da_f) (one GEMM: da·[Ω | 1]).
// Cancellation: for nearly one-hot rows o_i ≈ v_j, so [dO | −D]·S_cᵀ and V1·G_cᵀ are small
// differences of large sums (Σ φ·dO·v − D·Σ φ). bf16 storage keeps them fp32-accurate: the rows
// [v | 1 | 1] and [dO | −D_hi | −D_lo] are exact (D = D_hi + D_lo), every frame and 1/R factor
// sits on a feature row (Φk', Φq': its rounding scales both sides of the difference alike) or is
// applied after the product, and the backward's states are hi + lo bf16 pairs (two GEMMs each);
// M subtracts D in fp32 before rounding. (Rounding [dO | −D]/R and the states to bf16 alone gave
// dq errors of 1.7e-2 at inputs ×8; now 7e-3, as the other bf16 variants.)
// All exponents are ≤ 0: nothing overflows, whatever the input magnitude. Sums run in a fixed
// order, no atomics (cuBLAS is reproducible run to run on one GPU): bitwise deterministic.
// Speed (H100, bf16, B=2 H=12 T=32768 d=64, m=256, forward+backward): 58.9 ms (first version)
// -> 49.1 ms (per-tile stabilisers, batched scans) -> 46.7 ms (Ω products as cuBLAS SGEMMs)
// with 64×64 TF32 tile kernels that computed the features in their operand loaders
// (latency-bound, ~8 TFLOP/s) -> 23.8 ms with the materialised operands and strided-batched
// cuBLAS GEMMs of this file (our softmax: 42.9 ms in the same run).
// Math: bf16 storage rounds the features (and Φk', Φq'), the chunk scores W, W', M and the
// forward's states to bf16 (2^-9 relative); the logits, D, the normaliser and da stay fp32;
// Ωᵀ·da runs in TF32. fp32 storage keeps fp32 accuracy throughout.
//
// saved (fp32): R, cq, ck — three (B,H,T) arrays, as the CPU.
// workspace, linear in T (N = B·H·Tp padded rows, mld = m and dl = d + 2 rounded up to 8, nc
// chunks per head, Sz = B·H·nc·m·dl), sized for AttnShape::dtype: fp32 logits and the two parts
// of their gradients 6·N·mld (the local states Sz share the intra-chunk part's region), chunk
// scores N·64, two row buffers 2·N·dl, tile maxima, the augmented rows of the Ω GEMMs 4·N·xld;
// in the storage type: Φ and Φ' 4·N·mld, V1 and [dO | −D] 2·N·dl, S and G hi + lo 4·Sz, W and M
// 2·N·64. At m = 256, d = 64: 13 KB per (b, h, t) in bf16 (10 GB at B·H·T = 786k), 18 KB in fp32.
// Any head dim d ≥ 1 and feature count m ≥ 1; inputs bf16 or fp32 (all tensors one dtype),
// strided HeadTensors; outputs in the input dtype; all accumulation in fp32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention/performer_features.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/common.cuh"
#include "cuda/attention/strided.cuh"

namespace {

constexpr int kChunk = kPerformerChunk;  // positions per chunk (64)
constexpr int kThreads = 256;            // threads per block of every kernel here (but the stabiliser's)
constexpr int kTile = 64;                // features per tile of the logit maxima

inline int round8(int x) { return (x + 7) / 8 * 8; }
// Row stride of the augmented rows (xaug, gaug) and of Ω1 = [Ω | 1 | 0..]: d + 1 rounded up to 4
// floats (16-byte rows for cuBLAS).
inline int aug_ld(int d) { return (d + 1 + 3) / 4 * 4; }

// Sizes and constants of one call.
struct Dims {
    int B, H, T, d, m, nc;  // nc = number of chunks per head
    int Tp;                 // nc·64: rows per head of the padded arrays
    int mld, dl;            // row strides: m and d + 2 (V1 = [v | 1 | 1]) rounded up to 8
    size_t N;               // B·H·Tp padded rows
    float in_scale;         // d^(-1/4), rounded as the CPU rounds it
    float phi_scale;        // m^(-1/2)
    float epsilon;          // ε
};

// The workspace. Padded row p = bh·Tp + t; chunk z = bh·nc + c covers rows z·64 .. z·64+63.
template <typename E>
struct Work {
    float* logits;      // (2N, mld) a of q (rows 0..N-1), then of k
    float* dphi_state;  // (2N, mld) backward: the inter-chunk part of dφ (before its row scale) of q,
                        //   then of k; then da of q and k in place
    float* dphi_local;  // (2N, mld) backward: the intra-chunk part of dφ of q, then of k
    float* state;       // (B·H·nc, m, dl) local chunk states U_c (forward) or L_c (backward);
                        //   the region of dphi_local (dead by the time dphi_local is written)
    float* score;       // (B·H·nc, 64, 64) raw chunk products Φq·Φkᵀ, then dO·vᵀ
    float* out_s;       // (N, dl) forward: Φq·S_c; backward: dv = Φk'·G_c + W'ᵀ·dO
    float* out_l;       // (N, dl) forward: W·V1
    float* dot;         // (N) backward: D_i = dO_i·o_i
    float* tile_max;    // (2N, ceil(m/64)) max of the logits over each 64-feature tile (q, then k)
    float* xaug;        // (2N, xld) rows [x̃ | −‖x̃‖²/2 | 0..] of q, then of k: the logits GEMM's A
    float* gaug;        // (2N, xld) backward: [Ωᵀ·da | Σ_f da | 0..] of q, then of k
    E* phi;             // (2N, mld) Φq, then Φk
    E* phi_scaled;      // (2N, mld) Φq' = (r/R)∘Φq (backward only), then Φk' = ρ∘Φk
    E* v_one;           // (N, dl) V1 = [v | 1 | 1 | 0..]
    E* dod;             // (N, dl) backward: [dO | −D_hi | −D_lo | 0..]
    E* s_hi, *s_lo;     // (B·H·nc, m, dl) prefix states S_c = s_hi + s_lo (s_lo: bf16 backward only)
    E* g_hi, *g_lo;     // (B·H·nc, m, dl) suffix states G_c = g_hi + g_lo (g_lo: bf16 only)
    E* w;               // (B·H·nc, 64, 64) W (forward) or W' = W/R (backward)
    E* mm;              // (B·H·nc, 64, 64) M
};

// Sizes in floats, each array rounded up to 64 floats (256-byte aligned); the storage-type
// arrays take elem_bytes per element (2 for bf16, 4 for fp32). The local states (dead after the
// scans) and the intra-chunk dφ (written after them) share one region.
struct WorkLayout {
    size_t elem_bytes;
    size_t rows_m, states, scores, rows_d, dots, tmax, aug;  // fp32 arrays
    size_t e_rows_m, e_states, e_scores, e_rows_d;          // storage-type arrays
    static size_t round64(size_t n) { return (n + 63) / 64 * 64; }
    WorkLayout(const Dims& D, size_t elem) : elem_bytes(elem) {
        const size_t bhc = (size_t)D.B * D.H * D.nc;
        auto e = [&](size_t n) { return round64((n * elem + 3) / 4); };
        rows_m = round64(2 * D.N * D.mld);
        states = round64(bhc * D.m * D.dl);
        scores = round64(bhc * kChunk * kChunk);
        rows_d = round64(D.N * D.dl);
        dots = round64(D.N);
        tmax = round64(2 * D.N * ((D.m + kTile - 1) / kTile));
        aug = round64(2 * D.N * aug_ld(D.d));
        e_rows_m = e(2 * D.N * D.mld);
        e_states = e(bhc * D.m * D.dl);
        e_scores = e(bhc * kChunk * kChunk);
        e_rows_d = e(D.N * D.dl);
    }
    size_t total() const {
        return 2 * rows_m + std::max(states, rows_m) + scores + 2 * rows_d + dots + tmax + 2 * aug +  // fp32
               2 * e_rows_m + 2 * e_rows_d + 4 * e_states + 2 * e_scores;                              // E
    }
    template <typename E>
    Work<E> carve(float* p) const {
        Work<E> w;
        auto take = [&](size_t n) { float* at = p; p += n; return at; };
        w.logits = take(rows_m);
        w.dphi_state = take(rows_m);
        w.state = p;  // shares its region with dphi_local
        w.dphi_local = take(std::max(states, rows_m));
        w.score = take(scores);
        w.out_s = take(rows_d);
        w.out_l = take(rows_d);
        w.dot = take(dots);
        w.tile_max = take(tmax);
        w.xaug = take(aug);
        w.gaug = take(aug);
        w.phi = reinterpret_cast<E*>(take(e_rows_m));
        w.phi_scaled = reinterpret_cast<E*>(take(e_rows_m));
        w.v_one = reinterpret_cast<E*>(take(e_rows_d));
        w.dod = reinterpret_cast<E*>(take(e_rows_d));
        w.s_hi = reinterpret_cast<E*>(take(e_states));
        w.s_lo = reinterpret_cast<E*>(take(e_states));
        w.g_hi = reinterpret_cast<E*>(take(e_states));
        w.g_lo = reinterpret_cast<E*>(take(e_states));
        w.w = reinterpret_cast<E*>(take(e_scores));
        w.mm = reinterpret_cast<E*>(take(e_scores));
        return w;
    }
};

// bf16 storage splits the states (and D) into hi + lo pairs where cancellation needs more than
// bf16's 8 bits; fp32 storage needs no lo part.
template <typename E>
constexpr bool kSplit = std::is_same<E, bf16>::value;

// Key stabiliser at the last position of chunk c (ckh: one head's (T) array).
__device__ __forceinline__ float ck_last(const float* ckh, int c, int T) {
    return ckh[min(c * kChunk + kChunk - 1, T - 1)];
}
// r_t = exp(ck_last(c−1) − ck_t) for t in chunk c ≥ 1 (0 in chunk 0: its prefix state is empty).
__device__ __forceinline__ float query_frame(const float* ckh, int t, int T) {
    const int c = t / kChunk;
    return c > 0 ? expf(ck_last(ckh, c - 1, T) - ckh[t]) : 0.f;
}
// ρ_t = exp(ck_t − ck_last(c)) for t in chunk c.
__device__ __forceinline__ float key_frame(const float* ckh, int t, int T) {
    return expf(ckh[t] - ck_last(ckh, t / kChunk, T));
}

// Position of padded row p (of N): head bh, time t (t ≥ T: a padding row).
struct PaddedRow {
    int bh, t;
};
__device__ __forceinline__ PaddedRow padded_row(const Dims& D, size_t p) {
    return PaddedRow{(int)(p / D.Tp), (int)(p % D.Tp)};
}

// Feature row n of 2N (q's padded rows, then k's): its stabiliser (cq or ck) and its frame factor,
// ρ_t for k rows, r_t/R_t for q rows when saved_r is given (0 for guarded rows; 0 without saved_r);
// live = false and both 0 in padding rows.
struct FeatureRow {
    bool is_k, live;
    float stab, row_scale;
};
__device__ __forceinline__ FeatureRow feature_row(const Dims& D, size_t n, const float* __restrict__ cq,
                                                  const float* __restrict__ ck, const float* __restrict__ saved_r) {
    FeatureRow f{n >= D.N, false, 0.f, 0.f};
    const PaddedRow r = padded_row(D, f.is_k ? n - D.N : n);
    f.live = r.t < D.T;
    if (!f.live) return f;
    const float* ckh = ck + (size_t)r.bh * D.T;
    if (f.is_k) {
        f.stab = ckh[r.t];
        f.row_scale = key_frame(ckh, r.t, D.T);
    } else {
        f.stab = cq[(size_t)r.bh * D.T + r.t];
        const float R = saved_r != nullptr ? saved_r[(size_t)r.bh * D.T + r.t] : 0.f;
        f.row_scale = R > 0.f ? query_frame(ckh, r.t, D.T) / R : 0.f;
    }
    return f;
}

// ================================================================ row kernels
// xaug (2N, xld): row p < N is q's padded row p, row N + p is k's; padding rows are zero. One warp per row.
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    augment_rows_kernel(Dims D, Strided Q, Strided K, float* xaug, int xld) {
    const size_t n = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    if (n >= 2 * D.N) return;
    const int lane = threadIdx.x % 32;
    const bool is_k = n >= D.N;
    const PaddedRow r = padded_row(D, is_k ? n - D.N : n);
    float* out = xaug + n * xld;
    if (r.t >= D.T) {
        for (int col = lane; col < xld; col += 32) out[col] = 0.f;
        return;
    }
    const Strided X = is_k ? K : Q;
    const Tin* x = head_slice<const Tin>(X, r.bh / D.H, r.bh % D.H) + (int64_t)r.t * X.st;
    float sum = 0.f;
    for (int col = lane; col < D.d; col += 32) {
        const float xt = D.in_scale * to_f32(x[col]);
        out[col] = xt;
        sum += xt * xt;
    }
    sum = warp_sum(sum);
    for (int col = D.d + lane; col < xld; col += 32) out[col] = col == D.d ? -0.5f * sum : 0.f;
}

// tile_max[n][ft] = max over the features of tile ft of logits row n (2N rows). One warp per row.
__global__ void __launch_bounds__(kThreads) tile_max_kernel(Dims D, const float* __restrict__ logits, float* tile_max) {
    const size_t n = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    if (n >= 2 * D.N) return;
    const int lane = threadIdx.x % 32, f_tiles = (D.m + kTile - 1) / kTile;
    const float* a = logits + n * D.mld;
    for (int ft = 0; ft < f_tiles; ft++) {
        float mx = -INFINITY;
        for (int f = ft * kTile + lane; f < min(D.m, (ft + 1) * kTile); f += 32) mx = fmaxf(mx, a[f]);
        mx = warp_max(mx);
        if (lane == 0) tile_max[n * f_tiles + ft] = mx;
    }
}

// Stabilisers: cq_t = max_f aq[t][f]; ck_t = max_{t' ≤ t} max_f ak[t'][f], from the per-tile
// maxima. Grid (B·H), block 1024: each thread takes kStabRun consecutive positions, a block scan
// carries the running max across threads and across rounds of 1024·kStabRun positions. (Max is
// exact: any order gives the same bits.)
constexpr int kStabRun = 16;
__global__ void __launch_bounds__(1024)
    stabiliser_kernel(Dims D, const float* __restrict__ qmax, const float* __restrict__ kmax, float* cq, float* ck) {
    __shared__ float warp_total[32];
    __shared__ float carry;
    const int bh = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int f_tiles = (D.m + kTile - 1) / kTile;
    const size_t row0 = (size_t)bh * D.T, prow0 = (size_t)bh * D.Tp;
    if (threadIdx.x == 0) carry = -INFINITY;
    __syncthreads();
    for (int base = 0; base < D.T; base += 1024 * kStabRun) {
        const int t_begin = base + threadIdx.x * kStabRun;
        float run[kStabRun];
        float mine = -INFINITY;  // running max over this thread's positions
#pragma unroll
        for (int u = 0; u < kStabRun; u++) {
            const int t = t_begin + u;
            float mq = -INFINITY, mk = -INFINITY;
            if (t < D.T) {
                for (int f = 0; f < f_tiles; f++) {
                    mq = fmaxf(mq, qmax[(prow0 + t) * f_tiles + f]);
                    mk = fmaxf(mk, kmax[(prow0 + t) * f_tiles + f]);
                }
                cq[row0 + t] = mq;
            }
            mine = fmaxf(mine, mk);
            run[u] = mine;
        }
        // exclusive max over the threads before this one: warp scan, then the warp totals
        float incl = mine;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const float y = __shfl_up_sync(kFullMask, incl, off);
            if (lane >= off) incl = fmaxf(incl, y);
        }
        if (lane == 31) warp_total[warp] = incl;
        float excl = __shfl_up_sync(kFullMask, incl, 1);
        if (lane == 0) excl = -INFINITY;
        __syncthreads();
        float before = carry;
        for (int w = 0; w < warp; w++) before = fmaxf(before, warp_total[w]);
        before = fmaxf(before, excl);
#pragma unroll
        for (int u = 0; u < kStabRun; u++)
            if (t_begin + u < D.T) ck[row0 + t_begin + u] = fmaxf(before, run[u]);
        __syncthreads();  // everyone has read carry and warp_total
        if (threadIdx.x == 1023) carry = fmaxf(before, mine);
        __syncthreads();
    }
}

// Features (2N, mld) in E from the logits: φ = m^(-1/2)·(exp(a − c) + ε), c = cq (q rows) or ck
// (k rows) -> phi; the same scaled by its row's frame factor -> phi_scaled: Φk' = ρ∘Φk, and
// Φq' = (r/R)∘Φq when saved_r is given (backward; 0 for guarded rows). 0 in padding rows and
// columns. Four features per thread (mld is a multiple of 8).
template <typename E>
__global__ void __launch_bounds__(kThreads)
    features_kernel(Dims D, const float* __restrict__ logits, const float* __restrict__ cq,
                    const float* __restrict__ ck, const float* __restrict__ saved_r, E* phi, E* phi_scaled) {
    const size_t quads = (size_t)D.mld / 4, idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= 2 * D.N * quads) return;
    const size_t n = idx / quads;
    const int f0 = (int)(idx % quads) * 4;
    const FeatureRow row = feature_row(D, n, cq, ck, saved_r);
    const bool scaled = row.is_k || saved_r != nullptr;
    const float4 a = *reinterpret_cast<const float4*>(logits + n * D.mld + f0);
    const float av[4] = {a.x, a.y, a.z, a.w};
    E* out = phi + n * D.mld + f0;
    E* out_scaled = phi_scaled + n * D.mld + f0;
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const float x = row.live && f0 + u < D.m ? D.phi_scale * (expf(av[u] - row.stab) + D.epsilon) : 0.f;
        out[u] = from_f32<E>(x);
        if (scaled) out_scaled[u] = from_f32<E>(row.row_scale * x);
    }
}

// Value rows V1 (N, dl) in E: [v_t | 1 | 1 | 0..] (exact in bf16: the ones column twice, so that
// the states carry Σφ in two columns, against −D_hi and −D_lo in the backward); 0 in padding
// rows. One thread per element.
template <typename Tin, typename E>
__global__ void __launch_bounds__(kThreads) value_rows_kernel(Dims D, Strided V, E* v_one) {
    const size_t idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= D.N * D.dl) return;
    const size_t p = idx / D.dl;
    const int col = (int)(idx % D.dl);
    const PaddedRow r = padded_row(D, p);
    float x = 0.f;
    if (r.t < D.T) {
        if (col < D.d)
            x = to_f32(head_slice<const Tin>(V, r.bh / D.H, r.bh % D.H)[(int64_t)r.t * V.st + col]);
        else if (col <= D.d + 1)
            x = 1.f;
    }
    v_one[idx] = from_f32<E>(x);
}

// Scans over chunks, per (b, h) and state element, in chunk order (deterministic), from the local
// states (fp32) into out_hi (+ out_lo = the rounding remainder, when given) in E:
//   prefix (kSuffix = false): out[c] = S_c, frame ck_last(c−1): S_0 = 0, S_{c+1} = exp(ck_last(c−1) − ck_last(c))·S_c + U_c
//   suffix (kSuffix = true):  out[c] = G_c, frame ck_last(c): G_{nc−1} = 0, G_{c−1} = exp(ck_last(c−1) − ck_last(c))·G_c + L_c
// Grid (ceil(m·dl/256), B·H). Each thread loads kScanBatch chunks' values at once (independent
// loads in flight) before the dependent updates: the plain loop waited one memory latency per chunk
// (1.4 ms per scan at B·H = 4, T = 32k, 17% of the Performer's time then).
constexpr int kScanBatch = 8;
template <bool kSuffix, typename E>
__global__ void __launch_bounds__(kThreads)
    scan_states_kernel(Dims D, const float* __restrict__ ck, const float* __restrict__ local, E* out_hi, E* out_lo) {
    const size_t per_chunk = (size_t)D.m * D.dl;
    const size_t e = (size_t)blockIdx.x * kThreads + threadIdx.x;
    const int bh = blockIdx.y;
    if (e >= per_chunk) return;
    const float* ckh = ck + (size_t)bh * D.T;
    const size_t base = (size_t)bh * D.nc * per_chunk + e;
    float run = 0.f;
    for (int i0 = 0; i0 < D.nc; i0 += kScanBatch) {
        float u[kScanBatch];
#pragma unroll
        for (int k = 0; k < kScanBatch; k++) {
            const int c = kSuffix ? D.nc - 1 - (i0 + k) : i0 + k;
            u[k] = i0 + k < D.nc ? local[base + c * per_chunk] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kScanBatch; k++) {
            if (i0 + k >= D.nc) break;
            const int c = kSuffix ? D.nc - 1 - (i0 + k) : i0 + k;
            const E hi = from_f32<E>(run);
            out_hi[base + c * per_chunk] = hi;
            if (out_lo != nullptr) out_lo[base + c * per_chunk] = from_f32<E>(run - to_f32(hi));
            if (c > 0)
                run = run * expf(ck_last(ckh, c - 1, D.T) - ck_last(ckh, c, D.T)) + u[k];
            else if (!kSuffix)
                run = u[k];  // S_1 = U_0 (the suffix scan ends at chunk 0)
        }
    }
}

// Chunk scores (64 × 64 per chunk, 0 above the diagonal and at padding positions) from the raw
// products in `score`, with e_ij = exp(ck_j − ck_i):
//   kW       W_ij  = raw_ij·e_ij                      (raw = Φq·Φkᵀ)
//   kWOverR  W'_ij = raw_ij·e_ij / R_i                (0 for guarded rows)
//   kM       M_ij  = (raw_ij − D_i)·e_ij / R_i        (raw = dO·V1ᵀ over the d value columns)
// One thread per element.
enum class Score { kW, kWOverR, kM };
template <Score kMode, typename E>
__global__ void __launch_bounds__(kThreads)
    chunk_scores_kernel(Dims D, const float* __restrict__ raw, const float* __restrict__ ck,
                        const float* __restrict__ saved_r, const float* __restrict__ dots, E* out) {
    const size_t idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= (size_t)D.B * D.H * D.nc * kChunk * kChunk) return;
    const size_t z = idx / (kChunk * kChunk);
    const int i = (int)(idx / kChunk % kChunk), j = (int)(idx % kChunk);
    const int bh = (int)(z / D.nc), c = (int)(z % D.nc), ti = c * kChunk + i, tj = c * kChunk + j;
    float val = 0.f;
    if (j <= i && ti < D.T) {
        const float* ckh = ck + (size_t)bh * D.T;
        const float frame = expf(ckh[tj] - ckh[ti]);
        if (kMode == Score::kW) {
            val = raw[idx] * frame;
        } else {
            const float R = saved_r[(size_t)bh * D.T + ti];
            const float inv_r = R > 0.f ? 1.f / R : 0.f;
            const float x = kMode == Score::kM ? raw[idx] - dots[(size_t)bh * D.Tp + ti] : raw[idx];
            val = x * frame * inv_r;
        }
    }
    out[idx] = from_f32<E>(val);
}

constexpr float kMinDenominator = 1e-30f;  // as the CPU: R ≤ this gives o = 0, no gradient

// out_t = r_t·out_s_t + out_l_t;  o_t = out_t[:d] / R_t (0 where R_t ≤ 1e-30), saved R (0 where
// guarded). One warp per (unpadded) row.
template <typename Tout>
__global__ void __launch_bounds__(kThreads)
    normalise_kernel(Dims D, const float* __restrict__ out_s, const float* __restrict__ out_l,
                     const float* __restrict__ ck, Strided O, float* saved_r) {
    const size_t row = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)D.B * D.H * D.T) return;
    const int t = (int)(row % D.T), bh = (int)(row / D.T), b = bh / D.H, h = bh % D.H;
    const size_t p = (size_t)bh * D.Tp + t;
    const float r = query_frame(ck + (size_t)bh * D.T, t, D.T);
    const float* os = out_s + p * D.dl;
    const float* ol = out_l + p * D.dl;
    const float R = r * os[D.d] + ol[D.d];
    const bool ok = R > kMinDenominator;
    Tout* o = head_slice<Tout>(O, b, h) + (int64_t)t * O.st;
    for (int col = lane; col < D.d; col += 32) o[col] = from_f32<Tout>(ok ? (r * os[col] + ol[col]) / R : 0.f);
    if (lane == 0) saved_r[row] = ok ? R : 0.f;
}

// ================================================================ backward row kernels
// Per padded row: D_t = dO_t·o_t (fp32) -> dots; dod_t = [dO_t | −D_hi | −D_lo | 0..] in E, with
// D_hi + D_lo = D_t (hi/lo only in bf16): dO is exact in its own dtype, so the products with
// [v | 1 | 1] cancel as in fp32 (o_t ≈ v_j for nearly one-hot rows). 0 in padding rows. One warp per row.
template <typename Tin, typename E>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(Dims D, Strided dO, Strided O, float* dots, E* dod) {
    const size_t p = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (p >= D.N) return;
    const PaddedRow r = padded_row(D, p);
    E* row = dod + p * D.dl;
    if (r.t >= D.T) {
        for (int col = lane; col < D.dl; col += 32) row[col] = from_f32<E>(0.f);
        if (lane == 0) dots[p] = 0.f;
        return;
    }
    const int b = r.bh / D.H, h = r.bh % D.H;
    const Tin* dout = head_slice<const Tin>(dO, b, h) + (int64_t)r.t * dO.st;
    const Tin* o = head_slice<const Tin>(O, b, h) + (int64_t)r.t * O.st;
    float dot = 0.f;
    for (int col = lane; col < D.d; col += 32) {
        const float x = to_f32(dout[col]);
        dot += x * to_f32(o[col]);
        row[col] = from_f32<E>(x);
    }
    dot = warp_sum(dot);
    const E hi = from_f32<E>(-dot);
    for (int col = D.d + lane; col < D.dl; col += 32)
        row[col] = col == D.d ? hi : col == D.d + 1 ? from_f32<E>(-dot - to_f32(hi)) : from_f32<E>(0.f);
    if (lane == 0) dots[p] = dot;
}

// dv_t = out_s_t[:d] (= Φk'·G_c + W'ᵀ·dO) in the input dtype. One thread per element.
template <typename Tin>
__global__ void __launch_bounds__(kThreads) dv_kernel(Dims D, const float* __restrict__ dv_rows, Strided dV) {
    const size_t idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= (size_t)D.B * D.H * D.T * D.d) return;
    const size_t row = idx / D.d;
    const int col = (int)(idx % D.d), t = (int)(row % D.T), bh = (int)(row / D.T);
    const size_t p = ((size_t)bh * D.Tp + t) * D.dl + col;
    head_slice<Tin>(dV, bh / D.H, bh % D.H)[(int64_t)t * dV.st + col] = from_f32<Tin>(dv_rows[p]);
}

// da = (row_scale·dφ_state + dφ_local)·m^(-1/2)·exp(a − c), into dphi_state (2N, mld; q rows
// then k rows), from the fp32 logits; row_scale = r/R (q rows; 0 for guarded rows) or ρ (k rows).
// 0 in padding rows and columns. Four features per thread.
__global__ void __launch_bounds__(kThreads)
    feature_map_grad_kernel(Dims D, const float* __restrict__ logits, const float* __restrict__ cq,
                            const float* __restrict__ ck, const float* __restrict__ saved_r, float* dphi_state,
                            const float* __restrict__ dphi_local) {
    const size_t quads = (size_t)D.mld / 4, idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= 2 * D.N * quads) return;
    const size_t n = idx / quads;
    const int f0 = (int)(idx % quads) * 4;
    const FeatureRow row = feature_row(D, n, cq, ck, saved_r);
    const float4 a = *reinterpret_cast<const float4*>(logits + n * D.mld + f0);
    const float4 loc = *reinterpret_cast<const float4*>(dphi_local + n * D.mld + f0);
    float4* g = reinterpret_cast<float4*>(dphi_state + n * D.mld + f0);
    float4 x = *g;
    auto one = [&](float st, float lo, float av, int u) {
        return row.live && f0 + u < D.m ? (row.row_scale * st + lo) * D.phi_scale * expf(av - row.stab) : 0.f;
    };
    x.x = one(x.x, loc.x, a.x, 0);
    x.y = one(x.y, loc.y, a.y, 1);
    x.z = one(x.z, loc.z, a.z, 2);
    x.w = one(x.w, loc.w, a.w, 3);
    *g = x;
}

// Through the feature map, for q and k: dx_t = d^(-1/4)·(Σ_f da_t,f·Ω[f] − x̃_t·Σ_f da_t,f), from
// gaug = [Ωᵀ·da | Σ_f da] (one GEMM over every padded row of q and k: da · Ω1, host side) and
// x̃ in xaug. One thread per element of dq and dk.
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    feature_grad_kernel(Dims D, const float* __restrict__ gaug, const float* __restrict__ xaug, int xld, Strided dQ,
                        Strided dK) {
    const size_t rows = (size_t)D.B * D.H * D.T;
    const size_t idx = (size_t)blockIdx.x * kThreads + threadIdx.x;
    if (idx >= 2 * rows * D.d) return;
    const size_t n = idx / D.d;
    const int col = (int)(idx % D.d);
    const bool is_k = n >= rows;
    const size_t row = is_k ? n - rows : n;
    const int t = (int)(row % D.T), bh = (int)(row / D.T), b = bh / D.H, h = bh % D.H;
    const size_t p = (is_k ? D.N : 0) + (size_t)bh * D.Tp + t;
    const Strided dX = is_k ? dK : dQ;
    const float* g = gaug + p * xld;
    const float xt = xaug[p * xld + col];
    head_slice<Tin>(dX, b, h)[(int64_t)t * dX.st + col] = from_f32<Tin>(D.in_scale * (g[col] - xt * g[D.d]));
}

// ================================================================ GEMMs (host side)
// cuBLAS types of the storage type E: bf16 operands with fp32 accumulation (tensor cores), or
// fp32 without TF32.
template <typename E>
struct GemmTypes {
    static constexpr cudaDataType_t data = CUDA_R_32F;
    static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F_PEDANTIC;
};
template <>
struct GemmTypes<bf16> {
    static constexpr cudaDataType_t data = CUDA_R_16BF;
    static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
};

// One operand of a chunk GEMM: a row-major matrix per chunk z at ptr + z·stride with row stride
// ld, used as stored (trans = false) or transposed.
template <typename E>
struct Operand {
    const E* ptr;
    int ld;
    int64_t stride;
    bool trans;
};

// For every chunk z < count: row-major C_z (M × N, fp32) = op(A_z)·op(B_z) + beta·C_z, as
// strided-batched cuBLAS GEMMs of at most 65535 chunks each. (Row-major C = op(A)·op(B) is
// column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swap.)
template <typename E>
void chunk_gemm(cublasHandle_t blas, int64_t count, int M, int N, int K, Operand<E> A, Operand<E> B, float beta,
                float* C, int ldc, int64_t stride_c) {
    constexpr int64_t kMaxBatch = 65535;
    const float one = 1.f;
    for (int64_t z0 = 0; z0 < count; z0 += kMaxBatch) {
        const int batch = (int)std::min(kMaxBatch, count - z0);
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(
            blas, B.trans ? CUBLAS_OP_T : CUBLAS_OP_N, A.trans ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &one,
            B.ptr + z0 * B.stride, GemmTypes<E>::data, B.ld, B.stride, A.ptr + z0 * A.stride, GemmTypes<E>::data,
            A.ld, A.stride, &beta, C + z0 * stride_c, CUDA_R_32F, ldc, stride_c, batch, GemmTypes<E>::compute,
            CUBLAS_GEMM_DEFAULT));
    }
}

// Row-major C (M × N) = A (M × K) · op(B), fp32 data; B is (N × K) when trans_b, else (K × N).
void gemm_f32(cublasHandle_t blas, cublasComputeType_t compute, bool trans_b, int64_t M, int N, int K, const float* A,
              int lda, const float* B, int ldb, float* C, int ldc) {
    const float one = 1.f, zero = 0.f;
    CHECK(M <= INT32_MAX, "performer attention (CUDA): %lld rows are too many for one GEMM", (long long)M);
    CUBLAS_CHECK(cublasGemmEx(blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, (int)M, K, &one, B,
                              CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &zero, C, CUDA_R_32F, ldc, compute,
                              CUBLAS_GEMM_DEFAULT));
}

// ================================================================ launchers
int blocks_for(size_t n) { return ceil_div((long long)n, kThreads); }
int warp_blocks_for(size_t rows) { return ceil_div((long long)rows, kThreads / 32); }

// The logits of q and k: [aq; ak] = xaug · Ω1ᵀ (K = xld: x̃ against ω, −‖x̃‖²/2 against the ones
// column of Ω1), fp32 without TF32 (an error in a logit is an error in the exponent).
template <typename Tin, typename E>
void logits(cublasHandle_t blas, const Dims& D, const Work<E>& w, const float* omega1, Strided q, Strided k) {
    const int xld = aug_ld(D.d);
    augment_rows_kernel<Tin><<<warp_blocks_for(2 * D.N), kThreads>>>(D, q, k, w.xaug, xld);
    CUDA_LAUNCH_CHECK();
    gemm_f32(blas, CUBLAS_COMPUTE_32F_PEDANTIC, true, 2 * (int64_t)D.N, D.m, xld, w.xaug, xld, omega1, xld, w.logits,
             D.mld);
}

// The materialised GEMM operands: features Φq, Φk, their frame-scaled copies and V1.
template <typename Tin, typename E>
void operands(const Dims& D, const Work<E>& w, Strided v, const float* cq, const float* ck, const float* saved_r) {
    features_kernel<E><<<blocks_for(2 * D.N * D.mld / 4), kThreads>>>(D, w.logits, cq, ck, saved_r, w.phi,
                                                                     w.phi_scaled);
    CUDA_LAUNCH_CHECK();
    value_rows_kernel<Tin, E><<<blocks_for(D.N * D.dl), kThreads>>>(D, v, w.v_one);
    CUDA_LAUNCH_CHECK();
}

// Operand views of the workspace, per chunk.
template <typename E>
struct Views {
    Operand<E> phi_q, phi_k, phi_q_scaled, phi_k_scaled, v_one, dod, s_hi, s_lo, g_hi, g_lo, w, mm;
    int64_t chunks;
};
template <typename E>
Views<E> views(const Dims& D, const Work<E>& w) {
    const int64_t rows_m = (int64_t)kChunk * D.mld, rows_d = (int64_t)kChunk * D.dl;
    const int64_t state = (int64_t)D.m * D.dl, score = kChunk * kChunk;
    Views<E> x;
    x.phi_q = Operand<E>{w.phi, D.mld, rows_m, false};
    x.phi_k = Operand<E>{w.phi + D.N * D.mld, D.mld, rows_m, false};
    x.phi_q_scaled = Operand<E>{w.phi_scaled, D.mld, rows_m, false};
    x.phi_k_scaled = Operand<E>{w.phi_scaled + D.N * D.mld, D.mld, rows_m, false};
    x.v_one = Operand<E>{w.v_one, D.dl, rows_d, false};
    x.dod = Operand<E>{w.dod, D.dl, rows_d, false};
    x.s_hi = Operand<E>{w.s_hi, D.dl, state, false};
    x.s_lo = Operand<E>{w.s_lo, D.dl, state, false};
    x.g_hi = Operand<E>{w.g_hi, D.dl, state, false};
    x.g_lo = Operand<E>{w.g_lo, D.dl, state, false};
    x.w = Operand<E>{w.w, kChunk, score, false};
    x.mm = Operand<E>{w.mm, kChunk, score, false};
    x.chunks = (int64_t)D.B * D.H * D.nc;
    return x;
}
template <typename E>
Operand<E> T_(Operand<E> x) {  // the same matrices, transposed
    x.trans = !x.trans;
    return x;
}

// Local chunk states Xᵀ·Y (m × dl) into w.state, then the prefix (S) or suffix (G) scan into
// hi (+ lo, when given).
template <typename E>
void chunk_states(cublasHandle_t blas, const Dims& D, const Work<E>& w, int64_t chunks, Operand<E> X, Operand<E> Y,
                  const float* ck, bool suffix, E* hi, E* lo) {
    chunk_gemm<E>(blas, chunks, D.m, D.dl, kChunk, T_(X), Y, 0.f, w.state, D.dl, (int64_t)D.m * D.dl);
    const dim3 grid(ceil_div((long long)D.m * D.dl, kThreads), D.B * D.H);
    if (suffix)
        scan_states_kernel<true, E><<<grid, kThreads>>>(D, ck, w.state, hi, lo);
    else
        scan_states_kernel<false, E><<<grid, kThreads>>>(D, ck, w.state, hi, lo);
    CUDA_LAUNCH_CHECK();
}

template <typename Tin>
void launch_forward(cublasHandle_t blas, const Dims& D, float* workspace, const float* omega1, Strided o, Strided q,
                    Strided k, Strided v, float* saved) {
    using E = Tin;
    const Work<E> w = WorkLayout(D, sizeof(E)).carve<E>(workspace);
    const Views<E> x = views(D, w);
    const size_t rows = (size_t)D.B * D.H * D.T;
    const int64_t rows_d = (int64_t)kChunk * D.dl, score = kChunk * kChunk;
    float* saved_r = saved;
    float* cq = saved + rows;
    float* ck = saved + 2 * rows;
    logits<Tin, E>(blas, D, w, omega1, q, k);
    tile_max_kernel<<<warp_blocks_for(2 * D.N), kThreads>>>(D, w.logits, w.tile_max);
    CUDA_LAUNCH_CHECK();
    const size_t f_tiles = (D.m + kTile - 1) / kTile;
    stabiliser_kernel<<<D.B * D.H, 1024>>>(D, w.tile_max, w.tile_max + D.N * f_tiles, cq, ck);
    CUDA_LAUNCH_CHECK();
    operands<Tin, E>(D, w, v, cq, ck, nullptr);
    // S_c: prefix over chunks of Φk'_cᵀ·V1_c (hi part only: the forward's products do not cancel)
    chunk_states<E>(blas, D, w, x.chunks, x.phi_k_scaled, x.v_one, ck, false, w.s_hi, nullptr);
    // W_c = tril(Φq_c·Φk_cᵀ ∘ exp(ck_j − ck_i))
    chunk_gemm<E>(blas, x.chunks, kChunk, kChunk, D.mld, x.phi_q, T_(x.phi_k), 0.f, w.score, kChunk, score);
    chunk_scores_kernel<Score::kW, E><<<blocks_for(x.chunks * score), kThreads>>>(D, w.score, ck, nullptr, nullptr,
                                                                                  w.w);
    CUDA_LAUNCH_CHECK();
    // out = r∘(Φq_c·S_c) + W_c·V1_c, normalised
    chunk_gemm<E>(blas, x.chunks, kChunk, D.dl, D.m, x.phi_q, x.s_hi, 0.f, w.out_s, D.dl, rows_d);
    chunk_gemm<E>(blas, x.chunks, kChunk, D.dl, kChunk, x.w, x.v_one, 0.f, w.out_l, D.dl, rows_d);
    normalise_kernel<Tin><<<warp_blocks_for(rows), kThreads>>>(D, w.out_s, w.out_l, ck, o, saved_r);
    CUDA_LAUNCH_CHECK();
}

template <typename Tin>
void launch_backward(cublasHandle_t blas, const Dims& D, float* workspace, const float* omega1, Strided dq, Strided dk,
                     Strided dv, Strided dout, Strided q, Strided k, Strided v, Strided o, const float* saved) {
    using E = Tin;
    const Work<E> w = WorkLayout(D, sizeof(E)).carve<E>(workspace);
    const Views<E> x = views(D, w);
    const size_t rows = (size_t)D.B * D.H * D.T;
    const float* saved_r = saved;
    const float* cq = saved + rows;
    const float* ck = saved + 2 * rows;
    const int64_t rows_d = (int64_t)kChunk * D.dl, rows_m = (int64_t)kChunk * D.mld, score = kChunk * kChunk;
    logits<Tin, E>(blas, D, w, omega1, q, k);  // cq, ck are saved: no maxima this time
    operands<Tin, E>(D, w, v, cq, ck, saved_r);
    grad_rows_kernel<Tin, E><<<warp_blocks_for(D.N), kThreads>>>(D, dout, o, w.dot, w.dod);
    CUDA_LAUNCH_CHECK();
    // prefix states S_c = Σ Φk'ᵀ·V1 and suffix states G_c = Σ Φq'ᵀ·[dO | −D], as hi + lo in bf16
    chunk_states<E>(blas, D, w, x.chunks, x.phi_k_scaled, x.v_one, ck, false, w.s_hi, kSplit<E> ? w.s_lo : nullptr);
    chunk_states<E>(blas, D, w, x.chunks, x.phi_q_scaled, x.dod, ck, true, w.g_hi, kSplit<E> ? w.g_lo : nullptr);
    // W' = W/R and M = exp(ck_j − ck_i)·(dO_i·v_j − D_i)/R_i
    chunk_gemm<E>(blas, x.chunks, kChunk, kChunk, D.mld, x.phi_q, T_(x.phi_k), 0.f, w.score, kChunk, score);
    chunk_scores_kernel<Score::kWOverR, E><<<blocks_for(x.chunks * score), kThreads>>>(D, w.score, ck, saved_r,
                                                                                       nullptr, w.w);
    CUDA_LAUNCH_CHECK();
    chunk_gemm<E>(blas, x.chunks, kChunk, kChunk, D.d, x.dod, T_(x.v_one), 0.f, w.score, kChunk, score);
    chunk_scores_kernel<Score::kM, E><<<blocks_for(x.chunks * score), kThreads>>>(D, w.score, ck, saved_r, w.dot,
                                                                                  w.mm);
    CUDA_LAUNCH_CHECK();
    // dφq = (r/R)∘([dO | −D]·S_cᵀ) + M·Φk,   dφk = ρ∘(V1·G_cᵀ) + Mᵀ·Φq   (row scales in the
    // feature-map kernel; the state products over exact rows and hi + lo states cancel as in fp32)
    float* state_q = w.dphi_state;
    float* state_k = w.dphi_state + D.N * D.mld;
    chunk_gemm<E>(blas, x.chunks, kChunk, D.m, D.dl, x.dod, T_(x.s_hi), 0.f, state_q, D.mld, rows_m);
    chunk_gemm<E>(blas, x.chunks, kChunk, D.m, D.dl, x.v_one, T_(x.g_hi), 0.f, state_k, D.mld, rows_m);
    if (kSplit<E>) {
        chunk_gemm<E>(blas, x.chunks, kChunk, D.m, D.dl, x.dod, T_(x.s_lo), 1.f, state_q, D.mld, rows_m);
        chunk_gemm<E>(blas, x.chunks, kChunk, D.m, D.dl, x.v_one, T_(x.g_lo), 1.f, state_k, D.mld, rows_m);
    }
    chunk_gemm<E>(blas, x.chunks, kChunk, D.m, kChunk, x.mm, x.phi_k, 0.f, w.dphi_local, D.mld, rows_m);
    chunk_gemm<E>(blas, x.chunks, kChunk, D.m, kChunk, T_(x.mm), x.phi_q, 0.f, w.dphi_local + D.N * D.mld, D.mld,
                  rows_m);
    // dv = Φk'·G_c + W'ᵀ·dO
    chunk_gemm<E>(blas, x.chunks, kChunk, D.d, D.m, x.phi_k_scaled, x.g_hi, 0.f, w.out_s, D.dl, rows_d);
    chunk_gemm<E>(blas, x.chunks, kChunk, D.d, kChunk, T_(x.w), x.dod, 1.f, w.out_s, D.dl, rows_d);
    dv_kernel<Tin><<<blocks_for(rows * D.d), kThreads>>>(D, w.out_s, dv);
    CUDA_LAUNCH_CHECK();
    // through the feature map: da into dphi_state, [Ωᵀ·da | Σ_f da] of q and k in one GEMM, then dx
    feature_map_grad_kernel<<<blocks_for(2 * D.N * D.mld / 4), kThreads>>>(D, w.logits, cq, ck, saved_r,
                                                                          w.dphi_state, w.dphi_local);
    CUDA_LAUNCH_CHECK();
    const int xld = aug_ld(D.d);
    const cublasComputeType_t compute =
        std::is_same<Tin, float>::value ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F_FAST_TF32;
    gemm_f32(blas, compute, false, 2 * (int64_t)D.N, xld, D.m, w.dphi_state, D.mld, omega1, xld, w.gaug, xld);
    feature_grad_kernel<Tin><<<blocks_for(2 * rows * D.d), kThreads>>>(D, w.gaug, w.xaug, xld, dq, dk);
    CUDA_LAUNCH_CHECK();
}

// ================================================================ the module
class CudaPerformerAttention : public Attention {
public:
    explicit CudaPerformerAttention(const AttnConfig& cfg) : cfg_(cfg) {
        CHECK(cfg.features >= 1, "--features %d: the Performer needs at least one random feature", cfg.features);
        CHECK(cfg.redraw >= 0, "--redraw %d: must be >= 0 (0 = never redraw the features)", cfg.redraw);
    }
    ~CudaPerformerAttention() override {
        for (auto& [layer, c] : cache_)
            if (c.omega1) cudaFree(c.omega1);  // no throwing from a destructor
        if (blas_) cublasDestroy(blas_);
    }
    CudaPerformerAttention(const CudaPerformerAttention&) = delete;
    CudaPerformerAttention& operator=(const CudaPerformerAttention&) = delete;

    std::string name() const override { return "performer"; }
    size_t saved_size(const AttnShape& s) const override { return performer_saved_size(s); }
    size_t workspace_bytes(const AttnShape& s) const override {
        return WorkLayout(dims(s), dtype_size(s.dtype)).total() * sizeof(float);
    }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"o", o}, {"q", q}, {"k", k}, {"v", v}});
        CHECK(saved != nullptr && workspace != nullptr,
              "performer attention: forward needs the saved buffer (%zu floats) and a workspace of %zu bytes",
              saved_size(s), workspace_bytes(s));
        const Dims D = dims(s);
        float* ws = static_cast<float*>(workspace);
        const float* omega1 = features(ctx, s.d);
        if (dt == DType::BF16)
            launch_forward<bf16>(blas(), D, ws, omega1, strided(o), strided(q), strided(k), strided(v), saved);
        else
            launch_forward<float>(blas(), D, ws, omega1, strided(o), strided(q), strided(k), strided(v), saved);
    }

    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                  HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k,
                  HeadTensor v, HeadTensor o, const float* saved, Tensor params,
                  void* workspace) override {
        const DType dt = check_tensors(s, {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dout", dout},
                                           {"q", q}, {"k", k}, {"v", v}, {"o", o}});
        CHECK(saved != nullptr && workspace != nullptr,
              "performer attention: backward needs the saved buffer and a workspace of %zu bytes",
              workspace_bytes(s));
        const Dims D = dims(s);
        float* ws = static_cast<float*>(workspace);
        const float* omega1 = features(ctx, s.d);
        if (dt == DType::BF16)
            launch_backward<bf16>(blas(), D, ws, omega1, strided(dq), strided(dk), strided(dv), strided(dout),
                                  strided(q), strided(k), strided(v), strided(o), saved);
        else
            launch_backward<float>(blas(), D, ws, omega1, strided(dq), strided(dk), strided(dv), strided(dout),
                                   strided(q), strided(k), strided(v), strided(o), saved);
    }

private:
    Dims dims(const AttnShape& s) const {
        Dims D;
        D.B = s.B, D.H = s.H, D.T = s.T, D.d = s.d, D.m = cfg_.features;
        D.nc = ceil_div(s.T, kChunk);
        D.Tp = D.nc * kChunk;
        D.mld = round8(cfg_.features);
        D.dl = round8(s.d + 2);
        D.N = (size_t)s.B * s.H * D.Tp;
        D.in_scale = (float)std::pow((double)s.d, -0.25);
        D.phi_scale = (float)(1.0 / std::sqrt((double)cfg_.features));
        D.epsilon = (float)kPerformerEpsilon;
        return D;
    }

    // Ω1 = [Ω | 1 | 0..] (m × aug_ld(d), fp32) of this layer for ctx.step on the device: Ω drawn on
    // the host by the CPU's function, uploaded only when the draw index (or d) changes.
    const float* features(const AttnContext& ctx, int d) {
        const int64_t draw = cfg_.redraw > 0 ? ctx.step / cfg_.redraw : 0;
        Cached& c = cache_[ctx.layer];
        if (c.omega1 == nullptr || c.draw != draw || c.d != d) {
            const std::vector<float> omega = performer_features(cfg_, ctx.layer, ctx.step, d);
            const int m = cfg_.features, xld = aug_ld(d);
            std::vector<float> host((size_t)m * xld, 0.f);
            for (int f = 0; f < m; f++) {
                for (int i = 0; i < d; i++) host[(size_t)f * xld + i] = omega[(size_t)f * d + i];
                host[(size_t)f * xld + d] = 1.f;
            }
            if (c.omega1 != nullptr && c.d != d) {
                CUDA_CHECK(cudaFree(c.omega1));
                c.omega1 = nullptr;
            }
            if (c.omega1 == nullptr) CUDA_CHECK(cudaMalloc(&c.omega1, host.size() * sizeof(float)));
            // synchronous: kernels of earlier calls that read the old Ω (same stream) finish first
            CUDA_CHECK(cudaMemcpy(c.omega1, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
            c.draw = draw;
            c.d = d;
        }
        return c.omega1;
    }
    // The handle of the GEMMs, on the default stream as every launch here (each call names its
    // compute type: pedantic fp32, TF32 or bf16 with fp32 accumulation); created on first use.
    cublasHandle_t blas() {
        if (!blas_) {
            CUBLAS_CHECK(cublasCreate(&blas_));
            CUBLAS_CHECK(cublasSetStream(blas_, 0));
        }
        return blas_;
    }

    DType check_tensors(const AttnShape& s,
                        std::initializer_list<std::pair<const char*, HeadTensor>> ts) const {
        CHECK(s.B >= 1 && s.H >= 1 && s.T >= 1 && s.d >= 1 && (int64_t)s.B * s.H <= 65535 &&
                  ceil_div(s.T, kChunk) <= 65535,
              "performer attention (CUDA): bad shape B=%d H=%d T=%d d=%d", s.B, s.H, s.T, s.d);
        const DType dt = attention_dtype("performer", ts, false);
        CHECK(dt == DType::BF16 || dt == DType::F32, "performer attention (CUDA): dtype %s not supported",
              dtype_name(dt));
        CHECK(dtype_size(dt) <= dtype_size(s.dtype),
              "performer attention (CUDA): the tensors are %s but the shape says %s, and the workspace is sized "
              "for the shape's dtype: pass the tensors' dtype in AttnShape::dtype",
              dtype_name(dt), dtype_name(s.dtype));
        return dt;
    }

    struct Cached {
        int64_t draw = -1;
        int d = 0;
        float* omega1 = nullptr;  // device (m, aug_ld(d)): [Ω | 1 | 0..]
    };
    AttnConfig cfg_;
    std::map<int, Cached> cache_;  // layer -> its current Ω1 on the device
    cublasHandle_t blas_ = nullptr;
};

}  // namespace

std::unique_ptr<Attention> make_cuda_performer_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaPerformerAttention>(cfg);
}
