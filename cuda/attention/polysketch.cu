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
// Implementation (first version: fp32 FMAs, simple and correct, not tuned):
//   - every intermediate is fp32 in the workspace (q̂, k̂, rstd, A|B, C, G, block states, their
//     gradients): O(B·H·T·(d + r) + B·H·(T/b)·r²·(d+1)) floats, linear in T;
//   - row kernels use one warp per row (dot products by warp reduction), the state kernels one
//     thread per state element, looping over the rows of a block in order;
//   - the learned sketch runs on groups of kSketchRows rows per block of 256 threads, with the
//     activations in shared memory and the weights read from an fp32 copy (transposed for the
//     forward, so reads are coalesced);
//   - its parameter gradient is reduced deterministically: a fixed number of slots (blocks), slot
//     s taking row groups s, s + slots, ... in order and accumulating into its own fp32 partial
//     (no atomics), then an ordered sum of the partials into dparams (+=).
// Every launch writes each element from one thread in a fixed order, so the backward is bitwise
// deterministic. Storage dtypes float or bf16 (q, k, v, o, params in act dtype); dparams fp32.
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

namespace {

constexpr float kLnEps = 1e-5f;
constexpr int kWarps = 8;            // warps per block of the row-per-warp kernels
constexpr int kSketchRows = 8;       // rows per group of the learned-sketch kernels (one per warp)
constexpr int kSketchThreads = 256;  // threads of the learned-sketch kernels
constexpr int kGradSlots = 64;       // partial sums of the sketch-parameter gradient
constexpr int kMaxSketch = 128;      // largest sketch size r (register arrays of r/32 per lane)

// A HeadTensor on the device: element (b, h, t, i) at ptr + b*sb + h*sh + t*st + i.
struct Strided {
    void* ptr;
    int64_t sb, sh, st;
};
Strided strided(const HeadTensor& t) { return Strided{t.ptr, t.sb, t.sh, t.st}; }

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
// Parameters (fp32 copies in the workspace): `p` in the layout of polysketch_sketch.h, `pt` the
// same with every Linear weight transposed ((in, out) row-major), read by the forward.
template <typename T>
__global__ void ps_params_to_f32(float* p, const T* src, int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = to_f32(src[i]);
}
// dst (cols, rows) = src (rows, cols)ᵀ
__global__ void ps_transpose(float* dst, const float* src, int rows, int cols) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (int64_t)rows * cols) return;
    const int rr = (int)(i / cols), c = (int)(i % cols);
    dst[(int64_t)c * rows + rr] = src[i];
}

// Shared-memory carve-up of one group of kSketchRows rows (floats). Activations per (f, g):
// xhat (R, n_in), pre (R, hidden), out (R, r), rstd (R); scratch: the input x̂ rows, normed,
// act, and the backward's gradients.
struct SketchSmem {
    int xin;                                        // (R, d)
    int xhat[2][2], pre[2][2], out[2][2], rstd[2][2];
    int tz;                                         // (R, r) tanh(f1 f2 / sqrt r)
    int nrm, act, dh, dn, dy, df, dxf, dxacc;       // scratch
    int total;
    __host__ __device__ SketchSmem(int d, int r) {
        const int R = kSketchRows, hid = 8 * r, maxn = d > r ? d : r;
        int off = 0;
        xin = off; off += R * d;
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const int n_in = g == 0 ? d : r;
                xhat[f][g] = off; off += R * n_in;
                pre[f][g] = off; off += R * hid;
                out[f][g] = off; off += R * r;
                rstd[f][g] = off; off += R;
            }
        tz = off; off += R * r;
        nrm = off; off += R * maxn;
        act = off; off += R * hid;
        dh = off; off += R * hid;
        dn = off; off += R * maxn;
        dy = off; off += R * r;
        df = off; off += 2 * R * r;
        dxf = off; off += R * d;
        dxacc = off; off += R * d;
        total = off;
    }
};

// One block g forward on the group: in (R, n_in) smem -> xhat, pre, out, rstd. nrows valid rows.
__device__ void sketch_block_fwd(const PolySketchLayout& L, const PolySketchLayout::Block& blk,
                                 const float* p, const float* pt, const float* in, float* sm,
                                 const SketchSmem& S, int f, int g, int nrows) {
    const int n = blk.n_in, hid = L.hidden, r = L.r, R = kSketchRows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* xhat = sm + S.xhat[f][g];
    float* pre = sm + S.pre[f][g];
    float* out = sm + S.out[f][g];
    float* rstd = sm + S.rstd[f][g];
    float* nrm = sm + S.nrm;
    float* act = sm + S.act;
    const int maxn = L.d > r ? L.d : r;
    // LayerNorm with affine: one warp per row
    for (int row = warp; row < nrows; row += kSketchThreads / 32) {
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
            nrm[row * maxn + i] = xh * p[blk.ln_w + i] + p[blk.ln_b + i];
        }
        if (lane == 0) rstd[row] = rs;
    }
    __syncthreads();
    // pre = W_in normed; act = gelu(pre)
    const float* w_in_t = pt + blk.w_in;  // (n, hid)
    for (int idx = threadIdx.x; idx < nrows * hid; idx += kSketchThreads) {
        const int row = idx / hid, o = idx % hid;
        const float* x = nrm + row * maxn;
        float s = 0.f;
        for (int i = 0; i < n; ++i) s += w_in_t[(int64_t)i * hid + o] * x[i];
        pre[row * hid + o] = s;
        act[row * hid + o] = gelu_f(s);
    }
    __syncthreads();
    // out = W_out act
    const float* w_out_t = pt + blk.w_out;  // (hid, r)
    for (int idx = threadIdx.x; idx < nrows * r; idx += kSketchThreads) {
        const int row = idx / r, o = idx % r;
        const float* a = act + row * hid;
        float s = 0.f;
        for (int i = 0; i < hid; ++i) s += w_out_t[(int64_t)i * r + o] * a[i];
        out[row * r + o] = s;
    }
    __syncthreads();
    (void)R;
}

// The whole sketch forward of a group: x̂ rows already in sm + S.xin; fills every activation and
// tz; m (if given, global (rows, r)) gets M(x̂) of the group's rows.
__device__ void sketch_group_fwd(const PolySketchLayout& L, const float* p, const float* pt,
                                 float* sm, const SketchSmem& S, int nrows, float* m) {
    const int r = L.r;
    for (int f = 0; f < 2; f++) {
        sketch_block_fwd(L, L.blk[f][0], p, pt, sm + S.xin, sm, S, f, 0, nrows);
        sketch_block_fwd(L, L.blk[f][1], p, pt, sm + S.out[f][0], sm, S, f, 1, nrows);
    }
    const float sr = sqrtf((float)r);
    for (int idx = threadIdx.x; idx < nrows * r; idx += kSketchThreads) {
        const float z = tanhf(sm[S.out[0][1] + idx] * sm[S.out[1][1] + idx] / sr);
        sm[S.tz + idx] = z;
        if (m) m[idx] = sr * z;
    }
    __syncthreads();
}

// One block g backward on the group: dout (R, r) smem -> din (R, n_in) smem; partial += its
// parameter gradient (this block's slot, no other block touches it).
__device__ void sketch_block_bwd(const PolySketchLayout& L, const PolySketchLayout::Block& blk,
                                 const float* p, float* partial, const float* dout, float* din,
                                 float* sm, const SketchSmem& S, int f, int g, int nrows) {
    const int n = blk.n_in, hid = L.hidden, r = L.r;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int maxn = L.d > r ? L.d : r;
    const float* xhat = sm + S.xhat[f][g];
    const float* pre = sm + S.pre[f][g];
    const float* rstd = sm + S.rstd[f][g];
    float* nrm = sm + S.nrm;
    float* act = sm + S.act;
    float* dh = sm + S.dh;
    float* dn = sm + S.dn;
    // recompute normed and act of this block
    for (int idx = threadIdx.x; idx < nrows * n; idx += kSketchThreads) {
        const int row = idx / n, i = idx % n;
        nrm[row * maxn + i] = xhat[idx] * p[blk.ln_w + i] + p[blk.ln_b + i];
    }
    for (int idx = threadIdx.x; idx < nrows * hid; idx += kSketchThreads) act[idx] = gelu_f(pre[idx]);
    __syncthreads();
    // dW_out (r, hid) += Σ_rows dout ⊗ act
    for (int idx = threadIdx.x; idx < r * hid; idx += kSketchThreads) {
        const int o = idx / hid, i = idx % hid;
        float s = 0.f;
        for (int row = 0; row < nrows; ++row) s += dout[row * r + o] * act[row * hid + i];
        partial[blk.w_out + idx] += s;
    }
    // dh (R, hid) = (W_outᵀ dout) ∘ gelu'(pre)
    const float* w_out = p + blk.w_out;  // (r, hid)
    for (int idx = threadIdx.x; idx < nrows * hid; idx += kSketchThreads) {
        const int row = idx / hid, i = idx % hid;
        float s = 0.f;
        for (int o = 0; o < r; ++o) s += dout[row * r + o] * w_out[(int64_t)o * hid + i];
        dh[idx] = s * gelu_grad_f(pre[idx]);
    }
    __syncthreads();
    // dW_in (hid, n) += Σ_rows dh ⊗ normed
    for (int idx = threadIdx.x; idx < hid * n; idx += kSketchThreads) {
        const int o = idx / n, i = idx % n;
        float s = 0.f;
        for (int row = 0; row < nrows; ++row) s += dh[row * hid + o] * nrm[row * maxn + i];
        partial[blk.w_in + idx] += s;
    }
    // dnormed (R, n) = W_inᵀ dh
    const float* w_in = p + blk.w_in;  // (hid, n)
    for (int idx = threadIdx.x; idx < nrows * n; idx += kSketchThreads) {
        const int row = idx / n, i = idx % n;
        float s = 0.f;
        for (int o = 0; o < hid; ++o) s += dh[row * hid + o] * w_in[(int64_t)o * n + i];
        dn[row * maxn + i] = s;
    }
    __syncthreads();
    // dln_w += Σ dnormed·xhat, dln_b += Σ dnormed; dnormed *= ln_w (now dx̂)
    for (int i = threadIdx.x; i < n; i += kSketchThreads) {
        float sw = 0.f, sb = 0.f;
        const float w = p[blk.ln_w + i];
        for (int row = 0; row < nrows; ++row) {
            const float v = dn[row * maxn + i];
            sw += v * xhat[row * n + i];
            sb += v;
            dn[row * maxn + i] = v * w;
        }
        partial[blk.ln_w + i] += sw;
        partial[blk.ln_b + i] += sb;
    }
    __syncthreads();
    // LayerNorm backward, one warp per row
    for (int row = warp; row < nrows; row += kSketchThreads / 32) {
        float m1 = 0.f, m2 = 0.f;
        for (int i = lane; i < n; i += 32) {
            m1 += dn[row * maxn + i];
            m2 += dn[row * maxn + i] * xhat[row * n + i];
        }
        m1 = warp_sum(m1) / n;
        m2 = warp_sum(m2) / n;
        for (int i = lane; i < n; i += 32)
            din[row * n + i] = rstd[row] * (dn[row * maxn + i] - m1 - xhat[row * n + i] * m2);
    }
    __syncthreads();
}

// M (2·rows, r) = sketch of every row of xh (2·rows, d). One block per group.
__global__ void __launch_bounds__(kSketchThreads)
    ps_sketch_learned_fwd(float* M, const float* xh, const float* p, const float* pt,
                          PolySketchLayout L, int64_t n_rows) {
    extern __shared__ float sm[];
    const SketchSmem S(L.d, L.r);
    const int64_t row0 = (int64_t)blockIdx.x * kSketchRows;
    const int nrows = (int)(n_rows - row0 < kSketchRows ? n_rows - row0 : kSketchRows);
    for (int idx = threadIdx.x; idx < nrows * L.d; idx += kSketchThreads)
        sm[S.xin + idx] = xh[row0 * L.d + idx];
    __syncthreads();
    sketch_group_fwd(L, p, pt, sm, S, nrows, M + row0 * L.r);
}

// dxh (2·rows, d) += the gradient through M of dM (2·rows, r); partials (slots, P) += the
// parameter gradient, slot = blockIdx.x taking groups blockIdx.x, + gridDim.x, ... in order.
__global__ void __launch_bounds__(kSketchThreads)
    ps_sketch_learned_bwd(float* dxh, float* partials, const float* dM, const float* xh,
                          const float* p, const float* pt, PolySketchLayout L, int64_t n_rows) {
    extern __shared__ float sm[];
    const SketchSmem S(L.d, L.r);
    const int r = L.r, d = L.d;
    float* partial = partials + (int64_t)blockIdx.x * L.total;
    const int64_t groups = (n_rows + kSketchRows - 1) / kSketchRows;
    for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
        const int64_t row0 = grp * kSketchRows;
        const int nrows = (int)(n_rows - row0 < kSketchRows ? n_rows - row0 : kSketchRows);
        __syncthreads();
        for (int idx = threadIdx.x; idx < nrows * d; idx += kSketchThreads) {
            sm[S.xin + idx] = xh[row0 * d + idx];
            sm[S.dxacc + idx] = 0.f;
        }
        __syncthreads();
        sketch_group_fwd(L, p, pt, sm, S, nrows, nullptr);
        // m = sqrt(r) tanh(f1 f2 / sqrt r): dz = dm (1 − tz²), df1 = dz f2, df2 = dz f1
        float* df = sm + S.df;
        for (int idx = threadIdx.x; idx < nrows * r; idx += kSketchThreads) {
            const float tz = sm[S.tz + idx];
            const float dz = dM[row0 * r + idx] * (1.f - tz * tz);
            df[idx] = dz * sm[S.out[1][1] + idx];
            df[kSketchRows * r + idx] = dz * sm[S.out[0][1] + idx];
        }
        __syncthreads();
        for (int f = 0; f < 2; f++) {
            sketch_block_bwd(L, L.blk[f][1], p, partial, df + f * kSketchRows * r, sm + S.dy, sm, S, f, 1, nrows);
            sketch_block_bwd(L, L.blk[f][0], p, partial, sm + S.dy, sm + S.dxf, sm, S, f, 0, nrows);
            for (int idx = threadIdx.x; idx < nrows * d; idx += kSketchThreads) sm[S.dxacc + idx] += sm[S.dxf + idx];
            __syncthreads();
        }
        for (int idx = threadIdx.x; idx < nrows * d; idx += kSketchThreads) dxh[row0 * d + idx] += sm[S.dxacc + idx];
    }
}

// dparams (P) += Σ_slot partials[slot] in slot order
__global__ void ps_reduce_partials(float* dparams, const float* partials, int slots, int64_t P) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= P) return;
    float s = 0.f;
    for (int k = 0; k < slots; ++k) s += partials[(int64_t)k * P + i];
    dparams[i] += s;
}

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
// states (B·H, L, r, r, e): block l of head bh = Σ_{t∈l} X_ta X_tc Y_t (X (rows, r), Y (rows, e)).
// One thread per state element, rows of the block in order.
__global__ void ps_state_build(float* states, const float* X, const float* Y, Dims D) {
    const int64_t per_block = (int64_t)D.r * D.r * D.e;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.bh_count * D.L * per_block) return;
    const int64_t bhl = idx / per_block;
    const int64_t within = idx % per_block;
    const int x = (int)(within % D.e);
    const int pair = (int)(within / D.e), a = pair / D.r, c = pair % D.r;
    const int64_t bh = bhl / D.L;
    const int l = (int)(bhl % D.L);
    const int t0 = l * D.block, t1 = min(t0 + D.block, D.T);
    float s = 0.f;
    for (int t = t0; t < t1; ++t) {
        const int64_t n = bh * D.T + t;
        s += X[n * D.r + a] * X[n * D.r + c] * Y[n * D.e + x];
    }
    states[idx] = s;
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

// out (rows, e) += Σ_ac X_ta X_tc S_l(t)[a,c,:] for the rows of blocks with a non-zero state
// (skip_first: block 0 has an empty prefix; skip_last: the last block an empty suffix).
// One thread per (row, x).
__global__ void ps_state_apply(float* out, const float* X, const float* states, Dims D,
                               bool skip_first, bool skip_last) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.e) return;
    const int64_t n = idx / D.e;
    const int x = (int)(idx % D.e);
    const int t = (int)(n % D.T);
    const int l = t / D.block;
    if ((skip_first && l == 0) || (skip_last && l == D.L - 1)) return;
    const int64_t bh = n / D.T;
    const float* S = states + ((bh * D.L + l) * D.r * D.r) * D.e;
    const float* xr = X + n * D.r;
    float s = 0.f;
    for (int a = 0; a < D.r; ++a)
        for (int c = 0; c < D.r; ++c) s += xr[a] * xr[c] * S[((int64_t)a * D.r + c) * D.e + x];
    out[idx] += s;
}

// dX_t[a] += 2 Σ_c X_tc (S_l(t)[a,c,:]·Y_t). One thread per (row, a).
__global__ void ps_state_contract(float* dX, const float* X, const float* Y, const float* states,
                                  Dims D, bool skip_first, bool skip_last) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= D.rows * D.r) return;
    const int64_t n = idx / D.r;
    const int a = (int)(idx % D.r);
    const int t = (int)(n % D.T);
    const int l = t / D.block;
    if ((skip_first && l == 0) || (skip_last && l == D.L - 1)) return;
    const int64_t bh = n / D.T;
    const float* S = states + ((bh * D.L + l) * D.r * D.r) * D.e;
    const float* y = Y + n * D.e;
    const float* xr = X + n * D.r;
    float acc = 0.f;
    for (int c = 0; c < D.r; ++c) {
        const float* s = S + ((int64_t)a * D.r + c) * D.e;
        float yv = 0.f;
        for (int x = 0; x < D.e; ++x) yv += s[x] * y[x];
        acc += yv * xr[c];
    }
    dX[idx] += 2.f * acc;
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

// o (rows, d), den (rows) <- the intra-block part plus Σ_ac A_ta A_tc Z_l[a,c,:]. One warp per row;
// lane holds columns x = lane + 32m of out (e = d + 1 columns).
template <typename T, int Dh>
__global__ void ps_forward_rows(Strided O, float* den, const float* xh, const float* M,
                                const float* C, const float* Z, Dims D, bool exact) {
    constexpr int EM = Dh / 32 + 1;  // ceil((Dh + 1) / 32)
    const int64_t n = warp_row();
    if (n >= D.rows) return;
    const int lane = threadIdx.x % 32;
    const int t = (int)(n % D.T), l = t / D.block;
    const int64_t bh = n / D.T, head0 = bh * D.T;
    const int e = D.e, r = D.r;
    const float* A = M;
    const float* Bk = M + D.rows * r;
    const float* kh = xh + D.rows * Dh;
    float u[EM] = {};
    if (l > 0) {
        const float* S = Z + ((bh * D.L + l) * r * r) * e;
        const float* ar = A + n * r;
        for (int a = 0; a < r; ++a)
            for (int c = 0; c < r; ++c) {
                const float w = ar[a] * ar[c];
                const float* z = S + ((int64_t)a * r + c) * e;
#pragma unroll
                for (int m = 0; m < EM; ++m)
                    if (lane + 32 * m < e) u[m] += w * z[lane + 32 * m];
            }
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
    int64_t xh, rstd, M, C, G, states, dxh, dM, dC, p32, pt, partials, total;
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
        p32 = take((int64_t)num_params);
        pt = take((int64_t)num_params);
        partials = take((int64_t)kGradSlots * (int64_t)num_params);
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
        const float* sketch = prepare_sketch(s, ctx, params, ws, P);
        features(dt, D, q, k, ws, P, sketch);
        if (dt == DType::BF16) ps_values<bf16><<<grid_of(D.rows * D.e, 256), 256>>>(ws + P.C, strided(v), D);
        else ps_values<float><<<grid_of(D.rows * D.e, 256), 256>>>(ws + P.C, strided(v), D);
        CUDA_LAUNCH_CHECK();
        if (D.L > 1) build_states(D, ws + P.states, ws + P.M + D.rows * D.r, ws + P.C, false);
        dispatch(dt, s.d, [&](auto t_tag, auto d_tag) {
            using T = typename decltype(t_tag)::type;
            constexpr int Dh = decltype(d_tag)::value;
            ps_forward_rows<T, Dh><<<grid_of(D.rows, kWarps), 32 * kWarps>>>(
                strided(o), saved, ws + P.xh, ws + P.M, ws + P.C, ws + P.states, D, cfg_.exact_diag);
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
            // prefix Z from (B, C): dA += 2 Σ_c A_c (Z[a,c,:]·g)
            build_states(D, states, Bk, C, false);
            ps_state_contract<<<grid_of(D.rows * D.r, 256), 256>>>(dA, A, G, states, D, true, false);
            CUDA_LAUNCH_CHECK();
            // suffix R from (A, G): dC += Σ_ac B_a B_c R[a,c,:], dB += 2 Σ_c B_c (R[a,c,:]·C)
            build_states(D, states, A, G, true);
            ps_state_apply<<<grid_of(D.rows * D.e, 256), 256>>>(dC, Bk, states, D, false, true);
            CUDA_LAUNCH_CHECK();
            ps_state_contract<<<grid_of(D.rows * D.r, 256), 256>>>(dB, Bk, C, states, D, false, true);
            CUDA_LAUNCH_CHECK();
        }
        // through the sketch into dxh (and the parameters)
        const int64_t n2 = 2 * D.rows;
        if (cfg_.sketch_learned) {
            const PolySketchLayout L = polysketch_layout(s.d, cfg_.sketch_size);
            const int64_t groups = (n2 + kSketchRows - 1) / kSketchRows;
            const int slots = (int)std::min<int64_t>(kGradSlots, groups);
            CUDA_CHECK(cudaMemsetAsync(ws + P.partials, 0, (size_t)slots * L.total * sizeof(float)));
            const int smem = sketch_smem_bytes(s.d);
            ps_sketch_learned_bwd<<<slots, kSketchThreads, smem>>>(dxh, ws + P.partials, dM, xh, ws + P.p32,
                                                                   ws + P.pt, L, n2);
            CUDA_LAUNCH_CHECK();
            ps_reduce_partials<<<grid_of((int64_t)L.total, 256), 256>>>(dparams.f32(), ws + P.partials, slots,
                                                                       (int64_t)L.total);
            CUDA_LAUNCH_CHECK();
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
    int sketch_smem_bytes(int d) const { return SketchSmem(d, cfg_.sketch_size).total * (int)sizeof(float); }

    // The learned parameters converted to fp32 (and transposed) in the workspace, or the random S
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
        const int smem = sketch_smem_bytes(s.d);
        CHECK(smem <= 200 * 1024, "polysketch attention: sketch size r=%d needs %d bytes of shared memory", r, smem);
        float* p32 = ws + P.p32;
        float* pt = ws + P.pt;
        const int64_t n = (int64_t)L.total;
        if (params.dtype == DType::BF16)
            ps_params_to_f32<bf16><<<grid_of(n, 256), 256>>>(p32, static_cast<const bf16*>(params.ptr), n);
        else
            ps_params_to_f32<float><<<grid_of(n, 256), 256>>>(p32, static_cast<const float*>(params.ptr), n);
        CUDA_LAUNCH_CHECK();
        CUDA_CHECK(cudaMemcpyAsync(pt, p32, n * sizeof(float), cudaMemcpyDeviceToDevice));
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                const PolySketchLayout::Block& b = L.blk[f][g];
                ps_transpose<<<grid_of((int64_t)L.hidden * b.n_in, 256), 256>>>(pt + b.w_in, p32 + b.w_in, L.hidden, b.n_in);
                CUDA_LAUNCH_CHECK();
                ps_transpose<<<grid_of((int64_t)L.r * L.hidden, 256), 256>>>(pt + b.w_out, p32 + b.w_out, L.r, L.hidden);
                CUDA_LAUNCH_CHECK();
            }
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
            const int smem = sketch_smem_bytes(D.d);
            CUDA_CHECK(cudaFuncSetAttribute(ps_sketch_learned_fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            CUDA_CHECK(cudaFuncSetAttribute(ps_sketch_learned_bwd, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
            ps_sketch_learned_fwd<<<grid_of(n2, kSketchRows), kSketchThreads, smem>>>(ws + P.M, ws + P.xh, ws + P.p32,
                                                                                     ws + P.pt, L, n2);
        } else {
            ps_sketch_random_fwd<<<grid_of(n2, kWarps), 32 * kWarps>>>(ws + P.M, ws + P.xh, sketch, D.d, D.r, n2);
        }
        CUDA_LAUNCH_CHECK();
    }

    // states <- per-block Σ X⊗X⊗Y, then the exclusive prefix (reverse: suffix) over blocks
    static void build_states(const Dims& D, float* states, const float* X, const float* Y, bool reverse) {
        const int64_t per_block = (int64_t)D.r * D.r * D.e;
        ps_state_build<<<grid_of(D.bh_count * D.L * per_block, 256), 256>>>(states, X, Y, D);
        CUDA_LAUNCH_CHECK();
        ps_state_scan<<<grid_of(D.bh_count * per_block, 256), 256>>>(states, D, reverse);
        CUDA_LAUNCH_CHECK();
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
};

}  // namespace

std::unique_ptr<Attention> make_cuda_polysketch_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaPolySketchAttention>(cfg);
}
