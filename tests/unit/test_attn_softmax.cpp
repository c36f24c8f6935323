// Tests of the CPU exact causal softmax attention: the double-precision reference templates of
// src/attention/softmax_ref.h against a naive dense computation and against central finite
// differences (full causal and with a key window, T = 37, inputs scaled ×8), and the fp32
// `softmax` module (src/attention/softmax.cpp) against the double reference, on contiguous
// (B,H,T,d) tensors and on the strided views of the fused qkv buffer (B,T,3,H,d).
#define GTEST_DONT_DEFINE_FAIL 1  // check.h (through attn_test_util.h) defines FAIL
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "attention/cpu_variants.h"
#include "attention/softmax_ref.h"
#include "attn_test_util.h"
#include "rng.h"

namespace {
using Vec = std::vector<double>;
using VecF = std::vector<float>;

Vec randn(size_t n, Rng& rng, double scale) {
    Vec x(n);
    for (auto& e : x) e = scale * rng.normal();
    return x;
}
// Contiguous (B,H,T,d) views.
HeadView<double> view(Vec& x, const AttnShape& s) {
    return {x.data(), (int64_t)s.H * s.T * s.d, (int64_t)s.T * s.d, s.d};
}
HeadView<const double> cview(const Vec& x, const AttnShape& s) {
    return {x.data(), (int64_t)s.H * s.T * s.d, (int64_t)s.T * s.d, s.d};
}

// Dense causal attention with the window rule of softmax_ref.h: o and lse from the full matrix.
void naive_attention(const AttnShape& s, int window, const Vec& q, const Vec& k, const Vec& v, Vec& o, Vec& lse) {
    const int n = s.T, d = s.d;
    o.assign(q.size(), 0.0);
    lse.assign(s.rows(), 0.0);
    for (int bh = 0; bh < s.B * s.H; bh++) {
        const size_t base = (size_t)bh * n * d;
        for (int i = 0; i < n; i++) {
            Vec S(n, -std::numeric_limits<double>::infinity());
            double m = -std::numeric_limits<double>::infinity();
            for (int j = 0; j < n; j++) {
                const bool visible = j <= i && (window <= 0 || j > i - window);
                if (!visible) continue;
                double dot = 0;
                for (int c = 0; c < d; c++) dot += q[base + i * d + c] * k[base + j * d + c];
                S[j] = dot / std::sqrt((double)d);
                m = std::max(m, S[j]);
            }
            double z = 0;
            for (int j = 0; j < n; j++) z += std::exp(S[j] - m);
            for (int j = 0; j < n; j++)
                for (int c = 0; c < d; c++) o[base + i * d + c] += std::exp(S[j] - m) / z * v[base + j * d + c];
            lse[(size_t)bh * n + i] = m + std::log(z);
        }
    }
}

// max |got - want| / max(max |want|, floor) below tol
void expect_close(const Vec& got, const Vec& want, double tol, const char* what, double floor = 1e-30) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double err = 0;
    for (size_t i = 0; i < got.size(); i++) {
        ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "]";
        err = std::max(err, std::abs(got[i] - want[i]));
    }
    EXPECT_LE(err / std::max(max_abs(want), floor), tol) << what;
}

// Finite-difference check of dq, dk, dv of the double reference for L = Σ r ⊙ o.
void check_gradients(const AttnShape& s, int window, double input_scale, uint64_t seed, double tol) {
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(1);  // thousands of tiny forwards: thread start-up would dominate
    Rng rng(seed);
    const size_t n = (size_t)s.B * s.H * s.T * s.d;
    Vec q = randn(n, rng, input_scale), k = randn(n, rng, input_scale), v = randn(n, rng, 1.0);
    Vec r = randn(n, rng, 1.0), o(n), lse(s.rows());
    auto loss = [&] {
        softmax_attention_forward_ref<double>(s, window, view(o, s), cview(q, s), cview(k, s), cview(v, s), lse.data());
        double L = 0;
        for (size_t i = 0; i < n; i++) L += r[i] * o[i];
        return L;
    };
    loss();
    Vec dq(n), dk(n), dv(n);
    softmax_attention_backward_ref<double>(s, window, view(dq, s), view(dk, s), view(dv, s), cview(r, s), cview(q, s),
                                           cview(k, s), cview(v, s), cview(o, s), lse.data());
    const double h = 1e-6 / input_scale;
    for (auto [x, g, name] : {std::tuple<Vec*, Vec*, const char*>{&q, &dq, "dq"}, {&k, &dk, "dk"}, {&v, &dv, "dv"}}) {
        Vec fd(n);
        for (size_t i = 0; i < n; i++) fd[i] = central_difference(*x, i, h, loss);
        expect_close(*g, fd, tol, name, 1e-3);
    }
    omp_set_num_threads(saved_threads);
}

}  // namespace

TEST(SoftmaxAttention, ReferenceMatchesNaiveDense) {
    Rng rng(31);
    for (int window : {0, 1, 5, 100}) {
        AttnShape s{2, 3, 37, 8};
        const size_t n = (size_t)s.B * s.H * s.T * s.d;
        Vec q = randn(n, rng, 1.0), k = randn(n, rng, 1.0), v = randn(n, rng, 1.0), o(n), lse(s.rows());
        softmax_attention_forward_ref<double>(s, window, view(o, s), cview(q, s), cview(k, s), cview(v, s), lse.data());
        Vec o_ref, lse_ref;
        naive_attention(s, window, q, k, v, o_ref, lse_ref);
        expect_close(o, o_ref, 1e-12, "o");
        expect_close(lse, lse_ref, 1e-12, "lse");
        if (window == 1) expect_close(o, v, 1e-14, "W = 1 sees only itself");
    }
}

TEST(SoftmaxAttention, ReferenceGradientsFiniteDifferences) {
    check_gradients(AttnShape{1, 2, 7, 4}, 0, 1.0, 32, 1e-7);
    check_gradients(AttnShape{2, 1, 37, 8}, 0, 1.0, 33, 1e-7);  // T not a multiple of anything
}

TEST(SoftmaxAttention, ReferenceGradientsLargeInputs) {
    check_gradients(AttnShape{1, 1, 37, 8}, 0, 8.0, 34, 1e-6);  // q, k ×8: near one-hot rows
}

TEST(SoftmaxAttention, ReferenceGradientsWithWindow) {
    check_gradients(AttnShape{1, 2, 19, 4}, 4, 1.0, 35, 1e-7);
    check_gradients(AttnShape{1, 1, 9, 4}, 1, 1.0, 36, 1e-7);
}

// The fp32 module against the double reference, plain and with inputs ×8.
TEST(SoftmaxAttention, ModuleMatchesDoubleReference) {
    auto attn = make_cpu_softmax_attention(AttnConfig{});
    EXPECT_EQ(attn->name(), "softmax");
    for (double scale : {1.0, 8.0}) {
        Rng rng(37);
        AttnShape s{2, 2, 37, 16};
        const size_t n = (size_t)s.B * s.H * s.T * s.d;
        ASSERT_EQ(attn->saved_size(s), s.rows());
        Vec q = randn(n, rng, scale), k = randn(n, rng, scale), v = randn(n, rng, 1.0), dout = randn(n, rng, 1.0);
        for (Vec* x : {&q, &k, &v, &dout})
            for (auto& e : *x) e = (float)e;
        Vec o(n), lse(s.rows()), dq(n), dk(n), dv(n);
        softmax_attention_forward_ref<double>(s, 0, view(o, s), cview(q, s), cview(k, s), cview(v, s), lse.data());
        softmax_attention_backward_ref<double>(s, 0, view(dq, s), view(dk, s), view(dv, s), cview(dout, s), cview(q, s),
                                               cview(k, s), cview(v, s), cview(o, s), lse.data());
        VecF qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end()), doutf(dout.begin(), dout.end());
        VecF of(n), savedf(s.rows()), dqf(n), dkf(n), dvf(n);
        auto ht = [&](VecF& x) { return head_tensor_bhtd(x.data(), DType::F32, s.H, s.T, s.d); };
        attn->forward(s, AttnContext{}, ht(of), ht(qf), ht(kf), ht(vf), savedf.data(), Tensor{}, nullptr);
        attn->backward(s, AttnContext{}, ht(dqf), ht(dkf), ht(dvf), Tensor{}, ht(doutf), ht(qf), ht(kf), ht(vf), ht(of),
                       savedf.data(), Tensor{}, nullptr);
        // ×8: P = exp(S - LSE) with S, LSE of size ~64 rounded to fp32 loses ~1e-5 relative
        const double tol = scale > 1 ? 3e-5 : 1e-6;
        expect_close(Vec(of.begin(), of.end()), o, 1e-6, "o");
        expect_close(Vec(savedf.begin(), savedf.end()), lse, 1e-6, "lse");
        expect_close(Vec(dqf.begin(), dqf.end()), dq, tol, "dq");
        expect_close(Vec(dkf.begin(), dkf.end()), dk, tol, "dk");
        expect_close(Vec(dvf.begin(), dvf.end()), dv, tol, "dv");
    }
}

// The model's layout: q, k, v are views into qkv (B,T,3,H,d), o and dout are (B,T,H,d). The
// result must equal the contiguous (B,H,T,d) run exactly, gradients landing in dqkv (B,T,3,H,d).
TEST(SoftmaxAttention, StridedQkvViewMatchesContiguous) {
    auto attn = make_cpu_softmax_attention(AttnConfig{});
    Rng rng(38);
    const int B = 2, H = 3, T = 37, d = 8;
    AttnShape s{B, H, T, d};
    const size_t n = (size_t)B * H * T * d;
    VecF qkv(3 * n), dout_btHd(n);
    for (auto& e : qkv) e = 2 * rng.normal();
    for (auto& e : dout_btHd) e = rng.normal();
    // strided views
    const int64_t sb = (int64_t)T * 3 * H * d, st = 3 * H * d, sh = d;
    VecF o_btHd(n), dqkv(3 * n, 7.f), saved(s.rows());
    auto qkv_view = [&](VecF& buf, int which) { return HeadTensor{buf.data() + (size_t)which * H * d, DType::F32, sb, sh, st}; };
    auto bthd_view = [&](VecF& buf) { return HeadTensor{buf.data(), DType::F32, (int64_t)T * H * d, d, (int64_t)H * d}; };
    attn->forward(s, AttnContext{}, bthd_view(o_btHd), qkv_view(qkv, 0), qkv_view(qkv, 1), qkv_view(qkv, 2),
                  saved.data(), Tensor{}, nullptr);
    attn->backward(s, AttnContext{}, qkv_view(dqkv, 0), qkv_view(dqkv, 1), qkv_view(dqkv, 2), Tensor{},
                   bthd_view(dout_btHd), qkv_view(qkv, 0), qkv_view(qkv, 1), qkv_view(qkv, 2), bthd_view(o_btHd),
                   saved.data(), Tensor{}, nullptr);
    // the same data gathered into contiguous (B,H,T,d)
    VecF q(n), k(n), v(n), dout(n);
    auto bhtd = [&](int b, int h, int t) { return (((size_t)b * H + h) * T + t) * d; };
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int c = 0; c < d; c++) {
                    const size_t row = ((size_t)b * T + t) * 3 * H * d + (size_t)h * d + c;
                    q[bhtd(b, h, t) + c] = qkv[row];
                    k[bhtd(b, h, t) + c] = qkv[row + H * d];
                    v[bhtd(b, h, t) + c] = qkv[row + 2 * H * d];
                    dout[bhtd(b, h, t) + c] = dout_btHd[((size_t)b * T + t) * H * d + (size_t)h * d + c];
                }
    VecF o(n), dq(n), dk(n), dv(n), saved_c(s.rows());
    auto ht = [&](VecF& x) { return head_tensor_bhtd(x.data(), DType::F32, H, T, d); };
    attn->forward(s, AttnContext{}, ht(o), ht(q), ht(k), ht(v), saved_c.data(), Tensor{}, nullptr);
    attn->backward(s, AttnContext{}, ht(dq), ht(dk), ht(dv), Tensor{}, ht(dout), ht(q), ht(k), ht(v), ht(o),
                   saved_c.data(), Tensor{}, nullptr);
    EXPECT_EQ(saved, saved_c);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int c = 0; c < d; c++) {
                    const size_t row = ((size_t)b * T + t) * 3 * H * d + (size_t)h * d + c;
                    const size_t i = bhtd(b, h, t) + c;
                    ASSERT_EQ(o_btHd[((size_t)b * T + t) * H * d + (size_t)h * d + c], o[i]);
                    ASSERT_EQ(dqkv[row], dq[i]);
                    ASSERT_EQ(dqkv[row + H * d], dk[i]);
                    ASSERT_EQ(dqkv[row + 2 * H * d], dv[i]);
                }
}

TEST(SoftmaxAttention, DeterministicAcrossThreadCounts) {
    auto attn = make_cpu_softmax_attention(AttnConfig{});
    Rng rng(39);
    AttnShape s{2, 2, 45, 8};
    const size_t n = (size_t)s.B * s.H * s.T * s.d;
    VecF q(n), k(n), v(n), dout(n);
    for (VecF* x : {&q, &k, &v, &dout})
        for (auto& e : *x) e = rng.normal();
    auto ht = [&](VecF& x) { return head_tensor_bhtd(x.data(), DType::F32, s.H, s.T, s.d); };
    auto run = [&](int threads) {
        omp_set_num_threads(threads);
        VecF o(n), saved(s.rows()), dq(n), dk(n), dv(n);
        attn->forward(s, AttnContext{}, ht(o), ht(q), ht(k), ht(v), saved.data(), Tensor{}, nullptr);
        attn->backward(s, AttnContext{}, ht(dq), ht(dk), ht(dv), Tensor{}, ht(dout), ht(q), ht(k), ht(v), ht(o),
                       saved.data(), Tensor{}, nullptr);
        return std::vector<VecF>{o, saved, dq, dk, dv};
    };
    const int saved_threads = omp_get_max_threads();
    auto one = run(1), two = run(2);
    omp_set_num_threads(saved_threads);
    for (size_t i = 0; i < one.size(); i++) EXPECT_EQ(one[i], two[i]) << "output " << i;
}
