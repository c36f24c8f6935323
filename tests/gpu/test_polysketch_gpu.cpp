// GPU tests of `polysketch` on CUDA (cuda/attention/polysketch.cu): forward o, the saved
// denominators and dq/dk/dv (+ the sketch-parameter gradient for the learned sketch) against the
// CPU reference templates in fp64 (polysketch_attention_forward/backward<double>,
// src/attention/polysketch.cpp) on identical inputs and parameters (rounded to bf16 first in bf16
// mode). Covers T ∈ {1, 37, 256, 300, 1000} (ragged last block, T below one block), d ∈ {64, 128},
// r ∈ {32, 16, 8}, blocks {64, 256}, exact_diag on/off, learned and random sketch, contiguous and
// fused-qkv layouts, inputs ×1 and ×8, fp32 and bf16. Outputs are poisoned with NaN first;
// dparams starts from random values to check "+="; the backward runs twice (dparams reset in
// between) and must be bitwise equal. The CPU backward is given the GPU's o. Also: with
// exact_diag and one block covering T, polysketch equals `polynomial`.
// Error measure: ‖gpu − cpu‖ / ‖cpu‖ in double; for dq and dk with an rms floor of 1e-2 on the
// denominator (typical dq, dk rms 0.05..1): when one row's own weight w dominates (T = 1 with the
// sketched diagonal: w = ⟨A, B⟩² ~ 1e4..1e7 for the unnormalised random sketch), o = w v / (1 + w)
// rounds to v exactly in bf16, so g·C = dO·(v − o) / (1 + w) cancels to rounding noise: the fp64
// reference holds ~1e-16, the GPU's fp32 ~1e-7..1e-5 rms (even the exact-o gradient is < 1e-3 rms),
// and the plain relative error reads ~1e9.
#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "attention/polysketch_sketch.h"
#include "cuda/attention/cuda_variants.cuh"
#include "ops.h"
#include "rng.h"

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

using gpu_test::rel_err_floor;

using gpu_test::cuda_ops;
using gpu_test::Layout;
using gpu_test::round_bf16;
using gpu_test::slice;

struct SketchCase {
    int B, H, T, d, r, block;
    bool exact_diag, learned, fused;
    float magnitude;
    DType dtype;
};

std::string case_name(const SketchCase& c) {
    char name[160];
    std::snprintf(name, sizeof name, "B%dH%dT%dd%d_r%d_b%d_%s_%s_%s_x%d_%s", c.B, c.H, c.T, c.d, c.r,
                  c.block, c.exact_diag ? "exactdiag" : "sketchdiag", c.learned ? "learned" : "random",
                  c.fused ? "fused" : "contig", (int)c.magnitude, dtype_name(c.dtype));
    return name;
}

AttnConfig config_of(const SketchCase& c) {
    AttnConfig cfg;
    cfg.name = "polysketch";
    cfg.sketch_size = c.r;
    cfg.block = c.block;
    cfg.exact_diag = c.exact_diag;
    cfg.sketch_learned = c.learned;
    return cfg;
}

struct Inputs {
    std::vector<float> qkv, dout;  // canonical (3, B,H,T,d) and (B,H,T,d)
    std::vector<float> params;     // learned sketch (stored values), empty for the random one
    std::vector<float> dparams0;   // initial dparams (the backward adds to it)
};
Inputs make_inputs(const SketchCase& c, uint64_t seed) {
    Rng rng(seed);
    const size_t n = (size_t)c.B * c.H * c.T * c.d;
    Inputs in{std::vector<float>(3 * n), std::vector<float>(n), {}, {}};
    auto round = [&](float x) { return c.dtype == DType::BF16 ? round_bf16(x) : x; };
    for (float& x : in.qkv) x = round(rng.normal() * c.magnitude);
    for (float& x : in.dout) x = round(rng.normal());
    if (c.learned) {
        const PolySketchLayout L = polysketch_layout(c.d, c.r);
        in.params.resize(L.total);
        polysketch_init_params(in.params.data(), L, Rng::derive(seed, 7));
        // LayerNorm affines away from (1, 0), so their gradients are exercised in general position
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++)
                for (int i = 0; i < L.blk[f][g].n_in; i++) {
                    in.params[L.blk[f][g].ln_w + i] = 1.0f + 0.2f * rng.normal();
                    in.params[L.blk[f][g].ln_b + i] = 0.2f * rng.normal();
                }
        for (float& x : in.params) x = round(x);
        in.dparams0.resize(L.total);
        for (float& x : in.dparams0) x = rng.normal();
    }
    return in;
}

struct Result {
    std::vector<float> o, den, dq, dk, dv, dparams;  // dparams: the increment
};

Result run_gpu(const SketchCase& c, const Inputs& in) {
    Ops& ops = cuda_ops(c.dtype);
    std::unique_ptr<Attention> attn = make_cuda_polysketch_attention(config_of(c));
    const AttnShape s{c.B, c.H, c.T, c.d};
    const size_t n = s.rows() * c.d;
    const Layout lay{c.B, c.H, c.T, c.d, c.fused};
    const size_t np = attn->num_params(c.d);
    EXPECT_EQ(np, in.params.size());
    Buffer qkv(ops, c.dtype, 3 * n, "test qkv"), dqkv(ops, c.dtype, 3 * n, "test dqkv");
    Buffer o(ops, c.dtype, n, "test o"), dout(ops, c.dtype, n, "test dout");
    Buffer saved(ops, DType::F32, attn->saved_size(s), "test saved");
    Buffer work(ops, DType::F32, attn->workspace_bytes(s) / 4 + 1, "test workspace");
    Buffer params(ops, c.dtype, np + 1, "test params"), dparams(ops, DType::F32, np + 1, "test dparams");
    gpu_test::upload(ops, qkv.t(), lay.scatter(in.qkv, 3));
    gpu_test::upload(ops, dout.t(), lay.scatter(in.dout, 1));
    const Tensor params_t = np ? params.t().slice(0, np) : Tensor{};
    const Tensor dparams_t = np ? dparams.t().slice(0, np) : Tensor{};
    if (np) gpu_test::upload(ops, params_t, in.params);
    const HeadTensor q = lay.view(qkv.t(), 0, 3), k = lay.view(qkv.t(), 1, 3), v = lay.view(qkv.t(), 2, 3);
    const HeadTensor dq = lay.view(dqkv.t(), 0, 3), dk = lay.view(dqkv.t(), 1, 3), dv = lay.view(dqkv.t(), 2, 3);
    const HeadTensor o_view = lay.view(o.t(), 0, 1), dout_view = lay.view(dout.t(), 0, 1);
    auto download = [&](const Tensor& t) {
        ops.synchronize();
        return gpu_test::download(ops, t);
    };
    gpu_test::poison(ops, o.t());
    gpu_test::poison(ops, saved.t());
    gpu_test::poison(ops, work.t());
    attn->forward(s, AttnContext{}, o_view, q, k, v, saved.t().f32(), params_t, work.t().ptr);
    Result r;
    r.o = lay.gather(download(o.t()), 1);
    r.den = download(saved.t());
    std::vector<float> first, first_dp;
    for (int pass = 0; pass < 2; pass++) {
        gpu_test::poison(ops, dqkv.t());
        gpu_test::poison(ops, work.t());
        if (np) gpu_test::upload(ops, dparams_t, in.dparams0);
        attn->backward(s, AttnContext{}, dq, dk, dv, dparams_t, dout_view, q, k, v, o_view, saved.t().f32(),
                       params_t, work.t().ptr);
        std::vector<float> grads = download(dqkv.t());
        std::vector<float> dp = np ? download(dparams_t) : std::vector<float>{};
        if (pass == 0) {
            first = grads;
            first_dp = dp;
        } else {
            EXPECT_TRUE(gpu_test::bitwise_equal(first, grads)) << "backward dq/dk/dv not bitwise deterministic";
            EXPECT_TRUE(gpu_test::bitwise_equal(first_dp, dp)) << "dparams not bitwise deterministic";
        }
    }
    const std::vector<float> grads = lay.gather(first, 3);
    r.dq = slice(grads, 0, n);
    r.dk = slice(grads, 1, n);
    r.dv = slice(grads, 2, n);
    r.dparams.resize(np);
    for (size_t i = 0; i < np; i++) r.dparams[i] = (float)((double)first_dp[i] - (double)in.dparams0[i]);
    return r;
}

// fp64 reference on the same inputs; the backward differentiates at the GPU's o.
Result run_cpu(const SketchCase& c, const Inputs& in, const std::vector<float>& gpu_o) {
    const int64_t rows = (int64_t)c.B * c.H * c.T;
    const size_t n = (size_t)rows * c.d;
    PolySketchDims D;
    D.B = c.B; D.H = c.H; D.T = c.T; D.d = c.d;
    D.r = c.r;
    D.block = c.block;
    D.degree = 4;
    D.learned = c.learned;
    D.exact_diag = c.exact_diag;
    std::vector<double> qkv(in.qkv.begin(), in.qkv.end()), dout(in.dout.begin(), in.dout.end());
    std::vector<double> o(n), o_gpu(gpu_o.begin(), gpu_o.end()), den(rows), dq(n), dk(n), dv(n);
    std::vector<double> sketch;
    if (c.learned) {
        sketch.assign(in.params.begin(), in.params.end());
    } else {
        const AttnConfig cfg = config_of(c);
        const std::vector<float> S = polysketch_random_sketch(c.d, c.r, cfg.seed, /*layer=*/0);
        sketch.assign(S.begin(), S.end());
    }
    std::vector<double> dsketch(in.params.size(), 0.0);
    auto cv = [&](const double* p) { return StridedHeads<const double*>{p, (int64_t)c.H * c.T * c.d, (int64_t)c.T * c.d, c.d}; };
    auto mv = [&](double* p) { return StridedHeads<double*>{p, (int64_t)c.H * c.T * c.d, (int64_t)c.T * c.d, c.d}; };
    polysketch_attention_forward<double>(D, mv(o.data()), cv(qkv.data()), cv(qkv.data() + n), cv(qkv.data() + 2 * n),
                                         sketch.data(), den.data());
    polysketch_attention_backward<double>(D, mv(dq.data()), mv(dk.data()), mv(dv.data()),
                                          c.learned ? dsketch.data() : nullptr, cv(dout.data()), cv(qkv.data()),
                                          cv(qkv.data() + n), cv(qkv.data() + 2 * n), cv(o_gpu.data()),
                                          sketch.data(), den.data());
    auto f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    return Result{f(o), f(den), f(dq), f(dk), f(dv), f(dsketch)};
}

class PolySketchCudaVsCpu : public ::testing::TestWithParam<SketchCase> {};

TEST_P(PolySketchCudaVsCpu, ForwardGradientsAndParamGradient) {
    const SketchCase& c = GetParam();
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    const Result gpu = run_gpu(c, in);
    const Result cpu = run_cpu(c, in, gpu.o);
    // fp32: summation order only; bf16: inputs and params identical, outputs rounded to bf16
    const double tol = c.dtype == DType::BF16 ? 3e-2 : 1e-4;
    EXPECT_LE(rel_err(gpu.o, cpu.o), tol) << "o";
    EXPECT_LE(rel_err(gpu.den, cpu.den), 1e-4) << "saved 1 + δ (fp32 in both modes)";
    // dq, dk vanish to rounding noise where a row's own weight dominates (see the file comment)
    constexpr double kGradFloorRms = 1e-2;
    EXPECT_LE(rel_err_floor(gpu.dq, cpu.dq, kGradFloorRms), tol) << "dq";
    EXPECT_LE(rel_err_floor(gpu.dk, cpu.dk, kGradFloorRms), tol) << "dk";
    EXPECT_LE(rel_err(gpu.dv, cpu.dv), tol) << "dv";
    // dparams is fp32 in both modes; in bf16 mode it inherits the o rounding through Δ
    if (c.learned) {
        EXPECT_LE(rel_err(gpu.dparams, cpu.dparams), tol) << "dparams";
    }
}

constexpr DType kBF = DType::BF16, kF32 = DType::F32;
const SketchCase kCases[] = {
    // B, H, T, d, r, block, exact_diag, learned, fused, magnitude, dtype
    {1, 1, 1, 64, 32, 64, true, true, false, 1, kF32},
    {2, 1, 37, 64, 32, 64, false, true, true, 1, kF32},
    {1, 2, 256, 128, 32, 64, true, true, false, 8, kF32},
    {1, 1, 300, 64, 8, 64, false, true, true, 8, kF32},
    {1, 1, 300, 128, 32, 256, false, true, false, 1, kF32},
    {1, 1, 1000, 64, 32, 256, true, false, false, 1, kF32},
    {1, 1, 1000, 128, 16, 256, false, false, true, 8, kF32},
    {1, 1, 1000, 64, 32, 64, false, true, false, 1, kF32},
    {1, 1, 37, 64, 32, 64, true, true, true, 1, kBF},
    {2, 1, 300, 128, 32, 64, false, true, false, 8, kBF},
    {1, 1, 1000, 64, 32, 256, true, true, true, 8, kBF},
    {1, 2, 256, 64, 8, 64, false, false, false, 1, kBF},
    {1, 1, 1000, 128, 32, 64, false, true, true, 1, kBF},
    {1, 1, 1, 128, 32, 256, false, false, true, 1, kBF},
};
std::string param_name(const ::testing::TestParamInfo<SketchCase>& info) { return case_name(info.param); }
INSTANTIATE_TEST_SUITE_P(Cases, PolySketchCudaVsCpu, ::testing::ValuesIn(kCases), param_name);

// exact_diag with one block covering all of T: the sketch is never used and the result is the
// exact polynomial attention (degree 4).
TEST(PolySketchCudaEquivalence, OneExactBlockIsPolynomial) {
    for (DType dt : {DType::F32, DType::BF16}) {
        const SketchCase c{1, 2, 300, 64, 32, 512, true, true, true, 8, dt};
        const Inputs in = make_inputs(c, gpu_test::fresh_seed());
        const Result sk = run_gpu(c, in);
        // polynomial through the same harness: run_gpu of polysketch's test with the polynomial module
        Ops& ops = cuda_ops(dt);
        AttnConfig cfg;
        cfg.name = "polynomial";
        std::unique_ptr<Attention> poly = make_cuda_polynomial_attention(cfg);
        const AttnShape s{c.B, c.H, c.T, c.d};
        const size_t n = s.rows() * c.d;
        const Layout lay{c.B, c.H, c.T, c.d, c.fused};
        Buffer qkv(ops, dt, 3 * n, "test qkv"), dqkv(ops, dt, 3 * n, "test dqkv");
        Buffer o(ops, dt, n, "test o"), dout(ops, dt, n, "test dout");
        Buffer saved(ops, DType::F32, poly->saved_size(s), "test saved");
        Buffer work(ops, DType::F32, poly->workspace_bytes(s) / 4 + 1, "test workspace");
        gpu_test::upload(ops, qkv.t(), lay.scatter(in.qkv, 3));
        gpu_test::upload(ops, dout.t(), lay.scatter(in.dout, 1));
        const HeadTensor q = lay.view(qkv.t(), 0, 3), k = lay.view(qkv.t(), 1, 3), v = lay.view(qkv.t(), 2, 3);
        poly->forward(s, AttnContext{}, lay.view(o.t(), 0, 1), q, k, v, saved.t().f32(), Tensor{}, work.t().ptr);
        poly->backward(s, AttnContext{}, lay.view(dqkv.t(), 0, 3), lay.view(dqkv.t(), 1, 3), lay.view(dqkv.t(), 2, 3),
                       Tensor{}, lay.view(dout.t(), 0, 1), q, k, v, lay.view(o.t(), 0, 1), saved.t().f32(), Tensor{},
                       work.t().ptr);
        ops.synchronize();
        const std::vector<float> po = lay.gather(gpu_test::download(ops, o.t()), 1);
        const std::vector<float> grads = lay.gather(gpu_test::download(ops, dqkv.t()), 3);
        // different summation orders (tiles vs rows): fp32 rounding, or one bf16 ulp of the outputs
        const double tol = dt == DType::BF16 ? 1e-2 : 1e-5;
        EXPECT_LE(rel_err(sk.o, po), tol) << "o " << dtype_name(dt);
        EXPECT_LE(rel_err(sk.dq, slice(grads, 0, n)), tol) << "dq " << dtype_name(dt);
        EXPECT_LE(rel_err(sk.dk, slice(grads, 1, n)), tol) << "dk " << dtype_name(dt);
        EXPECT_LE(rel_err(sk.dv, slice(grads, 2, n)), tol) << "dv " << dtype_name(dt);
        for (float g : sk.dparams) ASSERT_EQ(g, 0.0f) << "the sketch is unused: its gradient must be 0";
    }
}

TEST(PolySketchCudaChecks, RefusesBadConfigs) {
    AttnConfig cfg;
    cfg.name = "polysketch";
    cfg.degree = 3;
    EXPECT_THROW(make_cuda_polysketch_attention(cfg), std::runtime_error);
    cfg.degree = 4;
    cfg.sketch_size = 0;
    EXPECT_THROW(make_cuda_polysketch_attention(cfg), std::runtime_error);
}

}  // namespace
