// Data-parallel training without GPUs: N ranks as threads (the `threads` communicator) with
// CpuOps, each on 1/N of the batch, end with the same parameters as one rank on the whole batch
// (ZeRO 0 and ZeRO 1, N = 2, 3, 4; relative error < 1e-5: only the summation order differs),
// every rank ends bitwise identical, ZeRO-1 on one rank is bitwise the plain optimizer, the
// DataLoader's rank split covers each window of a global batch exactly once, the collectives
// are the serial sums, mismatched options and dead or failing ranks stop every rank with a
// clear message, and build/train --nproc 2 (shm communicator) checkpoints and resumes bit-exactly.
// Gradients all-reduced per layer during the last backward (bucketed, the default) are bitwise
// those of one all-reduce after it, and the buckets cover the gradient arena exactly once.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "check.h"
#include "comm.h"
#include "data/dataloader.h"
#include "data/shard.h"
#include "fileio.h"
#include "models/gpt.h"
#include "models/model_file.h"
#include "test_util.h"

namespace {

GPTConfig small_config(const std::string& attention = "softmax") {
    GPTConfig c;
    c.vocab = 97;
    c.padded_vocab = 128;
    c.L = 2; c.H = 2; c.C = 16; c.max_seq = 16;
    c.attn.name = attention;
    if (attention == "polysketch") {  // learned sketch: per-element decay mask inside the attention parameters
        c.attn.block = 4;
        c.attn.sketch_size = 4;
        c.attn.degree = 4;
    }
    return c;
}

constexpr int kT = 8, kGlobalRows = 12, kAccum = 2, kSteps = 3;
constexpr float kClip = 0.5f;  // below the norms seen: the clipping path (global norm) is exercised

struct Batch { std::vector<int> x, y; };  // (kGlobalRows, kT)

std::vector<Batch> random_batches(int count, int vocab, uint64_t seed) {
    std::mt19937 gen((uint32_t)seed);
    std::uniform_int_distribution<int> tok(0, vocab - 1);
    std::vector<Batch> v(count);
    for (Batch& b : v) {
        b.x.resize(kGlobalRows * kT);
        b.y.resize(kGlobalRows * kT);
        for (int i = 0; i < kGlobalRows * kT; i++) { b.x[i] = tok(gen); b.y[i] = tok(gen); }
    }
    return v;
}

struct RankRun {
    std::vector<float> params;
    std::vector<float> norms;  // per step
    std::vector<double> losses;
    size_t attn_params = 0;  // the attention module's parameters: the last ones
    std::string error;
};

// One rank's training: kSteps AdamW steps of kAccum micro-steps; its rows of each global batch.
// comm == nullptr: the plain single-process path (the reference). bucket: the last micro-step's
// backward starts the per-layer all-reduces (ZeRO 0), else one all-reduce after it.
RankRun train_rank(const GPTConfig& cfg, Communicator* comm, int zero, const std::vector<Batch>& data, uint64_t seed,
                   int steps = kSteps, bool bucket = true) {
    RankRun out;
    const int world = comm ? comm->world() : 1, rank = comm ? comm->rank() : 0;
    const int rows = kGlobalRows / world;
    auto ops = make_cpu_ops();
    GPT model(cfg, *ops, rows, kT, comm ? DataParallel{comm, zero, bucket} : DataParallel{});
    model.init_weights(seed);
    for (int step = 0; step < steps; step++) {
        model.zero_grad();
        double loss = 0;
        for (int micro = 0; micro < kAccum; micro++) {
            const Batch& b = data[step * kAccum + micro];
            const size_t first = (size_t)rank * rows * kT;
            loss += model.forward(b.x.data() + first, b.y.data() + first, rows, kT, true, 1.0f / (kAccum * world), step);
            model.backward(micro == kAccum - 1);
        }
        model.reduce_gradients();
        if (comm) comm->all_reduce_sum_host(&loss, 1);
        out.losses.push_back(loss / (kAccum * world));
        const float norm = model.grad_norm();
        out.norms.push_back(norm);
        const float scale = norm > kClip ? kClip / norm : 1.0f;
        model.adamw_step(1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, step + 1, scale);
    }
    out.params = model.get_params();
    out.attn_params = model.attn_params_per_layer() * cfg.L;
    return out;
}

// world ranks as threads over the threads communicator; returns every rank's run.
std::vector<RankRun> train_threads(const GPTConfig& cfg, int world, int zero, const std::vector<Batch>& data, uint64_t seed,
                                   int steps, bool bucket = true) {
    auto comms = make_threads_communicators(world, 30.0);
    std::vector<RankRun> runs(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; r++)
        threads.emplace_back([&, r] {
            omp_set_num_threads(1);  // the ranks are the parallelism (2 cores)
            try {
                runs[r] = train_rank(cfg, comms[r].get(), zero, data, seed, steps, bucket);
            } catch (const std::exception& e) {
                runs[r].error = e.what();
                comms[r]->abort(e.what());
            }
        });
    for (auto& t : threads) t.join();
    return runs;
}

// ||a - b|| / ||b|| in double
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// steps: AdamW amplifies summation-order differences where a gradient is near 0 (its update is
// ±lr whatever the gradient's size), so the parameters drift apart step by step: after 3 steps of
// the softmax model they differ by up to 1.7e-5 (seen on random seeds), hence param_tol; a poorly
// conditioned model (PolySketch's degree-4 weights) is checked after one step at 1e-5. Any mistake
// in the update itself is far larger (a wrong decay flag moves an element by lr * wd = 1e-3 of
// itself); losses and gradient norms are compared at 1e-5 at every step.
void expect_ranks_match_reference(const std::string& attention, const std::vector<int>& worlds, const std::vector<int>& zeros,
                                  int steps, double param_tol) {
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE("attention " + attention + ", seed " + std::to_string(seed));
    const GPTConfig cfg = small_config(attention);
    const std::vector<Batch> data = random_batches(kSteps * kAccum, cfg.vocab, seed);
    const RankRun ref = train_rank(cfg, nullptr, 0, data, seed, steps);
    {  // not vacuous: the steps moved the parameters well beyond the tolerance
        auto ops = make_cpu_ops();
        GPT init(cfg, *ops, 1, kT);
        init.init_weights(seed);
        EXPECT_GT(rel_err(ref.params, init.get_params()), 1e-2);
    }
    for (int zero : zeros)
        for (int world : worlds) {
            SCOPED_TRACE("world " + std::to_string(world) + ", zero " + std::to_string(zero));
            std::vector<RankRun> runs = train_threads(cfg, world, zero, data, seed, steps);
            for (int r = 0; r < world; r++) ASSERT_EQ(runs[r].error, "") << "rank " << r;
            const double err = rel_err(runs[0].params, ref.params);
            std::printf("  %s world %d zero %d: relative error of the parameters %.2e\n", attention.c_str(), world, zero, err);
            EXPECT_LT(err, param_tol);
            if (ref.attn_params) {  // the attention parameters on their own (their decay mask is per element)
                const size_t n = ref.params.size(), a = ref.attn_params;
                std::vector<float> mine(runs[0].params.end() - a, runs[0].params.end()), theirs(ref.params.begin() + (n - a), ref.params.end());
                EXPECT_LT(rel_err(mine, theirs), param_tol);
            }
            for (int s = 0; s < steps; s++) {
                EXPECT_NEAR(runs[0].norms[s], ref.norms[s], 1e-5 * ref.norms[s]) << "step " << s;
                EXPECT_NEAR(runs[0].losses[s], ref.losses[s], 1e-5 * ref.losses[s]) << "step " << s;
            }
            for (int r = 1; r < world; r++) {  // every rank holds exactly the same model
                EXPECT_EQ(runs[r].params, runs[0].params) << "rank " << r;
                EXPECT_EQ(runs[r].norms, runs[0].norms) << "rank " << r;
            }
        }
}

}  // namespace

TEST(DataParallel, RanksMatchOneRankOnTheWholeBatch) {
    // world 3 pads the parameters (ZeRO-1 shards cut tensors and leave padding)
    ASSERT_NE(GPT(small_config(), *make_cpu_ops(), 1, kT).num_params() % 3, 0u);
    expect_ranks_match_reference("softmax", {2, 3, 4}, {0, 1}, kSteps, 1e-4);
}

TEST(DataParallel, ZeroOneHonoursPerElementDecayMask) {
    // PolySketch's learned sketch mixes decayed and non-decayed elements inside each layer's run
    expect_ranks_match_reference("polysketch", {3, 4}, {1}, 1, 1e-5);
}

TEST(DataParallel, ZeroOneOnOneRankIsBitwiseThePlainOptimizer) {
    const uint64_t seed = std::random_device{}();
    const GPTConfig cfg = small_config();
    const std::vector<Batch> data = random_batches(kSteps * kAccum, cfg.vocab, seed);
    const RankRun ref = train_rank(cfg, nullptr, 0, data, seed);
    auto single = make_single_communicator();
    const RankRun z1 = train_rank(cfg, single.get(), 1, data, seed);
    EXPECT_EQ(z1.params, ref.params) << "seed " << seed;
    EXPECT_EQ(z1.norms, ref.norms) << "seed " << seed;
}

TEST(DataParallel, BucketedGradientsAreBitwiseOneAllReduce) {
    // per-layer buckets (default) vs one all-reduce after the backward: every element is summed
    // once, in rank order, either way; RoPE (no position table) and polysketch (attention
    // parameters in the layer buckets) vary the bucket contents
    const uint64_t seed = std::random_device{}();
    for (const char* attention : {"softmax", "polysketch"})
        for (const char* pos : {"learned", "rope"}) {
            GPTConfig cfg = small_config(attention);
            cfg.pos = pos;
            SCOPED_TRACE(std::string(attention) + ", " + pos + ", seed " + std::to_string(seed));
            const std::vector<Batch> data = random_batches(kSteps * kAccum, cfg.vocab, seed);
            for (int world : {2, 3}) {
                std::vector<RankRun> bucketed = train_threads(cfg, world, 0, data, seed, kSteps, true);
                std::vector<RankRun> whole = train_threads(cfg, world, 0, data, seed, kSteps, false);
                for (int r = 0; r < world; r++) {
                    ASSERT_EQ(bucketed[r].error, "") << "rank " << r;
                    ASSERT_EQ(whole[r].error, "") << "rank " << r;
                    EXPECT_EQ(bucketed[r].params, whole[r].params) << "world " << world << " rank " << r;
                    EXPECT_EQ(bucketed[r].norms, whole[r].norms) << "world " << world << " rank " << r;
                    EXPECT_EQ(bucketed[r].losses, whole[r].losses) << "world " << world << " rank " << r;
                }
            }
        }
}

TEST(DataParallel, GradientBucketsCoverTheArenaOnce) {
    for (const char* attention : {"softmax", "polysketch"})
        for (const char* pos : {"learned", "rope"}) {
            GPTConfig cfg = small_config(attention);
            cfg.pos = pos;
            SCOPED_TRACE(std::string(attention) + ", " + pos);
            auto ops = make_cpu_ops();
            GPT model(cfg, *ops, 1, kT);
            const std::vector<std::vector<Tensor>> buckets = model.gradient_buckets();
            ASSERT_EQ(buckets.size(), (size_t)cfg.L + 1);
            // every layer's bucket: its share of the 12 per-layer tensors and the attention parameters
            const size_t C = cfg.C, per_layer = 12 * C * C + 13 * C + model.attn_params_per_layer();
            for (int l = 0; l < cfg.L; l++) {
                size_t n = 0;
                for (const Tensor& t : buckets[l]) n += t.n;
                EXPECT_EQ(n, per_layer) << "layer " << l;
            }
            // all slices, sorted by address, tile one range of num_params floats without gap or overlap
            std::vector<std::pair<const float*, size_t>> slices;
            for (const auto& bucket : buckets)
                for (const Tensor& t : bucket) {
                    EXPECT_EQ(t.dtype, DType::F32);
                    EXPECT_GT(t.n, 0u);
                    slices.push_back({t.f32(), t.n});
                }
            std::sort(slices.begin(), slices.end());
            size_t total = 0;
            for (size_t i = 0; i < slices.size(); i++) {
                if (i > 0) {
                    EXPECT_EQ(slices[i].first, slices[i - 1].first + slices[i - 1].second) << "slice " << i;
                }
                total += slices[i].second;
            }
            EXPECT_EQ(total, model.num_params());
        }
}

TEST(DataParallel, DataLoaderRanksCoverEachWindowOnce) {
    // tokens: window w of the shard starts with token w (unique), so rows identify windows
    const int T = 4, windows = 61;
    std::vector<uint16_t> tokens(windows * T + 1);
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = (uint16_t)(i % T == 0 ? i / T : 1000 + i % 7);
    const TempDir temp("gpt_dp_test");
    const std::string& dir = temp.path;
    write_shard(dir + "/train_000000.bin", tokens);
    const int global_rows = 12;
    for (int world : {2, 3, 4}) {
        SCOPED_TRACE("world " + std::to_string(world));
        const int rows = global_rows / world;
        DataLoader one(dir + "/train_*.bin", global_rows, T, 0, 1, 7, true, 2000);
        std::vector<std::unique_ptr<DataLoader>> ranks;
        for (int r = 0; r < world; r++) ranks.push_back(std::make_unique<DataLoader>(dir + "/train_*.bin", rows, T, r, world, 7, true, 2000));
        ASSERT_EQ(ranks[0]->batches_per_epoch(), one.batches_per_epoch());
        for (int batch = 0; batch < 12; batch++) {  // more than an epoch (5 batches of 12 windows)
            std::vector<int> x1(global_rows * T), y1(global_rows * T), xr(rows * T), yr(rows * T);
            one.next_batch(x1.data(), y1.data());
            std::map<int, int> seen;
            for (int r = 0; r < world; r++) {
                ranks[r]->next_batch(xr.data(), yr.data());
                for (int i = 0; i < rows * T; i++) {
                    ASSERT_EQ(xr[i], x1[r * rows * T + i]) << "batch " << batch << " rank " << r;
                    ASSERT_EQ(yr[i], y1[r * rows * T + i]) << "batch " << batch << " rank " << r;
                }
                for (int i = 0; i < rows; i++) seen[xr[i * T]]++;
            }
            EXPECT_EQ((int)seen.size(), global_rows) << "batch " << batch;  // each window of the global batch once
            for (auto& [w, count] : seen) EXPECT_EQ(count, 1) << "window " << w;
        }
    }
}

TEST(DataParallel, CollectivesAreTheSerialSums) {
    const int world = 3;
    const size_t chunk = 100003;  // > one staging slot per rank: several pieces
    auto comms = make_threads_communicators(world, 30.0);
    std::vector<std::vector<float>> reduced(world), scattered(world), gathered(world), bcast(world);
    std::vector<double> host(world);
    std::vector<std::vector<uint64_t>> ids(world);
    std::vector<std::string> text(world), errors(world);
    auto value = [](int r, size_t i) { return (float)((r + 1) * 0.25 + (double)(i % 977) * 1e-3); };
    std::vector<std::thread> threads;
    for (int r = 0; r < world; r++)
        threads.emplace_back([&, r] {
            try {
                Communicator& c = *comms[r];
                std::vector<float> a(world * chunk);
                for (size_t i = 0; i < a.size(); i++) a[i] = value(r, i);
                reduced[r] = a;
                c.all_reduce_sum(Tensor{reduced[r].data(), DType::F32, reduced[r].size()});
                scattered[r] = a;
                c.reduce_scatter_sum(Tensor{scattered[r].data(), DType::F32, scattered[r].size()});
                gathered[r].assign(world * chunk, -1.0f);
                for (size_t i = 0; i < chunk; i++) gathered[r][r * chunk + i] = value(r, i);
                c.all_gather(Tensor{gathered[r].data(), DType::F32, gathered[r].size()});
                bcast[r] = r == 1 ? a : std::vector<float>(a.size(), 0.0f);
                c.broadcast(Tensor{bcast[r].data(), DType::F32, bcast[r].size()}, 1);
                host[r] = r + 0.5;
                c.all_reduce_sum_host(&host[r], 1);
                ids[r] = c.all_gather_host(100 + r);
                text[r] = r == 2 ? std::string(3 << 20, 'x') + "end" : "";
                c.broadcast_host(text[r], 2);
                c.barrier();
            } catch (const std::exception& e) {
                errors[r] = e.what();
                comms[r]->abort(e.what());
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < world; r++) {
        ASSERT_EQ(errors[r], "") << "rank " << r;
        for (size_t i = 0; i < world * chunk; i += 997) {
            float sum = value(0, i);
            for (int k = 1; k < world; k++) sum += value(k, i);  // rank order
            ASSERT_EQ(reduced[r][i], sum) << i;
            ASSERT_EQ(bcast[r][i], value(1, i)) << i;
        }
        for (size_t i = 0; i < chunk; i += 991) {
            const size_t g = r * chunk + i;
            float sum = value(0, g);
            for (int k = 1; k < world; k++) sum += value(k, g);
            ASSERT_EQ(scattered[r][g], sum) << g;
            for (int k = 0; k < world; k++) ASSERT_EQ(gathered[r][k * chunk + i], value(k, i)) << k << " " << i;
        }
        EXPECT_EQ(host[r], 0.5 + 1.5 + 2.5);
        EXPECT_EQ(ids[r], (std::vector<uint64_t>{100, 101, 102}));
        EXPECT_EQ(text[r].size(), (3u << 20) + 3);
        EXPECT_EQ(text[r].substr(text[r].size() - 3), "end");
    }
}

TEST(DataParallel, MismatchedOptionsAreDetectedOnEveryRank) {
    const int world = 3;
    auto comms = make_threads_communicators(world, 30.0);
    std::vector<std::string> errors(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; r++)
        threads.emplace_back([&, r] {
            try {
                check_same_on_all_ranks(*comms[r], "options", "{\"lr\": 0.001}");  // agree
                check_same_on_all_ranks(*comms[r], "options", r == 2 ? "{\"lr\": 0.002}" : "{\"lr\": 0.001}");
            } catch (const std::exception& e) {
                errors[r] = e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < world; r++) {
        EXPECT_NE(errors[r].find("options differ across ranks"), std::string::npos) << errors[r];
        EXPECT_NE(errors[r].find("rank(s) 2 disagree"), std::string::npos) << errors[r];
    }
}

TEST(DataParallel, DeadRankTimesOutAndFailingRankStopsThePeers) {
    {  // rank 1 never arrives: rank 0 gives up after the timeout, naming rank 1
        auto comms = make_threads_communicators(2, 0.3);
        const auto start = std::chrono::steady_clock::now();
        try {
            comms[0]->barrier();
            ADD_FAILURE() << "barrier returned without rank 1";
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find("rank(s) 1 did not reach barrier"), std::string::npos) << e.what();
        }
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_GE(waited, 0.3);
        EXPECT_LT(waited, 5.0);
    }
    {  // rank 1 fails: rank 0, waiting in a collective, stops at once with rank 1's reason
        auto comms = make_threads_communicators(2, 60.0);
        std::string error;
        const auto start = std::chrono::steady_clock::now();
        std::thread t0([&] {
            try {
                double x = 1;
                comms[0]->all_reduce_sum_host(&x, 1);
            } catch (const Error& e) {
                error = e.what();
            }
        });
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        comms[1]->abort("cannot read shard foo.bin");
        t0.join();
        EXPECT_NE(error.find("rank 1 failed (cannot read shard foo.bin)"), std::string::npos) << error;
        EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
    }
}

TEST(DataParallel, ShmCommunicatorMeetsThroughAFile) {
    const TempDir temp("gpt_dp_test");
    const std::string path = temp / "comm";
    const int world = 2;
    std::vector<double> v(world);
    std::vector<std::string> errors(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; r++)
        threads.emplace_back([&, r] {
            try {
                if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(30));
                auto c = make_shm_communicator(path, r, world, 10.0);
                v[r] = 1.0 + r;
                c->all_reduce_sum_host(&v[r], 1);
            } catch (const std::exception& e) {
                errors[r] = e.what();
            }
        });
    for (auto& t : threads) t.join();
    for (int r = 0; r < world; r++) {
        EXPECT_EQ(errors[r], "");
        EXPECT_EQ(v[r], 3.0);
    }
    EXPECT_NE(access(path.c_str(), F_OK), 0) << "the rendezvous file is removed once every rank is attached";
    try {  // nobody creates the file: a clear timeout
        make_shm_communicator(path + "_missing", 1, 2, 0.2);
        ADD_FAILURE() << "no error without rank 0";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("rank 0 did not create"), std::string::npos) << e.what();
    }
}

// ---------------------------------------------------------------- build/train --nproc

namespace {

std::string make_data(const std::string& root) {
    std::string data = root + "/data";
    ensure_writable_dir(data, "test data");
    std::mt19937 gen(std::random_device{}());
    std::uniform_int_distribution<int> tok(0, 99);
    for (const char* name : {"train_000000.bin", "val_000000.bin"}) {
        std::vector<uint16_t> t(4000);
        for (auto& x : t) x = (uint16_t)tok(gen);
        write_shard(data + "/" + name, t);
    }
    return data;
}

const char* kTiny = "--device cpu --model tiny --layers 1 --channels 32 --heads 2 --batch 2 --seq 16 --total-batch 64 "
                    "--lr 1e-2 --sample-every 0 --eval-every 3 --eval-batches 1 --ckpt-every 3 --keep 3 --steps 6";

bool have_train_binary() { return access(train_binary().c_str(), X_OK) == 0; }

}  // namespace

TEST(DataParallel, TrainTwoRanksResumesBitExactAndOnAnotherWorld) {
    if (!have_train_binary()) GTEST_SKIP() << train_binary() << " not built";
    const TempDir temp("gpt_dp_test");
    const std::string root = temp.path, data = make_data(root);
    for (int zero : {0, 1}) {
        SCOPED_TRACE("zero " + std::to_string(zero));
        const std::string straight = root + "/straight" + std::to_string(zero), resumed = root + "/resumed" + std::to_string(zero);
        const std::string common = std::string(kTiny) + " --data " + data + " --zero " + std::to_string(zero) + " --nproc 2";
        CommandResult a = run_train(common + " --out " + straight);
        ASSERT_EQ(a.exit_code, 0) << a.out << a.err;
        CommandResult b = run_train(common + " --out " + resumed + " --stop-at 3");
        ASSERT_EQ(b.exit_code, 0) << b.out << b.err;
        if (zero == 1) {
            EXPECT_EQ(access((resumed + "/ckpt_00000003/optim_rank0.bin").c_str(), F_OK), 0);
            EXPECT_EQ(access((resumed + "/ckpt_00000003/optim_rank1.bin").c_str(), F_OK), 0);
        }
        CommandResult c = run_train(common + " --out " + resumed + " --resume");
        ASSERT_EQ(c.exit_code, 0) << c.out << c.err;
        auto la = logged_losses(straight + "/log.jsonl"), lc = logged_losses(resumed + "/log.jsonl");
        ASSERT_EQ(la.size(), 6u);
        EXPECT_EQ(la, lc);
        EXPECT_EQ(read_file(straight + "/ckpt_00000006/model.bin", "model"), read_file(resumed + "/ckpt_00000006/model.bin", "model"));
    }
    // one rank with the same total batch follows the same trajectory (up to summation order)
    const std::string one = root + "/one";
    CommandResult e = run_train(std::string(kTiny) + " --data " + data + " --out " + one);
    ASSERT_EQ(e.exit_code, 0) << e.out << e.err;
    auto l1 = logged_losses(one + "/log.jsonl"), l2 = logged_losses(root + "/straight0/log.jsonl");
    ASSERT_EQ(l1.size(), l2.size());
    for (auto& [step, text] : l1) EXPECT_NEAR(std::atof(text.c_str()), std::atof(l2[step].c_str()), 1e-4) << "step " << step;

    // Resuming on another number of ranks and ZeRO stage continues the same run: 2 ranks (ZeRO-1)
    // for 3 steps then 1 rank (ZeRO 0) matches the 1-rank run, and 1 rank then 2 ranks (ZeRO-1) the
    // 2-rank run, up to summation order (AdamW amplifies it to ~1e-5 after a few steps). A lost
    // optimizer state or data position would move the parameters by ~lr = 1e-2 of themselves.
    struct Switch {
        std::string first, second, reference;
    };
    int case_no = 0;
    for (const Switch& sw : {Switch{" --nproc 2 --zero 1", " --nproc 1 --zero 0", one},
                             Switch{" --nproc 1 --zero 0", " --nproc 2 --zero 1", root + "/straight1"}}) {
        SCOPED_TRACE("from" + sw.first + " to" + sw.second);
        const std::string dir = root + "/switch" + std::to_string(case_no++);
        CommandResult f = run_train(std::string(kTiny) + " --data " + data + sw.first + " --out " + dir + " --stop-at 3");
        ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
        CommandResult g = run_train(std::string(kTiny) + " --data " + data + sw.second + " --out " + dir + " --resume");
        ASSERT_EQ(g.exit_code, 0) << g.out << g.err;
        EXPECT_NE(g.out.find("resuming a run of"), std::string::npos) << g.out;
        auto lr = logged_losses(sw.reference + "/log.jsonl"), ls = logged_losses(dir + "/log.jsonl");
        ASSERT_EQ(ls.size(), 6u);
        for (auto& [step, text] : lr) EXPECT_NEAR(std::atof(ls[step].c_str()), std::atof(text.c_str()), 1e-4) << "step " << step;
        const std::vector<float> p = read_model_file(dir + "/ckpt_00000006/model.bin").params;
        const std::vector<float> q = read_model_file(sw.reference + "/ckpt_00000006/model.bin").params;
        EXPECT_LT(rel_err(p, q), 1e-4);
    }
}

TEST(DataParallel, TrainRankFailureStopsEveryRank) {
    if (!have_train_binary()) GTEST_SKIP() << train_binary() << " not built";
    const TempDir temp("gpt_dp_test");
    const std::string root = temp.path, data = make_data(root);
    // a total batch that 2 ranks cannot split: every rank refuses, with the arithmetic
    CommandResult a = run_train(std::string(kTiny) + " --data " + data + " --total-batch 96 --nproc 2 --out " + root + "/a");
    EXPECT_NE(a.exit_code, 0);
    EXPECT_NE(a.err.find("--total-batch 96"), std::string::npos) << a.err;
    // rank 0 started alone (torchrun-style environment): it gives up after --comm-timeout, naming rank 1
    const std::string env0 = "RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 GPT_RUN_ID=dp_test_" + std::to_string(getpid()) + " ";
    const auto start = std::chrono::steady_clock::now();
    const CommandResult b =
        run_command(env0 + train_binary() + " " + kTiny + " --data " + data + " --comm-timeout 1 --out " + root + "/b");
    EXPECT_NE(b.exit_code, 0);
    const std::string& err = b.err;
    EXPECT_NE(err.find("rank(s) 1 did not reach barrier"), std::string::npos) << err;
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 20.0);
    // two ranks launched with different options: both refuse, naming the rank that differs
    const std::string run = "GPT_RUN_ID=dp_test2_" + std::to_string(getpid()) + " WORLD_SIZE=2 ";
    const std::string cmd = "(" + run + "RANK=0 LOCAL_RANK=0 " + train_binary() + " " + kTiny + " --data " + data + " --out " + root +
                            "/c --comm-timeout 20 --lr 1e-2 >/dev/null 2>" + root + "/c0.err & " + run + "RANK=1 LOCAL_RANK=1 " + train_binary() + " " +
                            kTiny + " --data " + data + " --out " + root + "/c --comm-timeout 20 --lr 2e-2 >/dev/null 2>" + root + "/c1.err; wait)";
    std::system(cmd.c_str());
    for (const char* f : {"/c0.err", "/c1.err"}) {
        std::string e = read_file(root + f, "stderr");
        EXPECT_NE(e.find("options (or the checkpoint resumed) differ across ranks: rank(s) 1 disagree with rank 0"), std::string::npos) << e;
    }
}
