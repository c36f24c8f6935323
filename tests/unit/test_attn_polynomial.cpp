// Tests of the CPU reference of exact `polynomial` attention (src/attention/polynomial.cpp): the
// forward against a naive evaluation of a_ij = ⟨q̂_i, k̂_j⟩^p / (1 + Σ_{j'≤i} ⟨q̂_i, k̂_j'⟩^p) written
// here, fp64 finite-difference gradients through the LayerNorms (p = 2 and 4), the fp32 class
// against the fp64 templates, large inputs, and the even-degree check. q, k, v are views into a
// fused (B, T, 3, H, d) buffer as in the model. Inputs are fresh random numbers each run; the
// seed is printed on failure.
#define GTEST_DONT_DEFINE_FAIL 1  // check.h defines FAIL
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "attention/cpu_variants.h"
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

Problem<double> random_problem(Rng& rng, int B, int H, int T, int d, double scale = 1.0) {
    Problem<double> p;
    p.s.B = B, p.s.H = H, p.s.T = T, p.s.d = d;
    p.qkv.resize(p.s.rows() * 3 * d), p.dout.resize(p.s.rows() * d);
    for (double& x : p.qkv) x = scale * (rng.normal() + 0.3);  // a nonzero mean for LayerNorm to remove
    for (double& x : p.dout) x = rng.normal();
    return p;
}

std::vector<double> forward(Problem<double>& p, int degree, std::vector<double>* saved_out = nullptr) {
    std::vector<double> o(p.s.rows() * p.s.d), saved(polynomial_saved_size(p.s));
    polynomial_attention_forward<double>(p.s, degree, p.bthd_view(o), p.qkv_view(p.qkv, 0),
                                         p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2), saved.data());
    if (saved_out) *saved_out = saved;
    return o;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double e = 0;
    for (size_t i = 0; i < a.size(); i++) e = std::max(e, std::abs(a[i] - b[i]));
    return e;
}
double max_abs(const std::vector<double>& a) {
    double e = 0;
    for (double x : a) e = std::max(e, std::abs(x));
    return e;
}

TEST(PolynomialAttention, ForwardMatchesNaiveFormula) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    const int B = 2, H = 3, T = 37, d = 8;
    Problem<double> p = random_problem(rng, B, H, T, d);
    for (int degree : {2, 4, 6}) {
        const std::vector<double> o = forward(p, degree);
        std::vector<double> want(o.size());
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                auto layernorm = [&](int which, int t) {
                    std::vector<double> x(d);
                    double mu = 0, var = 0;
                    for (int i = 0; i < d; i++) x[i] = p.at(p.qkv, which, b, h, t, i), mu += x[i] / d;
                    for (int i = 0; i < d; i++) var += (x[i] - mu) * (x[i] - mu) / d;
                    for (int i = 0; i < d; i++) x[i] = (x[i] - mu) / std::sqrt(var + 1e-5);
                    return x;
                };
                for (int i = 0; i < T; i++) {
                    const std::vector<double> qh = layernorm(0, i);
                    std::vector<double> w(i + 1);
                    double denom = 1;
                    for (int j = 0; j <= i; j++) {
                        const std::vector<double> kh = layernorm(1, j);
                        double s = 0;
                        for (int c = 0; c < d; c++) s += qh[c] * kh[c];
                        w[j] = std::pow(s, degree), denom += w[j];
                    }
                    for (int c = 0; c < d; c++) {
                        double acc = 0;
                        for (int j = 0; j <= i; j++) acc += w[j] / denom * p.at(p.qkv, 2, b, h, j, c);
                        want[(((size_t)b * T + i) * H + h) * d + c] = acc;
                    }
                }
            }
        EXPECT_LT(max_abs_diff(o, want), 1e-12 * std::max(1.0, max_abs(want))) << "degree " << degree;
    }
}

TEST(PolynomialAttention, GradientsMatchFiniteDifferences) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem<double> p = random_problem(rng, 2, 2, 37, 8);
    // thousands of tiny forwards: one thread, or OpenMP barriers dominate on a loaded machine
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    for (int degree : {2, 4}) {
        std::vector<double> saved;
        std::vector<double> o = forward(p, degree, &saved);
        std::vector<double> dqkv(p.qkv.size(), 0.0);
        polynomial_attention_backward<double>(p.s, degree, p.qkv_view(dqkv, 0), p.qkv_view(dqkv, 1),
                                              p.qkv_view(dqkv, 2), p.bthd_view(p.dout),
                                              p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1),
                                              p.qkv_view(p.qkv, 2), p.bthd_view(o), saved.data());
        auto loss = [&] {
            const std::vector<double> oo = forward(p, degree);
            double L = 0;
            for (size_t i = 0; i < oo.size(); i++) L += oo[i] * p.dout[i];
            return L;
        };
        const double h = 1e-6, scale = std::max(1.0, max_abs(dqkv));
        double worst = 0;
        for (size_t e = 0; e < p.qkv.size(); e++) {
            const double x0 = p.qkv[e];
            p.qkv[e] = x0 + h;
            const double lp = loss();
            p.qkv[e] = x0 - h;
            const double lm = loss();
            p.qkv[e] = x0;
            worst = std::max(worst, std::abs((lp - lm) / (2 * h) - dqkv[e]));
        }
        EXPECT_LT(worst / scale, 1e-6) << "degree " << degree << ": max |fd − analytic| " << worst
                                       << ", max |grad| " << scale;
    }
    omp_set_num_threads(threads);
}

// The fp32 Attention class (through the registry) on p's inputs.
void run_class(Problem<double>& p, int degree, std::vector<float>& o, std::vector<float>& dqkv) {
    AttnConfig cfg;
    cfg.name = "polynomial", cfg.degree = degree;
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    EXPECT_EQ(attn->name(), "polynomial");
    EXPECT_EQ(attn->saved_size(p.s), 5 * p.s.rows());  // O(B·H·T), never T²
    Problem<float> pf;
    pf.s = p.s;
    pf.qkv.assign(p.qkv.begin(), p.qkv.end()), pf.dout.assign(p.dout.begin(), p.dout.end());
    o.assign(p.s.rows() * p.s.d, 0.f), dqkv.assign(p.qkv.size(), 0.f);
    std::vector<float> saved(attn->saved_size(p.s));
    const AttnContext ctx;
    attn->forward(p.s, ctx, pf.bthd_view(o), pf.qkv_view(pf.qkv, 0), pf.qkv_view(pf.qkv, 1),
                  pf.qkv_view(pf.qkv, 2), saved.data(), Tensor{}, nullptr);
    attn->backward(p.s, ctx, pf.qkv_view(dqkv, 0), pf.qkv_view(dqkv, 1), pf.qkv_view(dqkv, 2), Tensor{},
                   pf.bthd_view(pf.dout), pf.qkv_view(pf.qkv, 0), pf.qkv_view(pf.qkv, 1),
                   pf.qkv_view(pf.qkv, 2), pf.bthd_view(o), saved.data(), Tensor{}, nullptr);
}

TEST(PolynomialAttention, FloatClassMatchesDoubleReference) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem<double> p = random_problem(rng, 2, 3, 101, 16);
    std::vector<float> o, dqkv;
    run_class(p, 4, o, dqkv);
    std::vector<double> saved;
    std::vector<double> want_o = forward(p, 4, &saved);
    std::vector<double> want_d(p.qkv.size());
    polynomial_attention_backward<double>(p.s, 4, p.qkv_view(want_d, 0), p.qkv_view(want_d, 1),
                                          p.qkv_view(want_d, 2), p.bthd_view(p.dout), p.qkv_view(p.qkv, 0),
                                          p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2), p.bthd_view(want_o),
                                          saved.data());
    EXPECT_LT(max_abs_diff(std::vector<double>(o.begin(), o.end()), want_o), 1e-4 * std::max(1.0, max_abs(want_o)));
    EXPECT_LT(max_abs_diff(std::vector<double>(dqkv.begin(), dqkv.end()), want_d), 1e-3 * std::max(1.0, max_abs(want_d)));
}

TEST(PolynomialAttention, LargeInputsStayFinite) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE("seed " + std::to_string(seed));
    Rng rng(seed);
    Problem<double> p = random_problem(rng, 1, 2, 130, 64, 8.0);
    std::vector<float> o, dqkv;
    run_class(p, 4, o, dqkv);
    for (float x : o) ASSERT_TRUE(std::isfinite(x));
    for (float x : dqkv) ASSERT_TRUE(std::isfinite(x));
}

TEST(PolynomialAttention, OddOrTooSmallDegreeThrows) {
    for (int degree : {-2, 0, 1, 3, 5}) {
        AttnConfig cfg;
        cfg.name = "polynomial", cfg.degree = degree;
        try {
            make_cpu_attention(cfg);
            ADD_FAILURE() << "degree " << degree << " accepted";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("even"), std::string::npos) << e.what();
        }
    }
}

}  // namespace
