// Tests of the CPU `local` variant (src/attention/local.cpp over softmax_ref.h with a window):
// query i sees exactly keys i−W+1 .. i. Checked against a dense masked softmax written here for
// several W (T = 37, not a multiple of anything), W ≥ T equal to `softmax`, W = 1 giving o = v,
// fp64 finite-difference gradients of the windowed reference, large inputs, and W < 1 refused.
// q, k, v are views into a fused (B, T, 3, H, d) buffer as in the model. Inputs are fresh random
// numbers each run; the seed is printed on failure.
#define GTEST_DONT_DEFINE_FAIL 1  // check.h defines FAIL
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention.h"
#include "attention/softmax_ref.h"
#include "attn_test_util.h"
#include "check.h"
#include "rng.h"

namespace {

template <typename T>
HeadView<T> view(const HeadTensor& x) { return {static_cast<T*>(x.ptr), x.sb, x.sh, x.st}; }

FusedQkvProblem<float> random_problem(Rng& rng, int B, int H, int T, int d, float scale = 1.f) {
    FusedQkvProblem<float> p(B, H, T, d);
    for (float& x : p.qkv) x = scale * rng.normal();
    for (float& x : p.dout) x = rng.normal();
    return p;
}

// The fp32 module `name` (through the registry) on p.
ModuleOutputs run(FusedQkvProblem<float>& p, const std::string& name, int window) {
    AttnConfig cfg;
    cfg.name = name, cfg.window = window;
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    EXPECT_EQ(attn->name(), name);
    return run_module(*attn, AttnContext{}, p);
}

TEST(LocalAttention, MatchesDenseMaskedSoftmax) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int B = 2, H = 2, T = 37, d = 8;
    FusedQkvProblem<float> p = random_problem(rng, B, H, T, d);
    for (int W : {1, 2, 5, 16, 36}) {
        const ModuleOutputs r = run(p, "local", W);
        std::vector<double> want(r.o.size());
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < T; i++) {
                    std::vector<double> w(T, 0.0);  // dense row, masked to exactly W keys
                    double mx = -INFINITY, sum = 0;
                    int seen = 0;
                    for (int j = 0; j < T; j++) {
                        if (j > i || i - j >= W) continue;
                        double s = 0;
                        for (int c = 0; c < d; c++) s += (double)p.at(p.qkv, 0, b, h, i, c) * p.at(p.qkv, 1, b, h, j, c);
                        w[j] = s / std::sqrt(d), mx = std::max(mx, w[j]), seen++;
                    }
                    EXPECT_EQ(seen, std::min(W, i + 1));
                    for (int j = 0; j < T; j++) w[j] = (j > i || i - j >= W) ? 0.0 : std::exp(w[j] - mx), sum += w[j];
                    for (int c = 0; c < d; c++) {
                        double acc = 0;
                        for (int j = 0; j < T; j++) acc += w[j] / sum * p.at(p.qkv, 2, b, h, j, c);
                        want[(((size_t)b * T + i) * H + h) * d + c] = acc;
                    }
                }
        EXPECT_LT(max_abs_diff(r.o, want), 1e-5) << "W = " << W;
    }
}

TEST(LocalAttention, WindowAtLeastTEqualsSoftmax) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    FusedQkvProblem<float> p = random_problem(rng, 2, 3, 37, 16);
    const ModuleOutputs full = run(p, "softmax", 4096);
    for (int W : {37, 42, 4096}) {
        const ModuleOutputs r = run(p, "local", W);
        EXPECT_LT(max_abs_diff(r.o, full.o), 1e-6) << "W = " << W;
        EXPECT_LT(max_abs_diff(r.dqkv, full.dqkv), 1e-6) << "W = " << W;
    }
    const ModuleOutputs narrower = run(p, "local", 36);  // one key fewer for the last query: differs
    EXPECT_GT(max_abs_diff(narrower.o, full.o), 1e-6);
}

TEST(LocalAttention, WindowOneGivesValues) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    FusedQkvProblem<float> p = random_problem(rng, 1, 2, 37, 8);
    ModuleOutputs r = run(p, "local", 1);
    for (int t = 0; t < 37; t++)
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 8; i++) {
                const size_t oi = ((size_t)t * 2 + h) * 8 + i;
                EXPECT_NEAR(r.o[oi], p.at(p.qkv, 2, 0, h, t, i), 1e-6);
                EXPECT_NEAR(p.at(r.dqkv, 2, 0, h, t, i), p.dout[oi], 1e-6);  // dv = dout
                EXPECT_NEAR(p.at(r.dqkv, 0, 0, h, t, i), 0.f, 1e-6);          // one key: no dq, dk
                EXPECT_NEAR(p.at(r.dqkv, 1, 0, h, t, i), 0.f, 1e-6);
            }
}

TEST(LocalAttention, GradientsMatchFiniteDifferences) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int W = 5;
    FusedQkvProblem<float> pf = random_problem(rng, 2, 2, 37, 8, 2.f);
    FusedQkvProblem<double> p = converted<double>(pf);
    auto forward = [&](std::vector<double>& o, std::vector<double>& lse) {
        o.assign(p.s.rows() * p.s.d, 0.0), lse.assign(p.s.rows(), 0.0);
        softmax_attention_forward_ref<double>(p.s, W, view<double>(p.bthd_view(o)), view<const double>(p.qkv_view(p.qkv, 0)),
                                              view<const double>(p.qkv_view(p.qkv, 1)),
                                              view<const double>(p.qkv_view(p.qkv, 2)), lse.data());
    };
    std::vector<double> o, lse, dqkv(p.qkv.size(), 0.0);
    forward(o, lse);
    softmax_attention_backward_ref<double>(
        p.s, W, view<double>(p.qkv_view(dqkv, 0)), view<double>(p.qkv_view(dqkv, 1)), view<double>(p.qkv_view(dqkv, 2)),
        view<const double>(p.bthd_view(p.dout)), view<const double>(p.qkv_view(p.qkv, 0)),
        view<const double>(p.qkv_view(p.qkv, 1)), view<const double>(p.qkv_view(p.qkv, 2)),
        view<const double>(p.bthd_view(o)), lse.data());
    const double worst = worst_finite_difference_error(p.qkv, dqkv, [&] {
        std::vector<double> oo, ll;
        forward(oo, ll);
        return weighted_sum(oo, p.dout);
    });
    const double scale = std::max(1.0, max_abs(dqkv));
    EXPECT_LT(worst / scale, 1e-6) << "max |fd − analytic| " << worst << ", max |grad| " << scale;
}

TEST(LocalAttention, LargeInputsStayFinite) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    FusedQkvProblem<float> p = random_problem(rng, 1, 2, 130, 32, 8.f);
    const ModuleOutputs r = run(p, "local", 16);
    for (float x : r.o) ASSERT_TRUE(std::isfinite(x));
    for (float x : r.dqkv) ASSERT_TRUE(std::isfinite(x));
}

TEST(LocalAttention, WindowBelowOneThrows) {
    AttnConfig cfg;
    cfg.name = "local", cfg.window = 0;
    EXPECT_THROW(make_cpu_attention(cfg), Error);
}

}  // namespace
