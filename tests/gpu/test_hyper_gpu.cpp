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
#include "cuda/attention/cuda_variants.cuh"
#include "gpu_test_util.h"
#include "ops.h"
#include "rng.h"

namespace {

using gpu_test::Buffer;
using gpu_test::rel_err;

using gpu_test::cuda_ops;
using gpu_test::Layout;
using gpu_test::round_bf16;
using gpu_test::slice;

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

struct Inputs {
    std::vector<float> qkv, dout;  // canonical 3 × (B,H,T,d) and (B,H,T,d)
};
Inputs make_inputs(const HyperCase& c, uint64_t seed) {
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

struct AttnResult {
    std::vector<float> o, lse, dq, dk, dv;
};

// Forward twice and backward twice on the GPU, each pair checked bitwise equal.
AttnResult run_gpu(const HyperCase& c, Attention& attn, const Inputs& in) {
    Ops& ops = cuda_ops(c.dtype);
    const AttnShape s{c.B, c.H, c.T, c.d};
    const AttnContext ctx{c.layer, c.step};
    const size_t n = s.rows() * c.d;
    const Layout lay{c.B, c.H, c.T, c.d, c.fused};

    Buffer qkv(ops, c.dtype, 3 * n, "test qkv"), dqkv(ops, c.dtype, 3 * n, "test dqkv");
    Buffer o(ops, c.dtype, n, "test o"), dout(ops, c.dtype, n, "test dout");
    Buffer lse(ops, DType::F32, attn.saved_size(s), "test lse");
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
        gpu_test::poison(ops, lse.t());
        gpu_test::poison(ops, work.t());
        attn.forward(s, ctx, o_view, q, k, v, lse.t().f32(), Tensor{}, work.t().ptr);
        std::vector<float> o_img = download(o), lse_v = download(lse);
        if (pass == 0) {
            r.o = lay.gather(o_img, 1);
            r.lse = lse_v;
        } else {
            EXPECT_TRUE(gpu_test::bitwise_equal(r.o, lay.gather(o_img, 1))) << "forward o is not deterministic";
            EXPECT_TRUE(gpu_test::bitwise_equal(r.lse, lse_v)) << "forward lse is not deterministic";
        }
    }
    std::vector<float> first;
    for (int pass = 0; pass < 2; pass++) {
        gpu_test::poison(ops, dqkv_t);
        gpu_test::poison(ops, work.t());
        attn.backward(s, ctx, dq, dk, dv, Tensor{}, dout_view, q, k, v, o_view, lse.t().f32(), Tensor{},
                      work.t().ptr);
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

// The CPU reference on the same inputs; its backward uses the GPU's output `gpu_o`.
AttnResult run_cpu(const HyperCase& c, const Inputs& in, const std::vector<float>& gpu_o) {
    std::unique_ptr<Attention> attn = make_cpu_attention(config_of(c));
    const AttnShape s{c.B, c.H, c.T, c.d};
    const AttnContext ctx{c.layer, c.step};
    const size_t n = s.rows() * c.d;
    std::vector<float> qkv = in.qkv, dout = in.dout, o_gpu = gpu_o;
    auto view = [&](float* p) { return head_tensor_bhtd(p, DType::F32, c.H, c.T, c.d); };
    std::vector<char> work(attn->workspace_bytes(s) + 16);
    AttnResult r;
    r.o.resize(n);
    r.lse.resize(attn->saved_size(s));
    attn->forward(s, ctx, view(r.o.data()), view(qkv.data()), view(qkv.data() + n), view(qkv.data() + 2 * n),
                  r.lse.data(), Tensor{}, work.data());
    r.dq.resize(n);
    r.dk.resize(n);
    r.dv.resize(n);
    attn->backward(s, ctx, view(r.dq.data()), view(r.dk.data()), view(r.dv.data()), Tensor{}, view(dout.data()),
                   view(qkv.data()), view(qkv.data() + n), view(qkv.data() + 2 * n), view(o_gpu.data()),
                   r.lse.data(), Tensor{}, work.data());
    return r;
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
    EXPECT_LE(rel_err(gpu.lse, cpu.lse), tol_lse) << "lse";
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
        EXPECT_TRUE(gpu_test::bitwise_equal(a.lse, b.lse)) << gpu_test::precision_name(dt);
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
