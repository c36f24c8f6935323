// Tests of the CPU reference of `performer` (src/attention/performer.cpp, performer_features.h):
// Ω (orthogonal blocks, determinism in (seed, layer, step), redraw only at multiples of --redraw),
// the chunked causal scan against a naive O(T²) evaluation of the documented formulas, strict
// causality, fp64 finite-difference gradients (ε = 0, where the stabilisers cancel exactly, and
// the default ε), the error against exact softmax falling as m grows, the fp32 class against the
// fp64 templates, and large inputs. q, k, v are views into a fused (B, T, 3, H, d) buffer as in
// the model, T is not a multiple of the chunk. Inputs are fresh random numbers each run; the seed
// is printed on failure.
#define GTEST_DONT_DEFINE_FAIL 1  // check.h defines FAIL
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"
#include "attention/performer_features.h"
#include "attn_test_util.h"
#include "check.h"
#include "rng.h"

namespace {

FusedQkvProblem<double> random_problem(Rng& rng, int B, int H, int T, int d, double qk_scale) {
    FusedQkvProblem<double> p(B, H, T, d);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < d; i++) {
                    p.at(p.qkv, 0, b, h, t, i) = qk_scale * rng.normal();
                    p.at(p.qkv, 1, b, h, t, i) = qk_scale * rng.normal();
                    p.at(p.qkv, 2, b, h, t, i) = rng.normal();
                }
    for (double& x : p.dout) x = rng.normal();
    return p;
}

std::vector<double> forward(FusedQkvProblem<double>& p, const std::vector<float>& omega, int m, double eps,
                            std::vector<double>* saved_out = nullptr) {
    std::vector<double> o(p.s.rows() * p.s.d), saved(performer_saved_size(p.s));
    performer_forward<double>(p.s, omega.data(), m, eps, p.bthd_view(o), p.qkv_view(p.qkv, 0),
                              p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2), saved.data());
    if (saved_out) *saved_out = saved;
    return o;
}

// Naive O(T²) evaluation of the formulas in performer_features.h, with the stabilisers recomputed
// here: cq_i = max_f a_f(q_i), ck_j = max over keys j' ≤ j and features.
std::vector<double> naive(FusedQkvProblem<double>& p, const std::vector<float>& omega, int m, double eps,
                          std::vector<double>& cq_all, std::vector<double>& ck_all) {
    const int n = p.s.T, d = p.s.d;
    std::vector<double> o(p.s.rows() * d);
    cq_all.assign(p.s.rows(), 0), ck_all.assign(p.s.rows(), 0);
    auto logits = [&](int which, int b, int h, int t) {
        std::vector<double> xt(d), a(m);
        double half = 0;
        for (int i = 0; i < d; i++) xt[i] = std::pow(d, -0.25) * p.at(p.qkv, which, b, h, t, i), half += 0.5 * xt[i] * xt[i];
        for (int f = 0; f < m; f++) {
            a[f] = -half;
            for (int i = 0; i < d; i++) a[f] += omega[(size_t)f * d + i] * xt[i];
        }
        return a;
    };
    for (int b = 0; b < p.s.B; b++)
        for (int h = 0; h < p.s.H; h++) {
            std::vector<std::vector<double>> phq(n), phk(n);
            std::vector<double> ck(n);
            double running = -INFINITY;
            for (int t = 0; t < n; t++) {
                std::vector<double> aq = logits(0, b, h, t), ak = logits(1, b, h, t);
                const double cq = *std::max_element(aq.begin(), aq.end());
                running = std::max(running, *std::max_element(ak.begin(), ak.end()));
                ck[t] = running;
                phq[t].resize(m), phk[t].resize(m);
                for (int f = 0; f < m; f++) {
                    phq[t][f] = (std::exp(aq[f] - cq) + eps) / std::sqrt(m);
                    phk[t][f] = (std::exp(ak[f] - ck[t]) + eps) / std::sqrt(m);
                }
                cq_all[((size_t)b * p.s.H + h) * n + t] = cq;
                ck_all[((size_t)b * p.s.H + h) * n + t] = ck[t];
            }
            for (int i = 0; i < n; i++) {
                std::vector<double> out(d + 1, 0.0);
                for (int j = 0; j <= i; j++) {
                    double w = 0;
                    for (int f = 0; f < m; f++) w += phq[i][f] * phk[j][f];
                    w *= std::exp(ck[j] - ck[i]);
                    for (int c = 0; c < d; c++) out[c] += w * p.at(p.qkv, 2, b, h, j, c);
                    out[d] += w;
                }
                for (int c = 0; c < d; c++) o[(((size_t)b * n + i) * p.s.H + h) * d + c] = out[c] / out[d];
            }
        }
    return o;
}

AttnConfig performer_config(int m, uint64_t seed = 1337, int redraw = 1000) {
    AttnConfig cfg;
    cfg.name = "performer", cfg.features = m, cfg.seed = seed, cfg.redraw = redraw;
    return cfg;
}

// Analytic gradient (fused layout) vs central differences of L = Σ o∘dout on every `stride`-th
// input element. Tolerance relative to the largest gradient.
void check_gradients(FusedQkvProblem<double>& p, const std::vector<float>& omega, int m, double eps, double tol,
                     size_t stride = 1) {
    std::vector<double> saved;
    std::vector<double> o = forward(p, omega, m, eps, &saved);
    std::vector<double> dqkv(p.qkv.size(), 0.0);
    performer_backward<double>(p.s, omega.data(), m, eps, p.qkv_view(dqkv, 0), p.qkv_view(dqkv, 1),
                               p.qkv_view(dqkv, 2), p.bthd_view(p.dout), p.qkv_view(p.qkv, 0),
                               p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2), p.bthd_view(o), saved.data());
    const double scale = std::max(1.0, max_abs(dqkv));
    const double worst = worst_finite_difference_error(
        p.qkv, dqkv, [&] { return weighted_sum(forward(p, omega, m, eps), p.dout); }, stride);
    EXPECT_LT(worst / scale, tol) << "max |fd − analytic| " << worst << ", max |grad| " << scale;
}

TEST(PerformerAttention, FeaturesHaveOrthogonalBlocksAndAreDeterministic) {
    const int d = 8, m = 20;  // two full blocks and a partial one
    const AttnConfig cfg = performer_config(m, fresh_seed());
    SCOPED_TRACE("seed " + std::to_string(cfg.seed));
    const std::vector<float> omega = performer_features(cfg, 3, 42, d);
    ASSERT_EQ(omega.size(), (size_t)m * d);
    for (int r = 0; r < m; r++) {
        const float* a = &omega[(size_t)r * d];
        double na = 0;
        for (int i = 0; i < d; i++) na += (double)a[i] * a[i];
        EXPECT_GT(na, 1e-3) << "row " << r;
        EXPECT_LT(na, 10.0 * d) << "row " << r;  // norm of a Gaussian d-vector: ~sqrt(d)
        for (int s = (r / d) * d; s < r; s++) {  // earlier rows of the same block
            const float* b = &omega[(size_t)s * d];
            double ab = 0, nb = 0;
            for (int i = 0; i < d; i++) ab += (double)a[i] * b[i], nb += (double)b[i] * b[i];
            EXPECT_LT(std::abs(ab) / std::sqrt(na * nb), 1e-5) << "rows " << s << ", " << r;
        }
    }
    // rows of different blocks are independent: not all orthogonal
    double cross = 0;
    for (int i = 0; i < d; i++) cross += std::abs((double)omega[i] * omega[(size_t)d * d + i]);
    EXPECT_GT(cross, 0.0);
    EXPECT_EQ(omega, performer_features(cfg, 3, 42, d));
    EXPECT_NE(omega, performer_features(cfg, 4, 42, d));
    EXPECT_NE(omega, performer_features(performer_config(m, cfg.seed + 1), 3, 42, d));
}

TEST(PerformerAttention, RedrawOnlyAtMultiplesOfRedraw) {
    const int d = 8;
    const AttnConfig cfg = performer_config(16, fresh_seed(), 10);
    SCOPED_TRACE("seed " + std::to_string(cfg.seed));
    const std::vector<float> first = performer_features(cfg, 0, 0, d);
    for (int step = 1; step < 10; step++) EXPECT_EQ(first, performer_features(cfg, 0, step, d)) << step;
    const std::vector<float> second = performer_features(cfg, 0, 10, d);
    EXPECT_NE(first, second);
    for (int step = 11; step < 20; step++) EXPECT_EQ(second, performer_features(cfg, 0, step, d)) << step;
    EXPECT_NE(second, performer_features(cfg, 0, 20, d));
    const AttnConfig never = performer_config(16, cfg.seed, 0);
    EXPECT_EQ(performer_features(never, 0, 0, d), performer_features(never, 0, 123457, d));
}

TEST(PerformerAttention, ChunkedScanEqualsNaiveFormulas) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int m = 24, d = 8;
    FusedQkvProblem<double> p = random_problem(rng, 2, 2, 150, d, 1.0);  // 3 chunks, the last partial
    // growing key magnitudes make the running max move within and across chunks
    for (int b = 0; b < 2; b++)
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 150; t++)
                for (int i = 0; i < d; i++) p.at(p.qkv, 1, b, h, t, i) *= 0.3 + 2.0 * t / 150;
    const std::vector<float> omega = performer_features(performer_config(m, seed), 0, 0, d);
    for (double eps : {0.0, kPerformerEpsilon}) {
        std::vector<double> saved, cq, ck;
        const std::vector<double> o = forward(p, omega, m, eps, &saved);
        const std::vector<double> want = naive(p, omega, m, eps, cq, ck);
        EXPECT_LT(max_abs_diff(o, want), 1e-12 * std::max(1.0, max_abs(want))) << "eps " << eps;
        const size_t rows = p.s.rows();
        EXPECT_LT(max_abs_diff(std::vector<double>(saved.begin() + rows, saved.begin() + 2 * rows), cq), 1e-12);
        EXPECT_LT(max_abs_diff(std::vector<double>(saved.begin() + 2 * rows, saved.end()), ck), 1e-12);
    }
}

TEST(PerformerAttention, StrictlyCausalEvenThroughEpsilon) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int m = 16, d = 8, T = 100, t0 = 70;  // t0 inside the second chunk
    FusedQkvProblem<double> p = random_problem(rng, 1, 2, T, d, 1.0);
    const std::vector<float> omega = performer_features(performer_config(m, seed), 0, 0, d);
    const std::vector<double> before = forward(p, omega, m, kPerformerEpsilon);
    for (int h = 0; h < 2; h++)  // a huge later key (would move a chunk-wide max) and new values
        for (int i = 0; i < d; i++) {
            p.at(p.qkv, 1, 0, h, t0, i) *= 30;
            for (int t = t0; t < T; t++) p.at(p.qkv, 2, 0, h, t, i) = rng.normal();
        }
    const std::vector<double> after = forward(p, omega, m, kPerformerEpsilon);
    const size_t prefix = (size_t)t0 * 2 * d;  // rows t < t0 of (1, T, 2, d)
    EXPECT_EQ(std::vector<double>(before.begin(), before.begin() + prefix),
              std::vector<double>(after.begin(), after.begin() + prefix));
    EXPECT_NE(before, after);
}

TEST(PerformerAttention, GradientsMatchFiniteDifferences) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int m = 16, d = 8;
    const std::vector<float> omega = performer_features(performer_config(m, seed), 2, 7, d);
    FusedQkvProblem<double> p = random_problem(rng, 2, 2, 37, d, 1.0);
    // ε = 0: the stabilisers cancel exactly, so the forward is smooth and FD is exact
    check_gradients(p, omega, m, 0.0, 1e-6);
    // default ε: the stabilisers (held constant by design) move with the inputs by O(ε) only
    check_gradients(p, omega, m, kPerformerEpsilon, 1e-3, 5);
    // several chunks with a moving running max (every 7th element to keep it fast)
    FusedQkvProblem<double> longer = random_problem(rng, 1, 1, 150, d, 1.0);
    for (int t = 0; t < 150; t++)
        for (int i = 0; i < d; i++) longer.at(longer.qkv, 1, 0, 0, t, i) *= 0.3 + 2.0 * t / 150;
    check_gradients(longer, omega, m, 0.0, 1e-6, 7);
}

TEST(PerformerAttention, ErrorVsSoftmaxFallsAsFeaturesGrow) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int d = 16, T = 64;
    // |q|, |k| moderate: larger logits give the estimator heavy tails and slow, noisy convergence
    FusedQkvProblem<double> p = random_problem(rng, 1, 2, T, d, 0.4);
    // exact causal softmax, scale 1/sqrt(d)
    std::vector<double> exact(p.s.rows() * d);
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < T; i++) {
            std::vector<double> w(i + 1);
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= i; j++) {
                double s = 0;
                for (int c = 0; c < d; c++) s += p.at(p.qkv, 0, 0, h, i, c) * p.at(p.qkv, 1, 0, h, j, c);
                w[j] = s / std::sqrt(d), mx = std::max(mx, w[j]);
            }
            for (int j = 0; j <= i; j++) w[j] = std::exp(w[j] - mx), sum += w[j];
            for (int c = 0; c < d; c++) {
                double acc = 0;
                for (int j = 0; j <= i; j++) acc += w[j] * p.at(p.qkv, 2, 0, h, j, c);
                exact[((size_t)i * 2 + h) * d + c] = acc / sum;
            }
        }
    std::vector<double> err;
    for (int m : {16, 256, 1024}) {
        double total = 0;
        for (uint64_t draw = 0; draw < 8; draw++) {
            const std::vector<float> omega = performer_features(performer_config(m, seed + draw), 0, 0, d);
            const std::vector<double> o = forward(p, omega, m, kPerformerEpsilon);
            double se = 0;
            for (size_t i = 0; i < o.size(); i++) se += (o[i] - exact[i]) * (o[i] - exact[i]);
            total += std::sqrt(se / o.size());
        }
        err.push_back(total / 8);
    }
    // rms error ∝ 1/sqrt(m) would give 4× and 2×; ask for less (the estimator is noisy)
    EXPECT_GT(err[0], 1.5 * err[1]) << "m=16 " << err[0] << ", m=256 " << err[1];
    EXPECT_GT(err[1], 1.2 * err[2]) << "m=256 " << err[1] << ", m=1024 " << err[2];
    EXPECT_LT(err[2], 0.03);  // rms error of o (|v| ~ 1) with 1024 features
}

// The fp32 Attention class (through the registry) against the fp64 templates with the same Ω.
void run_class(FusedQkvProblem<double>& p, const AttnConfig& cfg, const AttnContext& ctx, std::vector<float>& o,
               std::vector<float>& dqkv) {
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    EXPECT_EQ(attn->name(), "performer");
    FusedQkvProblem<float> pf = converted<float>(p);
    ModuleOutputs out = run_module(*attn, ctx, pf);
    o = std::move(out.o), dqkv = std::move(out.dqkv);
}

TEST(PerformerAttention, FloatClassMatchesDoubleReference) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int m = 64, d = 16;
    FusedQkvProblem<double> p = random_problem(rng, 2, 3, 101, d, 1.0);
    const AttnConfig cfg = performer_config(m, seed, 5);
    const AttnContext ctx{2, 17};
    std::vector<float> o, dqkv;
    run_class(p, cfg, ctx, o, dqkv);

    const std::vector<float> omega = performer_features(cfg, ctx.layer, ctx.step, d);
    std::vector<double> saved;
    std::vector<double> want_o = forward(p, omega, m, kPerformerEpsilon, &saved);
    std::vector<double> want_d(p.qkv.size());
    performer_backward<double>(p.s, omega.data(), m, kPerformerEpsilon, p.qkv_view(want_d, 0),
                               p.qkv_view(want_d, 1), p.qkv_view(want_d, 2), p.bthd_view(p.dout),
                               p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2),
                               p.bthd_view(want_o), saved.data());
    EXPECT_LT(max_abs_diff(std::vector<double>(o.begin(), o.end()), want_o), 1e-4 * std::max(1.0, max_abs(want_o)));
    EXPECT_LT(max_abs_diff(std::vector<double>(dqkv.begin(), dqkv.end()), want_d), 1e-3 * std::max(1.0, max_abs(want_d)));
}

TEST(PerformerAttention, LargeInputsStayFinite) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    FusedQkvProblem<double> p = random_problem(rng, 1, 2, 130, 16, 8.0);
    for (int h = 0; h < 2; h++)  // q, k are ×8 already; v too
        for (int t = 0; t < 130; t++)
            for (int i = 0; i < 16; i++) p.at(p.qkv, 2, 0, h, t, i) *= 8;
    std::vector<float> o, dqkv;
    run_class(p, performer_config(256, seed), AttnContext{}, o, dqkv);
    for (float x : o) ASSERT_TRUE(std::isfinite(x));
    for (float x : dqkv) ASSERT_TRUE(std::isfinite(x));
}

TEST(PerformerAttention, BadOptionsThrow) {
    AttnConfig cfg = performer_config(0);
    EXPECT_THROW(make_cpu_attention(cfg), Error);
    cfg = performer_config(16, 1, -1);
    EXPECT_THROW(make_cpu_attention(cfg), Error);
}

}  // namespace
