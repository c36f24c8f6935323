// CUDA causal HyperAttention (ATTENTION.md §5) with its exact backward: the same function as the
// CPU reference (src/attention/hyper.cpp) on the same plan (src/attention/hyper_plan.h: recursion
// split at ceil(n/2), projections per (layer, step, level), samples per (layer, step, level, node,
// b·H+h), Gray-order buckets, stable sort, samples in the query's own sorted block dropped, ragged
// last blocks). T <= min_seq is exactly the CUDA `softmax` (flash.cu), call for call.
//
// How a call runs (everything on the default stream, in a fixed order: deterministic):
//   host    make_hyper_plan; the tables of the plan (which internal node covers position t on
//           each level, node bounds, the leaf of each t, the sort segments, every node's sampled
//           key offsets per head, the projections) go up in one copy (small: O(levels·T + nodes·
//           B·H·m) ints; the copy from pageable memory waits for the device, once per call).
//   leaves  every leaf [start, start+n) of the recursion is exact causal attention: the flash
//           kernels on sub-views (all B·H heads per call, one call per leaf).
//   hashing per level, one thread per (b·h, t) covered by an internal node: code bit p =
//           [x·proj_p > 0] in fp64 (as the CPU reference, so buckets agree with it on identical
//           inputs), bucket = gray_inverse(code); then CUB's DeviceSegmentedSort::StableSortPairs
//           sorts positions by bucket within each (b·h, node, key half | query half) segment
//           (stable: ties keep position order) -> perm; a scatter gives its inverse inv.
//   forward one warp per row (b·h, t): the row's state starts as its leaf's (m = LSE_leaf, l = 1,
//           acc = O_leaf); for every level where t is a query of a quadrant it runs online
//           softmax over the keys of its sorted key block and over the node's sampled keys
//           (log-weight ln(n_keys/m), draws in its own key block skipped), fp32 throughout; writes
//           O = acc/l and the final LSE = m + ln l (saved, (B,H,T) fp32).
//   backward Δ = rowsum(dO∘O); leaves by the flash backward with the final LSE and final O (so
//           P = exp(S − LSE_final), the leaf part of the exact gradient); then one warp per query
//           row adds its quadrant terms to dQ, and one warp per key row adds to dK, dV the terms of
//           the query block that sees it and, if it was drawn (count c times), c × the terms of
//           every query of the node outside its block. Every row's sum is owned by one warp, in a
//           fixed order: no atomics on floats (integer atomics count draws only).
// Costs beyond the math: per call the host draws B·H·(internal nodes)·m samples (Rng, cheap) and
// uploads the tables synchronously; one flash call per leaf; one CUB sort per level. The sampled
// keys' dK/dV walk every query of their node (one warp each): load-imbalanced at large T.
// Simple fp32 math (no tensor cores outside the leaves); memory O(levels·B·H·T) ints plus
// O(B·H·T) floats: nothing of size T² or of size B·H·T·d beyond the tensors themselves.
#include <cub/device/device_segmented_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "attention/hyper_plan.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/common.cuh"
#include "cuda/attention/strided.cuh"

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
    const int* draw_count;  // (levels, BH, T): times key t was drawn by its node (backward)
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
// to, a bucket could differ only where |x·proj| < ~1e-15·‖x‖‖proj‖).
template <typename T>
__global__ void hyper_hash(HyperDev p, int level, Strided Q, Strided K, uint32_t* keys_in, int* vals_in) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (int64_t)p.BH * p.T) return;
    const int bh = (int)(idx / p.T), t = (int)(idx % p.T);
    const int node = p.pos_node[(int64_t)level * p.T + t];
    if (node < 0) return;
    const int* nd = p.nodes + kNodeFields * node;
    const bool is_query = t >= nd[0] + nd[1];
    const T* x = row_ptr<const T>(is_query ? Q : K, bh / p.H, bh % p.H, t);
    const float* proj = p.proj + (int64_t)level * p.lsh_bits * p.d;
    uint32_t code = 0;
    for (int b = 0; b < p.lsh_bits; ++b) {
        double dot = 0;
        for (int c = 0; c < p.d; ++c) dot += (double)to_f32(x[c]) * (double)proj[b * p.d + c];
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

// ============================================================================ forward
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

// ============================================================================ backward
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

// dQ of row (bh, t) += scale · Σ over its quadrant terms of dS·k, dS = P(dP − Δ), P = exp(s − LSE).
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

// dK, dV of key row (bh, t) += its quadrant terms: the queries of the sorted query block with its
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

// ============================================================================ host side
// The plan's tables as one int array (uploaded in one copy) and the offsets of its parts.
struct HostTables {
    std::vector<int> ints;
    size_t pos_node_at = 0, nodes_at = 0, leaf_at = 0, draws_at = 0;
    std::vector<size_t> seg_begin_at, seg_end_at;  // per level
    std::vector<int> num_segments;                 // per level
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
    std::vector<int> nodes_per_level(tb.levels, 0);
    for (const HyperNode* node : internal) nodes_per_level[node->level]++;
    size_t size = 0;
    tb.pos_node_at = size, size += (size_t)tb.levels * T;
    tb.nodes_at = size, size += (size_t)kNodeFields * tb.num_internal;
    tb.leaf_at = size, size += (size_t)2 * T;
    for (int level = 0; level < tb.levels; level++) {
        const int segments = 2 * BH * nodes_per_level[level];
        tb.num_segments.push_back(segments);
        tb.seg_begin_at.push_back(size), size += segments;
        tb.seg_end_at.push_back(size), size += segments;
    }
    CHECK((int64_t)tb.num_internal * BH * m < (int64_t)INT32_MAX, "hyper: too many samples for 32-bit indices");
    tb.draws_at = size, size += (size_t)tb.num_internal * BH * m;
    tb.ints.assign(size, -1);
    if (!with_draws) return tb;

    std::vector<int> segment_fill(tb.levels, 0);
    for (int id = 0; id < tb.num_internal; id++) {
        const HyperNode& node = *internal[id];
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
                std::copy(draws.begin(), draws.end(), tb.ints.begin() + tb.draws_at + (size_t)fields[3] + (size_t)bh * m);
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
    size_t ints, proj, perm, inv, draw_count, keys_in, keys_out, vals_in, leaf_lse, delta, flash, cub;
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

template <typename T> struct TypeTag { using type = T; };
template <int V> using IntTag = std::integral_constant<int, V>;

int blocks_for(int64_t threads, int per_block) { return (int)((threads + per_block - 1) / per_block); }

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
        const int grid = blocks_for((int64_t)s.rows(), kWarpsPerBlock);
        dispatch(dt, s.d, [&](auto type_tag, auto d_tag) {
            using T = typename decltype(type_tag)::type;
            constexpr int D = decltype(d_tag)::value;
            hyper_forward_rows<T, D><<<grid, 32 * kWarpsPerBlock>>>(p, strided(o), strided(q), strided(k),
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
        int* draw_count = part<int>(workspace, w.draw_count);
        if (plan.samples > 0) {
            CUDA_CHECK(cudaMemsetAsync(draw_count, 0, (size_t)tb.levels * rows * sizeof(int)));
            const int64_t draws = (int64_t)tb.num_internal * BH * plan.samples;
            hyper_count_draws<<<blocks_for(draws, kThreads1D), kThreads1D>>>(p, tb.num_internal, draw_count);
            CUDA_LAUNCH_CHECK();
        }
        const int grid = blocks_for(rows, kWarpsPerBlock);
        dispatch(dt, s.d, [&](auto type_tag, auto d_tag) {
            using T = typename decltype(type_tag)::type;
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
    void dispatch(DType dt, int d, Fn&& fn) const {
        if (dt == DType::BF16 && d == 64) fn(TypeTag<bf16>{}, IntTag<64>{});
        else if (dt == DType::BF16) fn(TypeTag<bf16>{}, IntTag<128>{});
        else if (d == 64) fn(TypeTag<float>{}, IntTag<64>{});
        else fn(TypeTag<float>{}, IntTag<128>{});
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
            if (dt == DType::BF16)
                hyper_hash<bf16><<<grid, kThreads1D>>>(p, level, strided(q), strided(k), keys_in, vals_in);
            else
                hyper_hash<float><<<grid, kThreads1D>>>(p, level, strided(q), strided(k), keys_in, vals_in);
            CUDA_LAUNCH_CHECK();
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
        const DType dt = ts.begin()->second.dtype;
        for (const auto& [what, t] : ts) {
            CHECK(t.ptr != nullptr, "hyper attention: tensor %s is null", what);
            CHECK(t.dtype == dt, "hyper attention: tensor %s is %s but %s is %s", what, dtype_name(t.dtype),
                  ts.begin()->first, dtype_name(dt));
        }
        return dt;
    }

    AttnConfig cfg_;
    std::unique_ptr<Attention> flash_;  // the exact causal leaves
};

}  // namespace

std::unique_ptr<Attention> make_cuda_hyper_attention(const AttnConfig& cfg) {
    return std::make_unique<CudaHyperAttention>(cfg);
}
