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
#include "attn_gpu_harness.h"
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

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

using gpu_test::cuda_ops;
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

using Inputs = gpu_test::AttnInputs;
using AttnResult = gpu_test::AttnRun;  // saved = (R, cq, ck), each B·H·T

// Fresh canonical q,k,v (3 × B,H,T,d) and dout (B,H,T,d), bf16-rounded in bf16 mode.
Inputs make_inputs(const PerfCase& c, uint64_t seed) { return gpu_test::random_attn_inputs(c, seed); }

// Forward twice and backward twice on the GPU (each pair must be bitwise equal), with everything
// written poisoned first. `attn` may be reused across calls (its Ω cache is under test).
AttnResult run_gpu(Attention& attn, const PerfCase& c, const AttnContext& ctx, const Inputs& in) {
    gpu_test::AttnRunOptions opt;
    opt.ctx = ctx;
    opt.forward_passes = 2;
    opt.poison_workspace_in_forward = true;
    return gpu_test::run_gpu_attention(attn, c, in, opt);
}

AttnResult run_gpu(const PerfCase& c, const AttnContext& ctx, const Inputs& in) {
    std::unique_ptr<Attention> attn = make_cuda_performer_attention(config_of(c));
    return run_gpu(*attn, c, ctx, in);
}

// The CPU reference on the same inputs; its backward uses the GPU's output `gpu_o` (see top).
AttnResult run_cpu(const PerfCase& c, const AttnContext& ctx, const Inputs& in,
                   const std::vector<float>& gpu_o) {
    return gpu_test::run_cpu_attention(c, config_of(c), ctx, in, gpu_o);
}

// Tolerances of ‖gpu − cpu‖/‖cpu‖. Both sides compute in fp32 on identical inputs; they differ
// by summation order (and expf vs std::exp), which the feature map's exp amplifies by the logit
// magnitude (|a| ~ 250 at ×8; measured fp32 vs fp64 on the CPU at ×8: o ~1e-5, dq up to 2e-4).
// bf16 outputs add their rounding (2^-9 relative at most), and the bf16 path rounds the features,
// the chunk scores and the forward's states to bf16 for the tensor cores. Measured over 4 × 12
// bf16 cases (fresh seeds): o, dv ≤ 3.4e-3, dq ≤ 7.1e-3, dk ≤ 5.2e-3; the saved normaliser R (fp32)
// ≤ 4.7e-3 (at T = 1 one rounded chunk score and one product of rounded features, no averaging).
// So bf16: 1e-2 for o, dv and R, 2e-2 for dq and dk (as flash's and hyper's bf16 tests).
struct Tolerance {
    double out, grad, saved;
};
Tolerance tolerance(const PerfCase& c) {
    const bool big = c.magnitude > 1;
    if (c.dtype == DType::BF16) return Tolerance{1e-2, 2e-2, 1e-2};
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
    const double floor_rms = std::max(1e-3, 0.1 * gpu_test::rms(cpu.dv));
    EXPECT_LE(rel_err_floor(gpu.dq, cpu.dq, floor_rms), tol.grad) << "dq";
    EXPECT_LE(rel_err_floor(gpu.dk, cpu.dk, floor_rms), tol.grad) << "dk";
    EXPECT_LE(rel_err(gpu.dv, cpu.dv), tol.out) << "dv";
    // the measured errors, for choosing tolerances from what was seen
    std::printf("  errors: o %.2e  R %.2e  dq %.2e  dk %.2e  dv %.2e\n", rel_err(gpu.o, cpu.o),
                rel_err(slice(gpu.saved, 0, rows), slice(cpu.saved, 0, rows)),
                rel_err_floor(gpu.dq, cpu.dq, floor_rms), rel_err_floor(gpu.dk, cpu.dk, floor_rms),
                rel_err(gpu.dv, cpu.dv));
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

// A workspace sized for bf16 (AttnShape::dtype) is too small for fp32 tensors: refused, not overrun.
TEST(PerformerCudaChecks, RefusesTensorsWiderThanTheShape) {
    Ops& ops = cuda_ops(DType::F32);
    const AttnShape s{1, 1, 16, 64, DType::BF16};
    Buffer x(ops, DType::F32, 4 * s.rows() * s.d, "test f32");
    std::unique_ptr<Attention> attn = make_cuda_performer_attention(config_of({1, 1, 16, 64, 16, false, 1, kF32}));
    Buffer saved(ops, DType::F32, attn->saved_size(s), "test saved");
    Buffer work(ops, DType::F32, attn->workspace_bytes(s) / 4 + 1, "test workspace");
    const HeadTensor t = head_tensor_bhtd(x.t().ptr, DType::F32, s.H, s.T, s.d);
    EXPECT_THROW(attn->forward(s, AttnContext{}, t, t, t, t, saved.t().f32(), Tensor{}, work.t().ptr),
                 std::runtime_error);
    AttnShape wide = s;
    wide.dtype = DType::F32;
    EXPECT_GT(attn->workspace_bytes(wide), attn->workspace_bytes(s));
}

TEST(PerformerCudaChecks, RefusesNoFeatures) {
    AttnConfig cfg;
    cfg.name = "performer";
    cfg.features = 0;
    EXPECT_THROW(make_cuda_performer_attention(cfg), std::runtime_error);
}

}  // namespace
