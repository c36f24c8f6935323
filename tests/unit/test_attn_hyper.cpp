// Tests of the CPU reference of causal HyperAttention (src/attention/hyper.cpp, hyper_plan.h):
// equality with exact softmax at n <= min_seq, the forward against a dense evaluation of the
// same (i, j, weight) pattern rebuilt here independently, fp64 finite-difference gradients with
// recursion forced, Gray order, determinism in (seed, layer, step), large inputs, T not a
// multiple of the block. Inputs are fresh random numbers each run; the seed is printed on failure.
// gtest's FAIL() would clash with check.h's FAIL.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "attention.h"
#include "attention/hyper_plan.h"
#include "attention/softmax_ref.h"
#include "attn_test_util.h"
#include "check.h"
#include "rng.h"

namespace {

std::vector<double> randn(Rng& rng, size_t n, double scale = 1.0) {
    std::vector<double> x(n);
    for (double& e : x) e = scale * rng.normal();
    return x;
}

AttnConfig small_hyper_config() {  // forces two levels of recursion at T = 37
    AttnConfig cfg;
    cfg.name = "hyper";
    cfg.block = 4, cfg.samples = 5, cfg.lsh_bits = 3, cfg.min_seq = 8;
    return cfg;
}

// Contiguous (B, H, T, d) double tensors and the views over them.
struct Problem {
    AttnShape s;
    std::vector<double> q, k, v;
    HeadView<const double> in(const std::vector<double>& x) const {
        return {x.data(), (int64_t)s.H * s.T * s.d, (int64_t)s.T * s.d, s.d};
    }
    HeadView<double> out(std::vector<double>& x) const {
        return {x.data(), (int64_t)s.H * s.T * s.d, (int64_t)s.T * s.d, s.d};
    }
};
Problem random_problem(Rng& rng, int B, int H, int T, int d, double scale = 1.0) {
    Problem p;
    p.s.B = B, p.s.H = H, p.s.T = T, p.s.d = d;
    p.q = randn(rng, p.s.rows() * d, scale), p.k = randn(rng, p.s.rows() * d, scale), p.v = randn(rng, p.s.rows() * d);
    return p;
}

void run_forward(const HyperPlan& plan, const Problem& p, std::vector<double>& o, std::vector<double>& lse) {
    o.assign(p.s.rows() * p.s.d, 0.0), lse.assign(p.s.rows(), 0.0);
    hyper_forward<double>(plan, p.out(o), lse.data(), p.in(p.q), p.in(p.k), p.in(p.v));
}

// ---- The dense pattern of one head, rebuilt from the plan's random state without the layout
// code: weight[i * T + j] = sum over the terms (i, j) of their weight (1, or n_keys/m per draw).
void add_node_pattern(const HyperPlan& plan, int bh, const double* q, const double* k, int level, int index,
                      int start, int n, std::vector<double>& weight) {
    const int T = plan.T, d = plan.d;
    if (n <= plan.min_seq) {
        for (int i = start; i < start + n; i++)
            for (int j = start; j <= i; j++) weight[(size_t)i * T + j] += 1;
        return;
    }
    const int split = (n + 1) / 2, q0 = start + split;
    const float* proj = plan.projections.at(level).data();
    auto bucket = [&](const double* x) {
        uint32_t code = 0;
        for (int p = 0; p < plan.lsh_bits; p++) {
            double dot = 0;
            for (int c = 0; c < d; c++) dot += x[c] * proj[p * d + c];
            code |= (uint32_t)(dot > 0) << p;
        }
        return gray_inverse(code);
    };
    // sorted block of each position = (number of positions of the same set sorting before it) / b
    auto blocks_of = [&](const double* x, int first, int count) {
        std::vector<uint32_t> bk(count);
        for (int t = 0; t < count; t++) bk[t] = bucket(x + (size_t)(first + t) * d);
        std::vector<int> block(count);
        for (int t = 0; t < count; t++) {
            int rank = 0;
            for (int u = 0; u < count; u++) rank += bk[u] < bk[t] || (bk[u] == bk[t] && u < t);
            block[t] = rank / plan.block;
        }
        return block;
    };
    std::vector<int> qblock = blocks_of(q, q0, n - split), kblock = blocks_of(k, start, split);
    HyperNode node;
    node.level = level, node.index = index, node.start = start, node.n = n, node.split = split;
    std::vector<int> draws = hyper_samples(plan, node, bh);
    for (int a = 0; a < n - split; a++) {
        for (int j = 0; j < split; j++)
            if (kblock[j] == qblock[a]) weight[(size_t)(q0 + a) * T + start + j] += 1;
        for (int j : draws)
            if (kblock[j] != qblock[a]) weight[(size_t)(q0 + a) * T + start + j] += (double)split / plan.samples;
    }
    add_node_pattern(plan, bh, q, k, level + 1, 2 * index, start, split, weight);
    add_node_pattern(plan, bh, q, k, level + 1, 2 * index + 1, q0, n - split, weight);
}

TEST(HyperAttention, GrayOrderNeighbouringBucketsDifferInOneBit) {
    for (int bits = 1; bits <= 12; bits++) {
        const uint32_t count = 1u << bits;
        std::vector<bool> seen(count, false);
        for (uint32_t c = 0; c < count; c++) {
            ASSERT_EQ(gray_inverse(gray_code(c)), c);
            ASSERT_LT(gray_code(c), count);
            ASSERT_FALSE(seen[gray_code(c)]) << "gray_code not a bijection on " << bits << " bits";
            seen[gray_code(c)] = true;
            if (c + 1 < count) {
                ASSERT_EQ(__builtin_popcount(gray_code(c) ^ gray_code(c + 1)), 1) << c;
            }
        }
    }
    // A bucket is gray_inverse of the sign code: buckets of v and -v have complementary codes.
    Rng rng(fresh_seed());
    std::vector<float> proj(5 * 6);
    for (float& e : proj) e = rng.normal();
    std::vector<double> x = randn(rng, 6), minus_x(6);
    for (int c = 0; c < 6; c++) minus_x[c] = -x[c];
    EXPECT_EQ(gray_code(hyper_buckets(proj.data(), 5, x.data(), 1, 6, 6)[0]) ^
                  gray_code(hyper_buckets(proj.data(), 5, minus_x.data(), 1, 6, 6)[0]),
              31u);
}

TEST(HyperAttention, ShortSequenceEqualsExactSoftmax) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem p = random_problem(rng, 2, 3, 37, 8, 2.0);
    AttnConfig cfg = small_hyper_config();
    cfg.min_seq = 37;  // n <= n0: a single exact causal leaf
    HyperPlan plan = make_hyper_plan(cfg, AttnContext{}, p.s);
    ASSERT_EQ(plan.nodes.size(), 1u);
    std::vector<double> o, lse;
    run_forward(plan, p, o, lse);
    std::vector<double> o_ref(o.size()), lse_ref(lse.size());
    softmax_attention_forward_ref<double>(p.s, 0, p.out(o_ref), p.in(p.q), p.in(p.k), p.in(p.v), lse_ref.data());
    // Today bitwise equal (same sums in the same order); a tolerance keeps the test independent of
    // how softmax_ref.h orders its sums.
    for (size_t i = 0; i < o.size(); i++) ASSERT_NEAR(o[i], o_ref[i], 1e-12) << "o at " << i;
    for (size_t i = 0; i < lse.size(); i++) ASSERT_NEAR(lse[i], lse_ref[i], 1e-12) << "lse at " << i;

    std::vector<double> dout = randn(rng, o.size());
    std::vector<double> dq(o.size()), dk(o.size()), dv(o.size()), dq_ref(o.size()), dk_ref(o.size()), dv_ref(o.size());
    hyper_backward<double>(plan, p.out(dq), p.out(dk), p.out(dv), p.in(dout), p.in(p.q), p.in(p.k),
                           p.in(p.v), p.in(o), lse.data());
    softmax_attention_backward_ref<double>(p.s, 0, p.out(dq_ref), p.out(dk_ref), p.out(dv_ref), p.in(dout),
                                           p.in(p.q), p.in(p.k), p.in(p.v), p.in(o), lse.data());
    for (size_t i = 0; i < o.size(); i++) {
        ASSERT_NEAR(dq[i], dq_ref[i], 1e-12) << "dq at " << i;
        ASSERT_NEAR(dk[i], dk_ref[i], 1e-12) << "dk at " << i;
        ASSERT_NEAR(dv[i], dv_ref[i], 1e-12) << "dv at " << i;
    }
}

TEST(HyperAttention, ForwardEqualsDenseEvaluationOfItsPattern) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    for (int T : {37, 64}) {  // 37: odd splits, T and halves not multiples of the block
        Problem p = random_problem(rng, 1, 3, T, 8);
        AttnConfig cfg = small_hyper_config();
        AttnContext ctx;
        ctx.layer = 2, ctx.step = 11;
        HyperPlan plan = make_hyper_plan(cfg, ctx, p.s);
        std::vector<double> o, lse;
        run_forward(plan, p, o, lse);
        const int d = p.s.d;
        for (int h = 0; h < p.s.H; h++) {
            const double* qh = p.q.data() + (size_t)h * T * d;
            const double* kh = p.k.data() + (size_t)h * T * d;
            const double* vh = p.v.data() + (size_t)h * T * d;
            std::vector<double> weight((size_t)T * T, 0.0);  // (T, T)
            add_node_pattern(plan, h, qh, kh, 0, 0, 0, T, weight);
            int zeros_below_diagonal = 0, sampled = 0;
            for (int i = 0; i < T; i++) {
                ASSERT_EQ(weight[(size_t)i * T + i], 1.0) << "diagonal term of row " << i;
                double z = 0;
                std::vector<double> out(d, 0.0);
                for (int j = 0; j < T; j++) {
                    const double w = weight[(size_t)i * T + j];
                    if (j > i) {
                        ASSERT_EQ(w, 0.0) << "non-causal term " << i << "," << j;
                    }
                    zeros_below_diagonal += j < i && w == 0;
                    sampled += w != 0 && w != 1;
                    if (w == 0) continue;
                    double s = 0;
                    for (int c = 0; c < d; c++) s += qh[(size_t)i * d + c] * kh[(size_t)j * d + c];
                    const double e = w * std::exp(s / std::sqrt((double)d));
                    z += e;
                    for (int c = 0; c < d; c++) out[c] += e * vh[(size_t)j * d + c];
                }
                for (int c = 0; c < d; c++)
                    ASSERT_NEAR(o[((size_t)h * T + i) * d + c], out[c] / z, 1e-12) << "T " << T << " head " << h << " row " << i;
                ASSERT_NEAR(lse[(size_t)h * T + i], std::log(z), 1e-12);
            }
            EXPECT_GT(zeros_below_diagonal, 0) << "the pattern should be sparse";
            EXPECT_GT(sampled, 0) << "the pattern should hold sampled columns";
        }
    }
}

// d/dx of L = sum(o * G) by central differences, against hyper_backward; coordinates whose
// perturbation changes a bucket (the layout) are skipped and counted.
void check_gradients_by_finite_differences(double input_scale) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed) + ", input scale " + std::to_string(input_scale));
    Rng rng(seed);
    Problem p = random_problem(rng, 1, 2, 37, 8, input_scale);
    AttnContext ctx;
    ctx.layer = 1, ctx.step = 3;
    HyperPlan plan = make_hyper_plan(small_hyper_config(), ctx, p.s);
    ASSERT_GE(plan.nodes.size(), 7u) << "recursion should reach two levels";
    std::vector<double> o, lse;
    run_forward(plan, p, o, lse);
    std::vector<double> grad_out = randn(rng, o.size());  // G
    std::vector<double> dq(o.size()), dk(o.size()), dv(o.size());
    hyper_backward<double>(plan, p.out(dq), p.out(dk), p.out(dv), p.in(grad_out), p.in(p.q), p.in(p.k),
                           p.in(p.v), p.in(o), lse.data());

    const int T = p.s.T, d = p.s.d;
    auto layout_key = [&](const Problem& x, int head) {  // everything hashing decides for a head
        HyperLayout layout = build_hyper_layout(plan, head, x.q.data() + (size_t)head * T * d,
                                                x.k.data() + (size_t)head * T * d, d);
        std::vector<double> key(layout.idx.begin(), layout.idx.end());
        for (const HyperPiece& piece : layout.pieces) key.push_back(piece.log_weight);
        return key;
    };
    std::vector<std::vector<double>> base_layout = {layout_key(p, 0), layout_key(p, 1)};
    auto loss = [&](const Problem& x) {
        std::vector<double> ox, lx;
        run_forward(plan, x, ox, lx);
        double sum = 0;
        for (size_t i = 0; i < ox.size(); i++) sum += ox[i] * grad_out[i];
        return sum;
    };
    const double eps = 1e-6;
    int skipped = 0, checked = 0;
    for (int which = 0; which < 3; which++) {
        std::vector<double>& analytic = which == 0 ? dq : which == 1 ? dk : dv;
        for (size_t e = 0; e < o.size(); e++) {
            Problem plus = p, minus = p;
            std::vector<double>& xp = which == 0 ? plus.q : which == 1 ? plus.k : plus.v;
            std::vector<double>& xm = which == 0 ? minus.q : which == 1 ? minus.k : minus.v;
            xp[e] += eps, xm[e] -= eps;
            const int head = (int)(e / ((size_t)T * d));
            if (which < 2 && (layout_key(plus, head) != base_layout[head] || layout_key(minus, head) != base_layout[head])) {
                skipped++;
                continue;
            }
            const double numeric = (loss(plus) - loss(minus)) / (2 * eps);
            ASSERT_NEAR(analytic[e], numeric, 1e-6 * std::max(1.0, std::fabs(numeric)))
                << "d" << "qkv"[which] << " at " << e;
            checked++;
        }
    }
    EXPECT_LT(skipped, checked / 50) << "too many perturbations changed a bucket";
}

TEST(HyperAttention, GradientsMatchFiniteDifferences) { check_gradients_by_finite_differences(1.0); }
TEST(HyperAttention, GradientsMatchFiniteDifferencesLargeInputs) { check_gradients_by_finite_differences(8.0); }

TEST(HyperAttention, RandomStateIsAPureFunctionOfSeedLayerStep) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem p = random_problem(rng, 2, 2, 50, 8);
    AttnConfig cfg = small_hyper_config();
    cfg.samples = 16;
    AttnContext ctx;
    ctx.layer = 3, ctx.step = 100;
    AttnContext next_step = ctx, other_layer = ctx;
    next_step.step++, other_layer.layer++;
    HyperPlan plan = make_hyper_plan(cfg, ctx, p.s), again = make_hyper_plan(cfg, ctx, p.s);
    HyperPlan plan_next = make_hyper_plan(cfg, next_step, p.s), plan_layer = make_hyper_plan(cfg, other_layer, p.s);
    ASSERT_EQ(plan.projections, again.projections);
    EXPECT_NE(plan.projections, plan_next.projections);
    EXPECT_NE(plan.projections, plan_layer.projections);
    const HyperNode& root = plan.nodes[0];
    ASSERT_FALSE(root.leaf());
    EXPECT_EQ(hyper_samples(plan, root, 1), hyper_samples(again, root, 1));
    EXPECT_NE(hyper_samples(plan, root, 1), hyper_samples(plan_next, root, 1));
    EXPECT_NE(hyper_samples(plan, root, 1), hyper_samples(plan_layer, root, 1));
    EXPECT_NE(hyper_samples(plan, root, 0), hyper_samples(plan, root, 1)) << "samples are per (batch, head)";
    for (int j : hyper_samples(plan, root, 3)) EXPECT_TRUE(j >= 0 && j < root.split);

    std::vector<double> o1, o2, o3, lse;
    run_forward(plan, p, o1, lse);
    run_forward(again, p, o2, lse);
    run_forward(plan_next, p, o3, lse);
    EXPECT_EQ(o1, o2);
    EXPECT_NE(o1, o3);
}

// Through the registry, in float, with the strided views of the fused qkv buffer (B, T, 3, H, d):
// matches the double reference, deterministic, finite for inputs x8, T not a multiple of block.
TEST(HyperAttention, RegistryFloatModuleOnFusedLayoutLargeInputs) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    AttnConfig cfg = small_hyper_config();
    cfg.min_seq = 16, cfg.block = 8, cfg.samples = 7;
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    ASSERT_EQ(attn->name(), "hyper");
    EXPECT_EQ(attn->num_params(16), 0u);
    AttnShape s;
    s.B = 2, s.H = 2, s.T = 45, s.d = 16;
    const int C = s.H * s.d;
    std::vector<float> qkv((size_t)s.B * s.T * 3 * C), grad_out((size_t)s.B * s.T * C);  // (B,T,3,H,d), (B,T,H,d)
    for (float& x : qkv) x = 8.0f * rng.normal();
    for (float& x : grad_out) x = rng.normal();
    auto fused = [&](std::vector<float>& buf, int part) {
        return HeadTensor{buf.data() + (size_t)part * C, DType::F32, (int64_t)s.T * 3 * C, s.d, 3 * C};
    };
    auto bthd = [&](std::vector<float>& buf) { return HeadTensor{buf.data(), DType::F32, (int64_t)s.T * C, s.d, C}; };
    std::vector<float> o(grad_out.size()), o2(grad_out.size()), saved(attn->saved_size(s)), dqkv(qkv.size());
    AttnContext ctx;
    ctx.step = 5;
    attn->forward(s, ctx, bthd(o), fused(qkv, 0), fused(qkv, 1), fused(qkv, 2), saved.data(), Tensor{}, nullptr);
    attn->forward(s, ctx, bthd(o2), fused(qkv, 0), fused(qkv, 1), fused(qkv, 2), saved.data(), Tensor{}, nullptr);
    EXPECT_EQ(o, o2);
    attn->backward(s, ctx, fused(dqkv, 0), fused(dqkv, 1), fused(dqkv, 2), Tensor{}, bthd(grad_out),
                   fused(qkv, 0), fused(qkv, 1), fused(qkv, 2), bthd(o), saved.data(), Tensor{}, nullptr);
    for (float x : o) ASSERT_TRUE(std::isfinite(x));
    for (float x : saved) ASSERT_TRUE(std::isfinite(x));
    for (float x : dqkv) ASSERT_TRUE(std::isfinite(x));

    // The same call in double on contiguous copies.
    Problem p;
    p.s = s;
    p.q.resize(s.rows() * s.d), p.k.resize(p.q.size()), p.v.resize(p.q.size());
    std::vector<double> dout_d(p.q.size());
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++)
                for (int c = 0; c < s.d; c++) {
                    const size_t at = (((size_t)b * s.H + h) * s.T + t) * s.d + c;
                    const size_t fused_at = (((size_t)b * s.T + t) * 3) * C + h * s.d + c;
                    p.q[at] = qkv[fused_at], p.k[at] = qkv[fused_at + C], p.v[at] = qkv[fused_at + 2 * C];
                    dout_d[at] = grad_out[((size_t)b * s.T + t) * C + h * s.d + c];
                }
    HyperPlan plan = make_hyper_plan(cfg, ctx, s);
    std::vector<double> o_d, lse_d;
    run_forward(plan, p, o_d, lse_d);
    std::vector<double> dq(o_d.size()), dk(o_d.size()), dv(o_d.size());
    hyper_backward<double>(plan, p.out(dq), p.out(dk), p.out(dv), p.in(dout_d), p.in(p.q), p.in(p.k),
                           p.in(p.v), p.in(o_d), lse_d.data());
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++) {
                const size_t r = ((size_t)b * s.H + h) * s.T + t;
                ASSERT_NEAR(saved[r], lse_d[r], 1e-4 * std::max(1.0, std::fabs(lse_d[r])));
                for (int c = 0; c < s.d; c++) {
                    const size_t at = r * s.d + c;
                    const size_t fused_at = (((size_t)b * s.T + t) * 3) * C + h * s.d + c;
                    ASSERT_NEAR(o[((size_t)b * s.T + t) * C + h * s.d + c], o_d[at], 1e-5);
                    // float inputs are exact in double; the float module differs only by rounding
                    // its outputs and the saved LSE (whose rounding P = exp(S - LSE) feels ~1e-6).
                    ASSERT_NEAR(dqkv[fused_at], dq[at], 1e-3 * std::max(1.0, std::fabs(dq[at])));
                    ASSERT_NEAR(dqkv[fused_at + C], dk[at], 1e-3 * std::max(1.0, std::fabs(dk[at])));
                    ASSERT_NEAR(dqkv[fused_at + 2 * C], dv[at], 1e-4 * std::max(1.0, std::fabs(dv[at])));
                }
            }
}

TEST(HyperAttention, RejectsBadOptions) {
    AttnConfig cfg = small_hyper_config();
    cfg.block = 0;
    EXPECT_THROW(make_cpu_attention(cfg), Error);
    cfg = small_hyper_config();
    cfg.lsh_bits = 31;
    EXPECT_THROW(make_cpu_attention(cfg), Error);
    cfg = small_hyper_config();
    cfg.min_seq = 0;
    EXPECT_THROW(make_cpu_attention(cfg), Error);
}

}  // namespace
