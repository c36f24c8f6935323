// Harness shared by the CPU tests of the attention variants (tests/unit/test_attn_*.cpp): a fresh
// seed per test; the problem whose q, k, v are strided views into one fused (B, T, 3, H, d) qkv
// buffer as in the model, with o and dout (B, T, H, d), in fp64 (the reference templates) or fp32
// (the Attention modules) and converted between the two; one forward and backward of an fp32
// Attention module on it; max-abs error measures; and the worst central finite-difference error
// of an analytic gradient of L = Σ o ⊙ dout, evaluated on one thread. Includes test_util.h (and
// so gtest and check.h: define GTEST_DONT_DEFINE_FAIL 1 before including gtest).
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "attention.h"
#include "test_util.h"

// A fresh random seed for this test; tests print it (SCOPED_TRACE) so a failure can be rerun.
inline uint64_t fresh_seed() { return ((uint64_t)std::random_device{}() << 32) ^ std::random_device{}(); }

// q, k, v in one fused (B, T, 3, H, d) buffer; o and dout (B, T, H, d). Real: double or float.
// The views are tagged F32: the fp64 reference templates read the pointer and strides only.
template <typename Real>
struct FusedQkvProblem {
    AttnShape s;
    std::vector<Real> qkv, dout;

    FusedQkvProblem() = default;
    FusedQkvProblem(int B, int H, int T, int d) {  // zero-filled
        s.B = B, s.H = H, s.T = T, s.d = d;
        qkv.assign(s.rows() * 3 * d, Real(0)), dout.assign(s.rows() * d, Real(0));
    }
    // which: 0 = q, 1 = k, 2 = v, as a view into buf (qkv or a gradient of the same layout)
    HeadTensor qkv_view(std::vector<Real>& buf, int which) const {
        const int64_t st = 3LL * s.H * s.d;
        return HeadTensor{buf.data() + (int64_t)which * s.H * s.d, DType::F32, s.T * st, s.d, st};
    }
    // a (B, T, H, d) tensor such as o or dout
    HeadTensor bthd_view(std::vector<Real>& buf) const {
        const int64_t st = (int64_t)s.H * s.d;
        return HeadTensor{buf.data(), DType::F32, s.T * st, s.d, st};
    }
    // element i of head h at time t of batch b of q (which 0), k (1) or v (2) in buf
    Real& at(std::vector<Real>& buf, int which, int b, int h, int t, int i) const {
        return buf[(((size_t)b * s.T + t) * 3 + which) * s.H * s.d + (size_t)h * s.d + i];
    }
};

// The same problem in another precision (fp64 reference ↔ fp32 module).
template <typename To, typename From>
FusedQkvProblem<To> converted(const FusedQkvProblem<From>& p) {
    FusedQkvProblem<To> c;
    c.s = p.s;
    c.qkv.assign(p.qkv.begin(), p.qkv.end()), c.dout.assign(p.dout.begin(), p.dout.end());
    return c;
}

// What an fp32 Attention module computed: o (B, T, H, d) and dq, dk, dv in the fused layout of qkv.
struct ModuleOutputs {
    std::vector<float> o, dqkv;
};

// attn's forward, then its backward from p.dout, on p's views (a parameter-free variant; its
// saved state in a buffer of attn.saved_size).
inline ModuleOutputs run_module(Attention& attn, const AttnContext& ctx, FusedQkvProblem<float>& p) {
    ModuleOutputs r;
    r.o.assign(p.s.rows() * p.s.d, 0.f), r.dqkv.assign(p.qkv.size(), 0.f);
    std::vector<float> saved(attn.saved_size(p.s));
    attn.forward(p.s, ctx, p.bthd_view(r.o), p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2),
                 saved.data(), Tensor{}, nullptr);
    attn.backward(p.s, ctx, p.qkv_view(r.dqkv, 0), p.qkv_view(r.dqkv, 1), p.qkv_view(r.dqkv, 2), Tensor{},
                  p.bthd_view(p.dout), p.qkv_view(p.qkv, 0), p.qkv_view(p.qkv, 1), p.qkv_view(p.qkv, 2),
                  p.bthd_view(r.o), saved.data(), Tensor{}, nullptr);
    return r;
}

// max_i |a_i − b_i| in double (a and b of the same size).
template <typename A, typename B>
double max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
    double e = 0;
    for (size_t i = 0; i < a.size(); i++) e = std::max(e, std::abs((double)a[i] - (double)b[i]));
    return e;
}
// max_i |a_i| in double.
template <typename A>
double max_abs(const std::vector<A>& a) {
    double e = 0;
    for (const A& x : a) e = std::max(e, std::abs((double)x));
    return e;
}

// L = Σ_i o_i · dout_i: the scalar whose gradient with respect to o is dout.
inline double weighted_sum(const std::vector<double>& o, const std::vector<double>& dout) {
    double L = 0;
    for (size_t i = 0; i < o.size(); i++) L += o[i] * dout[i];
    return L;
}

// max |(L(x + h e) − L(x − h e)) / 2h − analytic_e| over every `stride`-th element e of x,
// h = 1e-6, with loss() evaluating L at the current x (x is restored). Runs on one thread:
// thousands of tiny forwards, where OpenMP barriers would dominate on a loaded machine.
inline double worst_finite_difference_error(std::vector<double>& x, const std::vector<double>& analytic,
                                            const std::function<double()>& loss, size_t stride = 1) {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double worst = 0;
    for (size_t e = 0; e < x.size(); e += stride)
        worst = std::max(worst, std::abs(central_difference(x, e, 1e-6, loss) - analytic[e]));
    omp_set_num_threads(threads);
    return worst;
}
