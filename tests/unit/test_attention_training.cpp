// A tiny GPT trained with each attention variant on the CPU: the loss falls and stays finite.
// Exercises every variant inside the model (strided qkv views, learned sketch parameters through
// AdamW, random state per layer and step) with learned positions and with RoPE.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "models/gpt.h"
#include "ops.h"

namespace {

struct Variant { const char* name; const char* pos; };

class AttentionTraining : public ::testing::TestWithParam<Variant> {};

TEST_P(AttentionTraining, LossFallsAndStaysFinite) {
    const Variant v = GetParam();
    GPTConfig cfg;
    cfg.vocab = 61;
    cfg.padded_vocab = 128;
    cfg.L = 2; cfg.H = 2; cfg.C = 16; cfg.max_seq = 32;  // head dim 8
    cfg.pos = v.pos;
    cfg.attn.name = v.name;
    cfg.attn.window = 5;        // local
    cfg.attn.features = 16;     // performer
    cfg.attn.redraw = 7;
    cfg.attn.sketch_size = 4;   // polysketch
    cfg.attn.block = 8;         // polysketch / hyper blocks: T=29 gives ragged blocks
    cfg.attn.min_seq = 8;       // hyper recurses
    cfg.attn.samples = 4;
    cfg.attn.lsh_bits = 3;
    auto ops = make_cpu_ops();
    const int B = 3, T = 29;
    GPT model(cfg, *ops, B, T);
    std::mt19937 gen(std::random_device{}());
    model.init_weights(gen());
    // a learnable signal: the target is a fixed function of the current and previous token
    std::uniform_int_distribution<int> tok(0, cfg.vocab - 1);
    std::vector<int> x(B * T), y(B * T);
    for (int& t : x) t = tok(gen);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) y[b * T + t] = (x[b * T + t] * 7 + (t ? x[b * T + t - 1] : 0)) % cfg.vocab;
    float first = 0, last = 0;
    for (int step = 1; step <= 60; step++) {
        model.zero_grad();
        float loss = model.forward(x.data(), y.data(), B, T, true, 1.0f, step);
        model.backward();
        float norm = model.grad_norm();
        ASSERT_TRUE(std::isfinite(loss) && std::isfinite(norm)) << v.name << " step " << step;
        model.adamw_step(1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f, step, norm > 1.0f ? 1.0f / norm : 1.0f);
        if (step == 1) first = loss;
        last = loss;
    }
    EXPECT_LT(last, 0.6f * first) << v.name << " (" << v.pos << "): first " << first << ", last " << last;
}

INSTANTIATE_TEST_SUITE_P(
    EveryVariant, AttentionTraining,
    ::testing::Values(Variant{"softmax", "learned"}, Variant{"softmax", "rope"}, Variant{"local", "rope"},
                      Variant{"performer", "learned"}, Variant{"polynomial", "learned"},
                      Variant{"polysketch", "learned"}, Variant{"polysketch", "rope"}, Variant{"hyper", "learned"}),
    [](const ::testing::TestParamInfo<Variant>& info) { return std::string(info.param.name) + "_" + info.param.pos; });

}  // namespace
