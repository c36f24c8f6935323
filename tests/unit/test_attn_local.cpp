// Tests of the CPU `local` variant (src/attention/local.cpp over softmax_ref.h with a window):
// query i sees exactly keys i−W+1 .. i. Checked against a dense masked softmax written here for
// several W (T = 37, not a multiple of anything), W ≥ T equal to `softmax`, W = 1 giving o = v,
// fp64 finite-difference gradients of the windowed reference, large inputs, and W < 1 refused.
// q, k, v are views into a fused (B, T, 3, H, d) buffer as in the model. Inputs are fresh random
// numbers each run; the seed is printed on failure.
#define GTEST_DONT_DEFINE_FAIL 1  // check.h defines FAIL
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "attention/softmax_ref.h"
#include "check.h"
#include "rng.h"

namespace {

uint64_t fresh_seed() { return ((uint64_t)std::random_device{}() << 32) ^ std::random_device{}(); }

// q, k, v in one fused (B, T, 3, H, d) buffer; o and dout (B, T, H, d).
template <typename T>
struct Problem {
    AttnShape s;
    std::vector<T> qkv, dout;
    HeadTensor qkv_view(std::vector<T>& buf, int which) const {  // which: 0 = q, 1 = k, 2 = v
        const int64_t st = 3LL * s.H * s.d;
        return HeadTensor{buf.data() + (int64_t)which * s.H * s.d, DType::F32, s.T * st, s.d, st};
    }
    HeadTensor bthd_view(std::vector<T>& buf) const {
        const int64_t st = (int64_t)s.H * s.d;
        return HeadTensor{buf.data(), DType::F32, s.T * st, s.d, st};
    }
    T& at(std::vector<T>& buf, int which, int b, int h, int t, int i) const {
        return buf[(((size_t)b * s.T + t) * 3 + which) * s.H * s.d + (size_t)h * s.d + i];
    }
};

template <typename T>
HeadView<T> view(const HeadTensor& x) { return {static_cast<T*>(x.ptr), x.sb, x.sh, x.st}; }

Problem<float> random_problem(Rng& rng, int B, int H, int T, int d, float scale = 1.f) {
    Problem<float> p;
    p.s.B = B, p.s.H = H, p.s.T = T, p.s.d = d;
    p.qkv.resize(p.s.rows() * 3 * d), p.dout.resize(p.s.rows() * d);
    for (float& x : p.qkv) x = scale * rng.normal();
    for (float& x : p.dout) x = rng.normal();
    return p;
}

struct Result {
    std::vector<float> o, dqkv;
};
Result run(Problem<float>& p, const std::string& name, int window) {
    AttnConfig cfg;
    cfg.name = name, cfg.window = window;
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    EXPECT_EQ(attn->name(), name);
    Result r;
    r.o.assign(p.s.rows() * p.s.d, 0.f), r.dqkv.assign(p.qkv.size(), 0.f);
    std::vector<float> saved(attn->saved_size(p.s));
    const AttnContext ctx;
    attn->forward(p.s, ctx, p.bthd_view(r.o), p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1),
                  p.qkv_view(p.qkv, 2), saved.data(), Tensor{}, nullptr);
    attn->backward(p.s, ctx, p.qkv_view(r.dqkv, 0), p.qkv_view(r.dqkv, 1), p.qkv_view(r.dqkv, 2), Tensor{},
                   p.bthd_view(p.dout), p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2),
                   p.bthd_view(r.o), saved.data(), Tensor{}, nullptr);
    return r;
}

template <typename A, typename B>
double max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
    double e = 0;
    for (size_t i = 0; i < a.size(); i++) e = std::max(e, std::abs((double)a[i] - (double)b[i]));
    return e;
}

TEST(LocalAttention, MatchesDenseMaskedSoftmax) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int B = 2, H = 2, T = 37, d = 8;
    Problem<float> p = random_problem(rng, B, H, T, d);
    for (int W : {1, 2, 5, 16, 36}) {
        const Result r = run(p, "local", W);
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
    Problem<float> p = random_problem(rng, 2, 3, 37, 16);
    const Result full = run(p, "softmax", 4096);
    for (int W : {37, 42, 4096}) {
        const Result r = run(p, "local", W);
        EXPECT_LT(max_abs_diff(r.o, full.o), 1e-6) << "W = " << W;
        EXPECT_LT(max_abs_diff(r.dqkv, full.dqkv), 1e-6) << "W = " << W;
    }
    const Result narrower = run(p, "local", 36);  // one key fewer for the last query: differs
    EXPECT_GT(max_abs_diff(narrower.o, full.o), 1e-6);
}

TEST(LocalAttention, WindowOneGivesValues) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem<float> p = random_problem(rng, 1, 2, 37, 8);
    Result r = run(p, "local", 1);
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
    Problem<float> pf = random_problem(rng, 2, 2, 37, 8, 2.f);
    Problem<double> p;
    p.s = pf.s;
    p.qkv.assign(pf.qkv.begin(), pf.qkv.end()), p.dout.assign(pf.dout.begin(), pf.dout.end());
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
    // thousands of tiny forwards: one thread, or OpenMP barriers dominate on a loaded machine
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    auto loss = [&] {
        std::vector<double> oo, ll;
        forward(oo, ll);
        double L = 0;
        for (size_t i = 0; i < oo.size(); i++) L += oo[i] * p.dout[i];
        return L;
    };
    const double h = 1e-6;
    double worst = 0, scale = 1;
    for (size_t e = 0; e < p.qkv.size(); e++) {
        const double x0 = p.qkv[e];
        p.qkv[e] = x0 + h;
        const double lp = loss();
        p.qkv[e] = x0 - h;
        const double lm = loss();
        p.qkv[e] = x0;
        worst = std::max(worst, std::abs((lp - lm) / (2 * h) - dqkv[e]));
        scale = std::max(scale, std::abs(dqkv[e]));
    }
    omp_set_num_threads(threads);
    EXPECT_LT(worst / scale, 1e-6) << "max |fd − analytic| " << worst << ", max |grad| " << scale;
}

TEST(LocalAttention, LargeInputsStayFinite) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem<float> p = random_problem(rng, 1, 2, 130, 32, 8.f);
    const Result r = run(p, "local", 16);
    for (float x : r.o) ASSERT_TRUE(std::isfinite(x));
    for (float x : r.dqkv) ASSERT_TRUE(std::isfinite(x));
}

TEST(LocalAttention, WindowBelowOneThrows) {
    AttnConfig cfg;
    cfg.name = "local", cfg.window = 0;
    EXPECT_THROW(make_cpu_attention(cfg), Error);
}

}  // namespace
