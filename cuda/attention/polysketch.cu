// `polysketch` on CUDA: PolySketchFormer's polynomial attention with a learned (or random) sketch
// (../../shared/ATTENTION.md §4), forward and exact backward, mirroring the CPU reference
// src/attention/polysketch.cpp step by step (the sketch network M, its parameter layout and the
// random draw are shared through src/attention/polysketch_sketch.h). Linear in T.
//
// Per head: q̂ = LayerNorm(q), k̂ = LayerNorm(k) over d; A = M(q̂), B = M(k̂) (T, r); C = [V | 1].
// Weight of key j for query i: ⟨q̂_i, k̂_j⟩^p inside the query's block when exact_diag, else
// ⟨A_i, B_j⟩²; out_i = Σ_j w_ij C_j, o_i = out_i[:d] / (1 + out_i[d]).
// Causal block algorithm (block b): H_l = Σ_{t∈l} B_t⊗B_t⊗C_t (r, r, d+1) per block, Z_l = the
// exclusive prefix of H over blocks (a sequential loop per element: deterministic); a row of block
// l gets Σ_ac A_ta A_tc Z_l[a,c,:] plus its intra-block (diagonal-block) part.
// Backward with g_t = [dO_t, −dO_t·o_t] / (1 + δ_t): intra-block query side (dq̂ or dA) and key
// side (dk̂ or dB, dC); inter-block dA from Z, then the suffix states R_l = Σ_{later blocks}
// A⊗A⊗g (built like H, scanned backwards) give dC and dB; then through M (into the sketch
// parameters and q̂, k̂) and the LayerNorms into q, k.
//
// Implementation (deterministic: no float atomics, every sum in a fixed order): every product is
// a tensor-core tile GEMM (block_gemm of tf32_block_gemm.cuh: 64×64 output tile per 256-thread
// block, operands read through loaders that compute them on the fly, epilogues in the kernel),
// plus a few elementwise / row kernels:
//   - every intermediate is fp32 in the workspace (q̂, k̂, rstd, A|B, C, G, block states, their
//     gradients, the learned sketch's block outputs): O(B·H·T·(d + r) + B·H·(T/b)·r(r+1)/2·(d+1))
//     floats plus fixed-size chunk buffers, linear in T;
//   - the diagonal blocks flash-style, 64 × 64 tiles: S = X_q X_kᵀ, W = tril(S^p) in shared memory,
//     out += W C; the backward dW = G Cᵀ, dS, then dX_q = dS X_k (query side), dX_k = dSᵀ X_q and
//     dC = Wᵀ G (key side), nothing of size b² stored;
//   - the block states use the packed symmetric features φ(x) (r(r+1)/2 per row, sqrt(2) off the
//     diagonal: ⟨φ(x), φ(y)⟩ = ⟨x, y⟩², half the r² of x⊗x), never stored: the loaders of
//     ps_build_states (H_l = Φ_lᵀ Y_l) and ps_apply_states (out_l (+)= Φ_l S_l) compute them from
//     the r values of a row and a table of the (a, c) pairs; ps_contract_states computes
//     dX_t = ∂(φ(X_t)·V_t)/∂X_t, V_t = S_l Y_t, in the full r² form tile by tile (V never stored);
//     the prefix/suffix over blocks is a sequential loop per element;
//   - the learned sketch runs on chunks of rows, one kernel per sketch block g: forward
//     GELU(LN(in) W_inᵀ) W_outᵀ with the LayerNorm in the loader and GELU in the epilogue into a
//     shared-memory hidden tile (only the blocks' outputs and tanh are stored, for every row: the
//     backward's forward pass leaves them for its sketch backward); backward per (hidden tile,
//     slice of kGradSliceRows rows) recomputing pre, then act and dh in shared memory feed the
//     weight-gradient partials (Σ over the slice) and dn partials per hidden tile; the partials are
//     summed in order (slices into dparams +=, hidden tiles in the LayerNorm backward).
//   (This replaced cuBLAS GEMMs through (b, b) buffers for the diagonal blocks, Φ and V
//   materialised per run of blocks for cuBLAS state GEMMs, and a sketch of cuBLAS GEMMs plus
//   LayerNorm / GELU passes storing every activation: 130 ms f+b at B=2 H=12 T=32768 d=64 bf16 on
//   an H100, now (to be measured).)
// Math: bf16 storage runs the products in one TF32 product (block_gemm Tf32::Single: 10 mantissa
// bits, finer than the bf16 inputs; the cancelling dW = G Cᵀ of the diagonal blocks in SplitA);
// fp32 storage (the checking path) keeps fp32 accuracy (Tf32::Split, 3xTF32). Every sum runs in
// a fixed order, so forward and backward are bitwise deterministic.
// Storage dtypes float or bf16 (q, k, v, o, params in act dtype); dparams fp32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention/polysketch_sketch.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/common.cuh"
#include "cuda/attention/strided.cuh"
#include "cuda/attention/tf32_block_gemm.cuh"

namespace {

constexpr float kLnEps = 1e-5f;
constexpr int kWarps = 8;            // warps per block of the row-per-warp kernels
constexpr int64_t kSketchChunkFloats = int64_t(1) << 27;  // chunk buffers of the learned sketch (512 MB)
constexpr int kGradSliceRows = 512;  // rows per partial of the sketch-parameter gradient
constexpr int kMaxSketch = 128;      // largest sketch size r (register arrays of r/32 per lane, LayerNorm backward)
constexpr float kSqrt2 = 1.4142135623730951f;


// Row n = (b·H + h)·T + t of a strided head tensor.
template <typename T>
__device__ __forceinline__ T* row_ptr(const Strided& s, int64_t n, int H, int Tn) {
    const int t = (int)(n % Tn), h = (int)((n / Tn) % H), b = (int)(n / ((int64_t)Tn * H));
    return static_cast<T*>(s.ptr) + b * s.sb + h * s.sh + (int64_t)t * s.st;
}

__device__ __forceinline__ float ipow(float x, int p) {
    float r = 1.f;
    for (int i = 0; i < p; ++i) r *= x;
    return r;
}

__device__ __forceinline__ float gelu_f(float x) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    return 0.5f * x * (1.f + tanhf(c * (x + a * x * x * x)));
}
__device__ __forceinline__ float gelu_grad_f(float x) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    const float t = tanhf(c * (x + a * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * a * x * x);
}

__device__ __forceinline__ int64_t warp_row() {
    return (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}

// Problem sizes every kernel needs.
struct Dims {
    int H, T, d, r, rp, e, block, L, degree;  // rp = r(r+1)/2 features of a state, e = d + 1, L = number of blocks
    int64_t rows;                         // B·H·T
    int64_t bh_count;                     // B·H
};

// ============================================================================ row preparation
// xh (2·rows, d) = LayerNorm(q) rows then LayerNorm(k) rows, rstd (2·rows). One warp per row.
template <typename T>
__global__ void ps_layernorm(float* xh, float* rstd, Strided Q, Strided K, Dims D) {
    const int64_t n = warp_row();
    if (n >= 2 * D.rows) return;
    const int lane = threadIdx.x % 32;
    const bool is_k = n >= D.rows;
    const T* x = row_ptr<const T>(is_k ? K : Q, is_k ? n - D.rows : n, D.H, D.T);
    float sum = 0.f;
    for (int i = lane; i < D.d; i += 32) sum += to_f32(x[i]);
    const float mean = warp_sum(sum) / D.d;
    float var = 0.f;
    for (int i = lane; i < D.d; i += 32) {
        const float c = to_f32(x[i]) - mean;
        var += c * c;
    }
    var = warp_sum(var) / D.d;
    const float rs = 1.f / sqrtf(var + kLnEps);
    float* out = xh + n * D.d;
    for (int i = lane; i < D.d; i += 32) out[i] = (to_f32(x[i]) - mean) * rs;
    if (lane == 0) rstd[n] = rs;
}

// C (rows, d+1) = [v | 1]
template <typename T>
__global__ void ps_values(float* C, Strided V, Dims D) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.e) return;
    const int64_t n = idx / D.e;
    const int x = (int)(idx % D.e);
    C[idx] = x < D.d ? to_f32(row_ptr<const T>(V, n, D.H, D.T)[x]) : 1.f;
}

// G (rows, d+1) = [dO, −dO·o] / den. One warp per row.
template <typename T>
__global__ void ps_out_grad(float* G, Strided dO, Strided O, const float* den, Dims D) {
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const T* g = row_ptr<const T>(dO, n, D.H, D.T);
    const T* o = row_ptr<const T>(O, n, D.H, D.T);
    const float inv = 1.f / den[n];
    float dot = 0.f;
    float* out = G + n * D.e;
    for (int i = lane; i < D.d; i += 32) {
        const float gi = to_f32(g[i]);
        dot += gi * to_f32(o[i]);
        out[i] = gi * inv;
    }
    dot = warp_sum(dot);
    if (lane == 0) out[D.d] = -dot * inv;
}

// ============================================================================ the learned sketch
// The sketch network runs on chunks of rows at a time (see the top of the file); the parameter
// gradients are per-slice partials (kGradSliceRows rows) summed in slice order into dparams (+=),
// chunk after chunk. Parameters: `p` is an fp32 copy of params in the layout of
// polysketch_sketch.h (Linear weights (out, in) row-major). Row-major chunk buffers, one row per
// sketch input row.
template <typename T>
__global__ void ps_params_to_f32(float* p, const T* src, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = to_f32(src[i]);
}
// dst (count) += Σ_s part[s, :] in slice order
__global__ void ps_reduce_slices(float* dst, const float* part, int slices, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float s = 0.f;
    for (int k = 0; k < slices; ++k) s += part[(int64_t)k * count + i];
    dst[i] += s;
}

// mean and 1/sqrt(var + eps) of the row x (n) for the warp (two passes, as the CPU).
__device__ __forceinline__ void ps_row_stats(const float* x, int n, float& mean, float& rs) {
    const int lane = threadIdx.x % 32;
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) sum += x[i];
    mean = warp_sum(sum) / n;
    float var = 0.f;
    for (int i = lane; i < n; i += 32) var += (x[i] - mean) * (x[i] - mean);
    var = warp_sum(var) / n;
    rs = 1.f / sqrtf(var + kLnEps);
}
// LayerNorm statistics of nc rows of n: mean (nc), rstd (nc). One warp per row.
__global__ void ps_sk_ln_stats(float* mean, float* rstd, const float* in, int n, int nc) {
    const int64_t row = warp_row();
    if (row >= nc) return;
    float mu, rs;
    ps_row_stats(in + row * n, n, mu, rs);
    if (threadIdx.x % 32 == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}
// The LayerNorm-with-affine output x̂·w + b of x (the same rounding steps as the CPU).
__device__ __forceinline__ float ps_ln_affine(float x, float mean, float rs, float w, float b) {
    return (x - mean) * rs * w + b;
}

// Calls fn(i, j, a_value, b_value) for this thread's 16 entries of two tiles (for_tile's layout).
template <typename Fn>
__device__ __forceinline__ void for_tile2(const TcAcc& a, const TcAcc& b, Fn fn) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row = 16 * (warp % 4) + g, col = 32 * (warp / 4) + 2 * t;
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) fn(row + 8 * (q / 2), col + 8 * nt + q % 2, a.v[nt][q], b.v[nt][q]);
}

// One sketch block g forward on 64 rows per thread block, nothing but the output stored:
// out (nc, r) = GELU(LN(in) W_inᵀ) W_outᵀ, in (nc, n). The LayerNorm statistics are computed in the
// block; LN(in) is applied in the loader of the first product (K = n), GELU in its epilogue into
// one 64 × 64 hidden tile in shared memory, which the second product (K = 64 of the hidden units)
// accumulates into the output tiles, hidden tile after hidden tile (a fixed order). Replaced
// LayerNorm / GELU kernels around cuBLAS GEMMs with every activation stored: (to be measured).
constexpr int kOutTiles = (kMaxSketch + kTile - 1) / kTile;  // output tiles of r
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_sk_block_fwd(float* out, const float* __restrict__ in, const float* __restrict__ ln_w,
                    const float* __restrict__ ln_b, const float* __restrict__ w_in, const float* __restrict__ w_out,
                    int n, int r, int hid, int nc) {
    __shared__ GemmSmem sm;
    __shared__ float act[kTile][kTile + 1];  // act[i][k] = GELU(pre) of row i, hidden unit h0 + k
    __shared__ float s_mean[kTile], s_rstd[kTile];
    const int64_t row0 = (int64_t)blockIdx.x * kTile;
    const int nr = (int)min((int64_t)kTile, nc - row0);
    const float* x = in + row0 * n;
    const int warp = threadIdx.x / 32;
    for (int i = warp; i < kTile; i += kThreads / 32) {
        float mu = 0.f, rs = 0.f;
        if (i < nr) ps_row_stats(x + (int64_t)i * n, n, mu, rs);
        if (threadIdx.x % 32 == 0) {
            s_mean[i] = mu;
            s_rstd[i] = rs;
        }
    }
    __syncthreads();
    const int out_tiles = (r + kTile - 1) / kTile;
    TcAcc acc_o[kOutTiles];
#pragma unroll
    for (int ot = 0; ot < kOutTiles; ot++) zero(acc_o[ot]);
    for (int h0 = 0; h0 < hid; h0 += kTile) {
        const int hk = min(kTile, hid - h0);
        TcAcc acc_h;
        zero(acc_h);
        block_gemm<kTf32, true, true>(
            acc_h, sm, 0, n,
            [&](int i, int k) {
                return i < nr ? ps_ln_affine(x[(int64_t)i * n + k], s_mean[i], s_rstd[i], ln_w[k], ln_b[k]) : 0.f;
            },
            [&](int k, int j) { return j < hk ? w_in[(int64_t)(h0 + j) * n + k] : 0.f; });
        for_tile(acc_h, [&](int i, int j, float v) { act[i][j] = gelu_f(v); });
        __syncthreads();
#pragma unroll
        for (int ot = 0; ot < kOutTiles; ot++)
            if (ot < out_tiles)
                block_gemm<kTf32, true, true>(
                    acc_o[ot], sm, 0, hk, [&](int i, int k) { return act[i][k]; },
                    [&](int k, int j) {
                        const int o = ot * kTile + j;
                        return o < r ? w_out[(int64_t)o * hid + h0 + k] : 0.f;
                    });
    }
#pragma unroll
    for (int ot = 0; ot < kOutTiles; ot++)
        if (ot < out_tiles)
            for_tile(acc_o[ot], [&](int i, int j, float v) {
                const int o = ot * kTile + j;
                if (i < nr && o < r) out[(row0 + i) * r + o] = v;
            });
}

// One sketch block g backward on a slice of kGradSliceRows rows × 64 hidden units h0.. per thread
// block, given its input in (nc, n), the LayerNorm statistics mean, rstd (nc) and dout (nc, r);
// per tile of 64 rows: pre = LN(in) W_inᵀ recomputed (LayerNorm in the loader), dact = dout W_out,
// act = GELU(pre) and dh = dact ∘ GELU'(pre) into shared memory; then
//   part_wo (slices, r, hid)  [slice, :, h0..] = Σ_{slice rows} doutᵀ act   (dW_out partial)
//   part_wi (slices, hid, n)  [slice, h0.., :] = Σ_{slice rows} dhᵀ LN(in)  (dW_in partial)
//   dn_part (hid tiles, nc, n) [h0 tile]       = dh W_in[h0.., :]           (dn partial)
// accumulated over the slice's row tiles in order. kTiles: tiles of r and of n (1 when both ≤ 64).
// Grid (hidden tiles, slices); with kTiles = 1 two blocks per SM (128 registers: ptxas spills
// 24-40 bytes, against 184 registers and one block per SM otherwise). Replaced stored activations
// (pre, act, dh: (nc, 8r) each) read by cuBLAS weight-gradient GEMMs plus GELU' and
// LayerNorm-forward passes: (to be measured).
template <Tf32 kTf32, int kTiles>
__global__ void __launch_bounds__(kThreads, kTiles == 1 ? 2 : 1)
    ps_sk_block_bwd(float* part_wo, float* part_wi, float* dn_part, const float* __restrict__ in,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    const float* __restrict__ dout, const float* __restrict__ ln_w,
                    const float* __restrict__ ln_b, const float* __restrict__ w_in,
                    const float* __restrict__ w_out, int n, int r, int hid, int nc) {
    __shared__ GemmSmem sm;
    __shared__ float act[kTile][kTile + 1];  // [row][hidden unit h0 + j] of the current row tile
    __shared__ float dh[kTile][kTile + 1];
    const int h0 = blockIdx.x * kTile, hk = min(kTile, hid - h0);
    const int slice = blockIdx.y;
    const int64_t s0 = (int64_t)slice * kGradSliceRows, s1 = min((int64_t)nc, s0 + kGradSliceRows);
    const int out_tiles = (r + kTile - 1) / kTile, in_tiles = (n + kTile - 1) / kTile;
    TcAcc acc_wo[kTiles], acc_wi[kTiles];
#pragma unroll
    for (int u = 0; u < kTiles; u++) {
        zero(acc_wo[u]);
        zero(acc_wi[u]);
    }
    for (int64_t row0 = s0; row0 < s1; row0 += kTile) {
        const int nr = (int)min((int64_t)kTile, s1 - row0);
        auto ln = [&](int i, int k) {
            const int64_t row = row0 + i;
            return ps_ln_affine(in[row * n + k], mean[row], rstd[row], ln_w[k], ln_b[k]);
        };
        TcAcc acc_pre, acc_da;
        zero(acc_pre);
        zero(acc_da);
        block_gemm<kTf32, true, true>(
            acc_pre, sm, 0, n, [&](int i, int k) { return i < nr ? ln(i, k) : 0.f; },
            [&](int k, int j) { return j < hk ? w_in[(int64_t)(h0 + j) * n + k] : 0.f; });
        block_gemm<kTf32, true, false>(
            acc_da, sm, 0, r, [&](int i, int k) { return i < nr ? dout[(row0 + i) * r + k] : 0.f; },
            [&](int k, int j) { return j < hk ? w_out[(int64_t)k * hid + h0 + j] : 0.f; });
        // rows ≥ nr and units ≥ hk have pre = dact = 0: act = dh = 0 there
        for_tile2(acc_pre, acc_da, [&](int i, int j, float pre, float da) {
            act[i][j] = gelu_f(pre);
            dh[i][j] = da * gelu_grad_f(pre);
        });
        __syncthreads();
#pragma unroll
        for (int u = 0; u < kTiles; u++)
            if (u < out_tiles)  // dW_out[u-th 64 outputs, h0..] += doutᵀ act
                block_gemm<kTf32, false, false>(
                    acc_wo[u], sm, 0, nr,
                    [&](int i, int k) {
                        const int o = u * kTile + i;
                        return o < r ? dout[(row0 + k) * r + o] : 0.f;
                    },
                    [&](int k, int j) { return act[k][j]; });
#pragma unroll
        for (int u = 0; u < kTiles; u++)
            if (u < in_tiles)  // dW_in[h0.., u-th 64 inputs] += dhᵀ LN(in)
                block_gemm<kTf32, false, false>(
                    acc_wi[u], sm, 0, nr, [&](int i, int k) { return dh[k][i]; },
                    [&](int k, int j) {
                        const int c = u * kTile + j;
                        return c < n ? ln(k, c) : 0.f;
                    });
#pragma unroll
        for (int u = 0; u < kTiles; u++)
            if (u < in_tiles) {  // dn[rows, u-th 64 inputs] of this hidden tile = dh W_in[h0.., :]
                TcAcc acc_dn;
                zero(acc_dn);
                block_gemm<kTf32, true, false>(
                    acc_dn, sm, 0, hk, [&](int i, int k) { return dh[i][k]; },
                    [&](int k, int j) {
                        const int c = u * kTile + j;
                        return c < n ? w_in[(int64_t)(h0 + k) * n + c] : 0.f;
                    });
                float* dst = dn_part + ((int64_t)blockIdx.x * nc + row0) * n;
                for_tile(acc_dn, [&](int i, int j, float v) {
                    const int c = u * kTile + j;
                    if (i < nr && c < n) dst[(int64_t)i * n + c] = v;
                });
            }
        // the last block_gemm ended with __syncthreads: act and dh may be overwritten
    }
    float* pwo = part_wo + (int64_t)slice * r * hid;
    float* pwi = part_wi + (int64_t)slice * hid * n;
#pragma unroll
    for (int u = 0; u < kTiles; u++) {
        for_tile(acc_wo[u], [&](int i, int j, float v) {
            const int o = u * kTile + i;
            if (o < r && j < hk) pwo[(int64_t)o * hid + h0 + j] = v;
        });
        for_tile(acc_wi[u], [&](int i, int j, float v) {
            const int c = u * kTile + j;
            if (i < hk && c < n) pwi[(int64_t)(h0 + i) * n + c] = v;
        });
    }
}
// tz = tanh(f1 f2 / sqrt r), m = sqrt(r) tz (nc, r)
__global__ void ps_sk_tanh(float* tz, float* m, const float* f1, const float* f2, int r, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count) return;
    const float sr = sqrtf((float)r);
    const float z = tanhf(f1[idx] * f2[idx] / sr);
    tz[idx] = z;
    m[idx] = sr * z;
}
// dz = dm (1 − tz²): df1 = dz f2, df2 = dz f1
__global__ void ps_sk_tanh_bwd(float* df1, float* df2, const float* dm, const float* tz, const float* f1,
                               const float* f2, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count) return;
    const float t = tz[idx];
    const float dz = dm[idx] * (1.f - t * t);
    df1[idx] = dz * f2[idx];
    df2[idx] = dz * f1[idx];
}
// LayerNorm-with-affine backward of nc rows of n (n ≤ kMaxSketch), given dn = d(normed) as the sum
// of `parts` partials dn_part (parts, nc, n) in order, the input in (nc, n) and its statistics mean,
// rstd (x̂ = (in − mean)·rstd recomputed):
// din = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂∘x̂)) with dx̂ = dn∘w, and the affine's gradient partials
// part (slices, 2n) = [Σ dn∘x̂ | Σ dn] over each slice of kGradSliceRows rows (the layout of
// ln_w, ln_b). One block per slice, one warp per row; lane sums of its rows in row order, then the
// warps' sums in warp order (deterministic). Replaced two separate column-sum passes over dn and
// dn∘x̂: (to be measured).
__global__ void ps_sk_ln_bwd(float* din, float* part, const float* dn_part, int parts, const float* in,
                             const float* mean, const float* rstd, const float* ln_w, int n, int nc) {
    constexpr int NM = kMaxSketch / 32;
    __shared__ float red[kWarps][2][kMaxSketch];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int row0 = blockIdx.x * kGradSliceRows, row1 = min(row0 + kGradSliceRows, nc);
    float sw[NM] = {}, sb[NM] = {};
    for (int64_t row = row0 + warp; row < row1; row += kWarps) {
        const float* xin = in + row * n;
        const float mu = mean[row], rs = rstd[row];
        float x[NM], g[NM];  // x̂ and dn (the sum of the parts in order) of this lane's columns
        float m1 = 0.f, m2 = 0.f;
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            const int i = lane + 32 * m;
            x[m] = 0.f;
            g[m] = 0.f;
            if (i < n) {
                x[m] = (xin[i] - mu) * rs;
                for (int h = 0; h < parts; ++h) g[m] += dn_part[((int64_t)h * nc + row) * n + i];
                const float dx = g[m] * ln_w[i];
                sw[m] += g[m] * x[m];
                sb[m] += g[m];
                m1 += dx;
                m2 += dx * x[m];
            }
        }
        m1 = warp_sum(m1) / n;
        m2 = warp_sum(m2) / n;
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            const int i = lane + 32 * m;
            if (i < n) din[row * n + i] = rs * (g[m] * ln_w[i] - m1 - x[m] * m2);
        }
    }
#pragma unroll
    for (int m = 0; m < NM; ++m) {
        const int i = lane + 32 * m;
        if (i < n) {
            red[warp][0][i] = sw[m];
            red[warp][1][i] = sb[m];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
        const int which = i / n, col = i % n;
        float acc = 0.f;
        for (int w = 0; w < kWarps; ++w) acc += red[w][which][col];
        part[(int64_t)blockIdx.x * 2 * n + i] = acc;
    }
}
// dxh (count) += d1 + d2 (the two sketch branches' gradients, in the order of the old group code)
__global__ void ps_sk_add2(float* dxh, const float* d1, const float* d2, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < count) dxh[idx] += (0.f + d1[idx]) + d2[idx];
}

// Offsets (floats) of the chunk buffers of the learned sketch's backward, nc rows, reused block
// after block.
struct SketchChunk {
    int64_t df[2], dy, mean, rstd, dn_part, dxf[2], part_wo, part_wi, part_ln, total;
    SketchChunk(int d, int r, int64_t nc) {
        const int64_t hid = 8 * r, maxn = d > r ? d : r;
        int64_t off = 0;
        auto take = [&](int64_t n) { int64_t o = off; off += (n + 63) / 64 * 64; return o; };
        df[0] = take(nc * r);
        df[1] = take(nc * r);
        dy = take(nc * r);
        mean = take(nc);
        rstd = take(nc);
        dn_part = take((hid + kTile - 1) / kTile * nc * maxn);
        dxf[0] = take(nc * d);
        dxf[1] = take(nc * d);
        // partial parameter gradients, one per slice of kGradSliceRows rows
        const int64_t slices = (nc + kGradSliceRows - 1) / kGradSliceRows;
        part_wo = take(slices * r * hid);
        part_wi = take(slices * hid * maxn);
        part_ln = take(slices * 2 * maxn);
        total = off;
    }
};

// ============================================================================ the random sketch
// M (2·rows, r) = (x̂ S1) ∘ (x̂ S2) / sqrt(r); S (2, d, r). One warp per row.
__global__ void ps_sketch_random_fwd(float* M, const float* xh, const float* S, int d, int r, int64_t n_rows) {
    const int64_t n = warp_row();
    if (n >= n_rows) return;
    const int lane = threadIdx.x % 32;
    const float* x = xh + n * d;
    const float inv_sr = 1.f / sqrtf((float)r);
    for (int c = lane; c < r; c += 32) {
        float p1 = 0.f, p2 = 0.f;
        for (int i = 0; i < d; ++i) {
            p1 += x[i] * S[(int64_t)i * r + c];
            p2 += x[i] * S[(int64_t)(d + i) * r + c];
        }
        M[n * r + c] = p1 * p2 * inv_sr;
    }
}
// dxh (2·rows, d) += Σ_c dM_c/sqrt(r) (p2_c S1[i,c] + p1_c S2[i,c]). One warp per row; p1, p2 in
// shared memory (2·r floats per warp).
__global__ void ps_sketch_random_bwd(float* dxh, const float* dM, const float* xh, const float* S,
                                     int d, int r, int64_t n_rows) {
    extern __shared__ float sm[];
    const int64_t n = warp_row();
    if (n >= n_rows) return;
    const int lane = threadIdx.x % 32;
    float* p1 = sm + (threadIdx.x / 32) * 2 * r;
    float* p2 = p1 + r;
    const float* x = xh + n * d;
    const float inv_sr = 1.f / sqrtf((float)r);
    for (int c = lane; c < r; c += 32) {
        float a = 0.f, b = 0.f;
        for (int i = 0; i < d; ++i) {
            a += x[i] * S[(int64_t)i * r + c];
            b += x[i] * S[(int64_t)(d + i) * r + c];
        }
        p1[c] = a;
        p2[c] = b;
    }
    __syncwarp();
    const float* dm = dM + n * r;
    for (int i = lane; i < d; i += 32) {
        float s = 0.f;
        for (int c = 0; c < r; ++c)
            s += dm[c] * inv_sr * (p2[c] * S[(int64_t)i * r + c] + p1[c] * S[(int64_t)(d + i) * r + c]);
        dxh[n * d + i] += s;
    }
}

// ============================================================================ block states
// states (B·H, L, r(r+1)/2, e): block l of head bh is H_l = Σ_{t∈l} φ(X_t) Y_tᵀ, a (r(r+1)/2, e)
// matrix, with φ(x) the packed symmetric features of x⊗x: X⊗X is symmetric in its two indices, so
// one feature per pair a ≤ c, scaled by sqrt(2) off the diagonal, gives ⟨φ(x), φ(y)⟩ = ⟨x, y⟩²
// with half the features (a reordering of the same sum; beat the r² features of x⊗x by (to be
// measured)). Every state operation is a block_gemm kernel over every block of every head: build
// H_l = Φ_lᵀ Y_l, apply out_l (+)= Φ_l S_l (Φ computed in the loaders, never stored) and the
// contraction dX_t += ∂(φ(X_t)·(S_l Y_t))/∂X_t.

// Index of the pair a ≤ c in the packed features (row-major upper triangle of r × r).
__device__ __forceinline__ int pair_index(int a, int c, int r) { return a * r - a * (a - 1) / 2 + (c - a); }

// pairs (r(r+1)/2): feature i of φ is the pair (a, c) = (pairs[i] & 0xffff, pairs[i] >> 16), a ≤ c,
// in pair_index order. One thread per (a, c) of the full square (those with c < a return).
__global__ void ps_pair_table(int* pairs, int r) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= r * r) return;
    const int a = idx / r, c = idx % r;
    if (c >= a) pairs[pair_index(a, c, r)] = a | (c << 16);
}
// Feature (a, c) = pr of the row x: x_a x_c for a = c, sqrt(2) x_a x_c for a < c.
__device__ __forceinline__ float feature(const float* x, int pr) {
    const int a = pr & 0xffff, c = pr >> 16;
    return (a == c ? 1.f : kSqrt2) * x[a] * x[c];
}

// Tile `tile` of 64 rows of block blk (= bh·L + l): its first global row and its number of rows n
// (≤ 0: the block has no such tile).
struct RowTile {
    int64_t row0;
    int n;
};
__device__ __forceinline__ RowTile row_tile(const Dims& D, int64_t blk, int tile) {
    const int t0 = (int)(blk % D.L) * D.block, nb = min(D.block, D.T - t0);
    return RowTile{(blk / D.L) * D.T + t0 + tile * kTile, min(kTile, nb - tile * kTile)};
}

// The (d+1)-wide outputs (rows of C = [V | 1], G, states) run as block_gemm column tiles over the
// first d columns; the last column (index d) is computed on the CUDA cores by the blocks of column
// tile 0 (a 64-wide tile for one column would double the products), with fixed-order sums.
constexpr int kParts = kThreads / kTile;  // threads per output row of those last-column sums

// states (B·H, L, r(r+1)/2, e): block l of head bh <- Σ_{t∈l} φ(X_t) Y_tᵀ, X (rows, r), Y (rows, e):
// block_gemm with A(i, k) = φ_i(X of the block's row k) computed by the loader (Φ is never stored),
// B = Y. Grid (B·H·L, feature tiles × column tiles of d). Replaced Φ materialised by a kernel plus
// cuBLAS GEMMs: (to be measured).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_build_states(float* states, const float* __restrict__ X, const float* __restrict__ Y,
                    const int* __restrict__ pairs, Dims D) {
    __shared__ GemmSmem sm;
    __shared__ float red[kParts][kTile];  // partial sums of the last column
    const int col_tiles = (D.d + kTile - 1) / kTile;
    const int f0 = (blockIdx.y / col_tiles) * kTile, j0 = (blockIdx.y % col_tiles) * kTile;
    const int64_t blk = blockIdx.x, bh = blk / D.L;
    const int t0 = (int)(blk % D.L) * D.block, nb = min(D.block, D.T - t0);
    const int64_t row0 = bh * D.T + t0;
    const float* x = X + row0 * D.r;
    const float* y = Y + row0 * D.e;
    TcAcc acc;
    zero(acc);
    block_gemm<kTf32, false, false>(
        acc, sm, 0, nb,
        [&](int i, int k) { return f0 + i < D.rp ? feature(x + (int64_t)k * D.r, pairs[f0 + i]) : 0.f; },
        [&](int k, int j) { return j0 + j < D.d ? y[(int64_t)k * D.e + j0 + j] : 0.f; });
    float* out = states + blk * D.rp * D.e;
    for_tile(acc, [&](int i, int j, float v) {
        if (f0 + i < D.rp && j0 + j < D.d) out[(int64_t)(f0 + i) * D.e + j0 + j] = v;
    });
    if (j0 == 0) {  // the last column: thread (i, part) sums the rows part, part + kParts, ... in order
        const int i = threadIdx.x % kTile, part = threadIdx.x / kTile;
        float sum = 0.f;
        if (f0 + i < D.rp) {
            const int pr = pairs[f0 + i];
            for (int k = part; k < nb; k += kParts) sum += feature(x + (int64_t)k * D.r, pr) * y[(int64_t)k * D.e + D.d];
        }
        red[part][i] = sum;
        __syncthreads();
        if (threadIdx.x < kTile && f0 + threadIdx.x < D.rp) {
            float v = 0.f;
            for (int u = 0; u < kParts; u++) v += red[u][threadIdx.x];
            out[(int64_t)(f0 + threadIdx.x) * D.e + D.d] = v;
        }
    }
}

// out (rows, e) = beta·out + φ(X_t)·S_l(t) (= Σ_ac X_ta X_tc S_l(t)[a,c,:] of the full form; out is
// not read when beta = 0): block_gemm over the r(r+1)/2 features with A(i, k) = φ_k(X_i) computed by
// the loader; the last column as in ps_build_states. Grid (B·H·L, row tiles of a block × column
// tiles of d).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_apply_states(float* out, const float* __restrict__ X, const float* __restrict__ states,
                    const int* __restrict__ pairs, Dims D, float beta) {
    __shared__ GemmSmem sm;
    __shared__ float red[kParts][kTile];  // partial sums of the last column
    const int col_tiles = (D.d + kTile - 1) / kTile;
    const int rt = blockIdx.y / col_tiles, j0 = (blockIdx.y % col_tiles) * kTile;
    const int64_t blk = blockIdx.x, bh = blk / D.L;
    const int t0 = (int)(blk % D.L) * D.block, nb = min(D.block, D.T - t0);
    if (rt * kTile >= nb) return;  // the whole block: before any barrier
    const int nr = min(kTile, nb - rt * kTile);
    const int64_t row0 = bh * D.T + t0 + rt * kTile;
    const float* x = X + row0 * D.r;
    const float* s = states + blk * D.rp * D.e;
    TcAcc acc;
    zero(acc);
    block_gemm<kTf32, true, false>(
        acc, sm, 0, D.rp,
        [&](int i, int k) { return i < nr ? feature(x + (int64_t)i * D.r, pairs[k]) : 0.f; },
        [&](int k, int j) { return j0 + j < D.d ? s[(int64_t)k * D.e + j0 + j] : 0.f; });
    float* o = out + row0 * D.e;
    for_tile(acc, [&](int i, int j, float v) {
        if (i < nr && j0 + j < D.d) {
            float& dst = o[(int64_t)i * D.e + j0 + j];
            dst = beta == 0.f ? v : beta * dst + v;
        }
    });
    if (j0 == 0) {  // the last column: thread (i, part) sums the features part, part + kParts, ... in order
        const int i = threadIdx.x % kTile, part = threadIdx.x / kTile;
        float sum = 0.f;
        if (i < nr)
            for (int k = part; k < D.rp; k += kParts) sum += feature(x + (int64_t)i * D.r, pairs[k]) * s[(int64_t)k * D.e + D.d];
        red[part][i] = sum;
        __syncthreads();
        if (threadIdx.x < nr) {
            float v = 0.f;
            for (int u = 0; u < kParts; u++) v += red[u][threadIdx.x];
            float& dst = o[(int64_t)threadIdx.x * D.e + D.d];
            dst = beta == 0.f ? v : beta * dst + v;
        }
    }
}

// dX_t[a] += ∂(φ(X_t)·V_t)/∂X_ta with V_t = S_l(t) Y_t: = 2 X_ta V_t[aa] + sqrt(2) Σ_{c≠a} X_tc V_t[ac],
// X, dX (rows, r), Y (rows, e). Computed in the full r² form, column J = a·r + c of
// Ṽ_t = Y_t·S̃ᵀ with S̃[J] = κ_ac S[pair(a, c)] (κ = 2 for a = c, sqrt(2) else) read from the
// packed state by the loader: per 64-row tile of a block and 64 columns J at a time, block_gemm
// (K = d, the last k = d added in the epilogue), the products X_tc Ṽ_t[J] into shared memory, and one thread per (row, a) adds the sum
// over its c in the tile (in order) to dX; the tiles in order. Grid (B·H·L, row tiles of a
// block). Replaced V = Y Sᵀ stored (rows, r(r+1)/2) by cuBLAS plus a finishing kernel: (to be
// measured).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_contract_states(float* dX, const float* __restrict__ X, const float* __restrict__ Y,
                       const float* __restrict__ states, Dims D) {
    __shared__ GemmSmem sm;
    __shared__ float pv[kTile][kTile + 1];  // X_tc Ṽ_t[J0 + j] of the current column tile
    const RowTile q = row_tile(D, blockIdx.x, blockIdx.y);
    if (q.n <= 0) return;  // the whole block: before any barrier
    const int r = D.r, e = D.e, rr = r * r;
    const float* s = states + (int64_t)blockIdx.x * D.rp * e;
    for (int J0 = 0; J0 < rr; J0 += kTile) {
        TcAcc acc;
        zero(acc);
        // S̃[J][k] for k < d by block_gemm, the last k = d as a rank-1 term in the epilogue
        auto s_tilde = [&](int J, int k) {
            const int a = J / r, c = J % r;
            return (a == c ? 2.f : kSqrt2) * s[(int64_t)pair_index(min(a, c), max(a, c), r) * e + k];
        };
        block_gemm<kTf32, true, true>(
            acc, sm, 0, D.d, [&](int i, int k) { return i < q.n ? Y[(q.row0 + i) * e + k] : 0.f; },
            [&](int k, int j) { return J0 + j < rr ? s_tilde(J0 + j, k) : 0.f; });
        for_tile(acc, [&](int i, int j, float v) {
            const int J = J0 + j;
            pv[i][j] = i < q.n && J < rr
                           ? X[(q.row0 + i) * r + J % r] * (v + Y[(q.row0 + i) * e + D.d] * s_tilde(J, D.d))
                           : 0.f;
        });
        __syncthreads();
        const int j_end = min(kTile, rr - J0);  // columns of this tile
        const int a_lo = J0 / r, segs = (J0 + j_end - 1) / r - a_lo + 1;
        for (int idx = threadIdx.x; idx < kTile * segs; idx += kThreads) {
            const int i = idx % kTile, a = a_lo + idx / kTile;
            if (i >= q.n) continue;
            const int jb = max(a * r - J0, 0), je = min(a * r + r - J0, j_end);
            float sum = 0.f;
            for (int j = jb; j < je; ++j) sum += pv[i][j];
            dX[(q.row0 + i) * r + a] += sum;
        }
        __syncthreads();  // pv is rewritten, and the next tile adds to the same dX entries
    }
}

// In place: exclusive prefix (reverse = false: Σ of earlier blocks) or suffix (reverse = true:
// Σ of later blocks) over the L blocks of each head. One thread per (head, element), blocks in
// order; loads issued kScanUnroll blocks at a time (independent of the running sum).
constexpr int kScanUnroll = 8;
__global__ void ps_state_scan(float* states, Dims D, bool reverse) {
    const int64_t per_block = (int64_t)D.rp * D.e;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.bh_count * per_block) return;
    const int64_t bh = idx / per_block, within = idx % per_block;
    float* s = states + bh * D.L * per_block + within;
    float run = 0.f;
    for (int k0 = 0; k0 < D.L; k0 += kScanUnroll) {
        float v[kScanUnroll];
#pragma unroll
        for (int u = 0; u < kScanUnroll; ++u) {
            const int k = k0 + u, l = reverse ? D.L - 1 - k : k;
            if (k < D.L) v[u] = s[(int64_t)l * per_block];
        }
#pragma unroll
        for (int u = 0; u < kScanUnroll; ++u) {
            const int k = k0 + u, l = reverse ? D.L - 1 - k : k;
            if (k < D.L) {
                s[(int64_t)l * per_block] = run;
                run += v[u];
            }
        }
    }
}

// ============================================================================ diagonal blocks
// The intra-block part of every block of nb ≤ b rows, with the base features X_q, X_k = q̂, k̂ and
// power p (exact_diag) or A, B and power 2 (nf features per row): S = X_q X_kᵀ (nb, nb),
// W = tril(S^p), out += W C; backward dW = G Cᵀ, dS = tril(p S^(p−1) ∘ dW), dX_q = dS X_k,
// dX_k = dSᵀ X_q, dC = Wᵀ G. Flash-style: a 64 × 64 tile of S (and dW) is computed by block_gemm,
// turned into W or dS in shared memory and multiplied at once, key tile after key tile (query side)
// or query tile after query tile (key side), in order; nothing of size nb² is stored. Grid
// (B·H·L, tiles within one block). Replaced per-block cuBLAS GEMMs through (nb, nb) buffers plus
// power/mask kernels: (to be measured).

// acc = X_q[query tile] X_k[key tile]ᵀ (i query, j key; 0 outside the tiles)
template <Tf32 kTf32>
__device__ __forceinline__ void diag_scores(TcAcc& acc, GemmSmem& sm, const float* Xq, const float* Xk, int nf,
                                            const RowTile& q, const RowTile& k) {
    zero(acc);
    block_gemm<kTf32, true, true>(
        acc, sm, 0, nf, [&](int i, int c) { return i < q.n ? Xq[(q.row0 + i) * nf + c] : 0.f; },
        [&](int c, int j) { return j < k.n ? Xk[(k.row0 + j) * nf + c] : 0.f; });
}
// acc = G[query tile] C[key tile]ᵀ = dW. Its entries cancel (dO·v_j − dO·o_i): SplitA in the bf16
// path (C = [v | 1] is exact in TF32), fp32 accuracy.
template <Tf32 kTf32>
__device__ __forceinline__ void diag_dw(TcAcc& acc, GemmSmem& sm, const float* G, const float* C, int e,
                                        const RowTile& q, const RowTile& k) {
    constexpr Tf32 kMode = kTf32 == Tf32::Single ? Tf32::SplitA : kTf32;
    zero(acc);
    block_gemm<kMode, true, true>(
        acc, sm, 0, e, [&](int i, int c) { return i < q.n ? G[(q.row0 + i) * e + c] : 0.f; },
        [&](int c, int j) { return j < k.n ? C[(k.row0 + j) * e + c] : 0.f; });
}

// out (rows, e) = beta·out + Σ_{j ≤ i in the block} w_ij C_j (out not read when beta = 0); the last
// column by the threads i < 64 of column tile 0 (keys in order). Grid (B·H·L, query tiles × column
// tiles of d).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_diag_fwd(float* out, const float* __restrict__ Xq, const float* __restrict__ Xk, const float* __restrict__ C,
                Dims D, int nf, int p, float beta) {
    __shared__ GemmSmem sm;
    __shared__ float w[kTile][kTile + 1];  // W[query i][key j] of the current key tile
    const int col_tiles = (D.d + kTile - 1) / kTile;
    const int qt = blockIdx.y / col_tiles, j0 = (blockIdx.y % col_tiles) * kTile;
    const RowTile q = row_tile(D, blockIdx.x, qt);
    if (q.n <= 0) return;  // the whole block: before any barrier
    const bool last = j0 == 0 && threadIdx.x < kTile;  // this thread sums the last column of row threadIdx.x
    float last_sum = 0.f;
    TcAcc acc;
    zero(acc);
    for (int kt = 0; kt <= qt; kt++) {
        const RowTile k = row_tile(D, blockIdx.x, kt);
        TcAcc s;
        diag_scores<kTf32>(s, sm, Xq, Xk, nf, q, k);
        for_tile(s, [&](int i, int j, float v) { w[i][j] = kt * kTile + j <= qt * kTile + i ? ipow(v, p) : 0.f; });
        __syncthreads();
        if (last)
            for (int j = 0; j < k.n; j++) last_sum += w[threadIdx.x][j] * C[(k.row0 + j) * D.e + D.d];
        block_gemm<kTf32, true, false>(
            acc, sm, 0, k.n, [&](int i, int c) { return w[i][c]; },
            [&](int c, int j) { return j0 + j < D.d ? C[(k.row0 + c) * D.e + j0 + j] : 0.f; });
    }
    float* o = out + q.row0 * D.e;
    for_tile(acc, [&](int i, int j, float v) {
        if (i < q.n && j0 + j < D.d) {
            float& dst = o[(int64_t)i * D.e + j0 + j];
            dst = beta == 0.f ? v : beta * dst + v;
        }
    });
    if (last && (int)threadIdx.x < q.n) {
        float& dst = o[(int64_t)threadIdx.x * D.e + D.d];
        dst = beta == 0.f ? last_sum : beta * dst + last_sum;
    }
}

// dX_q (rows, nf) = dS X_k over the keys of the block (overwritten). Grid (B·H·L, query tiles ×
// column tiles of nf).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_diag_bwd_q(float* dXq, const float* __restrict__ Xq, const float* __restrict__ Xk, const float* __restrict__ C,
                  const float* __restrict__ G, Dims D, int nf, int p) {
    __shared__ GemmSmem sm;
    __shared__ float ds[kTile][kTile + 1];  // dS[query i][key j] of the current key tile
    const int col_tiles = (nf + kTile - 1) / kTile;
    const int qt = blockIdx.y / col_tiles, c0 = (blockIdx.y % col_tiles) * kTile;
    const RowTile q = row_tile(D, blockIdx.x, qt);
    if (q.n <= 0) return;
    TcAcc acc;
    zero(acc);
    for (int kt = 0; kt <= qt; kt++) {
        const RowTile k = row_tile(D, blockIdx.x, kt);
        TcAcc s, dw;
        diag_scores<kTf32>(s, sm, Xq, Xk, nf, q, k);
        diag_dw<kTf32>(dw, sm, G, C, D.e, q, k);
        for_tile2(s, dw, [&](int i, int j, float sv, float dwv) {
            ds[i][j] = kt * kTile + j <= qt * kTile + i ? p * ipow(sv, p - 1) * dwv : 0.f;
        });
        __syncthreads();
        block_gemm<kTf32, true, false>(
            acc, sm, 0, k.n, [&](int i, int c) { return ds[i][c]; },
            [&](int c, int j) { return c0 + j < nf ? Xk[(k.row0 + c) * nf + c0 + j] : 0.f; });
    }
    for_tile(acc, [&](int i, int j, float v) {
        if (i < q.n && c0 + j < nf) dXq[(q.row0 + i) * nf + c0 + j] = v;
    });
}

// Key side, overwritten: dX_k (rows, nf) = dSᵀ X_q and dC (rows, e) = Wᵀ G over the queries of the
// block (the last column of dC by the threads j < 64 of dC's column tile 0, queries in order).
// Grid (B·H·L, key tiles × (column tiles of nf, then of d)).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_diag_bwd_k(float* dXk, float* dC, const float* __restrict__ Xq, const float* __restrict__ Xk,
                  const float* __restrict__ C, const float* __restrict__ G, Dims D, int nf, int p) {
    __shared__ GemmSmem sm;
    __shared__ float t[kTile][kTile + 1];  // dS or W [query i][key j] of the current query tile
    const int nf_tiles = (nf + kTile - 1) / kTile, tiles = nf_tiles + (D.d + kTile - 1) / kTile;
    const int kt = blockIdx.y / tiles, which = blockIdx.y % tiles;
    const bool is_dc = which >= nf_tiles;  // this block's output: dC, else dX_k
    const int c0 = (is_dc ? which - nf_tiles : which) * kTile;
    const int ld = is_dc ? D.e : nf, width = is_dc ? D.d : nf;  // row stride, columns by block_gemm
    const RowTile k = row_tile(D, blockIdx.x, kt);
    if (k.n <= 0) return;
    const float* Y = is_dc ? G : Xq;  // the right operand, (rows, ld)
    const bool last = is_dc && c0 == 0 && threadIdx.x < kTile;  // this thread sums dC[key threadIdx.x, d]
    float last_sum = 0.f;
    TcAcc acc;
    zero(acc);
    for (int qt = kt;; qt++) {
        const RowTile q = row_tile(D, blockIdx.x, qt);
        if (q.n <= 0) break;
        TcAcc s;
        diag_scores<kTf32>(s, sm, Xq, Xk, nf, q, k);
        if (is_dc) {
            for_tile(s, [&](int i, int j, float v) { t[i][j] = kt * kTile + j <= qt * kTile + i ? ipow(v, p) : 0.f; });
        } else {
            TcAcc dw;
            diag_dw<kTf32>(dw, sm, G, C, D.e, q, k);
            for_tile2(s, dw, [&](int i, int j, float sv, float dwv) {
                t[i][j] = kt * kTile + j <= qt * kTile + i ? p * ipow(sv, p - 1) * dwv : 0.f;
            });
        }
        __syncthreads();
        if (last)
            for (int c = 0; c < q.n; c++) last_sum += t[c][threadIdx.x] * G[(q.row0 + c) * D.e + D.d];
        block_gemm<kTf32, false, false>(
            acc, sm, 0, q.n, [&](int i, int c) { return t[c][i]; },
            [&](int c, int j) { return c0 + j < width ? Y[(q.row0 + c) * ld + c0 + j] : 0.f; });
    }
    float* dst = is_dc ? dC : dXk;
    for_tile(acc, [&](int i, int j, float v) {
        if (i < k.n && c0 + j < width) dst[(k.row0 + i) * ld + c0 + j] = v;
    });
    if (last && (int)threadIdx.x < k.n) dC[(k.row0 + threadIdx.x) * D.e + D.d] = last_sum;
}

// o (rows, d) = U[:, :d] / (1 + U[:, d]), den (rows) = 1 + U[:, d]. One thread per element of o.
template <typename T>
__global__ void ps_finish_out(Strided O, float* den, const float* U, Dims D) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.d) return;
    const int64_t n = idx / D.d;
    const int x = (int)(idx % D.d);
    const float dn = 1.f + U[n * D.e + D.d];
    row_ptr<T>(O, n, D.H, D.T)[x] = from_f32<T>(U[n * D.e + x] / dn);
    if (x == 0) den[n] = dn;
}

// ============================================================================ backward rows
// dq, dk rows = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂∘x̂)) (rows 0..rows−1 are q, then k). One warp per row.
template <typename T>
__global__ void ps_layernorm_bwd(Strided dQ, Strided dK, const float* dxh, const float* xh,
                                 const float* rstd, Dims D) {
    const int64_t n = warp_row();
    if (n >= 2 * D.rows) return;
    const int lane = threadIdx.x % 32;
    const bool is_k = n >= D.rows;
    const float* dx = dxh + n * D.d;
    const float* x = xh + n * D.d;
    float m1 = 0.f, m2 = 0.f;
    for (int i = lane; i < D.d; i += 32) {
        m1 += dx[i];
        m2 += dx[i] * x[i];
    }
    m1 = warp_sum(m1) / D.d;
    m2 = warp_sum(m2) / D.d;
    T* out = row_ptr<T>(is_k ? dK : dQ, is_k ? n - D.rows : n, D.H, D.T);
    const float rs = rstd[n];
    for (int i = lane; i < D.d; i += 32) out[i] = from_f32<T>(rs * (dx[i] - m1 - x[i] * m2));
}

// dv (rows, d) = dC[:, :d]
template <typename T>
__global__ void ps_write_dv(Strided dV, const float* dC, Dims D) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.d) return;
    const int64_t n = idx / D.d;
    const int x = (int)(idx % D.d);
    row_ptr<T>(dV, n, D.H, D.T)[x] = from_f32<T>(dC[n * D.e + x]);
}

// ============================================================================ host side
template <typename T> struct TypeTag { using type = T; };

int grid_of(int64_t n, int threads) { return ceil_div(n, threads); }

// Offsets (floats) of everything in the workspace.
struct WorkspacePlan {
    int64_t xh, rstd, M, C, G, states, dxh, dM, dC, pairs, p32, sk, total;
    int64_t sk_rows;  // rows per chunk of the learned sketch (0 for the random sketch)
    int64_t skk;      // the learned sketch's kept outputs (5, 2·rows, r): blocks (f, g) = (0,0) (0,1) (1,0) (1,1), tz
    WorkspacePlan(const AttnShape& s, int r, int block, size_t num_params) {
        const int64_t rows = (int64_t)s.rows(), d = s.d, e = d + 1;
        const int64_t L = (s.T + block - 1) / block, rp = (int64_t)r * (r + 1) / 2;
        int64_t off = 0;
        auto take = [&](int64_t n) { int64_t o = off; off += (n + 63) / 64 * 64; return o; };
        xh = take(2 * rows * d);
        rstd = take(2 * rows);
        M = take(2 * rows * r);
        C = take(rows * e);
        G = take(rows * e);
        states = take((int64_t)s.B * s.H * L * rp * e);
        dxh = take(2 * rows * d);
        dM = take(2 * rows * r);
        dC = take(rows * e);
        pairs = take(rp);  // ints
        p32 = take((int64_t)num_params);
        // rows per chunk: as many as fit kSketchChunkFloats (at least 256), at most all 2·rows
        const int64_t per_row = SketchChunk((int)d, r, 64).total / 64;
        sk_rows = num_params ? std::min<int64_t>(2 * rows, std::max<int64_t>(256, kSketchChunkFloats / per_row)) : 0;
        sk = take(num_params ? SketchChunk((int)d, r, sk_rows).total : 0);
        skk = take(num_params ? 5 * 2 * rows * r : 0);
        total = off;
    }
};

class CudaPolySketchAttention : public Attention {
public:
    explicit CudaPolySketchAttention(const AttnConfig& cfg) : cfg_(cfg) {
        CHECK(cfg.degree >= 2 && cfg.degree % 2 == 0,
              "--degree %d: polysketch needs an even degree >= 2 (the weights must be non-negative)", cfg.degree);
        CHECK(cfg.sketch_size >= 1 && cfg.sketch_size <= kMaxSketch,
              "--sketch-size %d: the CUDA polysketch supports sketch sizes 1..%d", cfg.sketch_size, kMaxSketch);
        CHECK(cfg.block >= 1, "--block %d: polysketch needs a block size >= 1", cfg.block);
    }
    ~CudaPolySketchAttention() override {
        for (auto& kv : random_sketch_) cudaFree(kv.second);  // no throw from a destructor
    }
    std::string name() const override { return "polysketch"; }
    size_t num_params(int d) const override {
        return cfg_.sketch_learned ? polysketch_layout(d, cfg_.sketch_size).total : 0;
    }
    std::vector<bool> param_decay_mask(int d) const override {
        if (!cfg_.sketch_learned) return {};
        return polysketch_decay_mask(polysketch_layout(d, cfg_.sketch_size));
    }
    void init_params(float* host_params, int d, uint64_t seed) const override {
        if (cfg_.sketch_learned) polysketch_init_params(host_params, polysketch_layout(d, cfg_.sketch_size), seed);
    }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // 1 + δ per row
    size_t workspace_bytes(const AttnShape& s) const override {
        return (size_t)plan(s).total * sizeof(float);
    }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q, HeadTensor k,
                 HeadTensor v, float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"o", o}, {"q", q}, {"k", k}, {"v", v}});
        CHECK(saved != nullptr && workspace != nullptr,
              "polysketch attention: forward needs the saved buffer and a workspace of %zu bytes", workspace_bytes(s));
        float* ws = static_cast<float*>(workspace);
        const WorkspacePlan P = plan(s);
        const Dims D = dims(s);
        set_math(dt);
        const float* sketch = prepare_sketch(s, ctx, params, ws, P);
        features(dt, D, q, k, v, ws, P, sketch);
        // U (rows, e) in the G buffer: the inter-block part φ(A)·Z of every row (zero in block 0),
        // plus the diagonal blocks' part; then o and the denominators from U
        float* U = ws + P.G;
        if (D.L > 1) {
            build_states(D, P, ws, ws + P.states, ws + P.M + D.rows * D.r, ws + P.C, false);
            apply_states(D, P, ws, U, ws + P.M, ws + P.states, 0.f);
        }
        diag_forward(D, P, ws, U, D.L > 1 ? 1.f : 0.f);
        by_type(dt, [&](auto t_tag) {
            using T = typename decltype(t_tag)::type;
            ps_finish_out<T><<<grid_of(D.rows * D.d, 256), 256>>>(strided(o), saved, U, D);
        });
        CUDA_LAUNCH_CHECK();
    }

    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk, HeadTensor dv,
                  Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k, HeadTensor v, HeadTensor o,
                  const float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dout", dout},
                                           {"q", q}, {"k", k}, {"v", v}, {"o", o}});
        CHECK(saved != nullptr && workspace != nullptr,
              "polysketch attention: backward needs the saved buffer and a workspace of %zu bytes", workspace_bytes(s));
        if (cfg_.sketch_learned)
            CHECK(dparams.dtype == DType::F32 && dparams.n == num_params(s.d) && dparams.ptr != nullptr,
                  "polysketch attention: dparams holds %zu %s values; expected %zu fp32", dparams.n,
                  dtype_name(dparams.dtype), num_params(s.d));
        float* ws = static_cast<float*>(workspace);
        const WorkspacePlan P = plan(s);
        const Dims D = dims(s);
        set_math(dt);
        const float* sketch = prepare_sketch(s, ctx, params, ws, P);
        features(dt, D, q, k, v, ws, P, sketch);
        float *xh = ws + P.xh, *M = ws + P.M, *C = ws + P.C, *G = ws + P.G, *states = ws + P.states;
        float *dxh = ws + P.dxh, *dM = ws + P.dM, *dC = ws + P.dC;
        const float* A = M;
        const float* Bk = M + D.rows * D.r;
        float* dA = dM;
        float* dB = dM + D.rows * D.r;
        by_type(dt, [&](auto t_tag) {
            using T = typename decltype(t_tag)::type;
            ps_out_grad<T><<<grid_of(D.rows, kWarps), 32 * kWarps>>>(G, strided(dout), strided(o), saved, D);
        });
        CUDA_LAUNCH_CHECK();
        // the diagonal blocks: dC, and dq̂, dk̂ (exact_diag) or dA, dB (sketched), the other pair zeroed
        diag_backward(D, P, ws);
        if (D.L > 1) {
            // prefix Z from (B, C): dA += 2 Σ_c A_c (Z[a,c,:]·g)  (Z of block 0 is exactly 0)
            build_states(D, P, ws, states, Bk, C, false);
            contract_states(D, dA, A, G, states);
            // suffix R from (A, G): dC += Σ_ac B_a B_c R[a,c,:], dB += 2 Σ_c B_c (R[a,c,:]·C)  (R of the
            // last block is exactly 0)
            build_states(D, P, ws, states, A, G, true);
            apply_states(D, P, ws, dC, Bk, states, 1.f);
            contract_states(D, dB, Bk, C, states);
        }
        // through the sketch into dxh (and the parameters)
        const int64_t n2 = 2 * D.rows;
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(s.d, cfg_.sketch_size);
            const SketchChunk S(s.d, D.r, P.sk_rows);
            float* ck = ws + P.sk;
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_bwd(L, ws + P.p32, dparams.f32(), xh + row0 * D.d, dM + row0 * D.r, dxh + row0 * D.d,
                                         nc, ck, S, SketchKeep(ws, P, D, row0));
            }
        } else {
            ps_sketch_random_bwd<<<grid_of(n2, kWarps), 32 * kWarps, kWarps * 2 * D.r * (int)sizeof(float)>>>(
                dxh, dM, xh, sketch, D.d, D.r, n2);
            CUDA_LAUNCH_CHECK();
        }
        const float* rstd = ws + P.rstd;
        if (dt == DType::BF16) {
            ps_layernorm_bwd<bf16><<<grid_of(n2, kWarps), 32 * kWarps>>>(strided(dq), strided(dk), dxh, xh, rstd, D);
            CUDA_LAUNCH_CHECK();
            ps_write_dv<bf16><<<grid_of(D.rows * D.d, 256), 256>>>(strided(dv), dC, D);
        } else {
            ps_layernorm_bwd<float><<<grid_of(n2, kWarps), 32 * kWarps>>>(strided(dq), strided(dk), dxh, xh, rstd, D);
            CUDA_LAUNCH_CHECK();
            ps_write_dv<float><<<grid_of(D.rows * D.d, 256), 256>>>(strided(dv), dC, D);
        }
        CUDA_LAUNCH_CHECK();
    }

private:
    template <typename Fn>
    static void by_type(DType dt, Fn&& fn) {
        if (dt == DType::BF16) fn(TypeTag<bf16>{});
        else fn(TypeTag<float>{});
    }

    WorkspacePlan plan(const AttnShape& s) const {
        return WorkspacePlan(s, cfg_.sketch_size, cfg_.block, num_params(s.d));
    }
    Dims dims(const AttnShape& s) const {
        Dims D;
        D.H = s.H;
        D.T = s.T;
        D.d = s.d;
        D.r = cfg_.sketch_size;
        D.rp = D.r * (D.r + 1) / 2;
        D.e = s.d + 1;
        D.block = cfg_.block;
        D.L = (s.T + cfg_.block - 1) / cfg_.block;
        D.degree = cfg_.degree;
        D.rows = (int64_t)s.rows();
        D.bh_count = (int64_t)s.B * s.H;
        return D;
    }

    // bf16 storage: the products on the tensor cores in one TF32 product (10 mantissa bits, finer
    // than the bf16 inputs). fp32 storage (the checking path): 3xTF32, fp32 accuracy.
    void set_math(DType dt) { split_ = dt != DType::BF16; }

    // fn(std::integral_constant<Tf32, mode>) with the block_gemm mode of this call (split_)
    template <typename Fn>
    void by_tf32(Fn&& fn) const {
        if (split_) fn(std::integral_constant<Tf32, Tf32::Split>{});
        else fn(std::integral_constant<Tf32, Tf32::Single>{});
    }

    // The kept outputs of the learned sketch (the inputs of the second blocks and of the tanh) of the
    // rows from row0 on: views of the workspace's skk (5, 2·rows, r).
    struct SketchKeep {
        float* out[2][2];  // (rows, r) of block (f, g)
        float* tz;         // (rows, r) tanh(f1 f2 / sqrt r)
        SketchKeep(float* ws, const WorkspacePlan& P, const Dims& D, int64_t row0) {
            const int64_t n2r = 2 * D.rows * D.r;
            float* base = ws + P.skk + row0 * D.r;
            for (int f = 0; f < 2; f++)
                for (int g = 0; g < 2; g++) out[f][g] = base + (2 * f + g) * n2r;
            tz = base + 4 * n2r;
        }
    };

    // The learned sketch forward of nc rows x (nc, d): the blocks' outputs and tz into K,
    // m (nc, r) = M(x).
    void sketch_learned_chunk_fwd(const PolySketchLayout& L, const float* p, const float* x, int nc, float* m,
                                  const SketchKeep& K) {
        const int hid = L.hidden, r = L.r;
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const PolySketchLayout::Block& b = L.blk[f][g];
                const float* in = g == 0 ? x : K.out[f][0];
                by_tf32([&](auto mode) {
                    ps_sk_block_fwd<decltype(mode)::value><<<ceil_div(nc, kTile), kThreads>>>(
                        K.out[f][g], in, p + b.ln_w, p + b.ln_b, p + b.w_in, p + b.w_out, b.n_in, r, hid, nc);
                });
                CUDA_LAUNCH_CHECK();
            }
        ps_sk_tanh<<<grid_of((int64_t)nc * r, 256), 256>>>(K.tz, m, K.out[0][1], K.out[1][1], r, (int64_t)nc * r);
        CUDA_LAUNCH_CHECK();
    }
    // One block (f, g) backward on the chunk: in (nc, n_in) its input, dout (nc, r) -> din (nc, n_in);
    // dp (the parameter gradient) += this block's part (per-slice partials summed in slice order).
    void sketch_block_chunk_bwd(const PolySketchLayout& L, const float* p, float* dp, int f, int g, const float* in,
                                const float* dout, float* din, int nc, float* ck, const SketchChunk& S) {
        const PolySketchLayout::Block& b = L.blk[f][g];
        const int n = b.n_in, hid = L.hidden, r = L.r;
        const int slices = ceil_div(nc, kGradSliceRows), hid_tiles = ceil_div(hid, kTile);
        float *mean = ck + S.mean, *rstd = ck + S.rstd, *dn_part = ck + S.dn_part;
        float *part_wo = ck + S.part_wo, *part_wi = ck + S.part_wi, *part_ln = ck + S.part_ln;
        ps_sk_ln_stats<<<grid_of(nc, kWarps), 32 * kWarps>>>(mean, rstd, in, n, nc);
        CUDA_LAUNCH_CHECK();
        by_tf32([&](auto mode) {
            constexpr Tf32 m = decltype(mode)::value;
            const dim3 grid(hid_tiles, slices);
            if (r > kTile || n > kTile)
                ps_sk_block_bwd<m, 2><<<grid, kThreads>>>(part_wo, part_wi, dn_part, in, mean, rstd, dout, p + b.ln_w,
                                                          p + b.ln_b, p + b.w_in, p + b.w_out, n, r, hid, nc);
            else
                ps_sk_block_bwd<m, 1><<<grid, kThreads>>>(part_wo, part_wi, dn_part, in, mean, rstd, dout, p + b.ln_w,
                                                          p + b.ln_b, p + b.w_in, p + b.w_out, n, r, hid, nc);
        });
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of((int64_t)r * hid, 256), 256>>>(dp + b.w_out, part_wo, slices, (int64_t)r * hid);
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of((int64_t)hid * n, 256), 256>>>(dp + b.w_in, part_wi, slices, (int64_t)hid * n);
        CUDA_LAUNCH_CHECK();
        // din, and (dln_w, dln_b) += (Σ dn∘x̂, Σ dn): ln_b follows ln_w in the layout
        ps_sk_ln_bwd<<<slices, 32 * kWarps>>>(din, part_ln, dn_part, hid_tiles, in, mean, rstd, p + b.ln_w, n, nc);
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of(2 * n, 256), 256>>>(dp + b.ln_w, part_ln, slices, 2 * n);
        CUDA_LAUNCH_CHECK();
    }
    // The learned sketch backward of the chunk x (nc, d): dxh (nc, d) += the gradient of dm (nc, r)
    // through M; dp += the parameter gradient. K: the kept outputs of sketch_learned_chunk_fwd.
    void sketch_learned_chunk_bwd(const PolySketchLayout& L, const float* p, float* dp, const float* x,
                                  const float* dm, float* dxh, int nc, float* ck, const SketchChunk& S,
                                  const SketchKeep& K) {
        const int64_t nr = (int64_t)nc * L.r, nd = (int64_t)nc * L.d;
        ps_sk_tanh_bwd<<<grid_of(nr, 256), 256>>>(ck + S.df[0], ck + S.df[1], dm, K.tz, K.out[0][1], K.out[1][1],
                                                 nr);
        CUDA_LAUNCH_CHECK();
        for (int f = 0; f < 2; f++) {
            sketch_block_chunk_bwd(L, p, dp, f, 1, K.out[f][0], ck + S.df[f], ck + S.dy, nc, ck, S);
            sketch_block_chunk_bwd(L, p, dp, f, 0, x, ck + S.dy, ck + S.dxf[f], nc, ck, S);
        }
        ps_sk_add2<<<grid_of(nd, 256), 256>>>(dxh, ck + S.dxf[0], ck + S.dxf[1], nd);
        CUDA_LAUNCH_CHECK();
    }

    // The learned parameters converted to fp32 in the workspace, or the random S
    // of this layer on the device. Returns the pointer the row kernels read (p32 or S).
    const float* prepare_sketch(const AttnShape& s, const AttnContext& ctx, const Tensor& params, float* ws,
                                const WorkspacePlan& P) {
        const int r = cfg_.sketch_size;
        if (!cfg_.sketch_learned) {
            auto it = random_sketch_.find(ctx.layer);
            if (it == random_sketch_.end() || random_sketch_d_ != s.d) {
                if (random_sketch_d_ != s.d) {
                    for (auto& kv : random_sketch_) CUDA_CHECK(cudaFree(kv.second));
                    random_sketch_.clear();
                    random_sketch_d_ = s.d;
                }
                const std::vector<float> S = polysketch_random_sketch(s.d, r, cfg_.seed, ctx.layer);
                float* dev = nullptr;
                CUDA_CHECK(cudaMalloc(&dev, S.size() * sizeof(float)));
                CUDA_CHECK(cudaMemcpy(dev, S.data(), S.size() * sizeof(float), cudaMemcpyHostToDevice));
                it = random_sketch_.emplace(ctx.layer, dev).first;
            }
            return it->second;
        }
        const PolySketchLayout L = polysketch_layout(s.d, r);
        CHECK(params.ptr != nullptr && params.n == L.total,
              "polysketch attention: params hold %zu values; expected %zu (the learned sketch for d=%d, r=%d)",
              params.n, L.total, s.d, r);
        float* p32 = ws + P.p32;
        const int64_t n = (int64_t)L.total;
        if (params.dtype == DType::BF16)
            ps_params_to_f32<bf16><<<grid_of(n, 256), 256>>>(p32, static_cast<const bf16*>(params.ptr), n);
        else
            ps_params_to_f32<float><<<grid_of(n, 256), 256>>>(p32, static_cast<const float*>(params.ptr), n);
        CUDA_LAUNCH_CHECK();
        return p32;
    }

    // xh, rstd (LayerNorms of q and k), C = [v | 1] and M = [A; B] (the sketches) into the workspace.
    void features(DType dt, const Dims& D, const HeadTensor& q, const HeadTensor& k, const HeadTensor& v, float* ws,
                  const WorkspacePlan& P, const float* sketch) {
        const int64_t n2 = 2 * D.rows;
        by_type(dt, [&](auto t_tag) {
            using T = typename decltype(t_tag)::type;
            ps_layernorm<T><<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.xh, ws + P.rstd, strided(q), strided(k), D);
            CUDA_LAUNCH_CHECK();
            ps_values<T><<<grid_of(D.rows * D.e, 256), 256>>>(ws + P.C, strided(v), D);
        });
        CUDA_LAUNCH_CHECK();
        ps_pair_table<<<grid_of(D.r * D.r, 256), 256>>>(reinterpret_cast<int*>(ws + P.pairs), D.r);
        CUDA_LAUNCH_CHECK();
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(D.d, D.r);
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_fwd(L, ws + P.p32, ws + P.xh + row0 * D.d, nc, ws + P.M + row0 * D.r,
                                         SketchKeep(ws, P, D, row0));
            }
        } else {
            ps_sketch_random_fwd<<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.M, ws + P.xh, sketch, D.d, D.r, n2);
        }
        CUDA_LAUNCH_CHECK();
    }

    // Grid of the state kernels: x = every block of every head, y = tiles within one block.
    static dim3 state_grid(const Dims& D, int tiles) { return dim3((unsigned)(D.bh_count * D.L), (unsigned)tiles); }
    // states <- per-block Σ_t φ(X_t) Y_tᵀ (r(r+1)/2, e), then the exclusive prefix (reverse: suffix) over blocks
    void build_states(const Dims& D, const WorkspacePlan& P, float* ws, float* states, const float* X, const float* Y,
                      bool reverse) {
        const int* pairs = reinterpret_cast<const int*>(ws + P.pairs);
        const dim3 grid = state_grid(D, ceil_div(D.rp, kTile) * ceil_div(D.d, kTile));
        if (split_) ps_build_states<Tf32::Split><<<grid, kThreads>>>(states, X, Y, pairs, D);
        else ps_build_states<Tf32::Single><<<grid, kThreads>>>(states, X, Y, pairs, D);
        CUDA_LAUNCH_CHECK();
        const int64_t per_block = (int64_t)D.rp * D.e;
        ps_state_scan<<<grid_of(D.bh_count * per_block, 256), 256>>>(states, D, reverse);
        CUDA_LAUNCH_CHECK();
    }
    // out (rows, e) = beta·out + φ(X_t)·S_l(t) (= Σ_ac X_ta X_tc S_l(t)[a,c,:] of the full form)
    void apply_states(const Dims& D, const WorkspacePlan& P, float* ws, float* out, const float* X, const float* states,
                      float beta) {
        const int* pairs = reinterpret_cast<const int*>(ws + P.pairs);
        const dim3 grid = state_grid(D, ceil_div(std::min(D.block, D.T), kTile) * ceil_div(D.d, kTile));
        if (split_) ps_apply_states<Tf32::Split><<<grid, kThreads>>>(out, X, states, pairs, D, beta);
        else ps_apply_states<Tf32::Single><<<grid, kThreads>>>(out, X, states, pairs, D, beta);
        CUDA_LAUNCH_CHECK();
    }
    // dX_t += ∂(φ(X_t)·V_t)/∂X_t with V_t = S_l(t) Y_t
    void contract_states(const Dims& D, float* dX, const float* X, const float* Y, const float* states) {
        const dim3 grid = state_grid(D, ceil_div(std::min(D.block, D.T), kTile));
        by_tf32([&](auto mode) {
            ps_contract_states<decltype(mode)::value><<<grid, kThreads>>>(dX, X, Y, states, D);
        });
        CUDA_LAUNCH_CHECK();
    }

    // out (rows, e) = beta·out + the diagonal blocks' part Σ_{j ≤ i, same block} w_ij C_j
    void diag_forward(const Dims& D, const WorkspacePlan& P, float* ws, float* out, float beta) {
        const bool exact = cfg_.exact_diag;
        const int nf = exact ? D.d : D.r, p = exact ? D.degree : 2;
        const float* Xq = ws + (exact ? P.xh : P.M);  // (rows, nf) q̂ or A, then the k̂ or B rows
        const float* Xk = Xq + D.rows * nf;
        const int q_tiles = ceil_div(std::min(D.block, D.T), kTile);
        const dim3 grid = state_grid(D, q_tiles * ceil_div(D.d, kTile));
        by_tf32([&](auto mode) {
            ps_diag_fwd<decltype(mode)::value><<<grid, kThreads>>>(out, Xq, Xk, ws + P.C, D, nf, p, beta);
        });
        CUDA_LAUNCH_CHECK();
    }
    // The diagonal blocks' gradients, overwriting: dC (rows, e); dq̂, dk̂ in dxh (exact_diag) or dA, dB
    // in dM (sketched), the other one zeroed (both are accumulated into afterwards).
    void diag_backward(const Dims& D, const WorkspacePlan& P, float* ws) {
        const bool exact = cfg_.exact_diag;
        const int nf = exact ? D.d : D.r, p = exact ? D.degree : 2;
        const float* Xq = ws + (exact ? P.xh : P.M);
        const float* Xk = Xq + D.rows * nf;
        float* dXq = ws + (exact ? P.dxh : P.dM);
        float* dXk = dXq + D.rows * nf;
        const float *C = ws + P.C, *G = ws + P.G;
        const int tiles = ceil_div(std::min(D.block, D.T), kTile), nf_tiles = ceil_div(nf, kTile);
        by_tf32([&](auto mode) {
            constexpr Tf32 m = decltype(mode)::value;
            ps_diag_bwd_q<m><<<state_grid(D, tiles * nf_tiles), kThreads>>>(dXq, Xq, Xk, C, G, D, nf, p);
            CUDA_LAUNCH_CHECK();
            ps_diag_bwd_k<m><<<state_grid(D, tiles * (nf_tiles + ceil_div(D.d, kTile))), kThreads>>>(
                dXk, ws + P.dC, Xq, Xk, C, G, D, nf, p);
        });
        CUDA_LAUNCH_CHECK();
        const int64_t other = exact ? 2 * D.rows * D.r : 2 * D.rows * D.d;
        CUDA_CHECK(cudaMemsetAsync(ws + (exact ? P.dM : P.dxh), 0, other * sizeof(float), 0));
    }

    static DType check_tensors(const AttnShape& s, std::initializer_list<std::pair<const char*, HeadTensor>> ts) {
        CHECK(s.d == 64 || s.d == 128,
              "polysketch attention (CUDA): head dim d=%d is not supported; use n_embd/n_head = 64 or 128", s.d);
        CHECK(s.B >= 1 && s.H >= 1 && s.T >= 1, "polysketch attention: bad shape B=%d H=%d T=%d", s.B, s.H, s.T);
        const DType dt = ts.begin()->second.dtype;
        for (const auto& [what, t] : ts) {
            CHECK(t.ptr != nullptr, "polysketch attention: tensor %s is null", what);
            CHECK(t.dtype == dt, "polysketch attention: tensor %s is %s but %s is %s", what, dtype_name(t.dtype),
                  ts.begin()->first, dtype_name(dt));
        }
        return dt;
    }

    AttnConfig cfg_;
    std::map<int, float*> random_sketch_;  // layer -> S (2, d, r) on the device
    int random_sketch_d_ = -1;
    bool split_ = true;  // block_gemm products: Tf32::Split (fp32 storage) or Tf32::Single (bf16), set by set_math
};

}  // namespace

std::unique_ptr<Attention> make_cuda_polysketch_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaPolySketchAttention>(cfg);
}
