// The whole GPT on CUDA against the CPU reference: loss and every parameter gradient from the
// same weights (fp32 and bf16), a few training steps side by side, bitwise determinism of two
// GPU runs, and bit-exact resume of build/train --device cuda.
#include "gpu_test_util.h"

#include <sys/wait.h>

#include <fstream>
#include <map>
#include <sstream>

#include "fileio.h"
#include "models/gpt.h"

namespace {

GPTConfig small_config(const std::string& pos = "learned") {
    GPTConfig c;
    c.vocab = 1000;
    c.padded_vocab = 1024;
    c.L = 2; c.H = 2; c.C = 128; c.max_seq = 128;  // head dim 64
    c.pos = pos;
    return c;
}

struct Batch { std::vector<int> x, y; };
Batch random_batch(int n, int vocab, std::mt19937& gen) {
    std::uniform_int_distribution<int> tok(0, vocab - 1);
    Batch b{std::vector<int>(n), std::vector<int>(n)};
    for (int i = 0; i < n; i++) { b.x[i] = tok(gen); b.y[i] = tok(gen); }
    return b;
}

double rel_err_ptr(const float* a, const float* b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

void compare_loss_and_grads(DType precision, const std::string& pos, double loss_tol, double grad_tol) {
    std::mt19937 gen(gpu_test::fresh_seed());
    const int B = 2, T = 100;  // T not a multiple of any tile
    GPTConfig cfg = small_config(pos);
    auto cpu = make_cpu_ops();
    auto gpu = make_cuda_ops(precision);
    GPT mc(cfg, *cpu, B, T), mg(cfg, *gpu, B, T);
    mg.init_weights(gen());
    // the CPU gets the GPU's weights as the GPU computes with them (bf16-rounded in bf16 mode)
    std::vector<float> p = gpu_test::stored_values(*gpu, precision, mg.get_params());
    mg.set_params(p);
    mc.set_params(p);
    Batch b = random_batch(B * T, cfg.vocab, gen);
    mc.zero_grad();
    mg.zero_grad();
    float lc = mc.forward(b.x.data(), b.y.data(), B, T, true, 1.0f, 0);
    float lg = mg.forward(b.x.data(), b.y.data(), B, T, true, 1.0f, 0);
    EXPECT_NEAR(lg, lc, loss_tol * std::abs(lc)) << "loss";
    mc.backward();
    mg.backward();
    std::vector<float> gc = mc.get_grads(), gg = mg.get_grads();
    size_t off = 0;
    for (const ParamSpec& s : param_specs(cfg, 0)) {
        if (s.size == 0) continue;
        double e = rel_err_ptr(gg.data() + off, gc.data() + off, s.size);
        EXPECT_LT(e, grad_tol) << "gradient of " << s.name << " (" << dtype_name(precision) << ")";
        off += s.size;
    }
    EXPECT_LT(std::abs(mg.grad_norm() - mc.grad_norm()), grad_tol * mc.grad_norm());
}

}  // namespace

TEST(CudaModel, LossAndGradientsMatchCpuFp32) { compare_loss_and_grads(DType::F32, "learned", 1e-5, 1e-3); }
TEST(CudaModel, LossAndGradientsMatchCpuFp32Rope) { compare_loss_and_grads(DType::F32, "rope", 1e-5, 1e-3); }
TEST(CudaModel, LossAndGradientsMatchCpuBf16) { compare_loss_and_grads(DType::BF16, "learned", 1e-2, 6e-2); }

TEST(CudaModel, TrainingStepsTrackCpu) {
    std::mt19937 gen(gpu_test::fresh_seed());
    const int B = 2, T = 64;
    GPTConfig cfg = small_config();
    auto cpu = make_cpu_ops();
    auto gpu = make_cuda_ops(DType::F32);
    GPT mc(cfg, *cpu, B, T), mg(cfg, *gpu, B, T);
    uint64_t seed = gen();
    mc.init_weights(seed);
    mg.init_weights(seed);
    for (int step = 1; step <= 5; step++) {
        Batch b = random_batch(B * T, cfg.vocab, gen);
        float l[2];
        GPT* models[2] = {&mc, &mg};
        for (int i = 0; i < 2; i++) {
            models[i]->zero_grad();
            l[i] = models[i]->forward(b.x.data(), b.y.data(), B, T, true, 1.0f, step);
            models[i]->backward();
            float norm = models[i]->grad_norm();
            models[i]->adamw_step(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, norm > 1.0f ? 1.0f / norm : 1.0f);
        }
        EXPECT_NEAR(l[1], l[0], 1e-4 * std::abs(l[0])) << "step " << step;
    }
    std::vector<float> pc = mc.get_params(), pg = mg.get_params();
    EXPECT_LT(gpu_test::rel_err(pg, pc), 1e-4);
}

TEST(CudaModel, TwoRunsAreBitwiseIdentical) {
    std::mt19937 gen(gpu_test::fresh_seed());
    const int B = 4, T = 128;
    GPTConfig cfg = small_config();
    auto gpu = make_cuda_ops(DType::BF16);
    uint64_t seed = gen();
    std::vector<Batch> batches;
    for (int i = 0; i < 3; i++) batches.push_back(random_batch(B * T, cfg.vocab, gen));
    std::vector<float> losses[2], params[2];
    for (int run = 0; run < 2; run++) {
        GPT m(cfg, *gpu, B, T);
        m.init_weights(seed);
        for (int step = 1; step <= 3; step++) {
            m.zero_grad();
            losses[run].push_back(m.forward(batches[step - 1].x.data(), batches[step - 1].y.data(), B, T, true, 1.0f, step));
            m.backward();
            losses[run].push_back(m.grad_norm());
            m.adamw_step(1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 1.0f);
        }
        params[run] = m.get_params();
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_TRUE(params[0] == params[1]) << "parameters differ between two identical runs";
}

namespace {
int run_cmd(const std::string& cmd) {
    int s = std::system(cmd.c_str());
    return WIFEXITED(s) ? WEXITSTATUS(s) : -1;
}
std::string slurp(const std::string& p) {
    std::ifstream f(p);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}
}  // namespace

TEST(CudaTrainProgram, ResumeIsBitExact) {
    std::mt19937 gen(gpu_test::fresh_seed());
    char tmpl[] = "/tmp/gpu_resume_XXXXXX";
    std::string root = mkdtemp(tmpl);
    std::string data = root + "/data";
    ensure_writable_dir(data, "data");
    std::uniform_int_distribution<int> tok(0, 50256);
    for (const char* name : {"train_000000.bin", "val_000000.bin"}) {
        std::string bytes(1024, '\0');
        int32_t* h = reinterpret_cast<int32_t*>(&bytes[0]);
        const int n = 40000;
        h[0] = 20240520; h[1] = 1; h[2] = n;
        for (int i = 0; i < n; i++) {
            uint16_t t = (uint16_t)tok(gen);
            bytes.append(reinterpret_cast<const char*>(&t), 2);
        }
        write_file_atomic(data + "/" + name, bytes);
    }
    const char* bin = std::getenv("TRAIN_BIN") ? std::getenv("TRAIN_BIN") : "build/train";
    std::string common = std::string(bin) + " --device cuda --model tiny --batch 4 --seq 128 --total-batch 1024 --steps 20 " +
                         "--eval-every 5 --eval-batches 2 --sample-every 0 --ckpt-every 5 --data " + data + " --seed " +
                         std::to_string(gen() % 10000) + " >>" + root + "/out.txt 2>&1";
    ASSERT_EQ(run_cmd(common + " --out " + root + "/a"), 0) << slurp(root + "/out.txt");
    ASSERT_EQ(run_cmd(common + " --out " + root + "/b --stop-at 10"), 0) << slurp(root + "/out.txt");
    ASSERT_EQ(run_cmd(common + " --out " + root + "/b --resume"), 0) << slurp(root + "/out.txt");
    auto steps = [](const std::string& log) {
        std::map<int, std::string> m;
        std::istringstream in(log);
        std::string line;
        while (std::getline(in, line)) {
            auto s = line.find("\"step\":");
            auto l = line.find("\"loss\":");
            if (s != std::string::npos && l != std::string::npos) m[std::atoi(line.c_str() + s + 7)] = line.substr(l, 30);
        }
        return m;
    };
    auto la = steps(slurp(root + "/a/log.jsonl")), lb = steps(slurp(root + "/b/log.jsonl"));
    EXPECT_EQ(la.size(), 20u);
    EXPECT_EQ(la, lb);
    EXPECT_TRUE(slurp(checkpoint_dir(root + "/a", 20) + "/model.bin") == slurp(checkpoint_dir(root + "/b", 20) + "/model.bin"));
    std::system(("rm -rf " + root).c_str());
}
