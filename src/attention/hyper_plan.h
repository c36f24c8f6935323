// The plan of causal HyperAttention (ATTENTION.md §5): everything random or hash-derived that
// decides which (query, key) pairs are evaluated and with which weight. Shared by the CPU
// reference (hyper.cpp), the CUDA version and the `attn` tool (which dumps projections and
// samples), so all of them evaluate the same sparsity pattern.
//
// Conventions fixed here (ATTENTION.md leaves them open):
// - Recursion tree. A node covers positions [start, start + n) of one head. If n <= min_seq it is
//   a leaf: exact causal softmax. Otherwise it splits at split = ceil(n / 2): the first half
//   [start, start + split) and the second half [start + split, start + n) recurse (children
//   2*index and 2*index + 1 on level + 1), and the lower-left quadrant (queries of the second
//   half, n - split of them, keys of the first half, split of them) runs the non-causal core.
//   Ceil, so a quadrant never has more queries than keys.
// - Random state is a pure function of (seed, layer, step, level, node, head):
//     step_seed       = Rng::derive(cfg.seed, layer, step)
//     projections     = Rng(Rng::derive(step_seed, level, 0)).normal() x (lsh_bits * d), row-major
//                       (lsh_bits, d); shared by every head and every node of one level.
//     samples of node = Rng(Rng::derive(Rng::derive(step_seed, level, 1 + node index), b*H + h))
//                       .below(split) x cfg.samples: key offsets into the node's first half,
//                       drawn with replacement, per (batch, head) and per node.
// - Buckets. Bit j of a vector's code is [x . proj_j > 0]; its bucket is gray_inverse(code), so
//   buckets c and c + 1 hold codes gray_code(c), gray_code(c + 1) that differ in one bit.
//   Queries and keys of a quadrant are stable-sorted by bucket (ties keep position order).
// - Blocks. Sorted query block c = sorted queries [c*b, (c+1)*b) attends exactly to sorted key
//   block c = sorted keys [c*b, min((c+1)*b, n_keys)): a short last key block simply has fewer
//   keys (padding is masked out, never a zero logit).
// - Samples. Each draw is its own term with log-weight ln(n_keys / m) (so a key drawn twice
//   counts twice: the unbiased estimator of the off-block mass). A draw whose key lies in the
//   sorted key block of the query's own block is dropped for that query (it is counted exactly
//   by the block part already).
// - The output of every row is then softmax over the multiset of its terms (logit
//   scale*q.k + log-weight), which is what merging the pieces by their LSEs computes.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "attention/softmax_ref.h"
#include "check.h"
#include "rng.h"

// ---- Gray order
inline uint32_t gray_code(uint32_t i) { return i ^ (i >> 1); }
inline uint32_t gray_inverse(uint32_t g) {
    for (uint32_t shift = 1; shift < 32; shift <<= 1) g ^= g >> shift;
    return g;
}

// ---- The recursion tree and the random state of one call
struct HyperNode {
    int level = 0, index = 0;  // depth (root 0) and position within the level (children 2i, 2i+1)
    int start = 0, n = 0;      // positions [start, start + n) of the head
    int split = 0;             // 0 for a leaf; else first half = [start, start + split)
    bool leaf() const { return split == 0; }
};

struct HyperPlan {
    int B = 1, H = 1, T = 1, d = 1;
    int block = 256, lsh_bits = 7, samples = 256, min_seq = 4096;
    uint64_t step_seed = 0;
    std::vector<HyperNode> nodes;               // pre-order: a node precedes its children
    std::vector<std::vector<float>> projections;  // per level with an internal node: (lsh_bits, d)
};

inline void hyper_check_config(const AttnConfig& cfg) {
    CHECK(cfg.block >= 1, "hyper: block=%d must be >= 1 (AttnConfig::block)", cfg.block);
    CHECK(cfg.min_seq >= 1, "hyper: min_seq=%d must be >= 1 (AttnConfig::min_seq)", cfg.min_seq);
    CHECK(cfg.lsh_bits >= 0 && cfg.lsh_bits <= 30, "hyper: lsh_bits=%d must be in [0, 30] (AttnConfig::lsh_bits)",
          cfg.lsh_bits);
    CHECK(cfg.samples >= 0, "hyper: samples=%d must be >= 0 (AttnConfig::samples)", cfg.samples);
}

inline void hyper_add_nodes(HyperPlan& plan, int level, int index, int start, int n) {
    HyperNode node;
    node.level = level, node.index = index, node.start = start, node.n = n;
    node.split = n <= plan.min_seq ? 0 : (n + 1) / 2;
    plan.nodes.push_back(node);
    if (node.leaf()) return;
    hyper_add_nodes(plan, level + 1, 2 * index, start, node.split);
    hyper_add_nodes(plan, level + 1, 2 * index + 1, start + node.split, n - node.split);
}

inline HyperPlan make_hyper_plan(const AttnConfig& cfg, const AttnContext& ctx, const AttnShape& s) {
    hyper_check_config(cfg);
    HyperPlan plan;
    plan.B = s.B, plan.H = s.H, plan.T = s.T, plan.d = s.d;
    plan.block = cfg.block, plan.lsh_bits = cfg.lsh_bits, plan.samples = cfg.samples, plan.min_seq = cfg.min_seq;
    plan.step_seed = Rng::derive(cfg.seed, (uint64_t)ctx.layer, (uint64_t)ctx.step);
    hyper_add_nodes(plan, 0, 0, 0, s.T);
    int levels = 0;
    for (const HyperNode& node : plan.nodes)
        if (!node.leaf()) levels = std::max(levels, node.level + 1);
    for (int level = 0; level < levels; level++) {
        Rng rng(Rng::derive(plan.step_seed, (uint64_t)level, 0));
        std::vector<float> proj((size_t)plan.lsh_bits * plan.d);  // (lsh_bits, d)
        for (float& x : proj) x = rng.normal();
        plan.projections.push_back(proj);
    }
    return plan;
}

// Sampled key offsets (into [0, node.split)) of an internal node for head bh = b*H + h; size
// plan.samples, in draw order.
inline std::vector<int> hyper_samples(const HyperPlan& plan, const HyperNode& node, int bh) {
    Rng rng(Rng::derive(Rng::derive(plan.step_seed, (uint64_t)node.level, 1 + (uint64_t)node.index), (uint64_t)bh));
    std::vector<int> draws(plan.samples);
    for (int& j : draws) j = (int)rng.below((uint64_t)node.split);
    return draws;
}

// Bucket of each of the n rows of x (row stride `stride`) under projections (lsh_bits, d).
template <typename T>
std::vector<uint32_t> hyper_buckets(const float* proj, int lsh_bits, const T* x, int n, int d, int64_t stride) {
    std::vector<uint32_t> buckets(n);
    for (int i = 0; i < n; i++) {
        uint32_t code = 0;
        for (int p = 0; p < lsh_bits; p++) {
            T dot = 0;
            for (int c = 0; c < d; c++) dot += x[i * stride + c] * (T)proj[(size_t)p * d + c];
            if (dot > 0) code |= 1u << p;
        }
        buckets[i] = gray_inverse(code);
    }
    return buckets;
}

// Stable sort by bucket: order[r] = the row at sorted position r.
inline std::vector<int> hyper_sorted_order(const std::vector<uint32_t>& buckets) {
    std::vector<int> order(buckets.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = (int)i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return buckets[a] < buckets[b]; });
    return order;
}

// ---- The pieces of one head: every term of the forward lies in exactly one piece (a key drawn
// twice as a sample lies in two). A piece = query rows x key columns (positions in the head),
// one log-weight, and, for the base-case blocks, the causal mask (column > row dropped).
struct HyperPiece {
    int rows_at = 0, num_rows = 0;  // rows = idx[rows_at .. rows_at + num_rows)
    int cols_at = 0, num_cols = 0;  // cols = idx[cols_at .. cols_at + num_cols)
    double log_weight = 0;
    bool causal = false;
};
struct HyperLayout {
    std::vector<int> idx;  // index lists the pieces point into
    std::vector<HyperPiece> pieces;
};

// The pieces of head bh, whose q and k rows are q[t * stride], k[t * stride] (t < plan.T).
template <typename T>
HyperLayout build_hyper_layout(const HyperPlan& plan, int bh, const T* q, const T* k, int64_t stride) {
    HyperLayout layout;
    auto add_list = [&](const int* list, int count) {
        int at = (int)layout.idx.size();
        layout.idx.insert(layout.idx.end(), list, list + count);
        return at;
    };
    for (const HyperNode& node : plan.nodes) {
        if (node.leaf()) {
            std::vector<int> range(node.n);
            for (int t = 0; t < node.n; t++) range[t] = node.start + t;
            HyperPiece piece;
            piece.rows_at = piece.cols_at = add_list(range.data(), node.n);
            piece.num_rows = piece.num_cols = node.n;
            piece.causal = true;
            layout.pieces.push_back(piece);
            continue;
        }
        // Quadrant: queries [q0, q0 + nq) against keys [node.start, node.start + nk).
        const int nk = node.split, nq = node.n - node.split, q0 = node.start + node.split;
        const float* proj = plan.projections[node.level].data();
        std::vector<int> q_order = hyper_sorted_order(hyper_buckets(proj, plan.lsh_bits, q + q0 * stride, nq, plan.d, stride));
        std::vector<int> k_order = hyper_sorted_order(hyper_buckets(proj, plan.lsh_bits, k + node.start * stride, nk, plan.d, stride));
        std::vector<int> key_block(nk);  // key offset -> its sorted block
        for (int r = 0; r < nk; r++) key_block[k_order[r]] = r / plan.block;
        for (int& j : q_order) j += q0;
        for (int& j : k_order) j += node.start;
        std::vector<int> draws = plan.samples > 0 ? hyper_samples(plan, node, bh) : std::vector<int>();
        const double sample_log_weight = plan.samples > 0 ? std::log((double)nk / plan.samples) : 0.0;
        for (int c = 0; c * plan.block < nq; c++) {
            HyperPiece block_piece;
            block_piece.num_rows = std::min(plan.block, nq - c * plan.block);
            block_piece.rows_at = add_list(q_order.data() + c * plan.block, block_piece.num_rows);
            block_piece.num_cols = std::max(0, std::min(plan.block, nk - c * plan.block));
            block_piece.cols_at = add_list(k_order.data() + std::min(c * plan.block, nk), block_piece.num_cols);
            if (block_piece.num_cols > 0) layout.pieces.push_back(block_piece);
            std::vector<int> sampled;  // draws outside key block c
            for (int j : draws)
                if (key_block[j] != c) sampled.push_back(node.start + j);
            if (sampled.empty()) continue;
            HyperPiece sample_piece;
            sample_piece.rows_at = block_piece.rows_at, sample_piece.num_rows = block_piece.num_rows;
            sample_piece.cols_at = add_list(sampled.data(), (int)sampled.size());
            sample_piece.num_cols = (int)sampled.size();
            sample_piece.log_weight = sample_log_weight;
            layout.pieces.push_back(sample_piece);
        }
    }
    return layout;
}

// ---- The CPU reference kernels (hyper.cpp; instantiated for float and double; computed in
// double whatever T). HeadView (softmax_ref.h): element (b, h, t, i) at p + b*sb + h*sh + t*st + i.

// o (B,H,T,d) and lse (B,H,T) <- q, k, v (B,H,T,d). lse = ln of each row's softmax normaliser.
template <typename T>
void hyper_forward(const HyperPlan& plan, HeadView<T> o, T* lse, HeadView<const T> q, HeadView<const T> k,
                   HeadView<const T> v);
// dq, dk, dv (B,H,T,d) overwritten with the exact gradient of hyper_forward, from dout, the
// inputs, and the forward's o and lse.
template <typename T>
void hyper_backward(const HyperPlan& plan, HeadView<T> dq, HeadView<T> dk, HeadView<T> dv,
                    HeadView<const T> dout, HeadView<const T> q, HeadView<const T> k, HeadView<const T> v,
                    HeadView<const T> o, const T* lse);
