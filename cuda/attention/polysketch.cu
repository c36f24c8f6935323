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
// Implementation (fp32 throughout; deterministic: no float atomics, every sum in a fixed order):
//   - every intermediate is fp32 in the workspace (q̂, k̂, rstd, A|B, C, G, block states, their
//     gradients): O(B·H·T·(d + r) + B·H·(T/b)·r²·(d+1)) floats, linear in T;
//   - row kernels use one warp per row (LayerNorms, the intra-block parts: dot products by warp
//     reduction);
//   - the block states are GEMMs per block with Φ_t = X_t⊗X_t (r² features per row, materialised
//     for a run of blocks at a time): build H_l = Φ_lᵀ Y_l, apply Φ_l S_l, contract Y_l S_lᵀ, as
//     cuBLAS strided-batched fp32 SGEMMs; the prefix/suffix over blocks is a sequential loop per
//     element;
//   - the learned sketch runs on chunks of rows as fp32 SGEMMs (rows × n_in → rows × 8r → rows × r)
//     plus row-wise LayerNorm / elementwise GELU kernels; its parameter gradient is Xᵀ·dY GEMMs
//     per slice of 256 rows into partials, summed in slice order into dparams (+=), chunk by chunk.
// cuBLAS (one handle per Attention object, default stream, default math = full fp32, no TF32) is
// bitwise reproducible run to run on one GPU model, so the backward is bitwise deterministic.
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

namespace {

constexpr float kLnEps = 1e-5f;
constexpr int kWarps = 8;            // warps per block of the row-per-warp kernels
constexpr int64_t kSketchChunkFloats = int64_t(1) << 26;  // chunk buffers of the learned sketch (256 MB)
constexpr int kGradSliceRows = 256;  // rows per partial of the sketch-parameter gradient
constexpr int64_t kPhiFloats = int64_t(1) << 25;  // Φ / V buffer of the state GEMMs (128 MB; at least one block)
constexpr int kMaxSketch = 128;      // largest sketch size r (register arrays of r/32 per lane)


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
    int H, T, d, r, e, block, L, degree;  // e = d + 1, L = number of blocks
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
// The sketch network runs on chunks of rows at a time as fp32 GEMMs (cuBLAS SGEMM, no TF32:
// deterministic for a fixed GPU and toolkit) plus row-wise/elementwise kernels; the parameter
// gradients are GEMMs over slices of the chunk's rows (Xᵀ·dY) and column sums (the LayerNorm
// affines) into per-slice partials, summed in slice order into dparams (+=), chunk after chunk.
// Parameters: `p` is an fp32 copy of params in the layout of polysketch_sketch.h (Linear weights
// (out, in) row-major). Row-major chunk buffers, one row per sketch input row.
template <typename T>
__global__ void ps_params_to_f32(float* p, const T* src, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = to_f32(src[i]);
}
// part (slices, n): column sums of X (nc, n) over the row slices of kGradSliceRows rows, each
// summed in row order. One block per slice, threads over columns.
__global__ void ps_colsum_slices(float* part, const float* X, int n, int nc) {
    const int row0 = blockIdx.x * kGradSliceRows;
    const int row1 = min(row0 + kGradSliceRows, nc);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float s = 0.f;
        for (int row = row0; row < row1; ++row) s += X[(int64_t)row * n + i];
        part[(int64_t)blockIdx.x * n + i] = s;
    }
}
// dst (count) += Σ_s part[s, :] in slice order
__global__ void ps_reduce_slices(float* dst, const float* part, int slices, int64_t count) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float s = 0.f;
    for (int k = 0; k < slices; ++k) s += part[(int64_t)k * count + i];
    dst[i] += s;
}

// LayerNorm with affine of nc rows of n: xhat (nc, n), rstd (nc), nrm (nc, n) = xhat·w + b. One warp per row.
__global__ void ps_sk_ln_fwd(float* xhat, float* rstd, float* nrm, const float* in, const float* ln_w,
                             const float* ln_b, int n, int nc) {
    const int64_t row = warp_row();
    if (row >= nc) return;
    const int lane = threadIdx.x % 32;
    const float* x = in + row * n;
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) sum += x[i];
    const float mean = warp_sum(sum) / n;
    float var = 0.f;
    for (int i = lane; i < n; i += 32) var += (x[i] - mean) * (x[i] - mean);
    var = warp_sum(var) / n;
    const float rs = 1.f / sqrtf(var + kLnEps);
    for (int i = lane; i < n; i += 32) {
        const float xh = (x[i] - mean) * rs;
        xhat[row * n + i] = xh;
        nrm[row * n + i] = xh * ln_w[i] + ln_b[i];
    }
    if (lane == 0) rstd[row] = rs;
}
// nrm (nc, n) = xhat·w + b (recomputed by the backward)
__global__ void ps_sk_affine(float* nrm, const float* xhat, const float* ln_w, const float* ln_b, int n, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count) return;
    const int i = (int)(idx % n);
    nrm[idx] = xhat[idx] * ln_w[i] + ln_b[i];
}
// act = gelu(pre)
__global__ void ps_sk_gelu(float* act, const float* pre, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < count) act[idx] = gelu_f(pre[idx]);
}
// dh *= gelu'(pre)
__global__ void ps_sk_gelu_bwd(float* dh, const float* pre, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < count) dh[idx] *= gelu_grad_f(pre[idx]);
}
// tz = tanh(f1 f2 / sqrt r), m = sqrt(r) tz (nc, r); m may be null (the backward's recompute)
__global__ void ps_sk_tanh(float* tz, float* m, const float* f1, const float* f2, int r, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count) return;
    const float sr = sqrtf((float)r);
    const float z = tanhf(f1[idx] * f2[idx] / sr);
    tz[idx] = z;
    if (m) m[idx] = sr * z;
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
// LayerNorm-with-affine backward of nc rows of n, given dn = d(normed): prod = dn∘xhat (for dln_w),
// din = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂∘x̂)) with dx̂ = dn∘w. One warp per row.
__global__ void ps_sk_ln_bwd(float* din, float* prod, const float* dn, const float* xhat, const float* rstd,
                             const float* ln_w, int n, int nc) {
    const int64_t row = warp_row();
    if (row >= nc) return;
    const int lane = threadIdx.x % 32;
    const float* g = dn + row * n;
    const float* x = xhat + row * n;
    float m1 = 0.f, m2 = 0.f;
    for (int i = lane; i < n; i += 32) {
        const float dx = g[i] * ln_w[i];
        prod[row * n + i] = g[i] * x[i];
        m1 += dx;
        m2 += dx * x[i];
    }
    m1 = warp_sum(m1) / n;
    m2 = warp_sum(m2) / n;
    const float rs = rstd[row];
    for (int i = lane; i < n; i += 32) din[row * n + i] = rs * (g[i] * ln_w[i] - m1 - x[i] * m2);
}
// dxh (count) += d1 + d2 (the two sketch branches' gradients, in the order of the old group code)
__global__ void ps_sk_add2(float* dxh, const float* d1, const float* d2, int64_t count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < count) dxh[idx] += (0.f + d1[idx]) + d2[idx];
}

// Offsets (floats) of the chunk buffers of the learned sketch, nc rows.
struct SketchChunk {
    int64_t xhat[2][2], rstd[2][2], pre[2][2], out[2][2];
    int64_t nrm, act, tz, df[2], dy, dh, dn, prod, dxf[2], part, total;
    SketchChunk(int d, int r, int64_t nc) {
        const int64_t hid = 8 * r, maxn = d > r ? d : r;
        int64_t off = 0;
        auto take = [&](int64_t n) { int64_t o = off; off += (n + 63) / 64 * 64; return o; };
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const int64_t n_in = g == 0 ? d : r;
                xhat[f][g] = take(nc * n_in);
                rstd[f][g] = take(nc);
                pre[f][g] = take(nc * hid);
                out[f][g] = take(nc * r);
            }
        nrm = take(nc * maxn);
        act = take(nc * hid);
        tz = take(nc * r);
        df[0] = take(nc * r);
        df[1] = take(nc * r);
        dy = take(nc * r);
        dh = take(nc * hid);
        dn = take(nc * maxn);
        prod = take(nc * maxn);
        dxf[0] = take(nc * d);
        dxf[1] = take(nc * d);
        // partial parameter gradients, one per slice of kGradSliceRows rows: the largest Linear weight
        const int64_t slices = (nc + kGradSliceRows - 1) / kGradSliceRows;
        part = take(slices * hid * maxn);
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
// states (B·H, L, r, r, e): block l of head bh is H_l = Σ_{t∈l} (X_t⊗X_t) Y_tᵀ, a (r², e) matrix.
// With Φ_t = X_t⊗X_t (r², row-major (a, c)) per row, every state operation is a GEMM per block,
// run as cuBLAS strided-batched fp32 GEMMs over runs of equally sized blocks (host side,
// StateSegment): build H_l = Φ_lᵀ Y_l, apply out_l (+)= Φ_l S_l, contract V_l = Y_l S_lᵀ then
// dX_t[a] += 2 Σ_c X_tc V_t[a, c]. These kernels fill Φ and finish the contraction.

// phi (n, r²) = X_t ⊗ X_t for the n rows of X (n, r): phi[t, a·r + c] = X_ta X_tc
__global__ void ps_outer(float* phi, const float* X, int r, int64_t n) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t rr = (int64_t)r * r;
    if (idx >= n * rr) return;
    const int64_t t = idx / rr;
    const int k = (int)(idx % rr), a = k / r, c = k % r;
    phi[idx] = X[t * r + a] * X[t * r + c];
}

// dX_t[a] += 2 Σ_c X_tc V_t[a·r + c] for n rows (X, dX (n, r), V (n, r²)). One thread per (t, a).
__global__ void ps_contract_finish(float* dX, const float* X, const float* V, int r, int64_t n) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * r) return;
    const int64_t t = idx / r;
    const int a = (int)(idx % r);
    const float* x = X + t * r;
    const float* v = V + t * r * r + (int64_t)a * r;
    float acc = 0.f;
    for (int c = 0; c < r; ++c) acc += x[c] * v[c];
    dX[idx] += 2.f * acc;
}

// In place: exclusive prefix (reverse = false: Σ of earlier blocks) or suffix (reverse = true:
// Σ of later blocks) over the L blocks of each head. One thread per (head, element).
__global__ void ps_state_scan(float* states, Dims D, bool reverse) {
    const int64_t per_block = (int64_t)D.r * D.r * D.e;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.bh_count * per_block) return;
    const int64_t bh = idx / per_block, within = idx % per_block;
    float* s = states + bh * D.L * per_block + within;
    float run = 0.f;
    for (int k = 0; k < D.L; ++k) {
        const int l = reverse ? D.L - 1 - k : k;
        const float v = s[(int64_t)l * per_block];
        s[(int64_t)l * per_block] = run;
        run += v;
    }
}

// ============================================================================ forward rows
// Intra-block weight of (query row qn, key row kn): s is the base (⟨q̂,k̂⟩ or ⟨A,B⟩), returned
// weight s^p or s². Warp-cooperative: every lane gets the same value.
template <int Dh>
__device__ __forceinline__ float warp_base(bool exact, const float (&q)[Dh / 32], const float* kh_row,
                                           const float* a_row, const float* b_row, int r, int lane) {
    float s = 0.f;
    if (exact) {
#pragma unroll
        for (int e = 0; e < Dh / 32; ++e) s += q[e] * kh_row[lane + 32 * e];
    } else {
        for (int c = lane; c < r; c += 32) s += a_row[c] * b_row[c];
    }
    return warp_sum(s);
}

// o (rows, d), den (rows) <- the intra-block part plus U (rows, e) = Σ_ac A_ta A_tc Z_l[a,c,:] (read for
// rows of blocks l > 0 only). One warp per row;
// lane holds columns x = lane + 32m of out (e = d + 1 columns).
template <typename T, int Dh>
__global__ void ps_forward_rows(Strided O, float* den, const float* xh, const float* M,
                                const float* C, const float* U, Dims D, bool exact) {
    constexpr int EM = Dh / 32 + 1;  // ceil((Dh + 1) / 32)
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const int t = (int)(n % D.T), l = t / D.block;
    const int64_t head0 = (n / D.T) * D.T;
    const int e = D.e, r = D.r;
    const float* A = M;
    const float* Bk = M + D.rows * r;
    const float* kh = xh + D.rows * Dh;
    float u[EM] = {};
    if (l > 0) {  // the inter-block part Σ_ac A_ta A_tc Z_l[a,c,:], computed by apply_states into U
#pragma unroll
        for (int m = 0; m < EM; ++m)
            if (lane + 32 * m < e) u[m] = U[n * e + lane + 32 * m];
    }
    float q[Dh / 32];
#pragma unroll
    for (int m = 0; m < Dh / 32; ++m) q[m] = xh[n * Dh + lane + 32 * m];
    for (int j = l * D.block; j <= t; ++j) {
        const int64_t jn = head0 + j;
        const float s = warp_base<Dh>(exact, q, kh + jn * Dh, A + n * r, Bk + jn * r, r, lane);
        const float w = exact ? ipow(s, D.degree) : s * s;
        const float* cj = C + jn * e;
#pragma unroll
        for (int m = 0; m < EM; ++m)
            if (lane + 32 * m < e) u[m] += w * cj[lane + 32 * m];
    }
    const float dn = 1.f + __shfl_sync(kFullMask, u[EM - 1], 0);  // column d = 32·(EM−1)
    T* o = row_ptr<T>(O, n, D.H, D.T);
#pragma unroll
    for (int m = 0; m < EM - 1; ++m) o[lane + 32 * m] = from_f32<T>(u[m] / dn);
    if (lane == 0) den[n] = dn;
}

// ============================================================================ backward rows
// Intra-block, query side: for query row t, over keys j of its block up to t:
// exact: dq̂_t = Σ_j p s^(p−1) (g_t·C_j) k̂_j; sketch: dA_t = Σ_j 2 s (g_t·C_j) B_j.
// Overwrites dxh (q rows) and dM (A rows) — the one not used gets 0. One warp per row.
template <int Dh>
__global__ void ps_intra_q(float* dxh, float* dM, const float* xh, const float* M, const float* C,
                           const float* G, Dims D, bool exact) {
    constexpr int EM = Dh / 32 + 1, RM = kMaxSketch / 32;
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const int t = (int)(n % D.T), l = t / D.block;
    const int64_t head0 = (n / D.T) * D.T;
    const int e = D.e, r = D.r;
    const float* A = M;
    const float* Bk = M + D.rows * r;
    const float* kh = xh + D.rows * Dh;
    float q[Dh / 32], g[EM], dq[Dh / 32] = {}, da[RM] = {};
#pragma unroll
    for (int m = 0; m < Dh / 32; ++m) q[m] = xh[n * Dh + lane + 32 * m];
#pragma unroll
    for (int m = 0; m < EM; ++m) g[m] = lane + 32 * m < e ? G[n * e + lane + 32 * m] : 0.f;
    for (int j = l * D.block; j <= t; ++j) {
        const int64_t jn = head0 + j;
        const float s = warp_base<Dh>(exact, q, kh + jn * Dh, A + n * r, Bk + jn * r, r, lane);
        float dw = 0.f;
#pragma unroll
        for (int m = 0; m < EM; ++m)
            if (lane + 32 * m < e) dw += g[m] * C[jn * e + lane + 32 * m];
        dw = warp_sum(dw);
        if (exact) {
            const float ds = D.degree * ipow(s, D.degree - 1) * dw;
#pragma unroll
            for (int m = 0; m < Dh / 32; ++m) dq[m] += ds * kh[jn * Dh + lane + 32 * m];
        } else {
            const float ds = 2.f * s * dw;
#pragma unroll
            for (int m = 0; m < RM; ++m)
                if (lane + 32 * m < r) da[m] += ds * Bk[jn * r + lane + 32 * m];
        }
    }
#pragma unroll
    for (int m = 0; m < Dh / 32; ++m) dxh[n * Dh + lane + 32 * m] = dq[m];
#pragma unroll
    for (int m = 0; m < RM; ++m)
        if (lane + 32 * m < r) dM[n * r + lane + 32 * m] = da[m];
}

// Intra-block, key side: for key row j, over queries i of its block from j on:
// dC_j = Σ_i w_ij g_i; exact: dk̂_j = Σ_i p s^(p−1) (g_i·C_j) q̂_i; sketch: dB_j = Σ_i 2 s (g_i·C_j) A_i.
// Overwrites dC, dxh (k rows) and dM (B rows). One warp per row.
template <int Dh>
__global__ void ps_intra_k(float* dC, float* dxh, float* dM, const float* xh, const float* M,
                           const float* C, const float* G, Dims D, bool exact) {
    constexpr int EM = Dh / 32 + 1, RM = kMaxSketch / 32;
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const int j = (int)(n % D.T), l = j / D.block;
    const int i_end = min((l + 1) * D.block, D.T);
    const int64_t head0 = (n / D.T) * D.T;
    const int e = D.e, r = D.r;
    const float* A = M;
    const float* Bk = M + D.rows * r;
    const float* qh = xh;
    const float* kh = xh + D.rows * Dh;
    float k[Dh / 32], c[EM], dk[Dh / 32] = {}, db[RM] = {}, dc[EM] = {};
#pragma unroll
    for (int m = 0; m < Dh / 32; ++m) k[m] = kh[n * Dh + lane + 32 * m];
#pragma unroll
    for (int m = 0; m < EM; ++m) c[m] = lane + 32 * m < e ? C[n * e + lane + 32 * m] : 0.f;
    for (int i = j; i < i_end; ++i) {
        const int64_t in = head0 + i;
        const float s = warp_base<Dh>(exact, k, qh + in * Dh, Bk + n * r, A + in * r, r, lane);
        const float w = exact ? ipow(s, D.degree) : s * s;
        float dw = 0.f;
#pragma unroll
        for (int m = 0; m < EM; ++m)
            if (lane + 32 * m < e) {
                const float gi = G[in * e + lane + 32 * m];
                dw += gi * c[m];
                dc[m] += w * gi;
            }
        dw = warp_sum(dw);
        if (exact) {
            const float ds = D.degree * ipow(s, D.degree - 1) * dw;
#pragma unroll
            for (int m = 0; m < Dh / 32; ++m) dk[m] += ds * qh[in * Dh + lane + 32 * m];
        } else {
            const float ds = 2.f * s * dw;
#pragma unroll
            for (int m = 0; m < RM; ++m)
                if (lane + 32 * m < r) db[m] += ds * A[in * r + lane + 32 * m];
        }
    }
#pragma unroll
    for (int m = 0; m < EM; ++m)
        if (lane + 32 * m < e) dC[n * e + lane + 32 * m] = dc[m];
#pragma unroll
    for (int m = 0; m < Dh / 32; ++m) dxh[(D.rows + n) * Dh + lane + 32 * m] = dk[m];
#pragma unroll
    for (int m = 0; m < RM; ++m)
        if (lane + 32 * m < r) dM[(D.rows + n) * r + lane + 32 * m] = db[m];
}

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
template <int V> using IntTag = std::integral_constant<int, V>;

int grid_of(int64_t n, int threads) { return ceil_div(n, threads); }

// Offsets (floats) of everything in the workspace.
struct WorkspacePlan {
    int64_t xh, rstd, M, C, G, states, dxh, dM, dC, phi, p32, sk, total;
    int64_t phi_blocks;  // blocks per run of the state GEMMs (phi holds phi_blocks·block rows of r²)
    int64_t sk_rows;  // rows per chunk of the learned sketch (0 for the random sketch)
    WorkspacePlan(const AttnShape& s, int r, int block, size_t num_params) {
        const int64_t rows = (int64_t)s.rows(), d = s.d, e = d + 1;
        const int64_t L = (s.T + block - 1) / block;
        int64_t off = 0;
        auto take = [&](int64_t n) { int64_t o = off; off += (n + 63) / 64 * 64; return o; };
        xh = take(2 * rows * d);
        rstd = take(2 * rows);
        M = take(2 * rows * r);
        C = take(rows * e);
        G = take(rows * e);
        states = take((int64_t)s.B * s.H * L * r * r * e);
        dxh = take(2 * rows * d);
        dM = take(2 * rows * r);
        dC = take(rows * e);
        phi_blocks = std::max<int64_t>(1, std::min<int64_t>(kPhiFloats / ((int64_t)block * r * r), s.B * s.H * L));
        phi = take(L > 1 ? phi_blocks * block * r * r : 0);
        p32 = take((int64_t)num_params);
        // rows per chunk: as many as fit kSketchChunkFloats (at least 256), at most all 2·rows
        const int64_t per_row = SketchChunk((int)d, r, 64).total / 64;
        sk_rows = num_params ? std::min<int64_t>(2 * rows, std::max<int64_t>(256, kSketchChunkFloats / per_row)) : 0;
        sk = take(num_params ? SketchChunk((int)d, r, sk_rows).total : 0);
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
        const float* sketch = prepare_sketch(s, ctx, params, ws, P);
        features(dt, D, q, k, ws, P, sketch);
        if (dt == DType::BF16) ps_values<bf16><<<grid_of(D.rows * D.e, 256), 256>>>(ws + P.C, strided(v), D);
        else ps_values<float><<<grid_of(D.rows * D.e, 256), 256>>>(ws + P.C, strided(v), D);
        CUDA_LAUNCH_CHECK();
        // U (rows, e) in the G buffer: the inter-block part A⊗A · Z of every row (zero in block 0)
        float* U = ws + P.G;
        if (D.L > 1) {
            build_states(D, P, ws, ws + P.states, ws + P.M + D.rows * D.r, ws + P.C, false);
            apply_states(D, P, ws, U, ws + P.M, ws + P.states, 0.f);
        }
        dispatch(dt, s.d, [&](auto t_tag, auto d_tag) {
            using T = typename decltype(t_tag)::type;
            constexpr int Dh = decltype(d_tag)::value;
            ps_forward_rows<T, Dh><<<grid_of(D.rows, kWarps), 32 * kWarps>>>(
                strided(o), saved, ws + P.xh, ws + P.M, ws + P.C, U, D, cfg_.exact_diag);
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
        const float* sketch = prepare_sketch(s, ctx, params, ws, P);
        features(dt, D, q, k, ws, P, sketch);
        const int row_blocks = grid_of(D.rows, kWarps);
        float *xh = ws + P.xh, *M = ws + P.M, *C = ws + P.C, *G = ws + P.G, *states = ws + P.states;
        float *dxh = ws + P.dxh, *dM = ws + P.dM, *dC = ws + P.dC;
        const float* A = M;
        const float* Bk = M + D.rows * D.r;
        float* dA = dM;
        float* dB = dM + D.rows * D.r;
        const bool exact = cfg_.exact_diag;
        dispatch(dt, s.d, [&](auto t_tag, auto d_tag) {
            using T = typename decltype(t_tag)::type;
            constexpr int Dh = decltype(d_tag)::value;
            ps_values<T><<<grid_of(D.rows * D.e, 256), 256>>>(C, strided(v), D);
            CUDA_LAUNCH_CHECK();
            ps_out_grad<T><<<row_blocks, 32 * kWarps>>>(G, strided(dout), strided(o), saved, D);
            CUDA_LAUNCH_CHECK();
            ps_intra_q<Dh><<<row_blocks, 32 * kWarps>>>(dxh, dM, xh, M, C, G, D, exact);
            CUDA_LAUNCH_CHECK();
            ps_intra_k<Dh><<<row_blocks, 32 * kWarps>>>(dC, dxh, dM, xh, M, C, G, D, exact);
            CUDA_LAUNCH_CHECK();
        });
        if (D.L > 1) {
            // prefix Z from (B, C): dA += 2 Σ_c A_c (Z[a,c,:]·g)  (Z of block 0 is exactly 0)
            build_states(D, P, ws, states, Bk, C, false);
            contract_states(D, P, ws, dA, A, G, states);
            // suffix R from (A, G): dC += Σ_ac B_a B_c R[a,c,:], dB += 2 Σ_c B_c (R[a,c,:]·C)  (R of the
            // last block is exactly 0)
            build_states(D, P, ws, states, A, G, true);
            apply_states(D, P, ws, dC, Bk, states, 1.f);
            contract_states(D, P, ws, dB, Bk, C, states);
        }
        // through the sketch into dxh (and the parameters)
        const int64_t n2 = 2 * D.rows;
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(s.d, cfg_.sketch_size);
            const SketchChunk S(s.d, D.r, P.sk_rows);
            float* ck = ws + P.sk;
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_fwd(L, ws + P.p32, xh + row0 * D.d, nc, nullptr, ck, S);
                sketch_learned_chunk_bwd(L, ws + P.p32, dparams.f32(), dM + row0 * D.r, dxh + row0 * D.d, nc, ck, S);
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
    static void dispatch(DType dt, int d, Fn&& fn) {
        if (dt == DType::BF16) {
            if (d == 64) fn(TypeTag<bf16>{}, IntTag<64>{});
            else fn(TypeTag<bf16>{}, IntTag<128>{});
        } else {
            if (d == 64) fn(TypeTag<float>{}, IntTag<64>{});
            else fn(TypeTag<float>{}, IntTag<128>{});
        }
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
            CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));  // full fp32, no TF32
        }
        return blas_;
    }
    // Row-major C (M, N) = op(A) op(B) + beta C in fp32 (cuBLAS is column-major: Cᵀ = op(B)ᵀ op(A)ᵀ).
    void gemm_rm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
        const float one = 1.f;
        CUBLAS_CHECK(cublasSgemm(blas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M,
                                 K, &one, B, ldb, A, lda, &beta, C, ldc));
    }
    // dst (M, N) += Aᵀ B over nc rows (A (nc, M) ld lda, B (nc, N) ld ldb, row-major): one GEMM per
    // slice of kGradSliceRows rows into part (slices, M, N), then their ordered sum (deterministic,
    // and parallel however small M·N is).
    void grad_gemm(int M, int N, int nc, const float* A, int lda, const float* B, int ldb, float* dst, float* part) {
        const int full = nc / kGradSliceRows, rem = nc % kGradSliceRows;
        const int64_t mn = (int64_t)M * N;
        if (full > 0)
            gemm_rm_batched(true, false, M, N, kGradSliceRows, A, lda, (int64_t)kGradSliceRows * lda, B, ldb,
                            (int64_t)kGradSliceRows * ldb, 0.f, part, N, mn, full);
        if (rem > 0)
            gemm_rm(true, false, M, N, rem, A + (int64_t)full * kGradSliceRows * lda, lda,
                    B + (int64_t)full * kGradSliceRows * ldb, ldb, 0.f, part + full * mn, N);
        ps_reduce_slices<<<grid_of(mn, 256), 256>>>(dst, part, full + (rem > 0 ? 1 : 0), mn);
        CUDA_LAUNCH_CHECK();
    }
    // dst (n) += Σ_rows X[row, :] for row-major X (nc, n), by slices as grad_gemm
    void grad_colsum(float* dst, const float* X, int n, int nc, float* part) {
        const int slices = ceil_div(nc, kGradSliceRows);
        ps_colsum_slices<<<slices, 128>>>(part, X, n, nc);
        CUDA_LAUNCH_CHECK();
        ps_reduce_slices<<<grid_of(n, 256), 256>>>(dst, part, slices, n);
        CUDA_LAUNCH_CHECK();
    }

    // The learned sketch forward of nc rows x (nc, d): every activation into the chunk buffers ck,
    // m (nc, r) = M(x) unless null.
    void sketch_learned_chunk_fwd(const PolySketchLayout& L, const float* p, const float* x, int nc, float* m,
                                  float* ck, const SketchChunk& S) {
        const int hid = L.hidden, r = L.r;
        const int64_t nh = (int64_t)nc * hid;
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const PolySketchLayout::Block& b = L.blk[f][g];
                const int n = b.n_in;
                const float* in = g == 0 ? x : ck + S.out[f][0];
                ps_sk_ln_fwd<<<grid_of(nc, kWarps), 32 * kWarps>>>(ck + S.xhat[f][g], ck + S.rstd[f][g], ck + S.nrm, in,
                                                                   p + b.ln_w, p + b.ln_b, n, nc);
                CUDA_LAUNCH_CHECK();
                gemm_rm(false, true, nc, hid, n, ck + S.nrm, n, p + b.w_in, n, 0.f, ck + S.pre[f][g], hid);  // pre = nrm W_inᵀ
                ps_sk_gelu<<<grid_of(nh, 256), 256>>>(ck + S.act, ck + S.pre[f][g], nh);
                CUDA_LAUNCH_CHECK();
                gemm_rm(false, true, nc, r, hid, ck + S.act, hid, p + b.w_out, hid, 0.f, ck + S.out[f][g], r);  // out = act W_outᵀ
            }
        ps_sk_tanh<<<grid_of((int64_t)nc * r, 256), 256>>>(ck + S.tz, m, ck + S.out[0][1], ck + S.out[1][1], r,
                                                          (int64_t)nc * r);
        CUDA_LAUNCH_CHECK();
    }
    // One block (f, g) backward on the chunk (activations from sketch_learned_chunk_fwd): dout (nc, r)
    // -> din (nc, n_in); dp (the parameter gradient) += this block's part.
    void sketch_block_chunk_bwd(const PolySketchLayout& L, const float* p, float* dp, int f, int g, const float* dout,
                                float* din, int nc, float* ck, const SketchChunk& S) {
        const PolySketchLayout::Block& b = L.blk[f][g];
        const int n = b.n_in, hid = L.hidden, r = L.r;
        const int64_t nh = (int64_t)nc * hid, nn = (int64_t)nc * n;
        float *act = ck + S.act, *nrm = ck + S.nrm, *dh = ck + S.dh, *dn = ck + S.dn, *prod = ck + S.prod;
        const float* pre = ck + S.pre[f][g];
        const float* xhat = ck + S.xhat[f][g];
        ps_sk_gelu<<<grid_of(nh, 256), 256>>>(act, pre, nh);
        CUDA_LAUNCH_CHECK();
        ps_sk_affine<<<grid_of(nn, 256), 256>>>(nrm, xhat, p + b.ln_w, p + b.ln_b, n, nn);
        CUDA_LAUNCH_CHECK();
        float* part = ck + S.part;
        grad_gemm(r, hid, nc, dout, r, act, hid, dp + b.w_out, part);                // dW_out (r, hid) += doutᵀ act
        gemm_rm(false, false, nc, hid, r, dout, r, p + b.w_out, hid, 0.f, dh, hid);   // dh = dout W_out
        ps_sk_gelu_bwd<<<grid_of(nh, 256), 256>>>(dh, pre, nh);
        CUDA_LAUNCH_CHECK();
        grad_gemm(hid, n, nc, dh, hid, nrm, n, dp + b.w_in, part);               // dW_in (hid, n) += dhᵀ nrm
        gemm_rm(false, false, nc, n, hid, dh, hid, p + b.w_in, n, 0.f, dn, n);   // dn = dh W_in
        grad_colsum(dp + b.ln_b, dn, n, nc, part);                               // dln_b += Σ dn
        ps_sk_ln_bwd<<<grid_of(nc, kWarps), 32 * kWarps>>>(din, prod, dn, xhat, ck + S.rstd[f][g], p + b.ln_w, n, nc);
        CUDA_LAUNCH_CHECK();
        grad_colsum(dp + b.ln_w, prod, n, nc, part);  // dln_w += Σ dn∘x̂
    }
    // The learned sketch backward of the chunk: dxh (nc, d) += the gradient of dm (nc, r) through M;
    // dp += the parameter gradient. Needs sketch_learned_chunk_fwd of the same rows first.
    void sketch_learned_chunk_bwd(const PolySketchLayout& L, const float* p, float* dp, const float* dm, float* dxh,
                                  int nc, float* ck, const SketchChunk& S) {
        const int64_t nr = (int64_t)nc * L.r, nd = (int64_t)nc * L.d;
        ps_sk_tanh_bwd<<<grid_of(nr, 256), 256>>>(ck + S.df[0], ck + S.df[1], dm, ck + S.tz, ck + S.out[0][1],
                                                 ck + S.out[1][1], nr);
        CUDA_LAUNCH_CHECK();
        for (int f = 0; f < 2; f++) {
            sketch_block_chunk_bwd(L, p, dp, f, 1, ck + S.df[f], ck + S.dy, nc, ck, S);
            sketch_block_chunk_bwd(L, p, dp, f, 0, ck + S.dy, ck + S.dxf[f], nc, ck, S);
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

    // xh, rstd (LayerNorms of q and k) and M = [A; B] (the sketches) into the workspace.
    void features(DType dt, const Dims& D, const HeadTensor& q, const HeadTensor& k, float* ws,
                  const WorkspacePlan& P, const float* sketch) {
        const int64_t n2 = 2 * D.rows;
        if (dt == DType::BF16)
            ps_layernorm<bf16><<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.xh, ws + P.rstd, strided(q), strided(k), D);
        else
            ps_layernorm<float><<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.xh, ws + P.rstd, strided(q), strided(k), D);
        CUDA_LAUNCH_CHECK();
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(D.d, D.r);
            const SketchChunk S(D.d, D.r, P.sk_rows);
            for (int64_t row0 = 0; row0 < n2; row0 += P.sk_rows) {
                const int nc = (int)std::min<int64_t>(P.sk_rows, n2 - row0);
                sketch_learned_chunk_fwd(L, ws + P.p32, ws + P.xh + row0 * D.d, nc, ws + P.M + row0 * D.r, ws + P.sk, S);
            }
        } else {
            ps_sketch_random_fwd<<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.M, ws + P.xh, sketch, D.d, D.r, n2);
        }
        CUDA_LAUNCH_CHECK();
    }

    // A run of `count` consecutive blocks of `rows_per` rows each (uniform strides): first global row
    // `row0`, first global block (state index bh·L + l) `blk0`.
    struct StateSegment {
        int64_t row0, blk0;
        int count, rows_per;
    };
    // Every block of every head in runs of at most P.phi_blocks equal blocks: when block | T all
    // blocks are equal and contiguous across heads; else per head its full blocks, then the ragged one.
    static std::vector<StateSegment> state_segments(const Dims& D, const WorkspacePlan& P) {
        std::vector<StateSegment> segs;
        const int64_t maxb = P.phi_blocks;
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
    // Φ (segment rows, r²) = X_t ⊗ X_t of the segment's rows into the phi buffer
    void fill_phi(const Dims& D, float* phi, const float* X, const StateSegment& g) {
        const int64_t n = (int64_t)g.count * g.rows_per;
        ps_outer<<<grid_of(n * D.r * D.r, 256), 256>>>(phi, X + g.row0 * D.r, D.r, n);
        CUDA_LAUNCH_CHECK();
    }
    // states <- per-block Σ_t (X_t⊗X_t) Y_tᵀ (r², e), then the exclusive prefix (reverse: suffix) over blocks
    void build_states(const Dims& D, const WorkspacePlan& P, float* ws, float* states, const float* X, const float* Y,
                      bool reverse) {
        const int rr = D.r * D.r, e = D.e;
        float* phi = ws + P.phi;
        for (const StateSegment& g : state_segments(D, P)) {
            fill_phi(D, phi, X, g);
            gemm_rm_batched(true, false, rr, e, g.rows_per, phi, rr, (int64_t)g.rows_per * rr, Y + g.row0 * e, e,
                            (int64_t)g.rows_per * e, 0.f, states + g.blk0 * rr * e, e, (int64_t)rr * e, g.count);
        }
        const int64_t per_block = (int64_t)rr * e;
        ps_state_scan<<<grid_of(D.bh_count * per_block, 256), 256>>>(states, D, reverse);
        CUDA_LAUNCH_CHECK();
    }
    // out (rows, e) = beta·out + Σ_ac X_ta X_tc S_l(t)[a,c,:]
    void apply_states(const Dims& D, const WorkspacePlan& P, float* ws, float* out, const float* X, const float* states,
                      float beta) {
        const int rr = D.r * D.r, e = D.e;
        float* phi = ws + P.phi;
        for (const StateSegment& g : state_segments(D, P)) {
            fill_phi(D, phi, X, g);
            gemm_rm_batched(false, false, g.rows_per, e, rr, phi, rr, (int64_t)g.rows_per * rr,
                            states + g.blk0 * rr * e, e, (int64_t)rr * e, beta, out + g.row0 * e, e,
                            (int64_t)g.rows_per * e, g.count);
        }
    }
    // dX_t[a] += 2 Σ_c X_tc (S_l(t)[a,c,:]·Y_t): V = Y Sᵀ per block into the phi buffer, then the finish
    void contract_states(const Dims& D, const WorkspacePlan& P, float* ws, float* dX, const float* X, const float* Y,
                         const float* states) {
        const int rr = D.r * D.r, e = D.e;
        float* V = ws + P.phi;
        for (const StateSegment& g : state_segments(D, P)) {
            gemm_rm_batched(false, true, g.rows_per, rr, e, Y + g.row0 * e, e, (int64_t)g.rows_per * e,
                            states + g.blk0 * rr * e, e, (int64_t)rr * e, 0.f, V, rr, (int64_t)g.rows_per * rr,
                            g.count);
            const int64_t n = (int64_t)g.count * g.rows_per;
            ps_contract_finish<<<grid_of(n * D.r, 256), 256>>>(dX + g.row0 * D.r, X + g.row0 * D.r, V, D.r, n);
            CUDA_LAUNCH_CHECK();
        }
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
    cublasHandle_t blas_ = nullptr;  // the learned sketch's GEMMs
};

}  // namespace

std::unique_ptr<Attention> make_cuda_polysketch_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaPolySketchAttention>(cfg);
}
