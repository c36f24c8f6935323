// GPU tests of the CUDA flash attention (cuda/attention/flash.cu), variants `softmax` and `local`:
// forward output, LSE and dq/dk/dv against the CPU reference (make_cpu_attention, fp32 with
// double accumulators) on the same inputs — rounded to bf16 first in bf16 mode — over ragged
// lengths, both head dims, the contiguous (B,H,T,d) layout and the model's strided view into a
// fused (B,T,3,H,d) qkv buffer, and inputs scaled ×1 and ×8 (large logits). Also: `local` with
// W >= T equals `softmax`, the backward is bitwise deterministic, and bad head dims are refused.
// On an H100 the bf16 forward and dQ run the Hopper wgmma kernels (flash_wgmma.cu) in all of these;
// the mma.sync ones (every other GPU) are checked against them on the same inputs (FLASH_KERNELS=mma).
//
// Outputs are poisoned with NaN before every launch, so an element the kernel forgets to write
// fails the comparison. Error measure: ‖gpu − cpu‖ / ‖cpu‖ in double per tensor.
//
// The CPU backward is given the GPU's output O (Δ = Σ dO·O uses it), so both sides differentiate
// the same forward: with bf16 O rounded, Δ would otherwise differ by O's rounding error, which at
// ×8 inputs (nearly one-hot rows, where dP − Δ cancels) is larger than the gradient itself.
// Even so, at ×8 every row of a short sequence can be one-hot: dq and dk then vanish to ~1e-3 of
// dv, and what is left is rounding of the logits (|S| ~ 700) on both sides — on one such input
// (T = 17, d = 128, seed 3112653598) an fp32 reference is itself 4% off an fp64 one and the GPU
// 8.7% off the CPU. So dq and dk are measured against a floor of 1e-2 × rms(dv) on the
// denominator (rel_err_floor): the plain relative error wherever the gradient is not vanishing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "attn_gpu_harness.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/attention/flash_wgmma.cuh"
#include "gpu_test_util.h"
#include "ops.h"

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

// ---------------------------------------------------------------- helpers
using gpu_test::cuda_ops;

std::unique_ptr<Attention> make_gpu_attention(const AttnConfig& cfg) {
    return cfg.name == "local" ? make_cuda_local_attention(cfg) : make_cuda_softmax_attention(cfg);
}

struct FlashCase {
    const char* variant;  // "softmax" or "local"
    int window;           // local only
    int B, H, T, d;
    bool fused;       // q/k/v as views into (B,T,3,H,d) and o as (B,T,H,d)
    float magnitude;  // inputs ~ N(0, magnitude²)
    DType dtype;
};

std::string case_name(const FlashCase& c) {
    char name[128];
    std::snprintf(name, sizeof name, "%s%s_B%dH%dT%dd%d_%s_x%d_%s", c.variant,
                  c.variant[0] == 'l' ? ("W" + std::to_string(c.window)).c_str() : "", c.B, c.H,
                  c.T, c.d, c.fused ? "fused" : "contig", (int)c.magnitude, dtype_name(c.dtype));
    return name;
}

using Inputs = gpu_test::AttnInputs;
using AttnResult = gpu_test::AttnRun;  // saved = the LSE (B,H,T)

// Fresh inputs of a case: canonical q,k,v (3 × B,H,T,d) and dout (B,H,T,d), bf16-rounded in bf16 mode.
Inputs make_inputs(const FlashCase& c, uint64_t seed) { return gpu_test::random_attn_inputs(c, seed); }

// Runs forward once and backward twice (checking the two backward passes are bitwise equal) on the GPU.
AttnResult run_gpu(const FlashCase& c, const AttnConfig& cfg, const Inputs& in) {
    std::unique_ptr<Attention> attn = make_gpu_attention(cfg);
    return gpu_test::run_gpu_attention(*attn, c, in);
}

// The CPU reference on the same inputs; the backward uses the GPU's output `gpu_o` (see top).
AttnResult run_cpu(const FlashCase& c, const AttnConfig& cfg, const Inputs& in,
                   const std::vector<float>& gpu_o) {
    return gpu_test::run_cpu_attention(c, cfg, AttnContext{}, in, gpu_o);
}

AttnConfig config_of(const FlashCase& c) {
    AttnConfig cfg;
    cfg.name = c.variant;
    cfg.window = c.window;
    return cfg;
}

// ---------------------------------------------------------------- GPU vs CPU reference
class FlashAttentionVsCpu : public ::testing::TestWithParam<FlashCase> {};

TEST_P(FlashAttentionVsCpu, ForwardLseAndGradients) {
    const FlashCase& c = GetParam();
    const AttnConfig cfg = config_of(c);
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    const AttnResult gpu = run_gpu(c, cfg, in);
    const AttnResult cpu = run_cpu(c, cfg, in, gpu.o);

    // bf16: O, P and dS are rounded to bf16 (2^-9 relative) before the products that use them
    const bool bf16 = c.dtype == DType::BF16;
    const double tol = bf16 ? 2e-2 : 1e-4;
    const double tol_lse = bf16 ? 1e-3 : 1e-5;  // the LSE is fp32 in both modes
    EXPECT_LE(rel_err(gpu.o, cpu.o), tol) << "o";
    EXPECT_LE(rel_err(gpu.saved, cpu.saved), tol_lse) << "lse";
    const double floor_rms = 1e-2 * gpu_test::rms(cpu.dv);
    EXPECT_LE(gpu_test::rel_err_floor(gpu.dq, cpu.dq, floor_rms), tol) << "dq";
    EXPECT_LE(gpu_test::rel_err_floor(gpu.dk, cpu.dk, floor_rms), tol) << "dk";
    EXPECT_LE(rel_err(gpu.dv, cpu.dv), tol) << "dv";
}

constexpr DType kBF = DType::BF16, kF32 = DType::F32;
// Each T in {1, 17, 64, 127, 128, 1000, 2048} with both head dims; B, H, layout and magnitude
// vary across the list so every value meets the others somewhere. B·H is kept small at large T
// (the CPU reference is O(T²)).
const FlashCase kSoftmaxCases[] = {
    {"softmax", 0, 1, 1, 1, 64, false, 1, kBF},     {"softmax", 0, 2, 3, 1, 128, true, 8, kBF},
    {"softmax", 0, 2, 3, 17, 64, true, 1, kBF},     {"softmax", 0, 1, 1, 17, 128, false, 8, kBF},
    {"softmax", 0, 1, 3, 64, 64, false, 8, kBF},    {"softmax", 0, 2, 1, 64, 128, true, 1, kBF},
    {"softmax", 0, 2, 1, 127, 64, false, 1, kBF},   {"softmax", 0, 1, 3, 127, 128, true, 8, kBF},
    {"softmax", 0, 1, 1, 128, 64, true, 8, kBF},    {"softmax", 0, 2, 3, 128, 128, false, 1, kBF},
    {"softmax", 0, 1, 3, 1000, 64, true, 1, kBF},   {"softmax", 0, 2, 1, 1000, 128, false, 8, kBF},
    {"softmax", 0, 1, 1, 2048, 64, false, 8, kBF},  {"softmax", 0, 1, 1, 2048, 128, true, 1, kBF},
    // fp32 path
    {"softmax", 0, 1, 1, 1, 64, true, 1, kF32},     {"softmax", 0, 2, 3, 17, 128, false, 8, kF32},
    {"softmax", 0, 1, 3, 127, 64, true, 1, kF32},   {"softmax", 0, 2, 1, 1000, 128, true, 8, kF32},
};
// W in {1, 16, 100, >= T}: W = 1 is attention to oneself only (o = v, dq = dk = 0: the error is
// then absolute, so those cases use ×1 inputs), window edges inside and across tiles, and windows
// that cover everything.
const FlashCase kLocalCases[] = {
    {"local", 1, 2, 3, 127, 64, true, 1, kBF},      {"local", 1, 1, 1, 1000, 128, false, 1, kBF},
    {"local", 16, 1, 3, 17, 128, false, 1, kBF},    {"local", 16, 2, 1, 1000, 64, true, 8, kBF},
    {"local", 16, 1, 1, 2048, 128, true, 1, kBF},   {"local", 100, 2, 3, 128, 64, false, 8, kBF},
    {"local", 100, 1, 1, 2048, 128, true, 1, kBF},  {"local", 100, 1, 3, 1000, 64, false, 1, kBF},
    {"local", 100, 2, 1, 64, 128, true, 8, kBF},    {"local", 64, 1, 3, 64, 64, true, 1, kBF},
    {"local", 5000, 1, 1, 1000, 128, false, 8, kBF}, {"local", 16, 2, 1, 1, 64, false, 1, kBF},
    // fp32 path
    {"local", 1, 1, 3, 17, 64, false, 1, kF32},     {"local", 16, 1, 1, 1000, 64, true, 8, kF32},
    {"local", 100, 2, 3, 128, 128, false, 1, kF32},
};

std::string param_name(const ::testing::TestParamInfo<FlashCase>& info) { return case_name(info.param); }

INSTANTIATE_TEST_SUITE_P(Softmax, FlashAttentionVsCpu, ::testing::ValuesIn(kSoftmaxCases), param_name);
INSTANTIATE_TEST_SUITE_P(Local, FlashAttentionVsCpu, ::testing::ValuesIn(kLocalCases), param_name);

// ---------------------------------------------------------------- local with W >= T is softmax
class FlashAttentionLocalWide : public ::testing::TestWithParam<FlashCase> {};

TEST_P(FlashAttentionLocalWide, EqualsSoftmax) {
    const FlashCase& c = GetParam();  // variant "local", window >= T
    ASSERT_GE(c.window, c.T);
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    const AttnResult local = run_gpu(c, config_of(c), in);
    FlashCase sc = c;
    sc.variant = "softmax";
    const AttnResult softmax = run_gpu(sc, config_of(sc), in);
    // the window kernel visits the same tiles in the same order: equal up to rounding at most
    EXPECT_LE(rel_err(local.o, softmax.o), 1e-6);
    EXPECT_LE(rel_err(local.saved, softmax.saved), 1e-6);
    EXPECT_LE(rel_err(local.dq, softmax.dq), 1e-6);
    EXPECT_LE(rel_err(local.dk, softmax.dk), 1e-6);
    EXPECT_LE(rel_err(local.dv, softmax.dv), 1e-6);
}

const FlashCase kWideCases[] = {
    {"local", 1000, 1, 3, 1000, 64, true, 1, kBF},
    {"local", 1270, 2, 1, 127, 128, false, 8, kBF},
    {"local", 300, 1, 1, 300, 64, false, 1, kF32},
};
INSTANTIATE_TEST_SUITE_P(Wide, FlashAttentionLocalWide, ::testing::ValuesIn(kWideCases), param_name);

// ---------------------------------------------------------------- the two kinds of bf16 kernels
// The wgmma forward and dQ (default on compute capability 9.0) and the mma.sync ones
// (FLASH_KERNELS=mma) on the same inputs: the same algorithm with other summation orders, so O
// agrees to bf16 rounding of P and O, the fp32 LSE to fp32 rounding, dq to bf16 rounding of dS.
class FlashForwardKernels : public ::testing::TestWithParam<FlashCase> {};

TEST_P(FlashForwardKernels, WgmmaEqualsMmaSync) {
    if (!flash_wgmma_supported()) GTEST_SKIP() << "not a compute-capability-9.0 GPU: no wgmma forward";
    const FlashCase& c = GetParam();
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    ASSERT_EQ(setenv("FLASH_KERNELS", "mma", 1), 0);
    const AttnResult mma = run_gpu(c, config_of(c), in);
    ASSERT_EQ(setenv("FLASH_KERNELS", "wgmma", 1), 0);
    const AttnResult wg = run_gpu(c, config_of(c), in);
    unsetenv("FLASH_KERNELS");
    EXPECT_LE(rel_err(wg.o, mma.o), 1e-2) << "o";
    EXPECT_LE(rel_err(wg.saved, mma.saved), 1e-5) << "lse";
    EXPECT_LE(rel_err(wg.dv, mma.dv), 2e-2) << "dv";
    EXPECT_LE(gpu_test::rel_err_floor(wg.dq, mma.dq, 1e-2 * gpu_test::rms(mma.dv)), 2e-2) << "dq";
    EXPECT_LE(gpu_test::rel_err_floor(wg.dk, mma.dk, 1e-2 * gpu_test::rms(mma.dv)), 2e-2) << "dk";
}

const FlashCase kKernelCases[] = {
    {"softmax", 0, 2, 3, 1000, 64, true, 1, kBF},  {"softmax", 0, 1, 2, 2048, 128, false, 8, kBF},
    {"softmax", 0, 1, 1, 127, 64, false, 8, kBF},  {"local", 100, 1, 2, 2048, 64, false, 1, kBF},
    {"local", 300, 2, 1, 1000, 128, true, 1, kBF},
};
INSTANTIATE_TEST_SUITE_P(Bf16, FlashForwardKernels, ::testing::ValuesIn(kKernelCases), param_name);

// ---------------------------------------------------------------- refused configurations
TEST(FlashAttentionChecks, RefusesUnsupportedHeadDim) {
    Ops& ops = cuda_ops(DType::BF16);
    const AttnShape s{1, 1, 16, 96};
    Buffer buf(ops, DType::BF16, 4 * s.rows() * s.d, "test buffer");
    Buffer lse(ops, DType::F32, s.rows(), "test lse");
    const HeadTensor t = head_tensor_bhtd(buf.t().ptr, DType::BF16, s.H, s.T, s.d);
    std::unique_ptr<Attention> attn = make_cuda_softmax_attention(AttnConfig{});
    EXPECT_THROW(attn->forward(s, AttnContext{}, t, t, t, t, lse.t().f32(), Tensor{}, nullptr),
                 std::runtime_error);
}

TEST(FlashAttentionChecks, RefusesEmptyWindow) {
    AttnConfig cfg;
    cfg.name = "local";
    cfg.window = 0;
    EXPECT_THROW(make_cuda_local_attention(cfg), std::runtime_error);
}

}  // namespace
