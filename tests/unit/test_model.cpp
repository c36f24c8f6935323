// The whole GPT on the CPU backend: backward vs finite differences of the loss (per parameter
// tensor, along a direction mixing the gradient and noise), overfitting one batch, and llm.c
// model-file round trips and malformed files.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "check.h"
#include "fileio.h"
#include "models/gpt.h"
#include "models/model_file.h"
#include "ops.h"
#include "test_util.h"

namespace {

GPTConfig tiny_config(const std::string& pos, const std::string& attention = "softmax") {
    GPTConfig c;
    c.vocab = 97;
    c.padded_vocab = 128;
    c.L = 2; c.H = 2; c.C = 16; c.max_seq = 16;
    c.pos = pos;
    c.attn.name = attention;
    return c;
}

struct Batch { std::vector<int> x, y; };
Batch random_batch(int B, int T, int vocab, std::mt19937& gen) {
    std::uniform_int_distribution<int> tok(0, vocab - 1);
    Batch b{std::vector<int>(B * T), std::vector<int>(B * T)};
    for (int i = 0; i < B * T; i++) { b.x[i] = tok(gen); b.y[i] = tok(gen); }
    return b;
}

// Directional finite difference per parameter tensor: u = ĝ + noise (restricted to the
// tensor); (L(p+εu) - L(p-εu)) / 2ε must match g·u.
void check_model_gradients(const GPTConfig& cfg) {
    auto ops = make_cpu_ops();
    const int B = 2, T = 7;
    GPT model(cfg, *ops, B, T);
    std::mt19937 gen(std::random_device{}());
    model.init_weights(gen());
    // larger-than-init weights so every path carries signal
    std::vector<float> p = model.get_params();
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (float& x : p) x += 0.05f * nd(gen);
    model.set_params(p);
    Batch batch = random_batch(B, T, cfg.vocab, gen);

    model.zero_grad();
    model.forward(batch.x.data(), batch.y.data(), B, T, true, 1.0f, 0);
    model.backward();
    std::vector<float> g = model.get_grads();

    size_t off = 0;
    for (const ParamSpec& s : param_specs(cfg, model.attn_params_per_layer())) {
        if (s.size == 0) continue;
        double gnorm = 0;
        for (size_t i = 0; i < s.size; i++) gnorm += (double)g[off + i] * g[off + i];
        gnorm = std::sqrt(gnorm);
        std::vector<double> u(s.size);
        double unorm = 0;
        for (size_t i = 0; i < s.size; i++) {
            u[i] = (gnorm > 0 ? g[off + i] / gnorm : 0.0) + 0.3 * nd(gen) / std::sqrt((double)s.size);
            unorm += u[i] * u[i];
        }
        double gu = 0;
        for (size_t i = 0; i < s.size; i++) gu += g[off + i] * u[i];
        const double eps = 2e-3;
        auto loss_at = [&](double sign) {
            std::vector<float> q = p;
            for (size_t i = 0; i < s.size; i++) q[off + i] = (float)(p[off + i] + sign * eps * u[i]);
            model.set_params(q);
            return (double)model.forward(batch.x.data(), batch.y.data(), B, T, false, 1.0f, 0);
        };
        double fd = (loss_at(+1) - loss_at(-1)) / (2 * eps);
        model.set_params(p);
        double tol = 2e-2 * std::max(std::abs(gu), 1e-3 * std::sqrt(unorm)) + 2e-4;
        EXPECT_NEAR(fd, gu, tol) << "parameter tensor " << s.name << " (|g| = " << gnorm << ")";
        off += s.size;
    }
}

}  // namespace

TEST(Model, GradientsMatchFiniteDifferencesLearnedPositions) { check_model_gradients(tiny_config("learned")); }
TEST(Model, GradientsMatchFiniteDifferencesRope) { check_model_gradients(tiny_config("rope")); }

TEST(Model, OverfitsOneBatch) {
    auto ops = make_cpu_ops();
    GPTConfig cfg = tiny_config("learned");
    const int B = 4, T = 16;
    GPT model(cfg, *ops, B, T);
    std::mt19937 gen(std::random_device{}());
    model.init_weights(gen());
    Batch batch = random_batch(B, T, cfg.vocab, gen);
    float first = 0, last = 0;
    for (int step = 1; step <= 150; step++) {
        model.zero_grad();
        float loss = model.forward(batch.x.data(), batch.y.data(), B, T, true, 1.0f, step);
        model.backward();
        model.adamw_step(1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f, step, 1.0f);
        if (step == 1) first = loss;
        last = loss;
    }
    EXPECT_NEAR(first, std::log(97.0), 0.5);
    EXPECT_LT(last, 0.3 * std::log(97.0)) << "first loss " << first;
}

TEST(Model, LossIsDeterministic) {
    auto ops = make_cpu_ops();
    GPTConfig cfg = tiny_config("learned");
    std::mt19937 gen(std::random_device{}());
    uint64_t seed = gen();
    Batch batch = random_batch(2, 8, cfg.vocab, gen);
    std::vector<float> losses[2];
    for (int run = 0; run < 2; run++) {
        GPT model(cfg, *ops, 2, 8);
        model.init_weights(seed);
        for (int step = 1; step <= 3; step++) {
            model.zero_grad();
            losses[run].push_back(model.forward(batch.x.data(), batch.y.data(), 2, 8, true, 1.0f, step));
            model.backward();
            model.adamw_step(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 1.0f);
        }
    }
    EXPECT_EQ(losses[0], losses[1]);
}

TEST(Model, RejectsOutOfRangeTokensAndLongSequences) {
    auto ops = make_cpu_ops();
    GPTConfig cfg = tiny_config("learned");
    EXPECT_THROW(GPT(cfg, *ops, 1, cfg.max_seq + 1), Error);
    GPT model(cfg, *ops, 1, 4);
    std::vector<int> x = {1, 2, 97, 3}, y = {1, 1, 1, 1};
    try {
        model.forward(x.data(), y.data(), 1, 4, false, 1.0f, 0);
        ADD_FAILURE() << "no error for token id 97 with vocab 97";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("97"), std::string::npos) << e.what();
    }
}

TEST(ModelFile, RoundTripFp32AndBf16) {
    auto ops = make_cpu_ops();
    GPTConfig cfg = tiny_config("learned");
    GPT model(cfg, *ops, 1, 4);
    std::mt19937 gen(std::random_device{}());
    model.init_weights(gen());
    std::vector<float> p = model.get_params();
    const TempDir temp;
    const std::string& dir = temp.path;
    write_model_file(dir + "/m3.bin", cfg, 0, p, false);
    ModelFile m = read_model_file(dir + "/m3.bin");
    EXPECT_EQ(m.params, p);
    EXPECT_EQ(m.cfg.L, cfg.L);
    EXPECT_EQ(m.cfg.C, cfg.C);
    EXPECT_EQ(m.cfg.padded_vocab, cfg.padded_vocab);
    write_model_file(dir + "/m5.bin", cfg, 0, p, true);
    ModelFile b = read_model_file(dir + "/m5.bin");
    ASSERT_EQ(b.params.size(), p.size());
    for (size_t i = 0; i < p.size(); i++) EXPECT_NEAR(b.params[i], p[i], std::abs(p[i]) * 4e-3 + 1e-30);
    std::string header = read_file(dir + "/m3.bin", "model").substr(0, 1024);
    const int32_t* h = reinterpret_cast<const int32_t*>(header.data());
    EXPECT_EQ(h[0], 20240326);
    EXPECT_EQ(h[1], 3);
}

TEST(ModelFile, MalformedFilesAreRefusedWithTheirName) {
    auto ops = make_cpu_ops();
    GPTConfig cfg = tiny_config("learned");
    GPT model(cfg, *ops, 1, 4);
    model.init_weights(1);
    const TempDir temp;
    const std::string& dir = temp.path;
    write_model_file(dir + "/good.bin", cfg, 0, model.get_params());
    std::string good = read_file(dir + "/good.bin", "model");
    auto expect_error = [&](const std::string& name, const std::string& bytes, const char* words) {
        write_file_atomic(dir + "/" + name, bytes);
        expect_error_containing([&] { read_model_file(dir + "/" + name); }, {name, words});
    };
    expect_error("truncated.bin", good.substr(0, good.size() - 4), "truncated");
    expect_error("short.bin", good.substr(0, 100), "truncated");
    std::string bad = good;
    bad[0] = 1;
    expect_error("magic.bin", bad, "magic");
    bad = good;
    bad[4] = 4;
    expect_error("version.bin", bad, "version");
    EXPECT_THROW(read_model_file(dir + "/missing.bin"), Error);
}
