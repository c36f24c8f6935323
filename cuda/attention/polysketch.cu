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
// Implementation (deterministic: no float atomics, every sum in a fixed order). Two paths share
// the algorithm, the workspace and the row kernels; they differ in how the products run:
//   - bf16 storage (the fast path): the learned sketch on bf16 tensor cores (polysketch_sketch_tc.cuh:
//     one fused flash-style kernel per sketch block forward, one per block backward, for r ∈ {16, 32};
//     other r fall back to the TF32 kernels below), the block states as cuBLAS bf16 GEMMs (fp32
//     accumulation) over materialised packed features Φ (rows, r(r+1)/2) bf16 and bf16 copies of C,
//     G and the scanned states; the diagonal blocks and the rest as below in TF32;
//   - fp32 storage (the checking path): tensor-core tile GEMMs with fp32 accuracy (block_gemm of
//     tf32_block_gemm.cuh, Tf32::Split: 64×64 output tile per 256-thread block, operands read
//     through loaders that compute them on the fly: features from a table of (a, c) pairs, LN(in),
//     GELU activations) for the block states and the sketch, cuBLAS SGEMM for the rest.
//   - every intermediate is fp32 in the workspace (q̂, k̂, rstd, A|B, C, G, block states, their
//     gradients; every (.., e) array with rows of ldy = e rounded up to 8): O(B·H·T·(d + r²/2) +
//     B·H·(T/b)·r(r+1)/2·(d+1)) floats plus fixed-size run buffers, linear in T;
//   - the diagonal blocks are dense GEMMs per block: S = X_q X_kᵀ (b, b), W = tril(S^p) by a kernel,
//     out += W C; the backward dW = G Cᵀ, dS, then dX_q = dS X_k, dX_k = dSᵀ X_q, dC = Wᵀ G;
//   - the block states use the packed symmetric features φ(x) (r(r+1)/2 per row, sqrt(2) off the
//     diagonal: ⟨φ(x), φ(y)⟩ = ⟨x, y⟩², half the r² of x⊗x): build H_l = Φ_lᵀ Y_l, apply
//     out_l (+)= Φ_l S_l, contract V_l = Y_l S_lᵀ then dX_t = ∂(φ(X_t)·V_t)/∂X_t; the prefix/suffix
//     over blocks is a sequential loop per element;
//   - the learned sketch runs on chunks of rows, one forward and one backward kernel per sketch
//     block g (only the blocks' outputs and tanh are stored, for every row: the backward's forward
//     pass leaves them for its sketch backward); the backward per (64 hidden units, slice of rows)
//     writes weight-gradient partials (Σ over the slice) and dn partials per 64 hidden units, summed
//     in order (slices into dparams +=, hidden tiles in the LayerNorm backward).
// Speed (B=2 H=12 T=32768 d=64 bf16 f+b on an H100): 129.7 ms with TF32 block_gemm everywhere
// (latency-bound 64×64 tiles: sketch 59%, states 21% of the time) -> 55.4 ms with the bf16
// tensor-core sketch and the bf16 cuBLAS states -> 46.0 ms with aligned (ldy) rows, the hardware
// tanh in the sketch kernels and fewer gradient partials; our softmax: 54.2 ms in the same run
// -> 40.7 ms with 2 GB sketch chunks and a 512 MB contraction buffer (fewer rounds; softmax, by
// then with all flash kernels on wgmma: 42.9 ms in the same run).
// Math: bf16 storage rounds the sketch's LN(x), GELU activations and dh, the features Φ, G and the
// states to bf16 (2^-9 relative) for the tensor cores, accumulating in fp32, and runs the diagonal
// blocks in TF32 (cuBLAS TF32 math: 10 mantissa bits); fp32 storage keeps fp32
// accuracy (Tf32::Split, i.e. 3xTF32, and cuBLAS SGEMM). cuBLAS (one handle per Attention object,
// default stream, no split-K reductions across calls) is bitwise reproducible run to run on one GPU
// model, so forward and backward are bitwise deterministic.
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
#include "cuda/attention/polysketch_sketch_tc.cuh"
#include "cuda/attention/tf32_block_gemm.cuh"

namespace {

constexpr float kLnEps = ps_tc::kLnEps;
constexpr int kWarps = 8;            // warps per block of the row-per-warp kernels
// chunk buffers of the learned sketch (2 GB): B=2 H=12 T=32k bf16 f+b 46.2 ms with 512 MB chunks
// (11 per pass, each with its launch tails and partial sums), 41.1 ms with 2 GB (3 per pass), H100
constexpr int64_t kSketchChunkFloats = int64_t(1) << 29;
constexpr int kGradSliceRows = 512;  // rows per partial of the LayerNorm-affine gradient (one block each)
constexpr int kWeightSliceRows = 2048;  // rows per partial of the Linear-weight gradients (4x fewer partials
                                        // to sum than slices of 512)
constexpr int64_t kContractFloats = int64_t(1) << 27;  // V buffer of the state contraction (512 MB; at least one block;
                                                      // 4x fewer GEMM + finish rounds than 128 MB)
constexpr int64_t kDiagFloats = int64_t(1) << 25;  // each of the two (nb, nb) buffers of the diagonal blocks (128 MB)
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

using ps_tc::gelu;  // the tanh approximation, as the CPU reference
using ps_tc::gelu_grad;

__device__ __forceinline__ int64_t warp_row() {
    return (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}

// Problem sizes every kernel needs.
struct Dims {
    int H, T, d, r, rp, e, block, L, degree;  // rp = r(r+1)/2 features of a state, e = d + 1, L = number of blocks
    int rpp;  // row stride of Φ (bf16 storage): rp rounded up to 8
    int ldy;  // row stride of every (.., e) array (C, G/U, dC, the states, their bf16 copies): e rounded up
              // to 8, the columns e.. zero where a GEMM reads them (16-byte aligned rows for cuBLAS)
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

// C (rows, ldy) = [v | 1 | 0..], and its bf16 copy C16 unless null
template <typename T>
__global__ void ps_values(float* C, bf16* C16, Strided V, Dims D) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.ldy) return;
    const int64_t n = idx / D.ldy;
    const int x = (int)(idx % D.ldy);
    const float c = x < D.d ? to_f32(row_ptr<const T>(V, n, D.H, D.T)[x]) : x == D.d ? 1.f : 0.f;
    C[idx] = c;
    if (C16) C16[idx] = __float2bfloat16(c);
}

// G (rows, ldy) = [dO, −dO·o, 0..] / den, and its bf16 copy G16 unless null. One warp per row.
template <typename T>
__global__ void ps_out_grad(float* G, bf16* G16, Strided dO, Strided O, const float* den, Dims D) {
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const T* g = row_ptr<const T>(dO, n, D.H, D.T);
    const T* o = row_ptr<const T>(O, n, D.H, D.T);
    const float inv = 1.f / den[n];
    float dot = 0.f;
    float* out = G + n * D.ldy;
    bf16* out16 = G16 ? G16 + n * D.ldy : nullptr;
    for (int i = lane; i < D.d; i += 32) {
        const float gi = to_f32(g[i]);
        dot += gi * to_f32(o[i]);
        out[i] = gi * inv;
        if (out16) out16[i] = __float2bfloat16(gi * inv);
    }
    dot = warp_sum(dot);
    for (int i = D.d + lane; i < D.ldy; i += 32) {
        const float v = i == D.d ? -dot * inv : 0.f;
        out[i] = v;
        if (out16) out16[i] = __float2bfloat16(v);
    }
}

// ============================================================================ the learned sketch
// The sketch network runs on chunks of rows at a time (see the top of the file); the parameter
// gradients are per-slice partials (kWeightSliceRows / kGradSliceRows rows) summed in slice order into dparams (+=),
// chunk after chunk. Parameters: `p` is an fp32 copy of params in the layout of
// polysketch_sketch.h (Linear weights (out, in) row-major). Row-major chunk buffers, one row per
// sketch input row.
template <typename T>
__global__ void ps_params_to_f32(float* p, const T* src, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = to_f32(src[i]);
}
// p16 (n) = p32 rounded to bf16 (exact for parameters stored in bf16): the weights of the
// tensor-core sketch kernels
__global__ void ps_params_to_bf16(bf16* p16, const float* p32, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p16[i] = __float2bfloat16(p32[i]);
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
// LayerNorm / GELU kernels around cuBLAS GEMMs with every activation stored (with the other
// block_gemm kernels of this file: 130.2 -> 129.7 ms f+b, see the top).
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
        for_tile(acc_h, [&](int i, int j, float v) { act[i][j] = gelu(v); });
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

// One sketch block g backward on a slice of kWeightSliceRows rows × 64 hidden units h0.. per thread
// block, given its input in (nc, n), the LayerNorm statistics mean, rstd (nc) and dout (nc, r);
// per tile of 64 rows: pre = LN(in) W_inᵀ recomputed (LayerNorm in the loader), dact = dout W_out,
// act = GELU(pre) and dh = dact ∘ GELU'(pre) into shared memory; then
//   part_wo (slices, r, hid)  [slice, :, h0..] = Σ_{slice rows} doutᵀ act   (dW_out partial)
//   part_wi (slices, hid, n)  [slice, h0.., :] = Σ_{slice rows} dhᵀ LN(in)  (dW_in partial)
//   dn_part (hid tiles, nc, n) [h0 tile]       = dh W_in[h0.., :]           (dn partial)
// accumulated over the slice's row tiles in order. kTiles: tiles of r and of n (1 when both ≤ 64).
// Grid (hidden tiles, slices). Replaced stored activations (pre, act, dh: (nc, 8r) each) read by
// cuBLAS weight-gradient GEMMs plus GELU' and LayerNorm-forward passes (with the other block_gemm
// kernels of this file: 130.2 -> 129.7 ms f+b, see the top).
template <Tf32 kTf32, int kTiles>
__global__ void __launch_bounds__(kThreads)
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
    const int64_t s0 = (int64_t)slice * kWeightSliceRows, s1 = min((int64_t)nc, s0 + kWeightSliceRows);
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
            act[i][j] = gelu(pre);
            dh[i][j] = da * gelu_grad(pre);
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
// dn∘x̂ (ps_colsum_slices, 5.2 of 95.6 ms in the first version's profile; 1.7 of 49.2 ms now).
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
        // partial parameter gradients, one per slice of kWeightSliceRows (weights) or kGradSliceRows rows
        const int64_t wslices = (nc + kWeightSliceRows - 1) / kWeightSliceRows;
        const int64_t slices = (nc + kGradSliceRows - 1) / kGradSliceRows;
        part_wo = take(wslices * r * hid);
        part_wi = take(wslices * hid * maxn);
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
// measured)). Every state operation is a GEMM per block: build H_l = Φ_lᵀ Y_l and apply
// out_l (+)= Φ_l S_l as block_gemm kernels over every block of every head (Φ computed in the
// loaders, never stored); contract V_l = Y_l S_lᵀ as cuBLAS strided-batched GEMMs over runs of
// equally sized blocks (host side, StateSegment) then dX_t = ∂(φ(X_t)·V_t)/∂X_t by a kernel.

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

// bf16 storage runs the state products as cuBLAS bf16 GEMMs (fp32 accumulation) on materialised
// features instead: Φ (n, rpp) bf16 of the rows X (n, r), columns rp.. zero. One thread per 8
// features (one 16-byte store). With the bf16 copies of C, G and the states this replaced the TF32
// block_gemm kernels (build and apply, 39% of the time after the tensor-core sketch) in bf16
// storage: see the top of the file.
__global__ void ps_features_bf16(bf16* phi, const float* __restrict__ X, const int* __restrict__ pairs, Dims D,
                                 int64_t n) {
    const int per_row = D.rpp / 8;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * per_row) return;
    const int64_t row = idx / per_row;
    const int f0 = (int)(idx % per_row) * 8;
    const float* x = X + row * D.r;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = f0 + j < D.rp ? feature(x, pairs[f0 + j]) : 0.f;
    *reinterpret_cast<uint4*>(phi + row * D.rpp + f0) =
        make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
}

// states (B·H, L, r(r+1)/2, e): block l of head bh <- Σ_{t∈l} φ(X_t) Y_tᵀ, X (rows, r), Y (rows, e):
// block_gemm with A(i, k) = φ_i(X of the block's row k) computed by the loader (Φ is never stored),
// B = Y. Grid (B·H·L, feature tiles × column tiles). Replaced Φ materialised by a kernel plus
// cuBLAS GEMMs (ps_outer alone was 15% of the time; ps_build_states is now 14%).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_build_states(float* states, const float* __restrict__ X, const float* __restrict__ Y,
                    const int* __restrict__ pairs, Dims D) {
    __shared__ GemmSmem sm;
    const int col_tiles = (D.e + kTile - 1) / kTile;
    const int f0 = (blockIdx.y / col_tiles) * kTile, j0 = (blockIdx.y % col_tiles) * kTile;
    const int64_t blk = blockIdx.x, bh = blk / D.L;
    const int t0 = (int)(blk % D.L) * D.block, nb = min(D.block, D.T - t0);
    const int64_t row0 = bh * D.T + t0;
    const float* x = X + row0 * D.r;
    const float* y = Y + row0 * D.ldy;
    TcAcc acc;
    zero(acc);
    block_gemm<kTf32, false, false>(
        acc, sm, 0, nb,
        [&](int i, int k) { return f0 + i < D.rp ? feature(x + (int64_t)k * D.r, pairs[f0 + i]) : 0.f; },
        [&](int k, int j) { return j0 + j < D.e ? y[(int64_t)k * D.ldy + j0 + j] : 0.f; });
    float* out = states + blk * D.rp * D.ldy;
    for_tile(acc, [&](int i, int j, float v) {  // v = 0 in the columns e..ldy−1
        if (f0 + i < D.rp && j0 + j < D.ldy) out[(int64_t)(f0 + i) * D.ldy + j0 + j] = v;
    });
}

// out (rows, e) = beta·out + φ(X_t)·S_l(t) (= Σ_ac X_ta X_tc S_l(t)[a,c,:] of the full form; out is
// not read when beta = 0): block_gemm over the r(r+1)/2 features with A(i, k) = φ_k(X_i) computed by
// the loader. Grid (B·H·L, row tiles of a block × column tiles).
template <Tf32 kTf32>
__global__ void __launch_bounds__(kThreads)
    ps_apply_states(float* out, const float* __restrict__ X, const float* __restrict__ states,
                    const int* __restrict__ pairs, Dims D, float beta) {
    __shared__ GemmSmem sm;
    const int col_tiles = (D.e + kTile - 1) / kTile;
    const int rt = blockIdx.y / col_tiles, j0 = (blockIdx.y % col_tiles) * kTile;
    const int64_t blk = blockIdx.x, bh = blk / D.L;
    const int t0 = (int)(blk % D.L) * D.block, nb = min(D.block, D.T - t0);
    if (rt * kTile >= nb) return;  // the whole block: before any barrier
    const int nr = min(kTile, nb - rt * kTile);
    const int64_t row0 = bh * D.T + t0 + rt * kTile;
    const float* x = X + row0 * D.r;
    const float* s = states + blk * D.rp * D.ldy;
    TcAcc acc;
    zero(acc);
    block_gemm<kTf32, true, false>(
        acc, sm, 0, D.rp,
        [&](int i, int k) { return i < nr ? feature(x + (int64_t)i * D.r, pairs[k]) : 0.f; },
        [&](int k, int j) { return j0 + j < D.e ? s[(int64_t)k * D.ldy + j0 + j] : 0.f; });
    float* o = out + row0 * D.ldy;
    for_tile(acc, [&](int i, int j, float v) {
        if (i < nr && j0 + j < D.ldy) {  // v = 0 in the columns e..ldy−1
            float& dst = o[(int64_t)i * D.ldy + j0 + j];
            dst = beta == 0.f ? v : beta * dst + v;
        }
    });
}

// dX_t[a] += ∂(φ(X_t)·V_t)/∂X_ta = 2 X_ta V_t[aa] + sqrt(2) Σ_{c≠a} X_tc V_t[ac] for n rows
// (X, dX (n, r), V (n, r(r+1)/2)); with the states built from φ this is 2 Σ_c X_tc (S[a,c,:]·Y_t)
// of the full r² form. One thread per (t, a).
__global__ void ps_contract_finish(float* dX, const float* X, const float* V, int r, int64_t n) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * r) return;
    const int64_t t = idx / r;
    const int a = (int)(idx % r);
    const float* x = X + t * r;
    const float* v = V + t * ((int64_t)r * (r + 1) / 2);
    float off = 0.f;
    for (int c = 0; c < r; ++c)
        if (c != a) off += x[c] * v[c < a ? pair_index(c, a, r) : pair_index(a, c, r)];
    dX[idx] += 2.f * x[a] * v[pair_index(a, a, r)] + kSqrt2 * off;
}

// In place: exclusive prefix (reverse = false: Σ of earlier blocks) or suffix (reverse = true:
// Σ of later blocks) over the L blocks of each head. One thread per (head, element), blocks in
// order; loads issued kScanUnroll blocks at a time (independent of the running sum). states16
// (unless null) receives a bf16 copy of the result (bf16 storage: the operand of the state GEMMs).
constexpr int kScanUnroll = 8;
__global__ void ps_state_scan(float* states, bf16* states16, Dims D, bool reverse) {
    const int64_t per_block = (int64_t)D.rp * D.ldy;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.bh_count * per_block) return;
    const int64_t bh = idx / per_block, within = idx % per_block;
    float* s = states + bh * D.L * per_block + within;
    bf16* s16 = states16 ? states16 + bh * D.L * per_block + within : nullptr;
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
                if (s16) s16[(int64_t)l * per_block] = __float2bfloat16(run);
                run += v[u];
            }
        }
    }
}

// ============================================================================ diagonal blocks
// The intra-block part as batched GEMMs per block of nb ≤ b rows (host side, diag_forward and
// diag_backward), with the base features X_q, X_k = q̂, k̂ and power p (exact_diag) or A, B and
// power 2: S = X_q X_kᵀ (nb, nb), W = tril(S^p), out += W C; backward dW = G Cᵀ,
// dS = tril(p S^(p−1) ∘ dW), dX_q = dS X_k, dX_k = dSᵀ X_q, dC = Wᵀ G. These kernels apply the
// power and the causal mask on (count, nb, nb) buffers.

// S <- W = tril(S^p)
__global__ void ps_diag_weights(float* S, int nb, int p, int64_t n) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int j = (int)(idx % nb), i = (int)((idx / nb) % nb);
    S[idx] = j <= i ? ipow(S[idx], p) : 0.f;
}
// S <- dS = tril(p S^(p−1) dW), dW <- W = tril(S^p)
__global__ void ps_diag_grads(float* S, float* dW, int nb, int p, int64_t n) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int j = (int)(idx % nb), i = (int)((idx / nb) % nb);
    if (j <= i) {
        const float s = S[idx], sp1 = ipow(s, p - 1);
        S[idx] = p * sp1 * dW[idx];
        dW[idx] = sp1 * s;
    } else {
        S[idx] = 0.f;
        dW[idx] = 0.f;
    }
}

// o (rows, d) = U[:, :d] / (1 + U[:, d]), den (rows) = 1 + U[:, d]. One thread per element of o.
template <typename T>
__global__ void ps_finish_out(Strided O, float* den, const float* U, Dims D) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.d) return;
    const int64_t n = idx / D.d;
    const int x = (int)(idx % D.d);
    const float dn = 1.f + U[n * D.ldy + D.d];
    row_ptr<T>(O, n, D.H, D.T)[x] = from_f32<T>(U[n * D.ldy + x] / dn);
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
    row_ptr<T>(dV, n, D.H, D.T)[x] = from_f32<T>(dC[n * D.ldy + x]);
}

// ============================================================================ host side
template <typename T> struct TypeTag { using type = T; };

int grid_of(int64_t n, int threads) { return ceil_div(n, threads); }

// Offsets (floats) of everything in the workspace.
struct WorkspacePlan {
    int64_t xh, rstd, M, C, G, states, dxh, dM, dC, pairs, cv, diag, p32, p16, sk, total;
    int64_t phi, y16, s16;  // bf16 storage only: Φ of A and B (2·rows, rpp), C and G (2, rows, ldy), states (.., ldy)
    int64_t cv_blocks;  // blocks per run of the contraction GEMMs (cv holds cv_blocks·block rows of r(r+1)/2)
    int64_t diag_blocks, diag_floats;  // blocks per run of the diagonal-block GEMMs; floats of each of its 2 buffers
    int64_t sk_rows;  // rows per chunk of the learned sketch (0 for the random sketch)
    int64_t skk;      // the learned sketch's kept outputs (5, 2·rows, r): blocks (f, g) = (0,0) (0,1) (1,0) (1,1), tz
    WorkspacePlan(const AttnShape& s, int r, int block, size_t num_params) {
        const int64_t rows = (int64_t)s.rows(), d = s.d, e = d + 1;
        const int64_t L = (s.T + block - 1) / block, rp = (int64_t)r * (r + 1) / 2;
        const int64_t nb = std::min(block, s.T);  // rows of the largest block
        int64_t off = 0;
        auto take = [&](int64_t n) { int64_t o = off; off += (n + 63) / 64 * 64; return o; };
        xh = take(2 * rows * d);
        rstd = take(2 * rows);
        M = take(2 * rows * r);
        const int64_t rpp = (rp + 7) / 8 * 8, ldy = (e + 7) / 8 * 8;  // as Dims
        C = take(rows * ldy);
        G = take(rows * ldy);
        states = take((int64_t)s.B * s.H * L * rp * ldy);
        dxh = take(2 * rows * d);
        dM = take(2 * rows * r);
        dC = take(rows * ldy);
        pairs = take(rp);  // ints
        cv_blocks = std::max<int64_t>(1, std::min<int64_t>(kContractFloats / ((int64_t)block * rp), s.B * s.H * L));
        cv = take(L > 1 ? cv_blocks * block * rp : 0);
        diag_blocks = std::max<int64_t>(1, std::min<int64_t>(kDiagFloats / (nb * nb), s.B * s.H * L));
        diag_floats = (diag_blocks * nb * nb + 63) / 64 * 64;
        diag = take(2 * diag_floats);
        p32 = take((int64_t)num_params);
        p16 = take(((int64_t)num_params + 1) / 2);  // bf16 copy of the parameters
        // rows per chunk: as many as fit kSketchChunkFloats (at least 256), at most all 2·rows
        const int64_t per_row = SketchChunk((int)d, r, 64).total / 64;
        sk_rows = num_params ? std::min<int64_t>(2 * rows, std::max<int64_t>(256, kSketchChunkFloats / per_row)) : 0;
        sk = take(num_params ? SketchChunk((int)d, r, sk_rows).total : 0);
        skk = take(num_params ? 5 * 2 * rows * r : 0);
        // bf16 copies for the state GEMMs of bf16 storage (allocated in fp32 mode too: the plan
        // does not know the dtype); sizes in floats = bf16 elements / 2
        phi = take(rows * rpp);
        y16 = take(rows * ldy);
        s16 = take(((int64_t)s.B * s.H * L * rp * ldy + 1) / 2);
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
        if (blas_) cublasDestroy(blas_);
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
            build_states(D, P, ws, feat(ws, P, D, 1), val(ws, P, D, false), false);
            apply_states(D, P, ws, U, feat(ws, P, D, 0), 0.f);
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
        float *xh = ws + P.xh, *G = ws + P.G;
        float *dxh = ws + P.dxh, *dM = ws + P.dM, *dC = ws + P.dC;
        float* dA = dM;
        float* dB = dM + D.rows * D.r;
        by_type(dt, [&](auto t_tag) {
            using T = typename decltype(t_tag)::type;
            ps_out_grad<T><<<grid_of(D.rows, kWarps), 32 * kWarps>>>(
                G, split_ ? nullptr : y16(ws, P) + D.rows * D.ldy, strided(dout), strided(o), saved, D);
        });
        CUDA_LAUNCH_CHECK();
        // the diagonal blocks: dC, and dq̂, dk̂ (exact_diag) or dA, dB (sketched), the other pair zeroed
        diag_backward(D, P, ws);
        if (D.L > 1) {
            // prefix Z from (B, C): dA += 2 Σ_c A_c (Z[a,c,:]·g)  (Z of block 0 is exactly 0)
            build_states(D, P, ws, feat(ws, P, D, 1), val(ws, P, D, false), false);
            contract_states(D, P, ws, dA, feat(ws, P, D, 0), val(ws, P, D, true));
            // suffix R from (A, G): dC += Σ_ac B_a B_c R[a,c,:], dB += 2 Σ_c B_c (R[a,c,:]·C)  (R of the
            // last block is exactly 0)
            build_states(D, P, ws, feat(ws, P, D, 0), val(ws, P, D, true), true);
            apply_states(D, P, ws, dC, feat(ws, P, D, 1), 1.f);
            contract_states(D, P, ws, dB, feat(ws, P, D, 1), val(ws, P, D, false));
        }
        // through the sketch into dxh (and the parameters)
        const int64_t n2 = 2 * D.rows;
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(s.d, cfg_.sketch_size);
            const SketchChunk S(s.d, D.r, P.sk_rows);
            float* ck = ws + P.sk;
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_bwd(L, ws + P.p32, p16(ws, P), dparams.f32(), xh + row0 * D.d, dM + row0 * D.r,
                                         dxh + row0 * D.d,
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

    static bf16* p16(float* ws, const WorkspacePlan& P) { return reinterpret_cast<bf16*>(ws + P.p16); }
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
        D.rpp = (D.rp + 7) / 8 * 8;
        D.ldy = (s.d + 1 + 7) / 8 * 8;
        D.e = s.d + 1;
        D.block = cfg_.block;
        D.L = (s.T + cfg_.block - 1) / cfg_.block;
        D.degree = cfg_.degree;
        D.rows = (int64_t)s.rows();
        D.bh_count = (int64_t)s.B * s.H;
        return D;
    }

    // The handle of the sketch GEMMs, on the default stream as every launch here; created on first use.
    cublasHandle_t blas() {
        if (!blas_) {
            CUBLAS_CHECK(cublasCreate(&blas_));
            CUBLAS_CHECK(cublasSetStream(blas_, 0));
        }
        return blas_;
    }
    // bf16 storage: the GEMMs on the tensor cores in TF32 (10 mantissa bits, finer than the bf16
    // inputs; deterministic like SGEMM). fp32 storage (the checking path): full fp32, no TF32.
    void set_math(DType dt) {
        split_ = dt != DType::BF16;
        CUBLAS_CHECK(cublasSetMathMode(blas(), dt == DType::BF16 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    }

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
    // p: the parameters in fp32, p16 in bf16 (read by the tensor-core kernels of bf16 storage).
    void sketch_learned_chunk_fwd(const PolySketchLayout& L, const float* p, const bf16* p16, const float* x, int nc,
                                  float* m, const SketchKeep& K) {
        const int hid = L.hidden, r = L.r;
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const PolySketchLayout::Block& b = L.blk[f][g];
                const float* in = g == 0 ? x : K.out[f][0];
                const bool tc = !split_ && ps_tc::by_shape(b.n_in, r, [&](auto n_c, auto r_c) {
                    constexpr int N = decltype(n_c)::value, R = decltype(r_c)::value;
                    constexpr int smem = ps_tc::Shape<N, R>::kFwdSmem;
                    auto kernel = ps_tc::sketch_block_fwd<N, R>;
                    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
                    const int grid = ceil_div(ceil_div(nc, ps_tc::kFwdRows), ps_tc::kFwdTilesPerBlock);
                    kernel<<<grid, ps_tc::kThreads, smem>>>(K.out[f][g], in, p + b.ln_w, p + b.ln_b, p16 + b.w_in,
                                                            p16 + b.w_out, nc);
                });
                if (!tc)
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
    void sketch_block_chunk_bwd(const PolySketchLayout& L, const float* p, const bf16* p16, float* dp, int f, int g,
                                const float* in, const float* dout, float* din, int nc, float* ck,
                                const SketchChunk& S) {
        const PolySketchLayout::Block& b = L.blk[f][g];
        const int n = b.n_in, hid = L.hidden, r = L.r;
        const int slices = ceil_div(nc, kGradSliceRows), hid_tiles = ceil_div(hid, kTile);
        const int wslices = ceil_div(nc, kWeightSliceRows);
        float *mean = ck + S.mean, *rstd = ck + S.rstd, *dn_part = ck + S.dn_part;
        float *part_wo = ck + S.part_wo, *part_wi = ck + S.part_wi, *part_ln = ck + S.part_ln;
        ps_sk_ln_stats<<<grid_of(nc, kWarps), 32 * kWarps>>>(mean, rstd, in, n, nc);
        CUDA_LAUNCH_CHECK();
        const dim3 grid(hid_tiles, wslices);
        const bool tc = !split_ && ps_tc::by_shape(n, r, [&](auto n_c, auto r_c) {
            constexpr int N = decltype(n_c)::value, R = decltype(r_c)::value;
            constexpr int smem = ps_tc::Shape<N, R>::kBwdSmem;
            static_assert(ps_tc::kBwdHid == kTile, "dn partials per 64 hidden units, as the TF32 kernel");
            auto kernel = ps_tc::sketch_block_bwd<N, R>;
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            kernel<<<grid, ps_tc::kThreads, smem>>>(part_wo, part_wi, dn_part, in, mean, rstd, dout, p + b.ln_w,
                                                    p + b.ln_b, p16 + b.w_in, p16 + b.w_out, nc, kWeightSliceRows);
        });
        if (!tc) by_tf32([&](auto mode) {
            constexpr Tf32 m = decltype(mode)::value;
            if (r > kTile || n > kTile)
                ps_sk_block_bwd<m, 2><<<grid, kThreads>>>(part_wo, part_wi, dn_part, in, mean, rstd, dout, p + b.ln_w,
                                                          p + b.ln_b, p + b.w_in, p + b.w_out, n, r, hid, nc);
            else
                ps_sk_block_bwd<m, 1><<<grid, kThreads>>>(part_wo, part_wi, dn_part, in, mean, rstd, dout, p + b.ln_w,
                                                          p + b.ln_b, p + b.w_in, p + b.w_out, n, r, hid, nc);
        });
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of((int64_t)r * hid, 256), 256>>>(dp + b.w_out, part_wo, wslices, (int64_t)r * hid);
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of((int64_t)hid * n, 256), 256>>>(dp + b.w_in, part_wi, wslices, (int64_t)hid * n);
        CUDA_LAUNCH_CHECK();
        // din, and (dln_w, dln_b) += (Σ dn∘x̂, Σ dn): ln_b follows ln_w in the layout
        ps_sk_ln_bwd<<<slices, 32 * kWarps>>>(din, part_ln, dn_part, hid_tiles, in, mean, rstd, p + b.ln_w, n, nc);
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of(2 * n, 256), 256>>>(dp + b.ln_w, part_ln, slices, 2 * n);
        CUDA_LAUNCH_CHECK();
    }
    // The learned sketch backward of the chunk x (nc, d): dxh (nc, d) += the gradient of dm (nc, r)
    // through M; dp += the parameter gradient. K: the kept outputs of sketch_learned_chunk_fwd.
    void sketch_learned_chunk_bwd(const PolySketchLayout& L, const float* p, const bf16* p16, float* dp, const float* x,
                                  const float* dm, float* dxh, int nc, float* ck, const SketchChunk& S,
                                  const SketchKeep& K) {
        const int64_t nr = (int64_t)nc * L.r, nd = (int64_t)nc * L.d;
        ps_sk_tanh_bwd<<<grid_of(nr, 256), 256>>>(ck + S.df[0], ck + S.df[1], dm, K.tz, K.out[0][1], K.out[1][1],
                                                 nr);
        CUDA_LAUNCH_CHECK();
        for (int f = 0; f < 2; f++) {
            sketch_block_chunk_bwd(L, p, p16, dp, f, 1, K.out[f][0], ck + S.df[f], ck + S.dy, nc, ck, S);
            sketch_block_chunk_bwd(L, p, p16, dp, f, 0, x, ck + S.dy, ck + S.dxf[f], nc, ck, S);
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
        if (!split_) {
            ps_params_to_bf16<<<grid_of(n, 256), 256>>>(p16(ws, P), p32, n);
            CUDA_LAUNCH_CHECK();
        }
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
            ps_values<T><<<grid_of(D.rows * D.ldy, 256), 256>>>(ws + P.C, split_ ? nullptr : y16(ws, P), strided(v), D);
        });
        CUDA_LAUNCH_CHECK();
        ps_pair_table<<<grid_of(D.r * D.r, 256), 256>>>(reinterpret_cast<int*>(ws + P.pairs), D.r);
        CUDA_LAUNCH_CHECK();
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(D.d, D.r);
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_fwd(L, ws + P.p32, p16(ws, P), ws + P.xh + row0 * D.d, nc, ws + P.M + row0 * D.r,
                                         SketchKeep(ws, P, D, row0));
            }
        } else {
            ps_sketch_random_fwd<<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.M, ws + P.xh, sketch, D.d, D.r, n2);
        }
        CUDA_LAUNCH_CHECK();
        if (!split_) {  // Φ of A and B: the bf16 feature operands of the state GEMMs
            ps_features_bf16<<<grid_of(n2 * (D.rpp / 8), 256), 256>>>(
                phi16(ws, P), ws + P.M, reinterpret_cast<const int*>(ws + P.pairs), D, n2);
            CUDA_LAUNCH_CHECK();
        }
    }

    // A run of `count` consecutive blocks of `rows_per` rows each (uniform strides): first global row
    // `row0`, first global block (state index bh·L + l) `blk0`.
    struct StateSegment {
        int64_t row0, blk0;
        int count, rows_per;
    };
    // Every block of every head in runs of at most maxb equal blocks: when block | T all blocks are
    // equal and contiguous across heads; else per head its full blocks, then the ragged one.
    static std::vector<StateSegment> segments(const Dims& D, int64_t maxb) {
        std::vector<StateSegment> segs;
        if (D.T % D.block == 0) {
            const int64_t total = D.bh_count * D.L;
            for (int64_t g = 0; g < total; g += maxb)
                segs.push_back({g * D.block, g, (int)std::min<int64_t>(maxb, total - g), D.block});
            return segs;
        }
        const int full = D.T / D.block;
        for (int64_t bh = 0; bh < D.bh_count; ++bh) {
            for (int64_t l = 0; l < full; l += maxb)
                segs.push_back({bh * D.T + l * D.block, bh * D.L + l, (int)std::min<int64_t>(maxb, full - l), D.block});
            segs.push_back({bh * D.T + (int64_t)full * D.block, bh * D.L + full, 1, D.T - full * D.block});
        }
        return segs;
    }
    // Row-major strided-batched C_i (M, N) = op(A_i) op(B_i) + beta C_i in fp32.
    void gemm_rm_batched(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int lda, int64_t stride_a,
                         const float* B, int ldb, int64_t stride_b, float beta, float* C, int ldc, int64_t stride_c,
                         int batch) {
        const float one = 1.f;
        CUBLAS_CHECK(cublasSgemmStridedBatched(blas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                               trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &one, B, ldb, stride_b, A,
                                               lda, stride_a, &beta, C, ldc, stride_c, batch));
    }
    // Row-major strided-batched C_i (M, N) fp32 = op(A_i) op(B_i) + beta C_i with A, B bf16 (fp32
    // accumulation).
    void gemm_rm_batched_bf16(bool trans_a, bool trans_b, int M, int N, int K, const bf16* A, int lda,
                              int64_t stride_a, const bf16* B, int ldb, int64_t stride_b, float beta, float* C, int ldc,
                              int64_t stride_c, int batch) {
        const float one = 1.f;
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(blas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &one, B, CUDA_R_16BF, ldb,
                                                stride_b, A, CUDA_R_16BF, lda, stride_a, &beta, C, CUDA_R_32F, ldc,
                                                stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    static constexpr int64_t kMaxBatch = 65535;  // blocks per batched GEMM call
    static bf16* phi16(float* ws, const WorkspacePlan& P) { return reinterpret_cast<bf16*>(ws + P.phi); }
    static bf16* y16(float* ws, const WorkspacePlan& P) { return reinterpret_cast<bf16*>(ws + P.y16); }
    static bf16* s16(float* ws, const WorkspacePlan& P) { return reinterpret_cast<bf16*>(ws + P.s16); }
    // The rows of A (side 0) or B (side 1): fp32 (rows, r) for the fp32 kernels and pairs, and
    // their features Φ (rows, rpp) bf16 (bf16 storage).
    struct FeatOperand {
        const float* x;
        const bf16* phi;
    };
    static FeatOperand feat(float* ws, const WorkspacePlan& P, const Dims& D, int side) {
        return {ws + P.M + side * D.rows * D.r, phi16(ws, P) + side * D.rows * D.rpp};
    }
    // C (grad = false) or G: fp32 (rows, e) and the bf16 copy (rows, ldy) (bf16 storage).
    struct ValOperand {
        const float* y;
        const bf16* y16;
    };
    static ValOperand val(float* ws, const WorkspacePlan& P, const Dims& D, bool grad) {
        return {ws + (grad ? P.G : P.C), y16(ws, P) + (grad ? D.rows * D.ldy : 0)};
    }
    // Grid of the state kernels: x = every block of every head, y = tiles within one block.
    static dim3 state_grid(const Dims& D, int tiles) { return dim3((unsigned)(D.bh_count * D.L), (unsigned)tiles); }
    // states <- per-block Σ_t φ(X_t) Y_tᵀ (r(r+1)/2, e), then the exclusive prefix (reverse: suffix)
    // over blocks; in bf16 storage also their bf16 copy s16 (blocks, rp, ldy) for apply and contract.
    void build_states(const Dims& D, const WorkspacePlan& P, float* ws, FeatOperand X, ValOperand Y, bool reverse) {
        float* states = ws + P.states;
        const int rp = D.rp, ld = D.ldy;
        if (split_) {
            const int* pairs = reinterpret_cast<const int*>(ws + P.pairs);
            const dim3 grid = state_grid(D, ceil_div(D.rp, kTile) * ceil_div(D.e, kTile));
            ps_build_states<Tf32::Split><<<grid, kThreads>>>(states, X.x, Y.y, pairs, D);
            CUDA_LAUNCH_CHECK();
        } else {
            for (const StateSegment& g : segments(D, kMaxBatch)) {  // H_l = Φ_lᵀ Y_l (all ldy columns: 0 from e on)
                const int nb = g.rows_per;
                gemm_rm_batched_bf16(true, false, rp, ld, nb, X.phi + g.row0 * D.rpp, D.rpp, (int64_t)nb * D.rpp,
                                     Y.y16 + g.row0 * ld, ld, (int64_t)nb * ld, 0.f, states + g.blk0 * rp * ld, ld,
                                     (int64_t)rp * ld, g.count);
            }
        }
        const int64_t per_block = (int64_t)rp * ld;
        ps_state_scan<<<grid_of(D.bh_count * per_block, 256), 256>>>(states, split_ ? nullptr : s16(ws, P), D,
                                                                      reverse);
        CUDA_LAUNCH_CHECK();
    }
    // out (rows, e) = beta·out + φ(X_t)·S_l(t) (= Σ_ac X_ta X_tc S_l(t)[a,c,:] of the full form), with
    // the states of the last build_states
    void apply_states(const Dims& D, const WorkspacePlan& P, float* ws, float* out, FeatOperand X, float beta) {
        if (split_) {
            const int* pairs = reinterpret_cast<const int*>(ws + P.pairs);
            const dim3 grid = state_grid(D, ceil_div(std::min(D.block, D.T), kTile) * ceil_div(D.e, kTile));
            ps_apply_states<Tf32::Split><<<grid, kThreads>>>(out, X.x, ws + P.states, pairs, D, beta);
            CUDA_LAUNCH_CHECK();
            return;
        }
        const int rp = D.rp, ld = D.ldy;
        for (const StateSegment& g : segments(D, kMaxBatch)) {  // out_l (+)= Φ_l S_l (all ldy columns: 0 from e on)
            const int nb = g.rows_per;
            gemm_rm_batched_bf16(false, false, nb, ld, rp, X.phi + g.row0 * D.rpp, D.rpp, (int64_t)nb * D.rpp,
                                 s16(ws, P) + g.blk0 * rp * ld, ld, (int64_t)rp * ld, beta, out + g.row0 * ld, ld,
                                 (int64_t)nb * ld, g.count);
        }
    }
    // dX_t += ∂(φ(X_t)·V_t)/∂X_t with V = Y Sᵀ per block (into the cv buffer; the states of the last
    // build_states), then the finish
    void contract_states(const Dims& D, const WorkspacePlan& P, float* ws, float* dX, FeatOperand X, ValOperand Y) {
        const int rp = D.rp, ld = D.ldy;
        const float* states = ws + P.states;
        float* V = ws + P.cv;
        for (const StateSegment& g : segments(D, P.cv_blocks)) {
            const int nb = g.rows_per;
            if (split_)
                gemm_rm_batched(false, true, nb, rp, D.e, Y.y + g.row0 * ld, ld, (int64_t)nb * ld,
                                states + g.blk0 * rp * ld, ld, (int64_t)rp * ld, 0.f, V, rp, (int64_t)nb * rp, g.count);
            else  // K = all ldy columns (zero from e on in both operands): aligned rows
                gemm_rm_batched_bf16(false, true, nb, rp, ld, Y.y16 + g.row0 * ld, ld, (int64_t)nb * ld,
                                     s16(ws, P) + g.blk0 * rp * ld, ld, (int64_t)rp * ld, 0.f, V, rp,
                                     (int64_t)nb * rp, g.count);
            const int64_t n = (int64_t)g.count * nb;
            ps_contract_finish<<<grid_of(n * D.r, 256), 256>>>(dX + g.row0 * D.r, X.x + g.row0 * D.r, V, D.r, n);
            CUDA_LAUNCH_CHECK();
        }
    }

    // out (rows, e) = beta·out + the diagonal blocks' part Σ_{j ≤ i, same block} w_ij C_j (diag kernels)
    void diag_forward(const Dims& D, const WorkspacePlan& P, float* ws, float* out, float beta) {
        const bool exact = cfg_.exact_diag;
        const int nf = exact ? D.d : D.r, p = exact ? D.degree : 2, ld = D.ldy;
        const float* Xq = ws + (exact ? P.xh : P.M);  // (rows, nf) q̂ or A, then the k̂ or B rows
        const float* Xk = Xq + D.rows * nf;
        const float* C = ws + P.C;
        float* S = ws + P.diag;
        for (const StateSegment& g : segments(D, P.diag_blocks)) {
            const int nb = g.rows_per;
            const int64_t nn = (int64_t)nb * nb, xs = (int64_t)nb * nf, cs = (int64_t)nb * ld;
            gemm_rm_batched(false, true, nb, nb, nf, Xq + g.row0 * nf, nf, xs, Xk + g.row0 * nf, nf, xs, 0.f, S, nb,
                            nn, g.count);  // S = X_q X_kᵀ
            ps_diag_weights<<<grid_of(g.count * nn, 256), 256>>>(S, nb, p, g.count * nn);
            CUDA_LAUNCH_CHECK();
            gemm_rm_batched(false, false, nb, ld, nb, S, nb, nn, C + g.row0 * ld, ld, cs, beta, out + g.row0 * ld, ld,
                            cs, g.count);  // out (+)= W C (all ldy columns: 0 from e on)
        }
    }
    // The diagonal blocks' gradients, overwriting: dC (rows, e); dq̂, dk̂ in dxh (exact_diag) or dA, dB
    // in dM (sketched), the other one zeroed (both are accumulated into afterwards).
    void diag_backward(const Dims& D, const WorkspacePlan& P, float* ws) {
        const bool exact = cfg_.exact_diag;
        const int nf = exact ? D.d : D.r, p = exact ? D.degree : 2, ld = D.ldy;
        const float* Xq = ws + (exact ? P.xh : P.M);
        const float* Xk = Xq + D.rows * nf;
        float* dXq = ws + (exact ? P.dxh : P.dM);
        float* dXk = dXq + D.rows * nf;
        const float *C = ws + P.C, *G = ws + P.G;
        float* dC = ws + P.dC;
        float* S = ws + P.diag;                  // S, then dS
        float* dW = ws + P.diag + P.diag_floats;  // dW, then W
        for (const StateSegment& g : segments(D, P.diag_blocks)) {
            const int nb = g.rows_per;
            const int64_t nn = (int64_t)nb * nb, xs = (int64_t)nb * nf, cs = (int64_t)nb * ld;
            gemm_rm_batched(false, true, nb, nb, nf, Xq + g.row0 * nf, nf, xs, Xk + g.row0 * nf, nf, xs, 0.f, S, nb,
                            nn, g.count);  // S = X_q X_kᵀ
            gemm_rm_batched(false, true, nb, nb, ld, G + g.row0 * ld, ld, cs, C + g.row0 * ld, ld, cs, 0.f, dW, nb, nn,
                            g.count);  // dW = G Cᵀ (K: all ldy columns, 0 from e on)
            ps_diag_grads<<<grid_of(g.count * nn, 256), 256>>>(S, dW, nb, p, g.count * nn);
            CUDA_LAUNCH_CHECK();
            gemm_rm_batched(false, false, nb, nf, nb, S, nb, nn, Xk + g.row0 * nf, nf, xs, 0.f, dXq + g.row0 * nf, nf,
                            xs, g.count);  // dX_q = dS X_k
            gemm_rm_batched(true, false, nb, nf, nb, S, nb, nn, Xq + g.row0 * nf, nf, xs, 0.f, dXk + g.row0 * nf, nf,
                            xs, g.count);  // dX_k = dSᵀ X_q
            gemm_rm_batched(true, false, nb, ld, nb, dW, nb, nn, G + g.row0 * ld, ld, cs, 0.f, dC + g.row0 * ld, ld,
                            cs, g.count);  // dC = Wᵀ G (all ldy columns: 0 from e on)
        }
        const int64_t other = exact ? 2 * D.rows * D.r : 2 * D.rows * D.d;
        CUDA_CHECK(cudaMemsetAsync(ws + (exact ? P.dM : P.dxh), 0, other * sizeof(float), 0));
    }

    static DType check_tensors(const AttnShape& s, std::initializer_list<std::pair<const char*, HeadTensor>> ts) {
        CHECK(s.d == 64 || s.d == 128,
              "polysketch attention (CUDA): head dim d=%d is not supported; use n_embd/n_head = 64 or 128", s.d);
        CHECK(s.B >= 1 && s.H >= 1 && s.T >= 1, "polysketch attention: bad shape B=%d H=%d T=%d", s.B, s.H, s.T);
        return attention_dtype("polysketch", ts, false);
    }

    AttnConfig cfg_;
    std::map<int, float*> random_sketch_;  // layer -> S (2, d, r) on the device
    int random_sketch_d_ = -1;
    cublasHandle_t blas_ = nullptr;  // the learned sketch's GEMMs
    bool split_ = true;  // block_gemm products: Tf32::Split (fp32 storage) or Tf32::Single (bf16), set by set_math
};

}  // namespace

std::unique_ptr<Attention> make_cuda_polysketch_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaPolySketchAttention>(cfg);
}
