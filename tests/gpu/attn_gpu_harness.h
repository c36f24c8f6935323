// Harness shared by the attention-variant GPU suites (tests/gpu/test_{flash,performer,polynomial,
// polysketch,hyper}_gpu.cpp): fresh random inputs in canonical (B,H,T,d) order (bf16-rounded in
// bf16 mode), the device buffers of one problem in the contiguous or fused-qkv layout, one GPU
// forward + backward of an Attention module with outputs and workspace poisoned with NaN before
// every launch and the backward run twice (bitwise equal), and the CPU twin through
// make_cpu_attention whose backward differentiates at the GPU's o. What the suites do differently
// (AttnContext, forward once or twice, poisoning the workspace before the forward, learned
// parameters) is chosen through AttnRunOptions; tolerances and comparisons stay in the suites.
//
// `Case` below is any of the suites' case structs: int B, H, T, d; bool fused; float magnitude;
// DType dtype.
#pragma once
#include "gpu_test_util.h"

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "attention.h"
#include "ops.h"
#include "rng.h"

namespace gpu_test {

// Canonical inputs of one problem.
struct AttnInputs {
    std::vector<float> qkv, dout;  // 3 × (B,H,T,d) (q, k, v) and (B,H,T,d)
    std::vector<float> params;     // learned parameters (stored values); empty for none
    std::vector<float> dparams0;   // initial dparams (the backward adds to it); empty for none
};

template <typename Case>
Layout layout_of(const Case& c) {
    return Layout{c.B, c.H, c.T, c.d, c.fused};
}
template <typename Case>
AttnShape shape_of(const Case& c) {
    return AttnShape{c.B, c.H, c.T, c.d};
}

// q,k,v ~ N(0, magnitude²) then dout ~ N(0, 1), drawn from `rng` in that order, rounded to bf16 in
// bf16 mode. `rng` is left after the draws (for further inputs such as learned parameters).
template <typename Case>
AttnInputs random_attn_inputs(const Case& c, Rng& rng) {
    const size_t n = (size_t)c.B * c.H * c.T * c.d;
    AttnInputs in{std::vector<float>(3 * n), std::vector<float>(n), {}, {}};
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
template <typename Case>
AttnInputs random_attn_inputs(const Case& c, uint64_t seed) {
    Rng rng(seed);
    return random_attn_inputs(c, rng);
}

// Everything one forward + backward produces, in canonical (B,H,T,d) order; `saved` as the module
// writes it (LSE, denominators, statistics ...); `dparams` the backward's increment (learned only).
struct AttnRun {
    std::vector<float> o, saved, dq, dk, dv, dparams;
};

// The device buffers of one problem on `ops`: qkv, dqkv (3 parts) and o, dout in layout `lay`,
// with the inputs uploaded, saved and workspace sized for `attn`, and the HeadTensor views.
struct AttnGpuBuffers {
    AttnGpuBuffers(Ops& ops, DType dtype, const Layout& lay, const Attention& attn, const AttnInputs& in)
        : qkv(ops, dtype, 3 * n_of(lay), "test qkv"),
          dqkv(ops, dtype, 3 * n_of(lay), "test dqkv"),
          o(ops, dtype, n_of(lay), "test o"),
          dout(ops, dtype, n_of(lay), "test dout"),
          saved(ops, DType::F32, attn.saved_size(AttnShape{lay.B, lay.H, lay.T, lay.d}), "test saved"),
          work(ops, DType::F32, attn.workspace_bytes(AttnShape{lay.B, lay.H, lay.T, lay.d}) / 4 + 1, "test workspace"),
          q(lay.view(qkv.t(), 0, 3)),
          k(lay.view(qkv.t(), 1, 3)),
          v(lay.view(qkv.t(), 2, 3)),
          dq(lay.view(dqkv.t(), 0, 3)),
          dk(lay.view(dqkv.t(), 1, 3)),
          dv(lay.view(dqkv.t(), 2, 3)),
          o_view(lay.view(o.t(), 0, 1)),
          dout_view(lay.view(dout.t(), 0, 1)) {
        upload(ops, qkv.t(), lay.scatter(in.qkv, 3));
        upload(ops, dout.t(), lay.scatter(in.dout, 1));
    }
    static size_t n_of(const Layout& lay) { return (size_t)lay.B * lay.H * lay.T * lay.d; }

    Buffer qkv, dqkv, o, dout, saved, work;
    HeadTensor q, k, v, dq, dk, dv, o_view, dout_view;
};

struct AttnRunOptions {
    AttnContext ctx{};
    // 2: forward twice, o and saved checked bitwise equal between the passes
    int forward_passes = 1;
    // poison the workspace before each forward too (the backward always poisons it)
    bool poison_workspace_in_forward = false;
    // learned parameters: upload in.params (num_params(d) of them), reset dparams to in.dparams0
    // before each backward, check dparams bitwise equal, return the increment in AttnRun::dparams
    bool learned_params = false;
};

// Forward (opt.forward_passes times) and backward (twice, bitwise equal) of `attn` on the GPU in
// `dtype`, with o and saved (and the workspace, per opt) poisoned before each forward and dqkv and
// the workspace before each backward. `attn` may be reused across calls (e.g. an Ω cache under test).
inline AttnRun run_gpu_attention(Attention& attn, DType dtype, const Layout& lay, const AttnInputs& in,
                                 const AttnRunOptions& opt = AttnRunOptions{}) {
    Ops& ops = cuda_ops(dtype);
    const AttnShape s{lay.B, lay.H, lay.T, lay.d};
    const size_t n = s.rows() * lay.d;
    AttnGpuBuffers b(ops, dtype, lay, attn, in);
    auto download = [&](const Tensor& t) {
        ops.synchronize();
        return gpu_test::download(ops, t);
    };

    size_t np = 0;
    std::optional<Buffer> params, dparams;  // np + 1 elements: allocated even when np = 0
    Tensor params_t, dparams_t;             // empty without learned parameters
    if (opt.learned_params) {
        np = attn.num_params(lay.d);
        EXPECT_EQ(np, in.params.size());
        params.emplace(ops, dtype, np + 1, "test params");
        dparams.emplace(ops, DType::F32, np + 1, "test dparams");
        if (np) {
            params_t = params->t().slice(0, np);
            dparams_t = dparams->t().slice(0, np);
            upload(ops, params_t, in.params);
        }
    }

    AttnRun r;
    for (int pass = 0; pass < opt.forward_passes; pass++) {
        poison(ops, b.o.t());
        poison(ops, b.saved.t());
        if (opt.poison_workspace_in_forward) poison(ops, b.work.t());
        attn.forward(s, opt.ctx, b.o_view, b.q, b.k, b.v, b.saved.t().f32(), params_t, b.work.t().ptr);
        std::vector<float> o = lay.gather(download(b.o.t()), 1), saved = download(b.saved.t());
        if (pass == 0) {
            r.o = o;
            r.saved = saved;
        } else {
            EXPECT_TRUE(bitwise_equal(r.o, o)) << "forward o is not bitwise deterministic";
            EXPECT_TRUE(bitwise_equal(r.saved, saved)) << "forward saved is not bitwise deterministic";
        }
    }

    std::vector<float> first, first_dp;
    for (int pass = 0; pass < 2; pass++) {
        poison(ops, b.dqkv.t());
        poison(ops, b.work.t());
        if (np) upload(ops, dparams_t, in.dparams0);
        attn.backward(s, opt.ctx, b.dq, b.dk, b.dv, dparams_t, b.dout_view, b.q, b.k, b.v, b.o_view,
                      b.saved.t().f32(), params_t, b.work.t().ptr);
        std::vector<float> grads = download(b.dqkv.t());
        std::vector<float> dp = np ? download(dparams_t) : std::vector<float>{};
        if (pass == 0) {
            first = grads;
            first_dp = dp;
        } else {
            EXPECT_TRUE(bitwise_equal(first, grads)) << "backward is not bitwise deterministic";
            if (opt.learned_params) {
                EXPECT_TRUE(bitwise_equal(first_dp, dp)) << "dparams not bitwise deterministic";
            }
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
template <typename Case>
AttnRun run_gpu_attention(Attention& attn, const Case& c, const AttnInputs& in,
                          const AttnRunOptions& opt = AttnRunOptions{}) {
    return run_gpu_attention(attn, c.dtype, layout_of(c), in, opt);
}

// fp64 reference results (the templated CPU references) as the fp32 vectors AttnRun holds.
inline std::vector<float> to_floats(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }

// The CPU module of `cfg` (make_cpu_attention, fp32 contiguous views) on the same inputs; its
// backward is given the GPU's output `gpu_o`, so both sides differentiate the same forward.
template <typename Case>
AttnRun run_cpu_attention(const Case& c, const AttnConfig& cfg, const AttnContext& ctx, const AttnInputs& in,
                          const std::vector<float>& gpu_o) {
    std::unique_ptr<Attention> attn = make_cpu_attention(cfg);
    const AttnShape s = shape_of(c);
    const size_t n = s.rows() * c.d;
    std::vector<float> qkv = in.qkv, dout = in.dout, o_gpu = gpu_o;
    auto view = [&](float* p) { return head_tensor_bhtd(p, DType::F32, c.H, c.T, c.d); };
    std::vector<char> work(attn->workspace_bytes(s) + 16);
    AttnRun r;
    r.o.resize(n);
    r.saved.resize(attn->saved_size(s));
    attn->forward(s, ctx, view(r.o.data()), view(qkv.data()), view(qkv.data() + n), view(qkv.data() + 2 * n),
                  r.saved.data(), Tensor{}, work.data());
    r.dq.resize(n);
    r.dk.resize(n);
    r.dv.resize(n);
    attn->backward(s, ctx, view(r.dq.data()), view(r.dk.data()), view(r.dv.data()), Tensor{}, view(dout.data()),
                   view(qkv.data()), view(qkv.data() + n), view(qkv.data() + 2 * n), view(o_gpu.data()),
                   r.saved.data(), Tensor{}, work.data());
    return r;
}

}  // namespace gpu_test
