// CUDA causal HyperAttention (ATTENTION.md §5) with its exact backward: the same function as the
// CPU reference (src/attention/hyper.cpp) on the same plan (src/attention/hyper_plan.h: recursion
// split at ceil(n/2), projections per (layer, step, level), samples per (layer, step, level, node,
// b·H+h), Gray-order buckets, stable sort, samples in the query's own sorted block dropped, ragged
// last blocks). T <= min_seq is exactly the CUDA `softmax` (flash.cu), call for call.
//
// How a call runs (everything on the default stream, in a fixed order: deterministic):
//   host    make_hyper_plan; the tables of the plan (which internal node covers position t on
//           each level, node bounds, the internal nodes of each level, the leaf of each t, the
//           sort segments, every node's sampled key offsets per head, and the same as distinct
//           keys with draw counts, the projections) go up in one copy (small: O(levels·T + nodes·
//           B·H·m) ints; the copy from pageable memory waits for the device, once per call).
//   leaves  every leaf [start, start+n) of the recursion is exact causal attention: the flash
//           kernels on sub-views (all B·H heads per call, one call per leaf).
//   hashing per level, one thread per (b·h, t) covered by an internal node: code bit p =
//           [x·proj_p > 0] in fp64 (as the CPU reference, so buckets agree with it on identical
//           inputs), bucket = gray_inverse(code); then CUB's DeviceSegmentedSort::StableSortPairs
//           sorts positions by bucket within each (b·h, node, key half | query half) segment
//           (stable: ties keep position order) -> perm; a scatter gives its inverse inv.
// bf16 path (tensor cores: flash_traits.cuh's mma.sync m16n8k16 blocks, fp32 accumulators; every
// Q/K/V/dO tile is gathered row by row through perm with 16-byte cp.async):
//   forward  every row's running state (normalised O in an fp32 (B·H, T, d) buffer, LSE in the
//           saved buffer) starts as its leaf's; then per level one block per (node, tile of
//           sorted query rows) runs the flash forward over key tiles = the tile's aligned sorted
//           key blocks, then the node's distinct sampled keys (a key drawn c times is one column
//           of log-weight ln(n_keys/m) + ln c; a sample in the query's own key block is masked),
//           and merges its piece into the rows' state by LSE; O = state at the end.
//   backward Δ = rowsum(dO∘O); leaves by the flash backward with the final LSE and final O (so
//           P = exp(S − LSE_final), the leaf part of the exact gradient); then per level: dQ
//           tiles (the flash dQ kernel on the forward's gathered tiles), dK/dV of the sorted
//           blocks (the flash dK/dV kernel: a sorted key tile against its aligned query blocks),
//           and dK/dV of the sampled keys: blocks of distinct sampled keys × chunks of 1024 of
//           the node's queries write fp32 partials, summed over chunks in a fixed order and added
//           to the keys' rows (distinct keys: no two threads share a row). All quadrant terms
//           accumulate in fp32 (B·H, T, d) sums; dq, dk, dv get them in one rounding at the end.
//           No float atomics anywhere.
// fp32 path (`--precision fp32`, for checking, as in flash.cu): one warp per row in fp32 FMAs —
// the forward runs the row's state over its quadrant terms of every level; dQ one warp per query
// row, dK/dV one warp per key row (c × every query of its node when drawn c times).
// The tile kernels beat the warp-per-row kernels they replace on the bf16 path (H100, B=2 H=12
// T=32768 d=64, bf16, fwd+bwd: 244.5 ms before, 22.6 ms after, 10.8×; now 2.4× faster than
// our softmax, 54.4 ms).
// Costs beyond the math: per call the host draws B·H·(internal nodes)·m samples (Rng, cheap) and
// uploads the tables synchronously; one flash call per leaf; one CUB sort per level. Memory
// O(levels·B·H·T) ints plus 3 fp32 (B·H, T, d) buffers (bf16 running state / gradient sums) and
// the sampled keys' partials: nothing of size T².
#include <cub/device/device_segmented_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention/hyper_plan.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/attention/flash_traits.cuh"
#include "cuda/attention/strided.cuh"
#include "cuda/common.cuh"

namespace {

constexpr int kWarpsPerBlock = 4;  // warp-per-row kernels
constexpr int kThreads1D = 256;    // thread-per-element kernels
constexpr int kNodeFields = 5;     // start, split, n, draws_at, level
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;


template <typename T>
__device__ __forceinline__ T* row_ptr(const Strided& s, int b, int h, int t) {
    return static_cast<T*>(s.ptr) + b * s.sb + h * s.sh + (int64_t)t * s.st;
}

// The plan's tables on the device (all indices are positions within one head, 0..T-1).
struct HyperDev {
    int B, H, T, d, BH, levels, block, samples, lsh_bits;
    float scale;
    const int* pos_node;  // (levels, T): internal node covering t on that level, or -1
    const int* nodes;     // (internal nodes, kNodeFields)
    const int* leaf;      // (T, 2): start and length of the leaf holding t
    const int* draws;     // node's draws_at + bh * samples: key offsets in [0, split)
    const float* proj;    // (levels, lsh_bits, d)
    const int* perm;      // (levels, BH, T): sorted position -> position (within node segments)
    const int* inv;       // (levels, BH, T): position -> sorted position
    const int* draw_count;  // (levels, BH, T): times key t was drawn by its node (fp32 backward)
    const int* ukeys;     // node's draws_at + bh * samples: its distinct drawn key offsets, ascending, then -1
    const int* ucount;    // same layout: their draw counts, then 0
};

__device__ __forceinline__ uint32_t gray_inverse_dev(uint32_t g) {
    for (uint32_t shift = 1; shift < 32; shift <<= 1) g ^= g >> shift;
    return g;
}

template <typename T, int E>
__device__ __forceinline__ void load_row(float (&x)[E], const T* row, int lane) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = to_f32(row[lane + 32 * e]);
}

// ============================================================================ hashing and sort
// keys_in[bh*T + t] = bucket of q_t (t in a node's query half) or k_t (key half); vals_in = t.
// One thread per (bh, t); fp64 dot products summed in index order, like hyper_buckets<double>
// (nvcc contracts `dot += x*p` to an fma, as g++ -march=native does on FMA hosts; were one side not
// to, a bucket could differ only where |x·proj| < ~1e-15·‖x‖‖proj‖). The row is read once into
// registers (bf16: 16-byte loads) and the level's projections (lsh_bits, D) wait in shared memory
// (dynamic, lsh_bits·D floats): one load per element and bit made this kernel L1-bound.
template <typename T, int D>
__global__ void hyper_hash(HyperDev p, int level, Strided Q, Strided K, uint32_t* keys_in, int* vals_in) {
    extern __shared__ float s_proj[];  // (lsh_bits, D)
    const float* proj = p.proj + (int64_t)level * p.lsh_bits * D;
    for (int i = threadIdx.x; i < p.lsh_bits * D; i += blockDim.x) s_proj[i] = proj[i];
    __syncthreads();
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(idx / p.T), t = (int)(idx % p.T);
    const int node = p.pos_node[(int64_t)level * p.T + t];
    if (node < 0) return;
    const int* nd = p.nodes + kNodeFields * node;
    const bool is_query = t >= nd[0] + nd[1];
    const T* row = row_ptr<const T>(is_query ? Q : K, bh / p.H, bh % p.H, t);
    float x[D];
    if constexpr (std::is_same<T, bf16>::value) {
#pragma unroll
        for (int v = 0; v < D / 8; ++v) {
            const uint4 w = reinterpret_cast<const uint4*>(row)[v];
            const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 f = __bfloat1622float2(pairs[k]);
                x[8 * v + 2 * k] = f.x;
                x[8 * v + 2 * k + 1] = f.y;
            }
        }
    } else {
#pragma unroll
        for (int c = 0; c < D; ++c) x[c] = row[c];
    }
    uint32_t code = 0;
    for (int b = 0; b < p.lsh_bits; ++b) {
        double dot = 0;
#pragma unroll
        for (int c = 0; c < D; ++c) dot += (double)x[c] * (double)s_proj[b * D + c];
        if (dot > 0) code |= 1u << b;
    }
    keys_in[idx] = gray_inverse_dev(code);
    vals_in[idx] = t;
}

// inv[perm[r]] = r for every sorted position r covered on this level.
__global__ void hyper_invert(HyperDev p, int level, int* inv_level, const int* perm_level) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(idx / p.T), r = (int)(idx % p.T);
    if (p.pos_node[(int64_t)level * p.T + r] < 0) return;
    inv_level[(int64_t)bh * p.T + perm_level[idx]] = r;
}

// draw_count[(level, bh, start + j)] += 1 per draw j of every (internal node, bh): integer atomics.
__global__ void hyper_count_draws(HyperDev p, int num_internal, int* draw_count) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t per_node = (int64_t)p.BH * p.samples;
    if (idx >= per_node * num_internal) return;
    const int node = (int)(idx / per_node);
    const int bh = (int)(idx % per_node / p.samples);
    const int* nd = p.nodes + kNodeFields * node;
    const int j = p.draws[nd[3] + idx % per_node];
    atomicAdd(&draw_count[((int64_t)nd[4] * p.BH + bh) * p.T + nd[0] + j], 1);
}

// ============================================================================ fp32 path: forward
// One warp per row (bh, t): leaf state + quadrant terms of every level -> O (in place), LSE.
// leaf_lse: leaf [ls, ls+ln) stores its (B,H,ln) LSE at leaf_lse + BH*ls.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    hyper_forward_rows(HyperDev p, Strided O, Strided Q, Strided K, Strided V, const float* leaf_lse,
                       float* lse_out) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    if (row >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(row / p.T), t = (int)(row % p.T), b = bh / p.H, h = bh % p.H;
    const int leaf_start = p.leaf[2 * t], leaf_len = p.leaf[2 * t + 1];
    // the state in the log2 domain: m = running max of s·log2(e), l = Σ 2^(s·log2 e − m)
    float m = leaf_lse[(int64_t)p.BH * leaf_start + (int64_t)bh * leaf_len + (t - leaf_start)] * kLog2e;
    float l = 1.f;
    float acc[E], q[E];
    T* o_row = row_ptr<T>(O, b, h, t);
    load_row<T, E>(acc, o_row, lane);
    load_row<T, E>(q, row_ptr<const T>(Q, b, h, t), lane);

    // one term: key j with log-weight lw2 (log2 domain), online softmax
    const float scale_log2 = p.scale * kLog2e;
    auto term = [&](int j, float lw2) {
        float k[E], v[E];
        load_row<T, E>(k, row_ptr<const T>(K, b, h, j), lane);
        load_row<T, E>(v, row_ptr<const T>(V, b, h, j), lane);
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) part += q[e] * k[e];
        const float s = warp_sum(part) * scale_log2 + lw2;  // identical on every lane
        const float m_new = fmaxf(m, s);
        const float f = exp2f(m - m_new), pr = exp2f(s - m_new);
        m = m_new;
        l = l * f + pr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * f + pr * v[e];
    };

    for (int level = 0; level < p.levels; ++level) {
        const int node = p.pos_node[(int64_t)level * p.T + t];
        if (node < 0) continue;
        const int* nd = p.nodes + kNodeFields * node;
        const int start = nd[0], split = nd[1], q0 = start + split;
        if (t < q0) continue;  // a key of this quadrant, not a query
        const int64_t slot = ((int64_t)level * p.BH + bh) * p.T;
        const int* perm = p.perm + slot;
        const int* inv = p.inv + slot;
        const int c = (inv[t] - q0) / p.block;  // the row's sorted block
        const int key_end = min((c + 1) * p.block, split);
        for (int r = c * p.block; r < key_end; ++r) term(perm[start + r], 0.f);
        if (p.samples > 0) {
            const float lw2 = log2f((float)split / (float)p.samples);
            const int* draws = p.draws + nd[3] + (int64_t)bh * p.samples;
            for (int s = 0; s < p.samples; ++s) {
                const int j = start + draws[s];
                if ((inv[j] - start) / p.block == c) continue;  // counted by the block already
                term(j, lw2);
            }
        }
    }
    const float inv_l = 1.f / l;
#pragma unroll
    for (int e = 0; e < E; ++e) o_row[lane + 32 * e] = from_f32<T>(acc[e] * inv_l);
    if (lane == 0) lse_out[row] = (m + log2f(l)) * kLn2;
}

// ============================================================================ backward pre-pass; fp32 path
// delta[bh*T + t] = Σ_e dO·O (fp32). One warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    hyper_delta(HyperDev p, Strided dO, Strided O, float* delta) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    if (row >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(row / p.T), t = (int)(row % p.T), b = bh / p.H, h = bh % p.H;
    float x[E], y[E];
    load_row<T, E>(x, row_ptr<const T>(dO, b, h, t), lane);
    load_row<T, E>(y, row_ptr<const T>(O, b, h, t), lane);
    float part = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) part += x[e] * y[e];
    part = warp_sum(part);
    if (lane == 0) delta[row] = part;
}

// leaf_lse[BH*ls + bh*ln + (t - ls)] = lse[bh*T + t]: the final LSE in each leaf's (B,H,ln) layout.
__global__ void hyper_gather_leaf_lse(HyperDev p, const float* lse, float* leaf_lse) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(idx / p.T), t = (int)(idx % p.T);
    const int ls = p.leaf[2 * t], ln = p.leaf[2 * t + 1];
    leaf_lse[(int64_t)p.BH * ls + (int64_t)bh * ln + (t - ls)] = lse[idx];
}

// lse[bh*T + t] = leaf_lse[BH*ls + bh*ln + (t - ls)]: the bf16 forward starts every row's state
// from its leaf's LSE.
__global__ void hyper_scatter_leaf_lse(HyperDev p, const float* leaf_lse, float* lse) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(idx / p.T), t = (int)(idx % p.T);
    const int ls = p.leaf[2 * t], ln = p.leaf[2 * t + 1];
    lse[idx] = leaf_lse[(int64_t)p.BH * ls + (int64_t)bh * ln + (t - ls)];
}

// fp32 path: dQ of row (bh, t) += scale · Σ over its quadrant terms of dS·k, dS = P(dP − Δ), P = exp(s − LSE).
// dQ already holds the leaf part (flash backward); one warp per row reads and rewrites it.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    hyper_backward_dq(HyperDev p, Strided dQ, Strided dO, Strided Q, Strided K, Strided V,
                      const float* lse, const float* delta) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    if (row >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(row / p.T), t = (int)(row % p.T), b = bh / p.H, h = bh % p.H;
    const float lse_row = lse[row], delta_row = delta[row];
    float q[E], dout[E], dq[E];
    load_row<T, E>(q, row_ptr<const T>(Q, b, h, t), lane);
    load_row<T, E>(dout, row_ptr<const T>(dO, b, h, t), lane);
#pragma unroll
    for (int e = 0; e < E; ++e) dq[e] = 0.f;
    bool any = false;

    auto term = [&](int j, float lw) {
        float k[E], v[E];
        load_row<T, E>(k, row_ptr<const T>(K, b, h, j), lane);
        load_row<T, E>(v, row_ptr<const T>(V, b, h, j), lane);
        float qk = 0.f, dov = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            qk += q[e] * k[e];
            dov += dout[e] * v[e];
        }
        qk = warp_sum(qk);
        dov = warp_sum(dov);
        const float pr = expf(qk * p.scale + lw - lse_row);
        const float ds = pr * (dov - delta_row);
#pragma unroll
        for (int e = 0; e < E; ++e) dq[e] += ds * k[e];
    };

    for (int level = 0; level < p.levels; ++level) {
        const int node = p.pos_node[(int64_t)level * p.T + t];
        if (node < 0) continue;
        const int* nd = p.nodes + kNodeFields * node;
        const int start = nd[0], split = nd[1], q0 = start + split;
        if (t < q0) continue;
        any = true;
        const int64_t slot = ((int64_t)level * p.BH + bh) * p.T;
        const int* perm = p.perm + slot;
        const int* inv = p.inv + slot;
        const int c = (inv[t] - q0) / p.block;
        const int key_end = min((c + 1) * p.block, split);
        for (int r = c * p.block; r < key_end; ++r) term(perm[start + r], 0.f);
        if (p.samples > 0) {
            const float lw = logf((float)split / (float)p.samples);
            const int* draws = p.draws + nd[3] + (int64_t)bh * p.samples;
            for (int s = 0; s < p.samples; ++s) {
                const int j = start + draws[s];
                if ((inv[j] - start) / p.block == c) continue;
                term(j, lw);
            }
        }
    }
    if (!any) return;
    T* dq_row = row_ptr<T>(dQ, b, h, t);
#pragma unroll
    for (int e = 0; e < E; ++e)
        dq_row[lane + 32 * e] = from_f32<T>(to_f32(dq_row[lane + 32 * e]) + p.scale * dq[e]);
}

// fp32 path: dK, dV of key row (bh, t) += its quadrant terms: the queries of the sorted query block with its
// block's index, and, if the key was drawn `count` times by its node, count × every query of the
// node outside that block (each draw is one term with log-weight ln(split/m)). One warp per key.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    hyper_backward_dkdv(HyperDev p, Strided dK, Strided dV, Strided dO, Strided Q, Strided K,
                        Strided V, const float* lse, const float* delta) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x % 32;
    const int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    if (row >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(row / p.T), t = (int)(row % p.T), b = bh / p.H, h = bh % p.H;
    const int64_t head = (int64_t)bh * p.T;
    float k[E], v[E], dk[E], dv[E];
    load_row<T, E>(k, row_ptr<const T>(K, b, h, t), lane);
    load_row<T, E>(v, row_ptr<const T>(V, b, h, t), lane);
#pragma unroll
    for (int e = 0; e < E; ++e) dk[e] = dv[e] = 0.f;
    bool any = false;

    auto term = [&](int i, float lw, float count) {
        float q[E], dout[E];
        load_row<T, E>(q, row_ptr<const T>(Q, b, h, i), lane);
        load_row<T, E>(dout, row_ptr<const T>(dO, b, h, i), lane);
        float qk = 0.f, dov = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            qk += q[e] * k[e];
            dov += dout[e] * v[e];
        }
        qk = warp_sum(qk);
        dov = warp_sum(dov);
        const float pr = expf(qk * p.scale + lw - lse[head + i]);
        const float ds = pr * (dov - delta[head + i]) * count;
        const float pc = pr * count;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            dv[e] += pc * dout[e];
            dk[e] += ds * q[e];
        }
    };

    for (int level = 0; level < p.levels; ++level) {
        const int node = p.pos_node[(int64_t)level * p.T + t];
        if (node < 0) continue;
        const int* nd = p.nodes + kNodeFields * node;
        const int start = nd[0], split = nd[1], n = nd[2], q0 = start + split;
        if (t >= q0) continue;  // a query of this quadrant, not a key
        any = true;
        const int nq = n - split;
        const int64_t slot = ((int64_t)level * p.BH + bh) * p.T;
        const int* perm = p.perm + slot;
        const int* inv = p.inv + slot;
        const int c = (inv[t] - start) / p.block;  // the key's sorted block
        const int query_end = min((c + 1) * p.block, nq);
        for (int r = c * p.block; r < query_end; ++r) term(perm[q0 + r], 0.f, 1.f);
        if (p.samples > 0) {
            const int count = p.draw_count[slot + t];
            if (count > 0) {
                const float lw = logf((float)split / (float)p.samples);
                for (int i = q0; i < start + n; ++i) {
                    if ((inv[i] - q0) / p.block == c) continue;  // that block drops the draw
                    term(i, lw, (float)count);
                }
            }
        }
    }
    if (!any) return;
    T* dk_row = row_ptr<T>(dK, b, h, t);
    T* dv_row = row_ptr<T>(dV, b, h, t);
#pragma unroll
    for (int e = 0; e < E; ++e) {
        dk_row[lane + 32 * e] = from_f32<T>(to_f32(dk_row[lane + 32 * e]) + p.scale * dk[e]);
        dv_row[lane + 32 * e] = from_f32<T>(to_f32(dv_row[lane + 32 * e]) + dv[e]);
    }
}

// ============================================================================ bf16 path: tiles
// The quadrant pieces on tensor cores (flash_traits.cuh building blocks) over gathered tiles.
// Ranks: sorted query rank r of a node is position perm[q0 + r], sorted key rank r is position
// perm[start + r]; a rank's block is rank / block. The sampled keys of a (node, head) are its
// distinct drawn keys (ukeys, ascending) with their draw counts: a key drawn c times is one column
// with log-weight ln(split/m) + ln c, which is the sum of its c identical terms.
// The sampled dK/dV kernel takes FlashTraits<d>::kBcKV distinct sampled keys per block (a sample
// tile) and kQueryChunk queries per partial sum.
constexpr int kQueryChunk = 1024;

// Tile sizes and dynamic shared memory (bytes) of the tile kernels: those of flash (FlashTraits),
// plus the int/float side arrays (positions, blocks, log-weights, LSE, Δ) of the gathered rows.
template <int D>
struct HyperTiles {
    using Tr = FlashTraits<D>;
    static_assert(kQueryChunk % Tr::kBrKV == 0, "hyper: a query chunk is whole query tiles");
    // The forward re-reads its Q fragments from shared memory per key tile at both head dims:
    // with the gather state, keeping them in registers (as flash does at d = 64) spills.
    static constexpr bool kFwdQInRegs = false;
    static constexpr int kFwdSmem = (Tr::kBrF * D + 4 * Tr::kBcF * D) * 2 + Tr::kBrF * 4 + 4 * Tr::kBcF * 4;
    static constexpr int kDqSmem = (2 * Tr::kBrQ * D + 4 * Tr::kBcQ * D) * 2 + 3 * Tr::kBrQ * 4 + 4 * Tr::kBcQ * 4;
    static constexpr int kDkvSmem = (2 * Tr::kBcKV * D + 4 * Tr::kBrKV * D) * 2 + 6 * Tr::kBrKV * 4 + 3 * Tr::kBcKV * 4;
};

// The quadrant of internal node `node` for head bh on `level`, as the tile kernels see it.
struct Quadrant {
    int start, split, q0, nq, nk;  // keys [start, start + nk), queries [q0, q0 + nq); nk = split
    const int* perm;               // this level and head: sorted rank (+ start or q0) -> position
    const int* inv;                // position -> sorted rank (+ start or q0)
    const int* ukeys;              // (m): distinct sampled key offsets in [0, split), ascending
    const int* ucount;             // (m): their draw counts; entries past the distinct keys are 0
};
__device__ __forceinline__ Quadrant quadrant_of(const HyperDev& p, int level, int node, int bh) {
    const int* nd = p.nodes + kNodeFields * node;
    Quadrant qd;
    qd.start = nd[0], qd.split = nd[1], qd.q0 = nd[0] + nd[1], qd.nq = nd[2] - nd[1], qd.nk = nd[1];
    const int64_t slot = ((int64_t)level * p.BH + bh) * p.T;
    qd.perm = p.perm + slot, qd.inv = p.inv + slot;
    qd.ukeys = p.ukeys + nd[3] + (int64_t)bh * p.samples;
    qd.ucount = p.ucount + nd[3] + (int64_t)bh * p.samples;
    return qd;
}

// Rows pos_of(0 .. R-1) of one (b, h) slice (row stride st; a negative position gives a zero
// row) -> swizzled tile (R, D), one 16-byte cp.async per chunk.
template <int R, int D, int kThreads, typename PosFn>
__device__ __forceinline__ void gather_tile_async(bf16* tile, const bf16* slice, int64_t st, PosFn pos_of, int tid) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int idx = tid; idx < R * kChunks; idx += kThreads) {
        const int row = idx / kChunks, chunk = idx % kChunks;
        const int t = pos_of(row);
        const bool valid = t >= 0;
        cp_async_16(tile + swizzled<D>(row, chunk), slice + (int64_t)(valid ? t : 0) * st + chunk * 8, valid);
    }
}

// The key tiles (Bc columns each) that the sorted query tile [r0, r0 + Br) sees: first the
// sorted key ranks [kb0, kb1) of its aligned blocks, then the distinct sampled keys.
struct KeyTiles {
    int kb0, kb1, block_tiles, tiles;
};
template <int Bc>
__device__ __forceinline__ KeyTiles key_tiles_of(const Quadrant& qd, int r0, int Br, int block, int samples) {
    const int r_last = min(r0 + Br, qd.nq) - 1;
    KeyTiles kt;
    kt.kb0 = r0 / block * block;  // < nq <= nk: every query block has keys
    kt.kb1 = (int)min((int64_t)(r_last / block + 1) * block, (int64_t)qd.nk);
    kt.block_tiles = (kt.kb1 - kt.kb0 + Bc - 1) / Bc;
    kt.tiles = kt.block_tiles + (samples + Bc - 1) / Bc;
    return kt;
}
// Position of column j of key tile `tile`, or -1 (padding).
template <int Bc>
__device__ __forceinline__ int key_pos(const Quadrant& qd, const KeyTiles& kt, int tile, int j, int samples) {
    if (tile < kt.block_tiles) {
        const int r = kt.kb0 + tile * Bc + j;
        return r < kt.kb1 ? qd.perm[qd.start + r] : -1;
    }
    const int s = (tile - kt.block_tiles) * Bc + j;
    return s < samples && qd.ucount[s] > 0 ? qd.start + qd.ukeys[s] : -1;
}
// Sorted block (-1: padding) and log2-weight of column j of key tile `tile`; lw2 = log2(split/m).
template <int Bc>
__device__ __forceinline__ void key_info(const Quadrant& qd, const KeyTiles& kt, int tile, int j, int block,
                                         int samples, float lw2, int& kblk, float& klw) {
    if (tile < kt.block_tiles) {
        const int r = kt.kb0 + tile * Bc + j;
        kblk = r < kt.kb1 ? r / block : -1;
        klw = 0.f;
        return;
    }
    const int s = (tile - kt.block_tiles) * Bc + j;
    const bool valid = s < samples && qd.ucount[s] > 0;
    kblk = valid ? (qd.inv[qd.start + qd.ukeys[s]] - qd.start) / block : -1;
    klw = valid ? lw2 + log2f((float)qd.ucount[s]) : 0.f;
}

// Key tile `tile` of a query tile's key list (its aligned sorted key blocks, then the node's
// distinct samples) into one stage: K and V rows gathered by cp.async, and every key's sorted block
// and log-weight (key_info). Shared by the forward and the dQ kernel.
template <int Bc, int D, int kThreads>
__device__ __forceinline__ void load_key_tile_async(bf16* s_k, bf16* s_v, int* s_kblk, float* s_klw,
                                                    const bf16* k_base, int64_t k_st, const bf16* v_base,
                                                    int64_t v_st, const Quadrant& qd, const KeyTiles& kt,
                                                    int tile, int block, int samples, float lw2, int tid) {
    auto pos = [&](int j) { return key_pos<Bc>(qd, kt, tile, j, samples); };
    gather_tile_async<Bc, D, kThreads>(s_k, k_base, k_st, pos, tid);
    gather_tile_async<Bc, D, kThreads>(s_v, v_base, v_st, pos, tid);
    for (int j = tid; j < Bc; j += kThreads) key_info<Bc>(qd, kt, tile, j, block, samples, lw2, s_kblk[j], s_klw[j]);
}
// Whether query block qblk drops the column of block kblk: block tiles keep only their own
// block, sample tiles drop it (that draw is counted by the block part already).
__device__ __forceinline__ bool column_masked(int kblk, int qblk, bool sample_tile) {
    return kblk < 0 || ((kblk == qblk) == sample_tile);
}

// ---------------------------------------------------------------- forward, one level
// Grid (tiles_per_node · nodes of the level, B·H): block = (node, sorted query tile of Br rows).
// Online softmax over the tile's key tiles (the flash forward's math, log2 units, with per-column
// log-weights and block masks), then the piece (O_piece, LSE_piece) is merged by LSE into the
// rows' running state: acc (B·H, T, d) fp32 normalised O, lse (B,H,T) natural log. Every row is
// in one tile per level, and the levels run in order: deterministic.
template <int D>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    hyper_forward_tiles(HyperDev p, int level, const int* level_nodes, int tiles_per_node, Strided Q, Strided K,
                        Strided V, float* acc, float* lse) {
    using Tr = FlashTraits<D>;
    constexpr int Br = Tr::kBrF, Bc = Tr::kBcF, kM = Tr::kFwdM;
    extern __shared__ __align__(16) unsigned char hyper_smem[];
    bf16* s_q = reinterpret_cast<bf16*>(hyper_smem);           // (Br, D)
    bf16* s_k = s_q + Br * D;                                  // 2 stages of (Bc, D)
    bf16* s_v = s_k + 2 * Bc * D;                              // 2 stages of (Bc, D)
    int* s_qpos = reinterpret_cast<int*>(s_v + 2 * Bc * D);    // (Br) query positions, -1 padding
    int* s_kblk = s_qpos + Br;                                 // 2 stages of (Bc)
    float* s_klw = reinterpret_cast<float*>(s_kblk + 2 * Bc);  // 2 stages of (Bc), log2 units

    const int node = level_nodes[blockIdx.x / tiles_per_node];
    const int r0 = (int)(blockIdx.x % tiles_per_node) * Br;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const Quadrant qd = quadrant_of(p, level, node, bh);
    if (r0 >= qd.nq) return;  // a node with fewer query tiles than the level's largest
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const KeyTiles kt = key_tiles_of<Bc>(qd, r0, Br, p.block, p.samples);
    const float lw2 = p.samples > 0 ? log2f((float)qd.split / (float)p.samples) : 0.f;
    const float scale_log2 = p.scale * kLog2e;

    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    auto query_pos = [&](int i) { return r0 + i < qd.nq ? qd.perm[qd.q0 + r0 + i] : -1; };
    for (int i = tid; i < Br; i += Tr::kThreads) s_qpos[i] = query_pos(i);
    gather_tile_async<Br, D, Tr::kThreads>(s_q, head_slice<const bf16>(Q, b, h), Q.st, query_pos, tid);
    auto load_key_tile = [&](int tile, int stage) {
        load_key_tile_async<Bc, D, Tr::kThreads>(s_k + stage * Bc * D, s_v + stage * Bc * D, s_kblk + stage * Bc,
                                                 s_klw + stage * Bc, k_base, K.st, v_base, V.st, qd, kt, tile,
                                                 p.block, p.samples, lw2, tid);
    };
    load_key_tile(0, 0);
    cp_async_commit();

    // the warp's rows (within the tile) w_first + 16m + 8half + g, and their sorted blocks
    const int w_first = warp * 16 * kM;
    int qblk[kM][2];
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) qblk[m][half] = (r0 + w_first + 16 * m + 8 * half + g) / p.block;
    float o_acc[kM][D / 8][4] = {};
    float m_run[kM][2], l_run[kM][2];
#pragma unroll
    for (int m = 0; m < kM; ++m) m_run[m][0] = m_run[m][1] = -INFINITY, l_run[m][0] = l_run[m][1] = 0.f;
    uint32_t q_frag[kM][D / 16][4];  // used when HyperTiles<D>::kFwdQInRegs

    for (int tile = 0; tile < kt.tiles; ++tile) {
        const int stage = tile & 1;
        cp_async_next_stage(tile + 1 < kt.tiles, [&] { load_key_tile(tile + 1, stage ^ 1); });
        __syncthreads();
        if constexpr (HyperTiles<D>::kFwdQInRegs)
            if (tile == 0)
#pragma unroll
                for (int m = 0; m < kM; ++m)
#pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk)
                        load_frag_a<D>(q_frag[m][kk], s_q, w_first + 16 * m, kk * 16, lane);
        const bf16* tile_k = s_k + stage * Bc * D;
        const bf16* tile_v = s_v + stage * Bc * D;
        const int* kblk = s_kblk + stage * Bc;
        const float* klw = s_klw + stage * Bc;
        const bool sample_tile = tile >= kt.block_tiles;

        float s[kM][Bc / 8][4] = {};
        if constexpr (HyperTiles<D>::kFwdQInRegs)
            warp_gemm_abt_regs_m<D, Bc, kM>(s, q_frag, tile_k, lane);
        else
            warp_gemm_abt_m<D, Bc, kM>(s, s_q, w_first, tile_k, lane);
        // scores in log2 units with their log-weights; dropped columns -inf
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
            for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nt * 8 + 2 * c + (e & 1);
                    s[m][nt][e] = column_masked(kblk[col], qblk[m][e >> 1], sample_tile)
                                      ? -INFINITY
                                      : fmaf(s[m][nt][e], scale_log2, klw[col]);
                }
        online_softmax_tile<D, Bc, kM>(s, m_run, l_run, o_acc, 1.f);  // s is already scaled
        warp_gemm_pv_m<D, Bc, kM>(o_acc, s, tile_v, lane);
        __syncthreads();  // the stage read here is overwritten by the next prefetch
    }

    // merge the piece into the running state of each row; every valid row has its own block's
    // keys, so l >= 1. The 4 threads of a row read the old LSE before thread c = 0 rewrites it.
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = l_run[m][half];
            l += __shfl_xor_sync(kFullMask, l, 1);
            l += __shfl_xor_sync(kFullMask, l, 2);
            const int pos = s_qpos[w_first + 16 * m + 8 * half + g];
            const int64_t row = (int64_t)bh * p.T + pos;
            const float old2 = pos >= 0 ? lse[row] * kLog2e : 0.f;
            __syncwarp();
            if (pos < 0) continue;
            const float piece2 = m_run[m][half] + log2f(l);
            const float mx = fmaxf(old2, piece2);
            const float w_old = exp2f(old2 - mx), w_piece = exp2f(piece2 - mx);
            const float sum = w_old + w_piece;
            const float a_old = w_old / sum, a_piece = w_piece / (sum * l);
            float* acc_row = acc + row * D;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                float2* x = reinterpret_cast<float2*>(acc_row + dn * 8 + 2 * c);
                float2 v = *x;
                v.x = v.x * a_old + o_acc[m][dn][2 * half] * a_piece;
                v.y = v.y * a_old + o_acc[m][dn][2 * half + 1] * a_piece;
                *x = v;
            }
            if (c == 0) lse[row] = (mx + log2f(sum)) * kLn2;
        }
}

// ---------------------------------------------------------------- backward dQ, one level
// acc_dq (B·H, T, d) fp32 += Σ over the tile's key tiles of dS·K (unscaled), dS = P∘(dP − Δ),
// P = exp(S + log-weight − LSE_final): the flash dQ kernel on the forward's gathered tiles.
template <int D>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    hyper_backward_dq_tiles(HyperDev p, int level, const int* level_nodes, int tiles_per_node, Strided Q,
                            Strided K, Strided V, Strided dO, const float* lse, const float* delta, float* acc_dq) {
    using Tr = FlashTraits<D>;
    constexpr int Br = Tr::kBrQ, Bc = Tr::kBcQ, kM = Tr::kDqM;
    extern __shared__ __align__(16) unsigned char hyper_smem[];
    bf16* s_q = reinterpret_cast<bf16*>(hyper_smem);           // (Br, D)
    bf16* s_do = s_q + Br * D;                                 // (Br, D)
    bf16* s_k = s_do + Br * D;                                 // 2 stages of (Bc, D)
    bf16* s_v = s_k + 2 * Bc * D;                              // 2 stages of (Bc, D)
    float* s_lse = reinterpret_cast<float*>(s_v + 2 * Bc * D);  // (Br) log2 units, +inf padding
    float* s_delta = s_lse + Br;                               // (Br)
    int* s_qpos = reinterpret_cast<int*>(s_delta + Br);        // (Br)
    int* s_kblk = s_qpos + Br;                                 // 2 stages of (Bc)
    float* s_klw = reinterpret_cast<float*>(s_kblk + 2 * Bc);  // 2 stages of (Bc)

    const int node = level_nodes[blockIdx.x / tiles_per_node];
    const int r0 = (int)(blockIdx.x % tiles_per_node) * Br;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const Quadrant qd = quadrant_of(p, level, node, bh);
    if (r0 >= qd.nq) return;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const KeyTiles kt = key_tiles_of<Bc>(qd, r0, Br, p.block, p.samples);
    const float lw2 = p.samples > 0 ? log2f((float)qd.split / (float)p.samples) : 0.f;
    const float scale_log2 = p.scale * kLog2e;

    const bf16* k_base = head_slice<const bf16>(K, b, h);
    const bf16* v_base = head_slice<const bf16>(V, b, h);
    auto query_pos = [&](int i) { return r0 + i < qd.nq ? qd.perm[qd.q0 + r0 + i] : -1; };
    for (int i = tid; i < Br; i += Tr::kThreads) {
        const int pos = query_pos(i);
        s_qpos[i] = pos;
        s_lse[i] = pos >= 0 ? lse[(int64_t)bh * p.T + pos] * kLog2e : INFINITY;
        s_delta[i] = pos >= 0 ? delta[(int64_t)bh * p.T + pos] : 0.f;
    }
    gather_tile_async<Br, D, Tr::kThreads>(s_q, head_slice<const bf16>(Q, b, h), Q.st, query_pos, tid);
    gather_tile_async<Br, D, Tr::kThreads>(s_do, head_slice<const bf16>(dO, b, h), dO.st, query_pos, tid);
    auto load_key_tile = [&](int tile, int stage) {
        load_key_tile_async<Bc, D, Tr::kThreads>(s_k + stage * Bc * D, s_v + stage * Bc * D, s_kblk + stage * Bc,
                                                 s_klw + stage * Bc, k_base, K.st, v_base, V.st, qd, kt, tile,
                                                 p.block, p.samples, lw2, tid);
    };
    load_key_tile(0, 0);
    cp_async_commit();

    const int w_first = warp * 16 * kM;
    int qblk[kM][2];
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) qblk[m][half] = (r0 + w_first + 16 * m + 8 * half + g) / p.block;
    float dq_acc[kM][D / 8][4] = {};

    for (int tile = 0; tile < kt.tiles; ++tile) {
        const int stage = tile & 1;
        cp_async_next_stage(tile + 1 < kt.tiles, [&] { load_key_tile(tile + 1, stage ^ 1); });
        __syncthreads();
        const bf16* tile_k = s_k + stage * Bc * D;
        const bf16* tile_v = s_v + stage * Bc * D;
        const int* kblk = s_kblk + stage * Bc;
        const float* klw = s_klw + stage * Bc;
        const bool sample_tile = tile >= kt.block_tiles;
        float s[kM][Bc / 8][4] = {};   // S = Q·Kᵀ, then dS
        float dp[kM][Bc / 8][4] = {};  // dP = dO·Vᵀ
        warp_gemm_abt_m<D, Bc, kM>(s, s_q, w_first, tile_k, lane);
        warp_gemm_abt_m<D, Bc, kM>(dp, s_do, w_first, tile_v, lane);
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
            for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = w_first + 16 * m + 8 * (e >> 1) + g, col = nt * 8 + 2 * c + (e & 1);
                    const float pr = exp2f(fmaf(s[m][nt][e], scale_log2, klw[col] - s_lse[row]));
                    // dS = 0 where dropped (P computed there may be inf: select, not multiply)
                    s[m][nt][e] = column_masked(kblk[col], qblk[m][e >> 1], sample_tile)
                                      ? 0.f
                                      : pr * (dp[m][nt][e] - s_delta[row]);
                }
        warp_gemm_pv_m<D, Bc, kM>(dq_acc, s, tile_k, lane);  // dQ += dS·K
        __syncthreads();
    }

#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int pos = s_qpos[w_first + 16 * m + 8 * half + g];
            if (pos < 0) continue;
            float* acc_row = acc_dq + ((int64_t)bh * p.T + pos) * D;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                float2* x = reinterpret_cast<float2*>(acc_row + dn * 8 + 2 * c);
                float2 v = *x;
                v.x += dq_acc[m][dn][2 * half];
                v.y += dq_acc[m][dn][2 * half + 1];
                *x = v;
            }
        }
}


// ---------------------------------------------------------------- backward dK, dV, one level
// The flash dK/dV kernel's loop (one block per key tile, 16·kM keys per warp; Sᵀ = K·Qᵀ,
// Pᵀ = exp2(Sᵀ·scale_log2 + log-weight − LSE_final), dV += Pᵀ·dO, dK += dSᵀ·Q) on gathered
// rows, in two flavours:
//   block   (kSampled = false) grid (key tiles per node · nodes of the level, B·H): the sorted
//           key tile [k0, k0 + Bc) against the sorted query ranks of its aligned blocks; adds
//           dK, dV (unscaled) to the keys' rows of acc_dk, acc_dv (B·H, T, d) fp32 (one tile per
//           key and level: no two blocks write one row).
//   sampled (kSampled = true) grid (chunks per node · sample tiles · nodes, B·H): Bc
//           distinct sampled keys (log-weight ln(split/m) + ln count) against the node's queries
//           [qa, qa + kQueryChunk) in position order, each dropping its own key block; writes
//           the partial dK, dV to `partial`, which hyper_sample_scatter sums over chunks in order.
template <int D, bool kSampled>
__global__ void __launch_bounds__(FlashTraits<D>::kThreads)
    hyper_backward_kv_tiles(HyperDev p, int level, const int* level_nodes, int blocks_per_node, Strided Q,
                            Strided K, Strided V, Strided dO, const float* lse, const float* delta, float* acc_dk,
                            float* acc_dv, float* partial) {
    using Tr = FlashTraits<D>;
    constexpr int Bc = Tr::kBcKV, Br = Tr::kBrKV, kM = Tr::kKvM;
    extern __shared__ __align__(16) unsigned char hyper_smem[];
    bf16* s_k = reinterpret_cast<bf16*>(hyper_smem);             // (Bc, D)
    bf16* s_v = s_k + Bc * D;                                    // (Bc, D)
    bf16* s_q = s_v + Bc * D;                                    // 2 stages of (Br, D)
    bf16* s_do = s_q + 2 * Br * D;                               // 2 stages of (Br, D)
    float* s_lse = reinterpret_cast<float*>(s_do + 2 * Br * D);  // 2 stages of (Br), log2, +inf padding
    float* s_delta = s_lse + 2 * Br;                             // 2 stages of (Br)
    int* s_qblk = reinterpret_cast<int*>(s_delta + 2 * Br);      // 2 stages of (Br), -1 padding
    int* s_kpos = s_qblk + 2 * Br;                               // (Bc), -1 padding
    int* s_kblk = s_kpos + Bc;                                   // (Bc), -2 padding
    float* s_klw = reinterpret_cast<float*>(s_kblk + Bc);        // (Bc), log2 units

    const int node_slot = blockIdx.x / blocks_per_node, in_node = blockIdx.x % blocks_per_node;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const Quadrant qd = quadrant_of(p, level, level_nodes[node_slot], bh);
    const int sample_tiles = (p.samples + Bc - 1) / Bc;
    // keys: sorted ranks (block) or distinct samples (sampled) [k0, k0 + Bc);
    // queries: sorted ranks (block) or positions - q0 (sampled) [qa, qe)
    int k0, qa, qe;
    if constexpr (kSampled) {
        k0 = in_node % sample_tiles * Bc;
        qa = in_node / sample_tiles * kQueryChunk;
        if (qa >= qd.nq) return;  // hyper_sample_scatter reads this node's chunks only
        qe = min(qa + kQueryChunk, qd.nq);
    } else {
        k0 = in_node * Bc;
        if (k0 >= qd.nk) return;
        qa = k0 / p.block * p.block;
        if (qa >= qd.nq) return;  // these keys' blocks hold no query: no block terms
        const int k_last = min(k0 + Bc, qd.nk) - 1;
        qe = (int)min((int64_t)(k_last / p.block + 1) * p.block, (int64_t)qd.nq);
    }
    const int q_tiles = (qe - qa + Br - 1) / Br;  // >= 1
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, c = lane % 4;
    const float scale_log2 = p.scale * kLog2e;
    const float lw2 = p.samples > 0 ? log2f((float)qd.split / (float)p.samples) : 0.f;

    auto key_pos_of = [&](int j) {
        if constexpr (kSampled) {
            const int s = k0 + j;
            return s < p.samples && qd.ucount[s] > 0 ? qd.start + qd.ukeys[s] : -1;
        } else {
            return k0 + j < qd.nk ? qd.perm[qd.start + k0 + j] : -1;
        }
    };
    for (int j = tid; j < Bc; j += Tr::kThreads) {
        const int pos = key_pos_of(j);
        s_kpos[j] = pos;
        if constexpr (kSampled) {
            s_kblk[j] = pos >= 0 ? (qd.inv[pos] - qd.start) / p.block : -2;
            s_klw[j] = pos >= 0 ? lw2 + log2f((float)qd.ucount[k0 + j]) : 0.f;
        } else {
            s_kblk[j] = pos >= 0 ? (k0 + j) / p.block : -2;
            s_klw[j] = 0.f;
        }
    }
    gather_tile_async<Bc, D, Tr::kThreads>(s_k, head_slice<const bf16>(K, b, h), K.st, key_pos_of, tid);
    gather_tile_async<Bc, D, Tr::kThreads>(s_v, head_slice<const bf16>(V, b, h), V.st, key_pos_of, tid);

    const bf16* q_base = head_slice<const bf16>(Q, b, h);
    const bf16* do_base = head_slice<const bf16>(dO, b, h);
    auto load_query_tile = [&](int qt, int stage) {
        const int base = qa + qt * Br;
        auto pos = [&](int i) {
            if (base + i >= qe) return -1;
            if constexpr (kSampled) return qd.q0 + base + i;
            else return qd.perm[qd.q0 + base + i];
        };
        gather_tile_async<Br, D, Tr::kThreads>(s_q + stage * Br * D, q_base, Q.st, pos, tid);
        gather_tile_async<Br, D, Tr::kThreads>(s_do + stage * Br * D, do_base, dO.st, pos, tid);
        for (int i = tid; i < Br; i += Tr::kThreads) {
            const int t = pos(i);
            const int64_t row = (int64_t)bh * p.T + t;
            s_lse[stage * Br + i] = t >= 0 ? lse[row] * kLog2e : INFINITY;
            s_delta[stage * Br + i] = t >= 0 ? delta[row] : 0.f;
            int blk = -1;
            if (t >= 0) blk = kSampled ? (qd.inv[t] - qd.q0) / p.block : (base + i) / p.block;
            s_qblk[stage * Br + i] = blk;
        }
    };
    load_query_tile(0, 0);
    cp_async_commit();

    // the warp's keys (within the tile): w_first + 16m + 8half + g
    const int w_first = warp * 16 * kM;
    float dk_acc[kM][D / 8][4] = {}, dv_acc[kM][D / 8][4] = {};
    for (int qt = 0; qt < q_tiles; ++qt) {
        const int stage = qt & 1;
        cp_async_next_stage(qt + 1 < q_tiles, [&] { load_query_tile(qt + 1, stage ^ 1); });
        __syncthreads();
        const bf16* tile_q = s_q + stage * Br * D;
        const bf16* tile_do = s_do + stage * Br * D;
        const float* tile_lse = s_lse + stage * Br;
        const float* tile_delta = s_delta + stage * Br;
        const int* tile_qblk = s_qblk + stage * Br;
        int kblk[kM][2];
        float klw[kM][2];
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                kblk[m][half] = s_kblk[w_first + 16 * m + 8 * half + g];
                klw[m][half] = s_klw[w_first + 16 * m + 8 * half + g];
            }
        float st[kM][Br / 8][4] = {};   // Sᵀ = K·Qᵀ (16·kM keys x Br queries), then Pᵀ
        float dpt[kM][Br / 8][4] = {};  // dPᵀ = V·dOᵀ, then dSᵀ
        warp_gemm_abt_m<D, Br, kM>(st, s_k, w_first, tile_q, lane);
        warp_gemm_abt_m<D, Br, kM>(dpt, s_v, w_first, tile_do, lane);
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * c + (e & 1);  // query within the tile
                const float lse_col = tile_lse[col], delta_col = tile_delta[col];
                const int qb = tile_qblk[col];
#pragma unroll
                for (int m = 0; m < kM; ++m) {
                    const int kb = kblk[m][e >> 1];
                    const bool drop = kSampled ? (qb < 0 || kb < 0 || qb == kb) : qb != kb;
                    // select, not multiply: P computed at a dropped pair may be inf
                    const float pr = exp2f(fmaf(st[m][nt][e], scale_log2, klw[m][e >> 1] - lse_col));
                    st[m][nt][e] = drop ? 0.f : pr;
                    dpt[m][nt][e] = drop ? 0.f : pr * (dpt[m][nt][e] - delta_col);
                }
            }
        warp_gemm_pv_m<D, Br, kM>(dv_acc, st, tile_do, lane);  // dV += Pᵀ·dO
        warp_gemm_pv_m<D, Br, kM>(dk_acc, dpt, tile_q, lane);  // dK += dSᵀ·Q
        __syncthreads();
    }

#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = w_first + 16 * m + 8 * half + g;  // within the tile
            if (s_kpos[key] < 0) continue;
            float *dk_row, *dv_row;
            if constexpr (kSampled) {
                const int chunk = in_node / sample_tiles;
                dk_row = partial + ((((int64_t)node_slot * p.BH + bh) * (blocks_per_node / sample_tiles) + chunk) *
                                        (sample_tiles * Bc) + k0 + key) * 2 * D;
                dv_row = dk_row + D;
            } else {
                dk_row = acc_dk + ((int64_t)bh * p.T + s_kpos[key]) * D;
                dv_row = acc_dv + ((int64_t)bh * p.T + s_kpos[key]) * D;
            }
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                float2* xk = reinterpret_cast<float2*>(dk_row + dn * 8 + 2 * c);
                float2* xv = reinterpret_cast<float2*>(dv_row + dn * 8 + 2 * c);
                float2 vk = make_float2(dk_acc[m][dn][2 * half], dk_acc[m][dn][2 * half + 1]);
                float2 vv = make_float2(dv_acc[m][dn][2 * half], dv_acc[m][dn][2 * half + 1]);
                if constexpr (!kSampled) {  // add to the running sums
                    const float2 ok = *xk, ov = *xv;
                    vk.x += ok.x, vk.y += ok.y, vv.x += ov.x, vv.y += ov.y;
                }
                *xk = vk;
                *xv = vv;
            }
        }
}

// acc_dk, acc_dv rows of the distinct sampled keys += the sum of their partials over the node's
// query chunks, in chunk order. One thread per (node of the level, b·h, sample, column of
// [dK | dV]); the sampled keys of one (node, head) are distinct, so no two threads write one
// element. partial: (nodes, B·H, chunks_per_node, m_pad, 2d).
__global__ void hyper_sample_scatter(HyperDev p, int level, const int* level_nodes, int num_nodes,
                                     int chunks_per_node, int m_pad, const float* partial, float* acc_dk,
                                     float* acc_dv) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int d2 = 2 * p.d;
    if (idx >= (int64_t)num_nodes * p.BH * m_pad * d2) return;
    const int col = (int)(idx % d2);
    const int s = (int)(idx / d2 % m_pad);
    const int64_t nb = idx / d2 / m_pad;  // node slot · B·H + bh
    const int bh = (int)(nb % p.BH), node_slot = (int)(nb / p.BH);
    if (s >= p.samples) return;
    const Quadrant qd = quadrant_of(p, level, level_nodes[node_slot], bh);
    if (qd.ucount[s] <= 0) return;
    const int chunks = (qd.nq + kQueryChunk - 1) / kQueryChunk;
    const float* src = partial + (nb * chunks_per_node * m_pad + s) * d2 + col;
    float sum = 0.f;
    for (int ch = 0; ch < chunks; ++ch) sum += src[(int64_t)ch * m_pad * d2];
    const int64_t row = (int64_t)bh * p.T + qd.start + qd.ukeys[s];
    if (col < p.d) acc_dk[row * p.d + col] += sum;
    else acc_dv[row * p.d + col - p.d] += sum;
}

// ---------------------------------------------------------------- fp32 running state <-> tensors
// One thread per element (bh, t, i) of (B·H, T, d).
__device__ __forceinline__ bf16* elem_ptr(const HyperDev& p, const Strided& x, int64_t idx) {
    const int64_t row = idx / p.d;
    const int bh = (int)(row / p.T), t = (int)(row % p.T);
    return row_ptr<bf16>(x, bh / p.H, bh % p.H, t) + idx % p.d;
}
// acc = O (the leaves' output: every row's state starts as its leaf's)
__global__ void hyper_acc_from_o(HyperDev p, Strided O, float* acc) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (int64_t)p.BH * p.T * p.d) acc[idx] = __bfloat162float(*elem_ptr(p, O, idx));
}
// O = acc
__global__ void hyper_o_from_acc(HyperDev p, Strided O, const float* acc) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (int64_t)p.BH * p.T * p.d) *elem_ptr(p, O, idx) = __float2bfloat16_rn(acc[idx]);
}
// x += factor · acc (the leaves' gradient plus the quadrants', one rounding)
__global__ void hyper_add_acc(HyperDev p, Strided X, const float* acc, float factor) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T * p.d) return;
    bf16* x = elem_ptr(p, X, idx);
    *x = __float2bfloat16_rn(__bfloat162float(*x) + factor * acc[idx]);
}

// ============================================================================ host side
// The plan's tables as one int array (uploaded in one copy) and the offsets of its parts.
struct HostTables {
    std::vector<int> ints;
    size_t pos_node_at = 0, nodes_at = 0, leaf_at = 0, draws_at = 0, ukeys_at = 0, ucount_at = 0;
    std::vector<size_t> seg_begin_at, seg_end_at;  // per level
    std::vector<int> num_segments;                 // per level
    std::vector<size_t> level_nodes_at;            // per level: its internal node ids (pre-order)
    std::vector<int> nodes_per_level, max_nq, max_nk;  // per level: nodes, largest query / key half
    std::vector<HyperNode> leaves;
    int levels = 0, num_internal = 0;
};

// with_draws = false only sizes the tables (for workspace_bytes).
HostTables build_tables(const HyperPlan& plan, bool with_draws) {
    const int T = plan.T, BH = plan.B * plan.H, m = plan.samples;
    HostTables tb;
    tb.levels = (int)plan.projections.size();
    std::vector<const HyperNode*> internal;
    for (const HyperNode& node : plan.nodes) {
        if (node.leaf()) tb.leaves.push_back(node);
        else internal.push_back(&node);
    }
    tb.num_internal = (int)internal.size();
    tb.nodes_per_level.assign(tb.levels, 0);
    tb.max_nq.assign(tb.levels, 0);
    tb.max_nk.assign(tb.levels, 0);
    for (const HyperNode* node : internal) {
        tb.nodes_per_level[node->level]++;
        tb.max_nq[node->level] = std::max(tb.max_nq[node->level], node->n - node->split);
        tb.max_nk[node->level] = std::max(tb.max_nk[node->level], node->split);
    }
    size_t size = 0;
    tb.pos_node_at = size, size += (size_t)tb.levels * T;
    tb.nodes_at = size, size += (size_t)kNodeFields * tb.num_internal;
    tb.leaf_at = size, size += (size_t)2 * T;
    for (int level = 0; level < tb.levels; level++) {
        const int segments = 2 * BH * tb.nodes_per_level[level];
        tb.num_segments.push_back(segments);
        tb.seg_begin_at.push_back(size), size += segments;
        tb.seg_end_at.push_back(size), size += segments;
    }
    CHECK((int64_t)tb.num_internal * BH * m < (int64_t)INT32_MAX, "hyper: too many samples for 32-bit indices");
    tb.draws_at = size, size += (size_t)tb.num_internal * BH * m;
    tb.ukeys_at = size, size += (size_t)tb.num_internal * BH * m;
    tb.ucount_at = size, size += (size_t)tb.num_internal * BH * m;
    for (int level = 0; level < tb.levels; level++)
        tb.level_nodes_at.push_back(size), size += tb.nodes_per_level[level];
    tb.ints.assign(size, -1);
    if (!with_draws) return tb;

    std::vector<int> segment_fill(tb.levels, 0), level_fill(tb.levels, 0);
    for (int id = 0; id < tb.num_internal; id++) {
        const HyperNode& node = *internal[id];
        tb.ints[tb.level_nodes_at[node.level] + level_fill[node.level]++] = id;
        int* fields = &tb.ints[tb.nodes_at + (size_t)kNodeFields * id];
        fields[0] = node.start, fields[1] = node.split, fields[2] = node.n;
        fields[3] = id * BH * m, fields[4] = node.level;
        for (int t = node.start; t < node.start + node.n; t++) tb.ints[tb.pos_node_at + (size_t)node.level * T + t] = id;
        for (int bh = 0; bh < BH; bh++) {
            int& at = segment_fill[node.level];
            const int head = bh * T;
            const int bounds[3] = {head + node.start, head + node.start + node.split, head + node.start + node.n};
            for (int half = 0; half < 2; half++, at++) {
                tb.ints[tb.seg_begin_at[node.level] + at] = bounds[half];
                tb.ints[tb.seg_end_at[node.level] + at] = bounds[half + 1];
            }
            if (m > 0) {
                const std::vector<int> draws = hyper_samples(plan, node, bh);
                const size_t at_draws = (size_t)fields[3] + (size_t)bh * m;
                std::copy(draws.begin(), draws.end(), tb.ints.begin() + tb.draws_at + at_draws);
                // the distinct keys, ascending, with their counts (the bf16 tile kernels)
                std::vector<int> sorted = draws;
                std::sort(sorted.begin(), sorted.end());
                int* ukeys = &tb.ints[tb.ukeys_at + at_draws];
                int* ucount = &tb.ints[tb.ucount_at + at_draws];
                int u = -1;
                for (int j : sorted) {
                    if (u < 0 || ukeys[u] != j) ukeys[++u] = j, ucount[u] = 0;
                    ucount[u]++;
                }
                for (int r = u + 1; r < m; r++) ucount[r] = 0;
            }
        }
    }
    for (const HyperNode& leaf : tb.leaves)
        for (int t = leaf.start; t < leaf.start + leaf.n; t++) {
            tb.ints[tb.leaf_at + 2 * (size_t)t] = leaf.start;
            tb.ints[tb.leaf_at + 2 * (size_t)t + 1] = leaf.n;
        }
    return tb;
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// The samples rounded up to whole sample tiles (FlashTraits<d>::kBcKV keys) of head dim d.
int sample_pad(int samples, int d) {
    const int tile = d == 64 ? FlashTraits<64>::kBcKV : FlashTraits<128>::kBcKV;
    return ceil_div(samples, tile) * tile;
}

// Bytes of CUB's segmented stable sort of `items` (uint32 key, int value) pairs in `segments`.
size_t cub_sort_bytes(int64_t items, int64_t segments) {
    size_t bytes = 0;
    CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(nullptr, bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                                         (const int*)nullptr, (int*)nullptr, items, segments,
                                                         (const int*)nullptr, (const int*)nullptr));
    return bytes;
}

// Byte offsets of the workspace's parts (each 256-aligned).
struct WorkspaceLayout {
    size_t ints, proj, perm, inv, draw_count, keys_in, keys_out, vals_in, leaf_lse, delta, flash, acc, partial, cub;
    size_t cub_bytes, total;
};

WorkspaceLayout workspace_layout(const HyperPlan& plan, const HostTables& tb) {
    const size_t rows = (size_t)plan.B * plan.H * plan.T;  // B·H·T
    const size_t level_rows = rows * tb.levels;
    WorkspaceLayout w{};
    size_t at = 0;
    auto take = [&](size_t bytes) {
        const size_t here = at;
        at += align_up(bytes);
        return here;
    };
    w.ints = take(tb.ints.size() * sizeof(int));
    w.proj = take((size_t)tb.levels * plan.lsh_bits * plan.d * sizeof(float));
    w.perm = take(level_rows * sizeof(int));
    w.inv = take(level_rows * sizeof(int));
    w.draw_count = take(level_rows * sizeof(int));
    w.keys_in = take(rows * sizeof(uint32_t));
    w.keys_out = take(rows * sizeof(uint32_t));
    w.vals_in = take(rows * sizeof(int));
    w.leaf_lse = take(rows * sizeof(float));
    w.delta = take(rows * sizeof(float));
    w.flash = take(rows * sizeof(float));  // the flash kernels' workspace (Δ of a leaf)
    // bf16 path: fp32 running state (forward: O; backward: dQ, dK, dV), each (B·H, T, d), and the
    // sampled keys' partial dK|dV, (nodes, B·H, query chunks, m_pad, 2d), the largest level's
    w.acc = take(3 * rows * plan.d * sizeof(float));
    size_t partial = 0;
    for (int level = 0; level < tb.levels; level++) {
        const size_t chunks = ceil_div(tb.max_nq[level], kQueryChunk);
        partial = std::max(partial, (size_t)tb.nodes_per_level[level] * plan.B * plan.H * chunks *
                                        sample_pad(plan.samples, plan.d) * 2 * plan.d);
    }
    w.partial = take(partial * sizeof(float));
    w.cub_bytes = 0;
    for (int segments : tb.num_segments) w.cub_bytes = std::max(w.cub_bytes, cub_sort_bytes((int64_t)rows, segments));
    w.cub = take(w.cub_bytes);
    w.total = at;
    return w;
}

template <typename T>
T* part(void* workspace, size_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// A (B,H,T,d) view moved to position `start` (the first row of a leaf).
HeadTensor shifted(HeadTensor x, int start) {
    x.ptr = static_cast<char*>(x.ptr) + (size_t)start * x.st * dtype_size(x.dtype);
    return x;
}

template <int V> using IntTag = std::integral_constant<int, V>;

int blocks_for(int64_t threads, int per_block) { return (int)((threads + per_block - 1) / per_block); }

// Kernels with more than 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

class CudaHyperAttention : public Attention {
public:
    explicit CudaHyperAttention(const AttnConfig& cfg) : cfg_(cfg), flash_(make_cuda_softmax_attention(cfg)) {
        hyper_check_config(cfg);
    }
    std::string name() const override { return "hyper"; }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // final LSE (B,H,T)

    size_t workspace_bytes(const AttnShape& s) const override {
        const HyperPlan plan = make_hyper_plan(cfg_, AttnContext{}, s);  // the tree depends on T only
        if (plan.nodes.size() == 1) return flash_->workspace_bytes(s);
        return workspace_layout(plan, build_tables(plan, false)).total;
    }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q, HeadTensor k,
                 HeadTensor v, float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"o", o}, {"q", q}, {"k", k}, {"v", v}});
        CHECK(saved != nullptr, "hyper attention: forward needs the saved buffer (%zu floats)", saved_size(s));
        const HyperPlan plan = make_hyper_plan(cfg_, ctx, s);
        if (plan.nodes.size() == 1) {  // T <= min_seq: exact causal softmax
            flash_->forward(s, ctx, o, q, k, v, saved, params, workspace);
            return;
        }
        CHECK(workspace != nullptr, "hyper attention: forward needs a workspace of %zu bytes", workspace_bytes(s));
        const HostTables tb = build_tables(plan, true);
        const WorkspaceLayout w = workspace_layout(plan, tb);
        const HyperDev p = prepare(plan, tb, w, workspace);
        float* leaf_lse = part<float>(workspace, w.leaf_lse);
        const int BH = s.B * s.H;
        for (const HyperNode& leaf : tb.leaves)
            flash_->forward(AttnShape{s.B, s.H, leaf.n, s.d}, ctx, shifted(o, leaf.start), shifted(q, leaf.start),
                            shifted(k, leaf.start), shifted(v, leaf.start), leaf_lse + (size_t)BH * leaf.start,
                            params, part<void>(workspace, w.flash));
        sort_levels(p, tb, w, workspace, dt, q, k);
        if (dt == DType::BF16) {
            forward_tiles(p, tb, w, workspace, o, q, k, v, leaf_lse, saved);
            return;
        }
        const int grid = blocks_for((int64_t)s.rows(), kWarpsPerBlock);
        dispatch_d(s.d, [&](auto d_tag) {
            constexpr int D = decltype(d_tag)::value;
            hyper_forward_rows<float, D><<<grid, 32 * kWarpsPerBlock>>>(p, strided(o), strided(q), strided(k),
                                                                         strided(v), leaf_lse, saved);
            CUDA_LAUNCH_CHECK();
        });
    }

    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk, HeadTensor dv,
                  Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k, HeadTensor v, HeadTensor o,
                  const float* saved, Tensor params, void* workspace) override {
        const DType dt = check_tensors(s, {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dout", dout}, {"q", q},
                                           {"k", k}, {"v", v}, {"o", o}});
        CHECK(saved != nullptr && workspace != nullptr,
              "hyper attention: backward needs the saved LSE and a workspace of %zu bytes", workspace_bytes(s));
        const HyperPlan plan = make_hyper_plan(cfg_, ctx, s);
        if (plan.nodes.size() == 1) {
            flash_->backward(s, ctx, dq, dk, dv, dparams, dout, q, k, v, o, saved, params, workspace);
            return;
        }
        const HostTables tb = build_tables(plan, true);
        const WorkspaceLayout w = workspace_layout(plan, tb);
        const HyperDev p = prepare(plan, tb, w, workspace);
        const int64_t rows = (int64_t)s.rows();
        const int BH = s.B * s.H;
        float* leaf_lse = part<float>(workspace, w.leaf_lse);
        float* delta = part<float>(workspace, w.delta);

        // leaves: the flash backward with the final LSE (in each leaf's layout) and the final O
        hyper_gather_leaf_lse<<<blocks_for(rows, kThreads1D), kThreads1D>>>(p, saved, leaf_lse);
        CUDA_LAUNCH_CHECK();
        for (const HyperNode& leaf : tb.leaves) {
            const int t0 = leaf.start;
            flash_->backward(AttnShape{s.B, s.H, leaf.n, s.d}, ctx, shifted(dq, t0), shifted(dk, t0),
                             shifted(dv, t0), dparams, shifted(dout, t0), shifted(q, t0), shifted(k, t0),
                             shifted(v, t0), shifted(o, t0), leaf_lse + (size_t)BH * t0, params,
                             part<void>(workspace, w.flash));
        }

        sort_levels(p, tb, w, workspace, dt, q, k);
        const int grid = blocks_for(rows, kWarpsPerBlock);
        if (dt == DType::BF16) {
            dispatch_d(s.d, [&](auto d_tag) {
                hyper_delta<bf16, decltype(d_tag)::value>
                    <<<grid, 32 * kWarpsPerBlock>>>(p, strided(dout), strided(o), delta);
                CUDA_LAUNCH_CHECK();
            });
            backward_tiles(p, tb, w, workspace, dq, dk, dv, dout, q, k, v, saved, delta);
            return;
        }
        int* draw_count = part<int>(workspace, w.draw_count);
        if (plan.samples > 0) {
            CUDA_CHECK(cudaMemsetAsync(draw_count, 0, (size_t)tb.levels * rows * sizeof(int)));
            const int64_t draws = (int64_t)tb.num_internal * BH * plan.samples;
            hyper_count_draws<<<blocks_for(draws, kThreads1D), kThreads1D>>>(p, tb.num_internal, draw_count);
            CUDA_LAUNCH_CHECK();
        }
        dispatch_d(s.d, [&](auto d_tag) {
            using T = float;
            constexpr int D = decltype(d_tag)::value;
            hyper_delta<T, D><<<grid, 32 * kWarpsPerBlock>>>(p, strided(dout), strided(o), delta);
            CUDA_LAUNCH_CHECK();
            hyper_backward_dq<T, D><<<grid, 32 * kWarpsPerBlock>>>(p, strided(dq), strided(dout), strided(q),
                                                                    strided(k), strided(v), saved, delta);
            CUDA_LAUNCH_CHECK();
            hyper_backward_dkdv<T, D><<<grid, 32 * kWarpsPerBlock>>>(p, strided(dk), strided(dv), strided(dout),
                                                                      strided(q), strided(k), strided(v), saved,
                                                                      delta);
            CUDA_LAUNCH_CHECK();
        });
    }

private:
    template <typename Fn>
    void dispatch_d(int d, Fn&& fn) const {
        if (d == 64) fn(IntTag<64>{});
        else fn(IntTag<128>{});
    }

    // bf16 forward after the leaves and the sort: every row's running state (acc, lse) starts as
    // its leaf's (O, LSE); one tile kernel per level merges that level's quadrant piece into the
    // state of its query rows; O = acc at the end. lse is the saved buffer: final LSE on return.
    void forward_tiles(const HyperDev& p, const HostTables& tb, const WorkspaceLayout& w, void* workspace,
                       HeadTensor o, HeadTensor q, HeadTensor k, HeadTensor v, const float* leaf_lse,
                       float* lse) const {
        const int64_t elems = (int64_t)p.BH * p.T * p.d;
        const int* ints = part<const int>(workspace, w.ints);
        float* acc = part<float>(workspace, w.acc);  // (B·H, T, d)
        hyper_scatter_leaf_lse<<<blocks_for((int64_t)p.BH * p.T, kThreads1D), kThreads1D>>>(p, leaf_lse, lse);
        CUDA_LAUNCH_CHECK();
        hyper_acc_from_o<<<blocks_for(elems, kThreads1D), kThreads1D>>>(p, strided(o), acc);
        CUDA_LAUNCH_CHECK();
        dispatch_d(p.d, [&](auto d_tag) {
            constexpr int D = decltype(d_tag)::value;
            using Tr = FlashTraits<D>;
            constexpr int smem = HyperTiles<D>::kFwdSmem;
            auto kernel = hyper_forward_tiles<D>;
            set_smem(kernel, smem);
            for (int level = 0; level < tb.levels; level++) {
                const int tiles = ceil_div(tb.max_nq[level], Tr::kBrF);
                kernel<<<dim3(tiles * tb.nodes_per_level[level], p.BH), Tr::kThreads, smem>>>(
                    p, level, ints + tb.level_nodes_at[level], tiles, strided(q), strided(k), strided(v), acc, lse);
                CUDA_LAUNCH_CHECK();
            }
        });
        hyper_o_from_acc<<<blocks_for(elems, kThreads1D), kThreads1D>>>(p, strided(o), acc);
        CUDA_LAUNCH_CHECK();
    }

    // bf16 backward after the leaves (which wrote dq, dk, dv), the sort and Δ: per level the dQ
    // tiles, the block dK/dV tiles and the sampled dK/dV partials + their ordered scatter add into
    // fp32 sums (B·H, T, d); then dq += scale·ΣdQ, dk += scale·ΣdK, dv += ΣdV, one rounding each.
    void backward_tiles(const HyperDev& p, const HostTables& tb, const WorkspaceLayout& w, void* workspace,
                        HeadTensor dq, HeadTensor dk, HeadTensor dv, HeadTensor dout, HeadTensor q, HeadTensor k,
                        HeadTensor v, const float* lse, const float* delta) const {
        const int64_t elems = (int64_t)p.BH * p.T * p.d;
        const int* ints = part<const int>(workspace, w.ints);
        float* acc_dq = part<float>(workspace, w.acc);  // 3 x (B·H, T, d)
        float* acc_dk = acc_dq + elems;
        float* acc_dv = acc_dk + elems;
        float* partial = part<float>(workspace, w.partial);
        CUDA_CHECK(cudaMemsetAsync(acc_dq, 0, 3 * elems * sizeof(float)));
        const int m_pad = sample_pad(p.samples, p.d);
        dispatch_d(p.d, [&](auto d_tag) {
            constexpr int D = decltype(d_tag)::value;
            using Tr = FlashTraits<D>;
            constexpr int dq_smem = HyperTiles<D>::kDqSmem, kv_smem = HyperTiles<D>::kDkvSmem;
            auto dq_kernel = hyper_backward_dq_tiles<D>;
            auto kv_block = hyper_backward_kv_tiles<D, false>;
            auto kv_sampled = hyper_backward_kv_tiles<D, true>;
            set_smem(dq_kernel, dq_smem);
            set_smem(kv_block, kv_smem);
            set_smem(kv_sampled, kv_smem);
            for (int level = 0; level < tb.levels; level++) {
                const int* nodes = ints + tb.level_nodes_at[level];
                const int num_nodes = tb.nodes_per_level[level];
                const int q_tiles = ceil_div(tb.max_nq[level], Tr::kBrQ);
                dq_kernel<<<dim3(q_tiles * num_nodes, p.BH), Tr::kThreads, dq_smem>>>(
                    p, level, nodes, q_tiles, strided(q), strided(k), strided(v), strided(dout), lse, delta, acc_dq);
                CUDA_LAUNCH_CHECK();
                const int k_tiles = ceil_div(tb.max_nk[level], Tr::kBcKV);
                kv_block<<<dim3(k_tiles * num_nodes, p.BH), Tr::kThreads, kv_smem>>>(
                    p, level, nodes, k_tiles, strided(q), strided(k), strided(v), strided(dout), lse, delta, acc_dk,
                    acc_dv, partial);
                CUDA_LAUNCH_CHECK();
                if (p.samples == 0) continue;
                const int chunks = ceil_div(tb.max_nq[level], kQueryChunk);
                const int per_node = chunks * (m_pad / Tr::kBcKV);
                kv_sampled<<<dim3(per_node * num_nodes, p.BH), Tr::kThreads, kv_smem>>>(
                    p, level, nodes, per_node, strided(q), strided(k), strided(v), strided(dout), lse, delta, acc_dk,
                    acc_dv, partial);
                CUDA_LAUNCH_CHECK();
                const int64_t threads = (int64_t)num_nodes * p.BH * m_pad * 2 * p.d;
                hyper_sample_scatter<<<blocks_for(threads, kThreads1D), kThreads1D>>>(
                    p, level, nodes, num_nodes, chunks, m_pad, partial, acc_dk, acc_dv);
                CUDA_LAUNCH_CHECK();
            }
        });
        const int grid = blocks_for(elems, kThreads1D);
        hyper_add_acc<<<grid, kThreads1D>>>(p, strided(dq), acc_dq, p.scale);
        CUDA_LAUNCH_CHECK();
        hyper_add_acc<<<grid, kThreads1D>>>(p, strided(dk), acc_dk, p.scale);
        CUDA_LAUNCH_CHECK();
        hyper_add_acc<<<grid, kThreads1D>>>(p, strided(dv), acc_dv, 1.f);
        CUDA_LAUNCH_CHECK();
    }

    // Uploads the tables and projections into the workspace; the device view of the plan.
    HyperDev prepare(const HyperPlan& plan, const HostTables& tb, const WorkspaceLayout& w, void* workspace) const {
        int* ints = part<int>(workspace, w.ints);
        float* proj = part<float>(workspace, w.proj);
        CUDA_CHECK(cudaMemcpy(ints, tb.ints.data(), tb.ints.size() * sizeof(int), cudaMemcpyHostToDevice));
        std::vector<float> all_proj;
        for (const std::vector<float>& level : plan.projections) all_proj.insert(all_proj.end(), level.begin(), level.end());
        if (!all_proj.empty())
            CUDA_CHECK(cudaMemcpy(proj, all_proj.data(), all_proj.size() * sizeof(float), cudaMemcpyHostToDevice));
        HyperDev p{};
        p.B = plan.B, p.H = plan.H, p.T = plan.T, p.d = plan.d, p.BH = plan.B * plan.H;
        p.levels = tb.levels, p.block = plan.block, p.samples = plan.samples, p.lsh_bits = plan.lsh_bits;
        p.scale = 1.f / std::sqrt((float)plan.d);
        p.pos_node = ints + tb.pos_node_at;
        p.nodes = ints + tb.nodes_at;
        p.leaf = ints + tb.leaf_at;
        p.draws = ints + tb.draws_at;
        p.proj = proj;
        p.perm = part<int>(workspace, w.perm);
        p.inv = part<int>(workspace, w.inv);
        p.draw_count = part<int>(workspace, w.draw_count);
        p.ukeys = ints + tb.ukeys_at;
        p.ucount = ints + tb.ucount_at;
        return p;
    }

    // Per level: hash, stable sort by bucket within each segment -> perm, invert -> inv.
    void sort_levels(const HyperDev& p, const HostTables& tb, const WorkspaceLayout& w, void* workspace, DType dt,
                     HeadTensor q, HeadTensor k) const {
        const int64_t rows = (int64_t)p.BH * p.T;
        const int* ints = part<const int>(workspace, w.ints);
        uint32_t* keys_in = part<uint32_t>(workspace, w.keys_in);
        uint32_t* keys_out = part<uint32_t>(workspace, w.keys_out);
        int* vals_in = part<int>(workspace, w.vals_in);
        const int grid = blocks_for(rows, kThreads1D);
        for (int level = 0; level < tb.levels; level++) {
            const int smem = p.lsh_bits * p.d * (int)sizeof(float);  // <= 30 x 128 floats
            dispatch_d(p.d, [&](auto d_tag) {
                constexpr int D = decltype(d_tag)::value;
                if (dt == DType::BF16)
                    hyper_hash<bf16, D><<<grid, kThreads1D, smem>>>(p, level, strided(q), strided(k), keys_in, vals_in);
                else
                    hyper_hash<float, D>
                        <<<grid, kThreads1D, smem>>>(p, level, strided(q), strided(k), keys_in, vals_in);
                CUDA_LAUNCH_CHECK();
            });
            int* perm_level = const_cast<int*>(p.perm) + level * rows;
            size_t bytes = w.cub_bytes;
            CHECK(cub_sort_bytes(rows, tb.num_segments[level]) <= w.cub_bytes, "hyper: sort scratch too small");
            CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
                part<void>(workspace, w.cub), bytes, keys_in, keys_out, vals_in, perm_level, rows,
                (int64_t)tb.num_segments[level], ints + tb.seg_begin_at[level], ints + tb.seg_end_at[level]));
            CUDA_LAUNCH_CHECK();
            hyper_invert<<<grid, kThreads1D>>>(p, level, const_cast<int*>(p.inv) + level * rows, perm_level);
            CUDA_LAUNCH_CHECK();
        }
    }

    // All tensors share one dtype; d is one the flash leaves support. Returns the dtype.
    DType check_tensors(const AttnShape& s, std::initializer_list<std::pair<const char*, HeadTensor>> ts) const {
        CHECK(s.d == 64 || s.d == 128,
              "hyper attention (CUDA): head dim d=%d is not supported; use n_embd/n_head = 64 or 128", s.d);
        CHECK(s.B >= 1 && s.H >= 1 && s.T >= 1, "hyper attention: bad shape B=%d H=%d T=%d", s.B, s.H, s.T);
        CHECK((int64_t)s.rows() < (int64_t)INT32_MAX, "hyper attention: B*H*T must fit in 32-bit indices (B=%d H=%d T=%d)",
              s.B, s.H, s.T);
        CHECK((int64_t)s.B * s.H <= 65535, "hyper attention: B*H = %d exceeds the grid's 65535", s.B * s.H);
        return attention_dtype("hyper", ts, true);
    }

    AttnConfig cfg_;
    std::unique_ptr<Attention> flash_;  // the exact causal leaves
};

}  // namespace

std::unique_ptr<Attention> make_cuda_hyper_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaHyperAttention>(cfg);
}
