// GPU tests of the CUDA `performer` (FAVOR+, cuda/attention/performer.cu): forward output, the
// saved (R, cq, ck) and dq/dk/dv against the CPU reference (make_cpu_attention "performer", fp32)
// on identical inputs (rounded to bf16 first in bf16 mode), over lengths that are and are not
// multiples of the 64-position chunk (1, 37, 64, 200, 1000), head dims 64 and 128, m = 16, 100
// and 256 features, the contiguous (B,H,T,d) layout and the model's strided views into a fused
// (B,T,3,H,d) qkv buffer, inputs scaled ×1 and ×8 (×8: a huge dynamic range of the features and
// of the key stabiliser). Also: Ω follows the step (same draw → bitwise the same outputs, a new
// draw or another layer → other outputs, each equal to the CPU's), forward and backward are
// bitwise deterministic, mixed dtypes are refused.
//
// Outputs, saved buffer and workspace are poisoned with NaN before every launch, so an element a
// kernel forgets to write fails the comparison. Error measure: ‖gpu − cpu‖ / ‖cpu‖ in double;
// for dq and dk with an rms floor of 1e-3 on the denominator: at T = 1 they vanish identically
// (o_0 = v_0 whatever q and k), and both sides hold rounding noise (~1e-5 rms; typical dq ~1).
// The CPU backward is given the GPU's output o (g_i[d] = −dO_i·o_i/R_i uses it; with bf16 o the
// rounding would otherwise enter dO·(v_j − o_i), which cancels for nearly one-hot rows at ×8).
#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "cuda/attention/cuda_variants.cuh"
#include "ops.h"
#include "rng.h"

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

using gpu_test::cuda_ops;
using gpu_test::Layout;
using gpu_test::round_bf16;
using gpu_test::slice;

struct PerfCase {
    int B, H, T, d, m;
    bool fused;       // q/k/v as views into (B,T,3,H,d) and o as (B,T,H,d)
    float magnitude;  // inputs ~ N(0, magnitude²)
    DType dtype;
};

std::string case_name(const PerfCase& c) {
    char name[128];
    std::snprintf(name, sizeof name, "B%dH%dT%dd%dm%d_%s_x%d_%s", c.B, c.H, c.T, c.d, c.m,
                  c.fused ? "fused" : "contig", (int)c.magnitude, dtype_name(c.dtype));
    return name;
}

AttnConfig config_of(const PerfCase& c) {
    AttnConfig cfg;
    cfg.name = "performer";
    cfg.features = c.m;
    cfg.redraw = 10;
    return cfg;
}

// Fresh canonical q,k,v (3 × B,H,T,d) and dout (B,H,T,d), bf16-rounded in bf16 mode.
struct Inputs {
    std::vector<float> qkv, dout;
};
Inputs make_inputs(const PerfCase& c, uint64_t seed) {
    Rng rng(seed);
    const size_t n = (size_t)c.B * c.H * c.T * c.d;
    Inputs in{std::vector<float>(3 * n), std::vector<float>(n)};
    auto fill = [&](std::vector<float>& v, float mag) {
        for (float& x : v) {
            x = rng.normal() * mag;
            if (c.dtype == DType::BF16) x = round_bf16(x);
        }
    };
    fill(in.qkv, c.magnitude);
    fill(in.dout, 1.0f);
    return in;
}

// Everything one forward + backward produces, in canonical (B,H,T,d) / saved order.
struct AttnResult {
    std::vector<float> o, saved, dq, dk, dv;
};

// Forward twice and backward twice on the GPU (each pair must be bitwise equal), with everything
// written poisoned first. `attn` may be reused across calls (its Ω cache is under test).
AttnResult run_gpu(Attention& attn, const PerfCase& c, const AttnContext& ctx, const Inputs& in) {
    Ops& ops = cuda_ops(c.dtype);
    const AttnShape s{c.B, c.H, c.T, c.d};
    const size_t n = s.rows() * c.d;
    const Layout lay{c.B, c.H, c.T, c.d, c.fused};

    Buffer qkv(ops, c.dtype, 3 * n, "test qkv"), dqkv(ops, c.dtype, 3 * n, "test dqkv");
    Buffer o(ops, c.dtype, n, "test o"), dout(ops, c.dtype, n, "test dout");
    Buffer saved(ops, DType::F32, attn.saved_size(s), "test saved");
    Buffer work(ops, DType::F32, attn.workspace_bytes(s) / 4 + 1, "test workspace");
    gpu_test::upload(ops, qkv.t(), lay.scatter(in.qkv, 3));
    gpu_test::upload(ops, dout.t(), lay.scatter(in.dout, 1));
    const Tensor qkv_t = qkv.t(), dqkv_t = dqkv.t();
    const HeadTensor q = lay.view(qkv_t, 0, 3), k = lay.view(qkv_t, 1, 3), v = lay.view(qkv_t, 2, 3);
    const HeadTensor dq = lay.view(dqkv_t, 0, 3), dk = lay.view(dqkv_t, 1, 3), dv = lay.view(dqkv_t, 2, 3);
    const HeadTensor o_view = lay.view(o.t(), 0, 1), dout_view = lay.view(dout.t(), 0, 1);
    auto download = [&](const Buffer& b) {
        ops.synchronize();
        return gpu_test::download(ops, b.t());
    };

    AttnResult r;
    for (int pass = 0; pass < 2; pass++) {
        gpu_test::poison(ops, o.t());
        gpu_test::poison(ops, saved.t());
        gpu_test::poison(ops, work.t());
        attn.forward(s, ctx, o_view, q, k, v, saved.t().f32(), Tensor{}, work.t().ptr);
        std::vector<float> o_img = download(o), saved_img = download(saved);
        if (pass == 0) {
            r.o = lay.gather(o_img, 1);
            r.saved = saved_img;
        } else {
            EXPECT_TRUE(gpu_test::bitwise_equal(r.o, lay.gather(o_img, 1))) << "forward o is not bitwise deterministic";
            EXPECT_TRUE(gpu_test::bitwise_equal(r.saved, saved_img)) << "saved is not bitwise deterministic";
        }
    }

    std::vector<float> first;
    for (int pass = 0; pass < 2; pass++) {
        gpu_test::poison(ops, dqkv_t);
        gpu_test::poison(ops, work.t());
        attn.backward(s, ctx, dq, dk, dv, Tensor{}, dout_view, q, k, v, o_view, saved.t().f32(),
                      Tensor{}, work.t().ptr);
        std::vector<float> grads = download(dqkv);
        if (pass == 0)
            first = grads;
        else
            EXPECT_TRUE(gpu_test::bitwise_equal(first, grads)) << "backward is not bitwise deterministic";
    }
    const std::vector<float> grads = lay.gather(first, 3);
    r.dq = slice(grads, 0, n);
    r.dk = slice(grads, 1, n);
    r.dv = slice(grads, 2, n);
    return r;
}

AttnResult run_gpu(const PerfCase& c, const AttnContext& ctx, const Inputs& in) {
    std::unique_ptr<Attention> attn = make_cuda_performer_attention(config_of(c));
    return run_gpu(*attn, c, ctx, in);
}

// The CPU reference on the same inputs; its backward uses the GPU's output `gpu_o` (see top).
AttnResult run_cpu(const PerfCase& c, const AttnContext& ctx, const Inputs& in,
                   const std::vector<float>& gpu_o) {
    std::unique_ptr<Attention> attn = make_cpu_attention(config_of(c));
    const AttnShape s{c.B, c.H, c.T, c.d};
    const size_t n = s.rows() * c.d;
    std::vector<float> qkv = in.qkv, dout = in.dout, o_gpu = gpu_o;
    auto view = [&](float* p) { return head_tensor_bhtd(p, DType::F32, c.H, c.T, c.d); };
    std::vector<char> work(attn->workspace_bytes(s) + 16);
    AttnResult r;
    r.o.resize(n);
    r.saved.resize(attn->saved_size(s));
    attn->forward(s, ctx, view(r.o.data()), view(qkv.data()), view(qkv.data() + n),
                  view(qkv.data() + 2 * n), r.saved.data(), Tensor{}, work.data());
    r.dq.resize(n);
    r.dk.resize(n);
    r.dv.resize(n);
    attn->backward(s, ctx, view(r.dq.data()), view(r.dk.data()), view(r.dv.data()), Tensor{},
                   view(dout.data()), view(qkv.data()), view(qkv.data() + n),
                   view(qkv.data() + 2 * n), view(o_gpu.data()), r.saved.data(), Tensor{}, work.data());
    return r;
}

// Tolerances of ‖gpu − cpu‖/‖cpu‖. Both sides compute in fp32 on identical inputs; they differ
// by summation order (and expf vs std::exp), which the feature map's exp amplifies by the logit
// magnitude (|a| ~ 250 at ×8; measured fp32 vs fp64 on the CPU at ×8: o ~1e-5, dq up to 2e-4).
// bf16 outputs add their rounding (2^-9 relative at most).
struct Tolerance {
    double out, dq, saved;
};
Tolerance tolerance(const PerfCase& c) {
    const bool big = c.magnitude > 1;
    if (c.dtype == DType::BF16) return Tolerance{1e-2, 1e-2, big ? 1e-3 : 1e-4};
    return big ? Tolerance{1e-3, 2e-3, 1e-3} : Tolerance{1e-4, 1e-4, 1e-4};
}

using gpu_test::rel_err_floor;

void expect_close(const PerfCase& c, const AttnResult& gpu, const AttnResult& cpu) {
    const Tolerance tol = tolerance(c);
    const size_t rows = (size_t)c.B * c.H * c.T;
    EXPECT_LE(rel_err(gpu.o, cpu.o), tol.out) << "o";
    EXPECT_LE(rel_err(slice(gpu.saved, 0, rows), slice(cpu.saved, 0, rows)), tol.saved) << "saved R";
    EXPECT_LE(rel_err(slice(gpu.saved, 1, rows), slice(cpu.saved, 1, rows)), tol.saved) << "saved cq";
    EXPECT_LE(rel_err(slice(gpu.saved, 2, rows), slice(cpu.saved, 2, rows)), tol.saved) << "saved ck";
    // At T=1, o = v exactly, so dq and dk are zero by math and both sides hold rounding noise
    // only: measure them against a floor of 10% of dv's rms (far below dq's size when T > 1).
    double dv_rms = 0.0;
    for (float x : cpu.dv) dv_rms += (double)x * x;
    const double floor_rms = std::max(1e-3, 0.1 * std::sqrt(dv_rms / std::max<size_t>(1, cpu.dv.size())));
    EXPECT_LE(rel_err_floor(gpu.dq, cpu.dq, floor_rms), tol.dq) << "dq";
    EXPECT_LE(rel_err_floor(gpu.dk, cpu.dk, floor_rms), tol.out) << "dk";
    EXPECT_LE(rel_err(gpu.dv, cpu.dv), tol.out) << "dv";
}

// ---------------------------------------------------------------- GPU vs CPU reference
class PerformerCudaVsCpu : public ::testing::TestWithParam<PerfCase> {};

TEST_P(PerformerCudaVsCpu, ForwardSavedAndGradients) {
    const PerfCase& c = GetParam();
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    const AttnContext ctx{0, 3};
    const AttnResult gpu = run_gpu(c, ctx, in);
    const AttnResult cpu = run_cpu(c, ctx, in, gpu.o);
    expect_close(c, gpu, cpu);
}

constexpr DType kBF = DType::BF16, kF32 = DType::F32;
// Each T in {1, 37, 64, 200, 1000} meets both head dims, m in {16, 256} (and 100: not a multiple
// of the 64-feature tile nor of d), both layouts and both magnitudes somewhere in the list.
const PerfCase kCases[] = {
    {1, 1, 1, 64, 256, false, 1, kBF},    {2, 3, 1, 128, 16, true, 8, kBF},
    {2, 3, 37, 128, 16, true, 8, kBF},    {1, 2, 37, 64, 256, false, 1, kBF},
    {1, 2, 64, 64, 16, true, 1, kBF},     {2, 1, 64, 128, 256, false, 8, kBF},
    {2, 1, 200, 128, 256, false, 8, kBF}, {2, 2, 200, 64, 256, true, 1, kBF},
    {1, 3, 1000, 64, 256, true, 8, kBF},  {1, 1, 1000, 128, 16, false, 1, kBF},
    {1, 1, 1000, 128, 256, true, 1, kBF}, {1, 2, 200, 64, 100, false, 8, kBF},
    // fp32 path
    {1, 1, 1, 128, 16, true, 1, kF32},    {2, 3, 37, 64, 256, false, 8, kF32},
    {2, 1, 64, 64, 256, true, 1, kF32},   {1, 2, 200, 128, 256, true, 1, kF32},
    {1, 1, 1000, 64, 16, true, 8, kF32},  {2, 1, 64, 128, 256, false, 8, kF32},
    {1, 1, 1000, 128, 256, false, 1, kF32}, {1, 2, 200, 64, 100, true, 8, kF32},
    {1, 1, 1000, 64, 256, false, 8, kF32},
};

std::string param_name(const ::testing::TestParamInfo<PerfCase>& info) { return case_name(info.param); }

INSTANTIATE_TEST_SUITE_P(PerformerCuda, PerformerCudaVsCpu, ::testing::ValuesIn(kCases), param_name);

// ---------------------------------------------------------------- Ω follows the step and layer
// One GPU module across calls: steps 0 and 5 share a draw (redraw = 10) and must give bitwise the
// same results; step 10 redraws, layer 1 has its own Ω; each matches the CPU at its (layer, step).
TEST(PerformerCudaRedraw, FeaturesFollowStepAndLayer) {
    const PerfCase c{1, 2, 200, 64, 256, false, 1, kF32};
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    std::unique_ptr<Attention> attn = make_cuda_performer_attention(config_of(c));
    const AttnResult step0 = run_gpu(*attn, c, AttnContext{0, 0}, in);
    const AttnResult step10 = run_gpu(*attn, c, AttnContext{0, 10}, in);
    const AttnResult layer1 = run_gpu(*attn, c, AttnContext{1, 0}, in);
    const AttnResult step5 = run_gpu(*attn, c, AttnContext{0, 5}, in);
    EXPECT_TRUE(gpu_test::bitwise_equal(step0.o, step5.o)) << "same draw, other output";
    EXPECT_TRUE(gpu_test::bitwise_equal(step0.dq, step5.dq)) << "same draw, other dq";
    EXPECT_GT(rel_err(step10.o, step0.o), 1e-3) << "step 10 did not redraw Ω";
    EXPECT_GT(rel_err(layer1.o, step0.o), 1e-3) << "layer 1 uses layer 0's Ω";
    expect_close(c, step0, run_cpu(c, AttnContext{0, 0}, in, step0.o));
    expect_close(c, step10, run_cpu(c, AttnContext{0, 10}, in, step10.o));
    expect_close(c, layer1, run_cpu(c, AttnContext{1, 0}, in, layer1.o));
}

// ---------------------------------------------------------------- refused configurations
TEST(PerformerCudaChecks, RefusesMixedDtypes) {
    Ops& ops = cuda_ops(DType::BF16);
    const AttnShape s{1, 1, 16, 64};
    Buffer a(ops, DType::BF16, 3 * s.rows() * s.d, "test bf16");
    Buffer f(ops, DType::F32, s.rows() * s.d, "test f32");
    std::unique_ptr<Attention> attn = make_cuda_performer_attention(config_of({1, 1, 16, 64, 16, false, 1, kBF}));
    Buffer saved(ops, DType::F32, attn->saved_size(s), "test saved");
    Buffer work(ops, DType::F32, attn->workspace_bytes(s) / 4 + 1, "test workspace");
    const HeadTensor t = head_tensor_bhtd(a.t().ptr, DType::BF16, s.H, s.T, s.d);
    const HeadTensor o = head_tensor_bhtd(f.t().ptr, DType::F32, s.H, s.T, s.d);
    EXPECT_THROW(attn->forward(s, AttnContext{}, o, t, t, t, saved.t().f32(), Tensor{}, work.t().ptr),
                 std::runtime_error);
}

TEST(PerformerCudaChecks, RefusesNoFeatures) {
    AttnConfig cfg;
    cfg.name = "performer";
    cfg.features = 0;
    EXPECT_THROW(make_cuda_performer_attention(cfg), std::runtime_error);
}

}  // namespace
