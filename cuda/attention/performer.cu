// `performer` on CUDA: FAVOR+ causal linear attention with positive orthogonal random features
// (../../shared/ATTENTION.md §3), forward and exact backward. The definition is that of the CPU
// reference (src/attention/performer.cpp, formulas in src/attention/performer_features.h): the
// same Ω (performer_features(cfg, layer, step, d), drawn on the host and uploaded when the draw
// index changes), x̃ = d^(-1/4)·x, φ = m^(-1/2)·(exp(ω·x̃ − ‖x̃‖²/2 − c) + ε) with cq_i the query's
// own max and ck_j the running max over keys ≤ j, w_ij = (φq_i·φk_j)·exp(ck_j − ck_i) for j ≤ i,
// o_i = Σ w_ij v_j / R_i with R_i = Σ w_ij (o_i = 0, no gradient, where R_i ≤ 1e-30).
//
// Per (b, h) the keys are cut into chunks of kChunk = 64 positions (the CPU's kPerformerChunk).
// The products with Ω (the logits x̃·Ωᵀ and the feature-map gradient da·Ω) are two fp32 cuBLAS
// GEMMs over every row of q and k (no TF32), with augmented operands carrying −‖x̃‖²/2 and Σ_f da.
// Every other step is a small batched fp32 GEMM (block_gemm of tf32_block_gemm.cuh: 64×64 output
// tile per 256-thread block on the tensor cores, operands read through loaders that compute
// features on the fly): 3xTF32 (fp32 accuracy) in the fp32 path; in the bf16 path one TF32
// product, two for the cancelling scores M (Tf32::SplitA). All sums run in a fixed order, no
// atomics (cuBLAS is reproducible run to run on one GPU): forward and backward are bitwise
// deterministic.
//   forward   1. logits a = x̃·Ωᵀ − ‖x̃‖²/2 of q and k            -> workspace (B,H,T,m)
//                and their maxima over each 64-feature tile      -> workspace (B,H,T,m/64)
//             2. cq (row max), ck (running max: a block scan)     -> saved
//             3. per chunk c: U_c = Σ_{j∈c} exp(ck_j − ck_last(c))·φk_j·[v_j|1]ᵀ   (m × (d+1))
//             4. exclusive prefix over chunks, in fixed order: S_c (frame ck_last(c−1))
//             5. per chunk: W = tril(Φq·Φkᵀ ∘ exp(ck_j − ck_i))      (64 × 64)
//             6. out_i = exp(ck_last(c−1) − ck_i)·S_cᵀφq_i + Σ_j W_ij·[v_j|1]     (d+1)
//             7. o = out[:d]/R (guarded), R saved
//   backward  the logits again; g_i = [dO_i/R_i, −(dO_i·o_i)/R_i]; S_c as in the forward; the
//             suffix states G_c = Σ_{i after chunk c} exp(ck_last(c) − ck_i)·φq_i·g_iᵀ (local
//             states per chunk, then a reverse scan in fixed order); W and
//             M_ij = exp(ck_j − ck_i)·([v_j|1]·g_i) per chunk; then
//             dφq = r∘g·S_cᵀ + M·Φk,   dφk = ρ∘[V|1]·G_cᵀ + Mᵀ·Φq,   dv = ρ∘Φk·G_c + Wᵀ·g
//             (r_i = exp(ck_last(c−1) − ck_i), ρ_j = exp(ck_j − ck_last(c))), and through the
//             feature map: dx = d^(-1/4)·(Ωᵀ·da − x̃·Σ_f da_f), da = dφ·m^(-1/2)·e.
// All exponents are ≤ 0: nothing overflows, whatever the input magnitude.
// Stabilisers from per-tile logit maxima (a block scan instead of one warp loop over every logit
// row per head), chunk scans with batched loads and single-TF32 products in the bf16 path took
// forward+backward from 58.9 to 49.1 ms (H100, bf16, B=2 H=12 T=32768 d=64, m=256). The Ω
// products as cuBLAS SGEMMs instead of 3xTF32 block_gemm tiles: (not yet measured; branch
// next-performer-cublas).
//
// saved (fp32): R, cq, ck — three (B,H,T) arrays, as the CPU.
// workspace (fp32), linear in T: logits of q and k and their gradients 4·(B·H·T·m), the chunk
// states S and G 2·(B·H·nc·m·(d+1)), the chunk scores W and M 2·(B·H·nc·64·64), one (B,H,T,d+1)
// row buffer, the augmented rows of the Ω GEMMs 4·(B·H·T·xld) (xld = d + 1 rounded up to 4);
// nc = ceil(T/64). About B·H·T·(4m + 2m(d+1)/64 + 128 + d + 1 + 2m/64 + 4·xld) floats: 7.9 KB
// per (b, h, t) at m = 256, d = 64 (790 MB at B·H = 96, T = 1024).
// Any head dim d ≥ 1 and feature count m ≥ 1; inputs bf16 or fp32 (all tensors one dtype),
// strided HeadTensors; outputs in the input dtype; all accumulation in fp32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

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
#include "cuda/attention/tf32_block_gemm.cuh"

namespace {

constexpr int kChunk = kPerformerChunk;  // positions per chunk (64), = the GEMM tile
static_assert(kChunk == kTile, "one chunk is one GEMM tile of rows");


// Sizes and constants of one call.
struct Dims {
    int B, H, T, d, m, nc;  // nc = number of chunks
    float in_scale;         // d^(-1/4), rounded as the CPU rounds it
    float phi_scale;        // m^(-1/2)
    float epsilon;          // ε
};

// The workspace, carved into fp32 arrays (see the top of the file).
struct Work {
    float* aq;       // (B,H,T,m) query logits a = x̃·Ωᵀ − ‖x̃‖²/2
    float* ak;       // (B,H,T,m) key logits
    float* daq;      // (B,H,T,m) backward: dφq·m^(-1/2)·eq
    float* dak;      // (B,H,T,m) backward: dφk·m^(-1/2)·ek
    float* state_s;  // (B,H,nc,m,d+1) prefix states S_c
    float* state_g;  // (B,H,nc,m,d+1) suffix states G_c
    float* score_w;  // (B,H,nc,64,64) W
    float* score_m;  // (B,H,nc,64,64) M
    float* rows;     // (B,H,T,d+1) forward: unnormalised out; backward: g
    float* qmax;     // (B,H,T,ceil(m/64)) max of aq over each 64-feature tile
    float* kmax;     // (B,H,T,ceil(m/64)) max of ak over each 64-feature tile
    float* xaug;     // (2·B·H·T, xld) rows [x̃ | −‖x̃‖²/2 | 0..] of q, then of k: the logits GEMM's A
    float* gaug;     // (2·B·H·T, xld) backward: [Ωᵀ·da | Σ_f da | 0..] of q, then of k
};

// Row stride of the augmented rows (xaug, gaug) and of Ω1 = [Ω | 1 | 0..]: d + 1 rounded up to 4
// floats (16-byte rows for cuBLAS).
inline int aug_ld(int d) { return (d + 1 + 3) / 4 * 4; }

struct WorkLayout {
    size_t logits, states, scores, rows, tile_max, aug;
    size_t total() const { return 4 * logits + 2 * states + 2 * scores + rows + 2 * tile_max + 2 * aug; }
    Work carve(float* base) const {
        Work w;
        w.aq = base;
        w.ak = w.aq + logits;
        w.daq = w.ak + logits;
        w.dak = w.daq + logits;
        w.state_s = w.dak + logits;
        w.state_g = w.state_s + states;
        w.score_w = w.state_g + states;
        w.score_m = w.score_w + scores;
        w.rows = w.score_m + scores;
        w.qmax = w.rows + rows;
        w.kmax = w.qmax + tile_max;
        w.xaug = w.kmax + tile_max;
        w.gaug = w.xaug + aug;
        return w;
    }
};
WorkLayout work_layout(const AttnShape& s, int m) {
    const size_t bh = (size_t)s.B * s.H, nc = (size_t)ceil_div(s.T, kChunk);
    return WorkLayout{bh * s.T * m, bh * nc * m * (s.d + 1), bh * nc * kChunk * kChunk,
                      bh * s.T * (s.d + 1), bh * s.T * ceil_div(m, kTile), 2 * bh * s.T * aug_ld(s.d)};
}


// Key stabiliser at the last position of chunk c.
__device__ __forceinline__ float ck_last(const float* ck, int c, int T) {
    return ck[min(c * kChunk + kChunk - 1, T - 1)];
}

// φ from a logit and its stabiliser: m^(-1/2)·(exp(a − c) + ε), as the CPU computes it.
__device__ __forceinline__ float feature(float logit, float stab, const Dims& D) {
    return D.phi_scale * (expf(logit - stab) + D.epsilon);
}

// ================================================================ forward (and shared) kernels
// 1. Logits of q and k: a[t][f] = Σ_i Ω[f][i]·x̃[t][i] − ‖x̃_t‖²/2, x̃ = d^(-1/4)·x, as one fp32
// cuBLAS GEMM over every row of q and k (host side, logits()): A = xaug rows [x̃ | −‖x̃‖²/2 | 0..],
// B = Ω1ᵀ with Ω1 = [Ω | 1 | 0..], so the subtraction rides in the product; then the maximum of
// each row over each 64-feature tile (for the stabilisers). Replaced a 3xTF32 block_gemm kernel
// (64 × 64 tiles, K = d) that did both: see the top of the file.

// xaug (2·rows, xld): row n < rows is q's row n (in (B,H,T) order), row rows + n is k's. One warp per row.
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    augment_rows_kernel(Dims D, Strided Q, Strided K, float* xaug, int xld) {
    const size_t rows = (size_t)D.B * D.H * D.T;
    const size_t n = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    if (n >= 2 * rows) return;
    const int lane = threadIdx.x % 32;
    const bool is_k = n >= rows;
    const size_t r = is_k ? n - rows : n;
    const int t = (int)(r % D.T), bh = (int)(r / D.T), b = bh / D.H, h = bh % D.H;
    const Strided X = is_k ? K : Q;
    const Tin* x = head_slice<const Tin>(X, b, h) + (int64_t)t * X.st;
    float* out = xaug + n * xld;
    float sum = 0.f;
    for (int col = lane; col < D.d; col += 32) {
        const float xt = D.in_scale * to_f32(x[col]);
        out[col] = xt;
        sum += xt * xt;
    }
    sum = warp_sum(sum);
    for (int col = D.d + lane; col < xld; col += 32) out[col] = col == D.d ? -0.5f * sum : 0.f;
}

// tile_max[n][ft] = max over the features of tile ft of the logits row n (aq then ak: 2·rows rows;
// qmax then kmax are contiguous). One warp per row.
__global__ void __launch_bounds__(kThreads) tile_max_kernel(Dims D, const float* __restrict__ logits, float* tile_max) {
    const size_t rows2 = 2 * (size_t)D.B * D.H * D.T;
    const size_t n = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    if (n >= rows2) return;
    const int lane = threadIdx.x % 32, f_tiles = (D.m + kTile - 1) / kTile;
    const float* a = logits + n * D.m;
    for (int ft = 0; ft < f_tiles; ft++) {
        float mx = -INFINITY;
        for (int f = ft * kTile + lane; f < min(D.m, (ft + 1) * kTile); f += 32) mx = fmaxf(mx, a[f]);
        mx = warp_max(mx);
        if (lane == 0) tile_max[n * f_tiles + ft] = mx;
    }
}

// 2. Stabilisers: cq_t = max_f aq[t][f]; ck_t = max_{t' ≤ t} max_f ak[t'][f], from the per-tile
// maxima of the logits kernel. Grid (B·H), block 1024: each thread takes kStabRun consecutive
// positions, a block scan carries the running max across threads and across rounds of
// 1024·kStabRun positions. (Max is exact: any order gives the same bits.)
constexpr int kStabRun = 16;
__global__ void __launch_bounds__(1024)
    stabiliser_kernel(Dims D, int f_tiles, const float* __restrict__ qmax, const float* __restrict__ kmax,
                      float* cq, float* ck) {
    __shared__ float warp_total[32];
    __shared__ float carry;
    const int bh = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t row0 = (size_t)bh * D.T;
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
                    mq = fmaxf(mq, qmax[(row0 + t) * f_tiles + f]);
                    mk = fmaxf(mk, kmax[(row0 + t) * f_tiles + f]);
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

// 3. Local state of chunk c: U[f][col] = Σ_{t∈c} α_t,f·Y_t,col (m × (d+1)), written at
// states[(bh, c)].
//   forward  (kBackward = false): α = φk_t,f·exp(ck_t − ck_last(c)),      Y_t = [v_t | 1]
//   backward (kBackward = true):  α = φq_t,f·exp(ck_last(c−1) − ck_t),    Y_t = g_t (rows buffer);
//            chunk 0 has no such state and is skipped.
// Grid (ceil(m/64)·ceil((d+1)/64), nc, B·H).
template <typename Tin, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    chunk_state_kernel(Dims D, const float* __restrict__ logits, const float* __restrict__ stab,
                       const float* __restrict__ ck, Strided V, const float* __restrict__ g_rows,
                       float* states) {
    __shared__ GemmSmem sm;
    __shared__ float s_stab[kChunk], s_scale[kChunk];
    const int col_tiles = (D.d + kTile) / kTile;  // ceil((d+1)/64)
    const int f0 = (blockIdx.x / col_tiles) * kTile, col0 = (blockIdx.x % col_tiles) * kTile;
    const int c = blockIdx.y, bh = blockIdx.z, b = bh / D.H, h = bh % D.H, t0 = c * kChunk;
    if (kBackward && c == 0) return;
    const size_t row0 = (size_t)bh * D.T;
    const float* ckh = ck + row0;
    const float frame = kBackward ? ck_last(ckh, c - 1, D.T) : ck_last(ckh, c, D.T);
    for (int i = threadIdx.x; i < kChunk; i += kThreads) {
        const int t = t0 + i;
        s_stab[i] = t < D.T ? stab[row0 + t] : 0.f;
        s_scale[i] = t < D.T ? expf(kBackward ? frame - ckh[t] : ckh[t] - frame) : 0.f;
    }
    __syncthreads();
    const float* a = logits + row0 * D.m;
    const Tin* v = head_slice<const Tin>(V, b, h);
    const float* g = g_rows + row0 * (D.d + 1);
    TcAcc acc;
    zero(acc);
    block_gemm<Tf32Of<Tin>, false, false>(
        acc, sm, 0, min(kChunk, D.T - t0),
        [&](int i, int k) {  // α_{t0+k, f0+i}
            const int f = f0 + i;
            return f < D.m ? feature(a[(size_t)(t0 + k) * D.m + f], s_stab[k], D) * s_scale[k] : 0.f;
        },
        [&](int k, int j) {  // Y_{t0+k, col0+j}
            const int col = col0 + j, t = t0 + k;
            if (col > D.d) return 0.f;
            if (kBackward) return g[(size_t)t * (D.d + 1) + col];
            return col < D.d ? to_f32(v[(int64_t)t * V.st + col]) : 1.f;
        });
    float* out = states + ((size_t)bh * D.nc + c) * D.m * (D.d + 1);
    for_tile(acc, [&](int i, int j, float val) {
        const int f = f0 + i, col = col0 + j;
        if (f < D.m && col <= D.d) out[(size_t)f * (D.d + 1) + col] = val;
    });
}

// 4. Scans over chunks, per (b, h) and state element, in chunk order (deterministic), in place.
//   prefix (kSuffix = false): states[c] <- S_c = Σ_{c' < c} U_c' in the frame ck_last(c−1):
//            S_0 = 0, S_{c+1} = exp(ck_last(c−1) − ck_last(c))·S_c + U_c.
//   suffix (kSuffix = true):  states[c] <- G_c = Σ_{c' > c} W_c' in the frame ck_last(c):
//            G_{nc−1} = 0, G_{c−1} = exp(ck_last(c−1) − ck_last(c))·G_c + W_c.
// Grid (ceil(m·(d+1)/256), B·H). Each thread loads kScanBatch chunks' values at once (independent
// loads in flight) before the dependent updates: the plain loop waited one memory latency per chunk
// (1.4 ms per scan at B·H = 4, T = 32k, 17% of the Performer's time).
constexpr int kScanBatch = 8;
template <bool kSuffix>
__global__ void __launch_bounds__(kThreads) scan_states_kernel(Dims D, const float* __restrict__ ck, float* states) {
    const size_t per_chunk = (size_t)D.m * (D.d + 1);
    const size_t e = (size_t)blockIdx.x * kThreads + threadIdx.x;
    const int bh = blockIdx.y;
    if (e >= per_chunk) return;
    const float* ckh = ck + (size_t)bh * D.T;
    float* st = states + (size_t)bh * D.nc * per_chunk + e;
    float run = 0.f;
    for (int i0 = 0; i0 < D.nc; i0 += kScanBatch) {
        float u[kScanBatch];
#pragma unroll
        for (int k = 0; k < kScanBatch; k++) {
            const int c = kSuffix ? D.nc - 1 - (i0 + k) : i0 + k;
            u[k] = i0 + k < D.nc ? st[c * per_chunk] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kScanBatch; k++) {
            if (i0 + k >= D.nc) break;
            const int c = kSuffix ? D.nc - 1 - (i0 + k) : i0 + k;
            st[c * per_chunk] = run;
            if (c > 0)
                run = run * expf(ck_last(ckh, c - 1, D.T) - ck_last(ckh, c, D.T)) + u[k];
            else if (!kSuffix)
                run = u[k];  // S_1 = U_0 (the suffix scan ends at chunk 0)
        }
    }
}

// 5. Chunk scores (64 × 64 per chunk, 0 above the diagonal and outside [0, T)):
//   W_ij = (φq_i·φk_j)·exp(ck_j − ck_i);  with kWithM also M_ij = ([v_j|1]·g_i)·exp(ck_j − ck_i).
// Grid (nc, B·H).
template <typename Tin, bool kWithM>
__global__ void __launch_bounds__(kThreads, 2)
    scores_kernel(Dims D, const float* __restrict__ aq, const float* __restrict__ ak,
                  const float* __restrict__ cq, const float* __restrict__ ck, Strided V,
                  const float* __restrict__ g_rows, float* score_w, float* score_m) {
    __shared__ GemmSmem sm;
    __shared__ float s_cq[kChunk], s_ck[kChunk];
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / D.H, h = bh % D.H, t0 = c * kChunk;
    const size_t row0 = (size_t)bh * D.T;
    for (int i = threadIdx.x; i < kChunk; i += kThreads) {
        s_cq[i] = t0 + i < D.T ? cq[row0 + t0 + i] : 0.f;
        s_ck[i] = t0 + i < D.T ? ck[row0 + t0 + i] : 0.f;
    }
    __syncthreads();
    const float* q_logits = aq + row0 * D.m;
    const float* k_logits = ak + row0 * D.m;
    const size_t tile = ((size_t)bh * D.nc + c) * kChunk * kChunk;
    auto store = [&](float* dst, const TcAcc& acc) {
        for_tile(acc, [&](int i, int j, float val) {
            const bool live = j <= i && t0 + i < D.T;
            dst[tile + i * kChunk + j] = live ? val * expf(s_ck[j] - s_ck[i]) : 0.f;
        });
    };
    TcAcc acc;
    zero(acc);
    block_gemm<Tf32Of<Tin>, true, true>(
        acc, sm, 0, D.m,
        [&](int i, int k) {
            return t0 + i < D.T ? feature(q_logits[(size_t)(t0 + i) * D.m + k], s_cq[i], D) : 0.f;
        },
        [&](int k, int j) {
            return t0 + j < D.T ? feature(k_logits[(size_t)(t0 + j) * D.m + k], s_ck[j], D) : 0.f;
        });
    store(score_w, acc);
    if (kWithM) {
        const Tin* v = head_slice<const Tin>(V, b, h);
        const float* g = g_rows + row0 * (D.d + 1);
        zero(acc);
        block_gemm<std::is_same<Tin, float>::value ? Tf32::Split : Tf32::SplitA, true, true>(
            acc, sm, 0, D.d + 1,
            [&](int i, int k) { return t0 + i < D.T ? g[(size_t)(t0 + i) * (D.d + 1) + k] : 0.f; },
            [&](int k, int j) {
                if (t0 + j >= D.T) return 0.f;
                return k < D.d ? to_f32(v[(int64_t)(t0 + j) * V.st + k]) : 1.f;
            });
        store(score_m, acc);
    }
}

// 6. Unnormalised output of chunk c, columns col0.. of d+1:
//   out_i = exp(ck_last(c−1) − ck_i)·Σ_f φq_i,f·S_c[f] + Σ_j W_ij·[v_j|1]   -> rows buffer.
// One GEMM with K = m (the state part, absent for chunk 0) + 64 (the chunk part).
// Grid (ceil((d+1)/64), nc, B·H).
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    output_kernel(Dims D, const float* __restrict__ aq, const float* __restrict__ cq,
                  const float* __restrict__ ck, Strided V, const float* __restrict__ state_s,
                  const float* __restrict__ score_w, float* out_rows) {
    __shared__ GemmSmem sm;
    __shared__ float s_cq[kChunk], s_r[kChunk];
    const int col0 = blockIdx.x * kTile, c = blockIdx.y, bh = blockIdx.z;
    const int b = bh / D.H, h = bh % D.H, t0 = c * kChunk;
    const size_t row0 = (size_t)bh * D.T;
    const float frame = c > 0 ? ck_last(ck + row0, c - 1, D.T) : 0.f;
    for (int i = threadIdx.x; i < kChunk; i += kThreads) {
        const int t = t0 + i;
        s_cq[i] = t < D.T ? cq[row0 + t] : 0.f;
        s_r[i] = t < D.T && c > 0 ? expf(frame - ck[row0 + t]) : 0.f;
    }
    __syncthreads();
    const float* q_logits = aq + row0 * D.m;
    const float* S = state_s + ((size_t)bh * D.nc + c) * D.m * (D.d + 1);
    const float* W = score_w + ((size_t)bh * D.nc + c) * kChunk * kChunk;
    const Tin* v = head_slice<const Tin>(V, b, h);
    TcAcc acc;
    zero(acc);
    block_gemm<Tf32Of<Tin>, true, false>(
        acc, sm, c > 0 ? 0 : D.m, D.m + kChunk,
        [&](int i, int k) {
            if (t0 + i >= D.T) return 0.f;
            if (k < D.m) return s_r[i] * feature(q_logits[(size_t)(t0 + i) * D.m + k], s_cq[i], D);
            return W[i * kChunk + (k - D.m)];
        },
        [&](int k, int j) {
            const int col = col0 + j;
            if (col > D.d) return 0.f;
            if (k < D.m) return S[(size_t)k * (D.d + 1) + col];
            const int t = t0 + k - D.m;
            if (t >= D.T) return 0.f;
            return col < D.d ? to_f32(v[(int64_t)t * V.st + col]) : 1.f;
        });
    float* out = out_rows + row0 * (D.d + 1);
    for_tile(acc, [&](int i, int j, float val) {
        const int t = t0 + i, col = col0 + j;
        if (t < D.T && col <= D.d) out[(size_t)t * (D.d + 1) + col] = val;
    });
}

constexpr float kMinDenominator = 1e-30f;  // as the CPU: R ≤ this gives o = 0, no gradient

// 7. o_i = out_i[:d] / R_i (0 where R_i ≤ 1e-30), saved R (0 where guarded). One warp per row.
template <typename Tout>
__global__ void __launch_bounds__(kThreads)
    normalise_kernel(Dims D, const float* __restrict__ out_rows, Strided O, float* saved_r) {
    const size_t row = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)D.B * D.H * D.T) return;
    const int t = (int)(row % D.T), bh = (int)(row / D.T), b = bh / D.H, h = bh % D.H;
    const float* r = out_rows + row * (D.d + 1);
    const float R = r[D.d];
    const bool ok = R > kMinDenominator;
    Tout* o = head_slice<Tout>(O, b, h) + (int64_t)t * O.st;
    for (int col = lane; col < D.d; col += 32) o[col] = from_f32<Tout>(ok ? r[col] / R : 0.f);
    if (lane == 0) saved_r[row] = ok ? R : 0.f;
}

// ================================================================ backward kernels
// g_i = [dO_i/R_i, −(dO_i·o_i)/R_i] (0 for guarded rows) -> rows buffer. One warp per row.
template <typename Tin>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(Dims D, Strided dO, Strided O, const float* __restrict__ saved_r, float* g_rows) {
    const size_t row = (size_t)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (size_t)D.B * D.H * D.T) return;
    const int t = (int)(row % D.T), bh = (int)(row / D.T), b = bh / D.H, h = bh % D.H;
    const float R = saved_r[row];
    const bool ok = R > 0.f;
    const Tin* dout = head_slice<const Tin>(dO, b, h) + (int64_t)t * dO.st;
    const Tin* o = head_slice<const Tin>(O, b, h) + (int64_t)t * O.st;
    float* g = g_rows + row * (D.d + 1);
    float dot = 0.f;
    for (int col = lane; col < D.d; col += 32) {
        const float x = to_f32(dout[col]);
        dot += x * to_f32(o[col]);
        g[col] = ok ? x / R : 0.f;
    }
    dot = warp_sum(dot);
    if (lane == 0) g[D.d] = ok ? -dot / R : 0.f;
}

// dφ of chunk c, features f0.., for q and k, turned into da = dφ·m^(-1/2)·e:
//   dφq_i = r_i·S_c·g_i + Σ_j M_ij·φk_j          (K = d+1, absent for chunk 0, then 64)
//   dφk_j = Σ_i M_ij·φq_i + ρ_j·G_c·[v_j|1]       (K = 64, then d+1, absent for the last chunk)
// Grid (ceil(m/64), nc, B·H).
template <typename Tin>
__global__ void __launch_bounds__(kThreads, 2)
    dphi_kernel(Dims D, const float* __restrict__ aq, const float* __restrict__ ak,
                const float* __restrict__ cq, const float* __restrict__ ck, Strided V,
                const float* __restrict__ g_rows, const float* __restrict__ state_s,
                const float* __restrict__ state_g, const float* __restrict__ score_m, float* daq,
                float* dak) {
    __shared__ GemmSmem sm;
    __shared__ float s_cq[kChunk], s_ck[kChunk], s_r[kChunk], s_rho[kChunk];
    const int f0 = blockIdx.x * kTile, c = blockIdx.y, bh = blockIdx.z;
    const int b = bh / D.H, h = bh % D.H, t0 = c * kChunk;
    const size_t row0 = (size_t)bh * D.T;
    const float* ckh = ck + row0;
    const float frame_prev = c > 0 ? ck_last(ckh, c - 1, D.T) : 0.f, frame = ck_last(ckh, c, D.T);
    for (int i = threadIdx.x; i < kChunk; i += kThreads) {
        const int t = t0 + i;
        const bool live = t < D.T;
        s_cq[i] = live ? cq[row0 + t] : 0.f;
        s_ck[i] = live ? ckh[t] : 0.f;
        s_r[i] = live && c > 0 ? expf(frame_prev - ckh[t]) : 0.f;
        s_rho[i] = live ? expf(ckh[t] - frame) : 0.f;
    }
    __syncthreads();
    const int dc = D.d + 1;
    const float* q_logits = aq + row0 * D.m;
    const float* k_logits = ak + row0 * D.m;
    const float* g = g_rows + row0 * dc;
    const float* S = state_s + ((size_t)bh * D.nc + c) * D.m * dc;
    const float* G = state_g + ((size_t)bh * D.nc + c) * D.m * dc;
    const float* M = score_m + ((size_t)bh * D.nc + c) * kChunk * kChunk;
    const Tin* v = head_slice<const Tin>(V, b, h);
    TcAcc acc;

    // dφq: K = [0, d+1) state part, [d+1, d+1+64) chunk part
    zero(acc);
    block_gemm<Tf32Of<Tin>, true, false>(
        acc, sm, c > 0 ? 0 : dc, dc + kChunk,
        [&](int i, int k) {
            if (t0 + i >= D.T) return 0.f;
            return k < dc ? s_r[i] * g[(size_t)(t0 + i) * dc + k] : M[i * kChunk + (k - dc)];
        },
        [&](int k, int j) {
            const int f = f0 + j;
            if (f >= D.m) return 0.f;
            if (k < dc) return S[(size_t)f * dc + k];
            const int jj = k - dc;
            return t0 + jj < D.T ? feature(k_logits[(size_t)(t0 + jj) * D.m + f], s_ck[jj], D) : 0.f;
        });
    for_tile(acc, [&](int i, int j, float val) {
        const int t = t0 + i, f = f0 + j;
        if (t < D.T && f < D.m) {
            const size_t at = (size_t)t * D.m + f;
            daq[row0 * D.m + at] = val * D.phi_scale * expf(q_logits[at] - s_cq[i]);
        }
    });

    // dφk: K = [0, 64) chunk part (Mᵀ·Φq), [64, 64+d+1) state part (absent for the last chunk)
    zero(acc);
    block_gemm<Tf32Of<Tin>, false, false>(
        acc, sm, 0, c + 1 < D.nc ? kChunk + dc : kChunk,
        [&](int j, int k) {
            if (t0 + j >= D.T) return 0.f;
            if (k < kChunk) return M[k * kChunk + j];
            const int col = k - kChunk;
            return s_rho[j] * (col < D.d ? to_f32(v[(int64_t)(t0 + j) * V.st + col]) : 1.f);
        },
        [&](int k, int jf) {
            const int f = f0 + jf;
            if (f >= D.m) return 0.f;
            if (k < kChunk)
                return t0 + k < D.T ? feature(q_logits[(size_t)(t0 + k) * D.m + f], s_cq[k], D) : 0.f;
            return G[(size_t)f * dc + (k - kChunk)];
        });
    for_tile(acc, [&](int i, int j, float val) {
        const int t = t0 + i, f = f0 + j;
        if (t < D.T && f < D.m) {
            const size_t at = (size_t)t * D.m + f;
            dak[row0 * D.m + at] = val * D.phi_scale * expf(k_logits[at] - s_ck[i]);
        }
    });
}

// dv_j = Σ_i W_ij·g_i[:d] + ρ_j·Σ_f φk_j,f·G_c[f][:d]   (K = 64, then m, absent for the last chunk)
// Grid (ceil(d/64), nc, B·H).
template <typename Tin>
__global__ void __launch_bounds__(kThreads, 2)
    dv_kernel(Dims D, const float* __restrict__ ak, const float* __restrict__ ck,
              const float* __restrict__ g_rows, const float* __restrict__ state_g,
              const float* __restrict__ score_w, Strided dV) {
    __shared__ GemmSmem sm;
    __shared__ float s_ck[kChunk], s_rho[kChunk];
    const int col0 = blockIdx.x * kTile, c = blockIdx.y, bh = blockIdx.z;
    const int b = bh / D.H, h = bh % D.H, t0 = c * kChunk;
    const size_t row0 = (size_t)bh * D.T;
    const float* ckh = ck + row0;
    const float frame = ck_last(ckh, c, D.T);
    for (int i = threadIdx.x; i < kChunk; i += kThreads) {
        const int t = t0 + i;
        s_ck[i] = t < D.T ? ckh[t] : 0.f;
        s_rho[i] = t < D.T ? expf(ckh[t] - frame) : 0.f;
    }
    __syncthreads();
    const int dc = D.d + 1;
    const float* k_logits = ak + row0 * D.m;
    const float* g = g_rows + row0 * dc;
    const float* G = state_g + ((size_t)bh * D.nc + c) * D.m * dc;
    const float* W = score_w + ((size_t)bh * D.nc + c) * kChunk * kChunk;
    TcAcc acc;
    zero(acc);
    block_gemm<Tf32Of<Tin>, false, false>(
        acc, sm, 0, c + 1 < D.nc ? kChunk + D.m : kChunk,
        [&](int j, int k) {
            if (t0 + j >= D.T) return 0.f;
            if (k < kChunk) return W[k * kChunk + j];
            return s_rho[j] * feature(k_logits[(size_t)(t0 + j) * D.m + (k - kChunk)], s_ck[j], D);
        },
        [&](int k, int jc) {
            const int col = col0 + jc;
            if (col >= D.d) return 0.f;
            if (k < kChunk) return t0 + k < D.T ? g[(size_t)(t0 + k) * dc + col] : 0.f;
            return G[(size_t)(k - kChunk) * dc + col];
        });
    Tin* dv = head_slice<Tin>(dV, b, h);
    for_tile(acc, [&](int i, int j, float val) {
        const int t = t0 + i, col = col0 + j;
        if (t < D.T && col < D.d) dv[(int64_t)t * dV.st + col] = from_f32<Tin>(val);
    });
}

// Through the feature map, for q and k: dx_i = d^(-1/4)·(Σ_f da_i,f·Ω[f] − x̃_i·Σ_f da_i,f), from
// gaug = [Ωᵀ·da | Σ_f da] (one fp32 cuBLAS GEMM over every row of q and k: da · Ω1, host side) and
// x̃ in xaug. One thread per element of dq and dk. Replaced a 3xTF32 block_gemm kernel (K = m).
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
    const size_t r = is_k ? n - rows : n;
    const int t = (int)(r % D.T), bh = (int)(r / D.T), b = bh / D.H, h = bh % D.H;
    const Strided dX = is_k ? dK : dQ;
    const float* g = gaug + n * xld;
    const float xt = xaug[n * xld + col];
    head_slice<Tin>(dX, b, h)[(int64_t)t * dX.st + col] = from_f32<Tin>(D.in_scale * (g[col] - xt * g[D.d]));
}

// ================================================================ launchers
// Row-major C (M × N) = A (M × K) · op(B), fp32 (cuBLAS SGEMM, pedantic math: no TF32); B is
// (N × K) when trans_b, else (K × N).
void sgemm_rm(cublasHandle_t blas, bool trans_b, int M, int N, int K, const float* A, int lda, const float* B,
              int ldb, float* C, int ldc) {
    const float one = 1.f, zero = 0.f;
    CUBLAS_CHECK(cublasSgemm(blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, B, ldb, A, lda,
                             &zero, C, ldc));
}

// 1. the logits of q and k (aq, ak) and their per-tile maxima (qmax, kmax), see above
template <typename Tin>
void logits(cublasHandle_t blas, const Dims& D, const Work& w, const float* omega1, Strided q, Strided k) {
    const size_t rows2 = 2 * (size_t)D.B * D.H * D.T;
    const int xld = aug_ld(D.d);
    augment_rows_kernel<Tin><<<ceil_div(rows2, kThreads / 32), kThreads>>>(D, q, k, w.xaug, xld);
    CUDA_LAUNCH_CHECK();
    sgemm_rm(blas, true, (int)rows2, D.m, xld, w.xaug, xld, omega1, xld, w.aq, D.m);  // [aq; ak] = xaug · Ω1ᵀ
    tile_max_kernel<<<ceil_div(rows2, kThreads / 32), kThreads>>>(D, w.aq, w.qmax);
    CUDA_LAUNCH_CHECK();
}

template <typename Tin>
void launch_forward(cublasHandle_t blas, const Dims& D, const Work& w, const float* omega1, Strided o, Strided q,
                    Strided k, Strided v, float* saved) {
    const int bh = D.B * D.H;
    const size_t rows = (size_t)bh * D.T;
    float* saved_r = saved;
    float* cq = saved + rows;
    float* ck = saved + 2 * rows;
    const int f_tiles = ceil_div(D.m, kTile), c_tiles = ceil_div(D.d + 1, kTile);
    logits<Tin>(blas, D, w, omega1, q, k);
    stabiliser_kernel<<<bh, 1024>>>(D, f_tiles, w.qmax, w.kmax, cq, ck);
    CUDA_LAUNCH_CHECK();
    chunk_state_kernel<Tin, false><<<dim3(f_tiles * c_tiles, D.nc, bh), kThreads>>>(
        D, w.ak, ck, ck, v, nullptr, w.state_s);
    CUDA_LAUNCH_CHECK();
    scan_states_kernel<false><<<dim3(ceil_div((size_t)D.m * (D.d + 1), kThreads), bh), kThreads>>>(D, ck, w.state_s);
    CUDA_LAUNCH_CHECK();
    scores_kernel<Tin, false><<<dim3(D.nc, bh), kThreads>>>(D, w.aq, w.ak, cq, ck, v, nullptr, w.score_w, nullptr);
    CUDA_LAUNCH_CHECK();
    output_kernel<Tin><<<dim3(c_tiles, D.nc, bh), kThreads>>>(D, w.aq, cq, ck, v, w.state_s, w.score_w, w.rows);
    CUDA_LAUNCH_CHECK();
    normalise_kernel<Tin><<<ceil_div(rows, kThreads / 32), kThreads>>>(D, w.rows, o, saved_r);
    CUDA_LAUNCH_CHECK();
}

template <typename Tin>
void launch_backward(cublasHandle_t blas, const Dims& D, const Work& w, const float* omega1, Strided dq, Strided dk,
                     Strided dv, Strided dout, Strided q, Strided k, Strided v, Strided o,
                     const float* saved) {
    const int bh = D.B * D.H;
    const size_t rows = (size_t)bh * D.T;
    const float* saved_r = saved;
    const float* cq = saved + rows;
    const float* ck = saved + 2 * rows;
    const int f_tiles = ceil_div(D.m, kTile), c_tiles = ceil_div(D.d + 1, kTile);
    const int d_tiles = ceil_div(D.d, kTile);
    const dim3 scan_grid(ceil_div((size_t)D.m * (D.d + 1), kThreads), bh);
    logits<Tin>(blas, D, w, omega1, q, k);
    grad_rows_kernel<Tin><<<ceil_div(rows, kThreads / 32), kThreads>>>(D, dout, o, saved_r, w.rows);
    CUDA_LAUNCH_CHECK();
    // prefix states S_c, as in the forward
    chunk_state_kernel<Tin, false><<<dim3(f_tiles * c_tiles, D.nc, bh), kThreads>>>(
        D, w.ak, ck, ck, v, nullptr, w.state_s);
    CUDA_LAUNCH_CHECK();
    scan_states_kernel<false><<<scan_grid, kThreads>>>(D, ck, w.state_s);
    CUDA_LAUNCH_CHECK();
    // suffix states G_c
    chunk_state_kernel<Tin, true><<<dim3(f_tiles * c_tiles, D.nc, bh), kThreads>>>(
        D, w.aq, cq, ck, v, w.rows, w.state_g);
    CUDA_LAUNCH_CHECK();
    scan_states_kernel<true><<<scan_grid, kThreads>>>(D, ck, w.state_g);
    CUDA_LAUNCH_CHECK();
    scores_kernel<Tin, true><<<dim3(D.nc, bh), kThreads>>>(D, w.aq, w.ak, cq, ck, v, w.rows, w.score_w, w.score_m);
    CUDA_LAUNCH_CHECK();
    dphi_kernel<Tin><<<dim3(f_tiles, D.nc, bh), kThreads>>>(D, w.aq, w.ak, cq, ck, v, w.rows, w.state_s,
                                                            w.state_g, w.score_m, w.daq, w.dak);
    CUDA_LAUNCH_CHECK();
    dv_kernel<Tin><<<dim3(d_tiles, D.nc, bh), kThreads>>>(D, w.ak, ck, w.rows, w.state_g, w.score_w, dv);
    CUDA_LAUNCH_CHECK();
    // [Ωᵀ·da | Σ_f da] of q and k in one GEMM (daq, dak contiguous), then dx
    const size_t rows2 = 2 * rows;
    const int xld = aug_ld(D.d);
    sgemm_rm(blas, false, (int)rows2, xld, D.m, w.daq, D.m, omega1, xld, w.gaug, xld);
    feature_grad_kernel<Tin><<<ceil_div(rows2 * D.d, kThreads), kThreads>>>(D, w.gaug, w.xaug, xld, dq, dk);
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
        return work_layout(s, cfg_.features).total() * sizeof(float);
    }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"o", o}, {"q", q}, {"k", k}, {"v", v}});
        CHECK(saved != nullptr && workspace != nullptr,
              "performer attention: forward needs the saved buffer (%zu floats) and a workspace of %zu bytes",
              saved_size(s), workspace_bytes(s));
        const Dims D = dims(s);
        const Work w = work_layout(s, cfg_.features).carve(static_cast<float*>(workspace));
        const float* omega1 = features(ctx, s.d);
        if (dt == DType::BF16)
            launch_forward<bf16>(blas(), D, w, omega1, strided(o), strided(q), strided(k), strided(v), saved);
        else
            launch_forward<float>(blas(), D, w, omega1, strided(o), strided(q), strided(k), strided(v), saved);
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
        const Work w = work_layout(s, cfg_.features).carve(static_cast<float*>(workspace));
        const float* omega1 = features(ctx, s.d);
        if (dt == DType::BF16)
            launch_backward<bf16>(blas(), D, w, omega1, strided(dq), strided(dk), strided(dv), strided(dout),
                                  strided(q), strided(k), strided(v), strided(o), saved);
        else
            launch_backward<float>(blas(), D, w, omega1, strided(dq), strided(dk), strided(dv), strided(dout),
                                   strided(q), strided(k), strided(v), strided(o), saved);
    }

private:
    Dims dims(const AttnShape& s) const {
        Dims D;
        D.B = s.B, D.H = s.H, D.T = s.T, D.d = s.d, D.m = cfg_.features;
        D.nc = ceil_div(s.T, kChunk);
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
    // The handle of the Ω GEMMs, on the default stream as every launch here, fp32 without TF32
    // (pedantic math); created on first use.
    cublasHandle_t blas() {
        if (!blas_) {
            CUBLAS_CHECK(cublasCreate(&blas_));
            CUBLAS_CHECK(cublasSetStream(blas_, 0));
            CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_PEDANTIC_MATH));
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
