// GPU tests of the CUDA causal HyperAttention (cuda/attention/hyper.cu): forward output, saved
// LSE and dq/dk/dv against the CPU reference `hyper` (src/attention/hyper.cpp, fp64 math) on the
// same inputs — rounded to bf16 first in bf16 mode, so both sides hash identical values (both hash
// in fp64, so buckets agree) — over recursion depths (T in {37, 300, 1000}, min_seq in {8, 64}),
// block sizes {4, 16, 64} (ragged last blocks, blocks larger than a quadrant), samples {0, 5, 32},
// lsh_bits {0, 3, 7}, both head dims, the contiguous (B,H,T,d) layout and the model's strided
// views into a fused (B,T,3,H,d) qkv buffer, inputs ×1 and ×8, non-zero (layer, step), fp32 and
// bf16. Also: T <= min_seq is bitwise the CUDA `softmax`; forward and backward are bitwise
// deterministic; bad head dims are refused.
//
// Outputs (and the workspace) are poisoned with NaN before every launch, so an element the kernels
// forget to write fails the comparison. Error: ‖gpu − cpu‖ / ‖cpu‖ in double per tensor. As in
// test_flash_gpu.cpp, the CPU backward is given the GPU's O, so both differentiate the same forward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "attn_gpu_harness.h"
#include "cuda/attention/cuda_variants.cuh"
#include "gpu_test_util.h"
#include "ops.h"

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

using gpu_test::cuda_ops;

struct HyperCase {
    int T, min_seq, block, samples, lsh_bits;
    int B, H, d;
    bool fused;
    float magnitude;
    DType dtype;
    int layer;
    int64_t step;
};

std::string case_name(const HyperCase& c) {
    char name[160];
    std::snprintf(name, sizeof name, "T%d_n0_%d_b%d_m%d_r%d_B%dH%dd%d_%s_x%d_%s_L%dS%lld", c.T, c.min_seq, c.block,
                  c.samples, c.lsh_bits, c.B, c.H, c.d, c.fused ? "fused" : "contig", (int)c.magnitude,
                  dtype_name(c.dtype), c.layer, (long long)c.step);
    return name;
}

AttnConfig config_of(const HyperCase& c) {
    AttnConfig cfg;
    cfg.name = "hyper";
    cfg.min_seq = c.min_seq;
    cfg.block = c.block;
    cfg.samples = c.samples;
    cfg.lsh_bits = c.lsh_bits;
    return cfg;
}

using Inputs = gpu_test::AttnInputs;
using AttnResult = gpu_test::AttnRun;  // saved = the LSE (B,H,T)

// Fresh canonical 3 × (B,H,T,d) q,k,v and (B,H,T,d) dout, bf16-rounded in bf16 mode.
Inputs make_inputs(const HyperCase& c, uint64_t seed) { return gpu_test::random_attn_inputs(c, seed); }

// Forward twice and backward twice on the GPU, each pair checked bitwise equal.
AttnResult run_gpu(const HyperCase& c, Attention& attn, const Inputs& in) {
    gpu_test::AttnRunOptions opt;
    opt.ctx = AttnContext{c.layer, c.step};
    opt.forward_passes = 2;
    opt.poison_workspace_in_forward = true;
    return gpu_test::run_gpu_attention(attn, c, in, opt);
}

// The CPU reference on the same inputs; its backward uses the GPU's output `gpu_o`.
AttnResult run_cpu(const HyperCase& c, const Inputs& in, const std::vector<float>& gpu_o) {
    return gpu_test::run_cpu_attention(c, config_of(c), AttnContext{c.layer, c.step}, in, gpu_o);
}

// ---------------------------------------------------------------- GPU vs CPU reference
class HyperCudaVsCpu : public ::testing::TestWithParam<HyperCase> {};

TEST_P(HyperCudaVsCpu, ForwardLseAndGradients) {
    const HyperCase& c = GetParam();
    const Inputs in = make_inputs(c, gpu_test::fresh_seed());
    std::unique_ptr<Attention> attn = make_cuda_hyper_attention(config_of(c));
    const AttnResult gpu = run_gpu(c, *attn, in);
    const AttnResult cpu = run_cpu(c, in, gpu.o);

    // bf16: outputs rounded to bf16, the exact leaves use bf16 P and dS (as test_flash_gpu.cpp);
    // fp32: summation order and exp2 vs the fp64 reference only.
    const bool bf16 = c.dtype == DType::BF16;
    const double tol = bf16 ? 2e-2 : 1e-4;
    const double tol_lse = bf16 ? 1e-3 : 1e-5;
    EXPECT_LE(rel_err(gpu.o, cpu.o), tol) << "o";
    EXPECT_LE(rel_err(gpu.saved, cpu.saved), tol_lse) << "lse";
    EXPECT_LE(rel_err(gpu.dq, cpu.dq), tol) << "dq";
    EXPECT_LE(rel_err(gpu.dk, cpu.dk), tol) << "dk";
    EXPECT_LE(rel_err(gpu.dv, cpu.dv), tol) << "dv";
}

constexpr DType kBF = DType::BF16, kF32 = DType::F32;
// {T, min_seq, block, samples, lsh_bits, B, H, d, fused, magnitude, dtype, layer, step}
const HyperCase kCases[] = {
    // T <= min_seq: one exact causal leaf (= softmax)
    {37, 64, 16, 32, 7, 2, 3, 64, true, 1, kBF, 0, 0},
    {300, 1000, 64, 32, 7, 1, 2, 128, false, 8, kF32, 1, 3},
    // recursion, bf16
    {37, 8, 4, 5, 3, 2, 3, 64, true, 1, kBF, 0, 0},
    {37, 8, 64, 32, 7, 1, 2, 128, false, 8, kBF, 2, 7},  // block larger than every quadrant
    {300, 64, 16, 32, 7, 2, 1, 128, false, 8, kBF, 0, 0},
    {300, 8, 4, 0, 3, 1, 3, 64, true, 8, kBF, 3, 11},   // deep tree, no samples
    {1000, 64, 64, 32, 7, 1, 2, 64, true, 1, kBF, 1, 0},
    {1000, 8, 16, 5, 3, 1, 1, 128, true, 8, kBF, 0, 42},
    {1000, 64, 4, 32, 0, 1, 1, 64, false, 1, kBF, 5, 1},  // lsh_bits 0: one bucket, sort = identity
    // recursion, fp32
    {37, 8, 4, 5, 3, 2, 1, 128, false, 1, kF32, 0, 0},
    {300, 64, 16, 32, 7, 1, 3, 64, true, 8, kF32, 4, 2},
    {300, 8, 64, 5, 7, 1, 1, 128, true, 1, kF32, 0, 9},
    {1000, 64, 64, 32, 7, 2, 1, 128, false, 8, kF32, 0, 0},
    {1000, 8, 4, 0, 3, 1, 1, 64, true, 1, kF32, 7, 5},
};

std::string param_name(const ::testing::TestParamInfo<HyperCase>& info) { return case_name(info.param); }

INSTANTIATE_TEST_SUITE_P(Hyper, HyperCudaVsCpu, ::testing::ValuesIn(kCases), param_name);

// ---------------------------------------------------------------- T <= min_seq is softmax
TEST(HyperCudaShort, EqualsSoftmaxBitwise) {
    for (DType dt : {kBF, kF32}) {
        const HyperCase c{300, 300, 64, 32, 7, 2, 2, 64, true, 8, dt, 0, 0};
        const Inputs in = make_inputs(c, gpu_test::fresh_seed());
        std::unique_ptr<Attention> hyper = make_cuda_hyper_attention(config_of(c));
        std::unique_ptr<Attention> softmax = make_cuda_softmax_attention(AttnConfig{});
        const AttnResult a = run_gpu(c, *hyper, in), b = run_gpu(c, *softmax, in);
        EXPECT_TRUE(gpu_test::bitwise_equal(a.o, b.o)) << gpu_test::precision_name(dt);
        EXPECT_TRUE(gpu_test::bitwise_equal(a.saved, b.saved)) << gpu_test::precision_name(dt);
        EXPECT_TRUE(gpu_test::bitwise_equal(a.dq, b.dq)) << gpu_test::precision_name(dt);
        EXPECT_TRUE(gpu_test::bitwise_equal(a.dk, b.dk)) << gpu_test::precision_name(dt);
        EXPECT_TRUE(gpu_test::bitwise_equal(a.dv, b.dv)) << gpu_test::precision_name(dt);
    }
}

// ---------------------------------------------------------------- refused configurations
TEST(HyperCudaChecks, RefusesUnsupportedHeadDim) {
    Ops& ops = cuda_ops(kBF);
    const AttnShape s{1, 1, 16, 96};
    Buffer buf(ops, kBF, 4 * s.rows() * s.d, "test buffer");
    Buffer lse(ops, DType::F32, s.rows(), "test lse");
    const HeadTensor t = head_tensor_bhtd(buf.t().ptr, kBF, s.H, s.T, s.d);
    std::unique_ptr<Attention> attn = make_cuda_hyper_attention(AttnConfig{});
    EXPECT_THROW(attn->forward(s, AttnContext{}, t, t, t, t, lse.t().f32(), Tensor{}, nullptr), std::runtime_error);
}

TEST(HyperCudaChecks, RefusesBadConfig) {
    AttnConfig cfg;
    cfg.block = 0;
    EXPECT_THROW(make_cuda_hyper_attention(cfg), std::runtime_error);
}

}  // namespace
