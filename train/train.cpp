// build/train: the training program. Reads options (src/options.h, the one table), builds the
// backend and the model, then loops: micro-batches with gradient accumulation, global-norm
// clipping, AdamW with the LR schedule, a status line, JSON-lines log, validation loss, text
// samples and atomic checkpoints that --resume continues bit for bit.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "check.h"
#include "comm.h"
#include "data/dataloader.h"
#include "data/tokenizer.h"
#include "fileio.h"
#include "launch.h"
#include "log.h"
#include "models/gpt.h"
#include "models/model_file.h"
#include "ops.h"
#include "options.h"
#include "rng.h"
#include "schedule.h"

using nlohmann::json;

namespace {

// This process's communicator, here so that main can tell the other ranks when run() fails.
std::unique_ptr<Communicator> g_comm;
int g_rank = 0, g_world = 1;

bool file_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0;
}

std::string default_data_dir() {
    const char* home = std::getenv("HOME");
    return std::string(home ? home : ".") + "/.cache/gpt-framework/brown";
}

// Fills the device-dependent defaults (0 / "" in TrainOptions) once the device is known.
void resolve_defaults(TrainOptions& o, bool cuda) {
    if (o.model.empty()) o.model = cuda ? "d6" : "tiny";
    if (o.batch == 0) o.batch = cuda ? 16 : 8;
    if (o.seq == 0) o.seq = cuda ? 512 : 64;
    if (o.steps == 0) o.steps = cuda ? 400 : 500;
    if (o.total_batch == 0) o.total_batch = (long)o.batch * o.seq;
    if (o.warmup == 0) o.warmup = std::max(1, o.steps / 20);
    if (o.data.empty()) o.data = default_data_dir();
}

// Model shape from a preset or an llm.c file, then the overrides of the command line.
GPTConfig model_config(const TrainOptions& o, ModelFile* loaded) {
    GPTConfig cfg;
    if (file_exists(o.model)) {
        *loaded = read_model_file(o.model);
        cfg = loaded->cfg;
    } else {
        cfg = gpt_preset(o.model);
        if (o.layers) cfg.L = o.layers;
        if (o.heads) cfg.H = o.heads;
        if (o.channels) cfg.C = o.channels;
        if (o.max_seq) cfg.max_seq = o.max_seq;
        cfg.pos = o.pos;
    }
    if (loaded->params.empty() && cfg.pos == "rope" && !o.max_seq) cfg.max_seq = std::max(cfg.max_seq, o.seq);
    cfg.attn = attention_config(o);
    validate_config(cfg);
    return cfg;
}

// Optimizer state file: header (magic, version, n) then m and v as fp32.
constexpr int kOptimMagic = 20241123;
void write_optimizer(const std::string& path, const std::vector<float>& m, const std::vector<float>& v) {
    std::string bytes(16, '\0');
    int64_t* h = reinterpret_cast<int64_t*>(&bytes[0]);
    h[0] = ((int64_t)kOptimMagic << 8) | 1;
    h[1] = (int64_t)m.size();
    bytes.append(reinterpret_cast<const char*>(m.data()), m.size() * 4);
    bytes.append(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    write_file_atomic(path, bytes);
}
void read_optimizer(const std::string& path, size_t n, std::vector<float>& m, std::vector<float>& v) {
    std::string bytes = read_file(path, "optimizer state");
    CHECK(bytes.size() >= 16, "%s: truncated optimizer state", path.c_str());
    const int64_t* h = reinterpret_cast<const int64_t*>(bytes.data());
    CHECK(h[0] == (((int64_t)kOptimMagic << 8) | 1), "%s: not an optimizer state file (wrong magic or version)", path.c_str());
    CHECK((size_t)h[1] == n && bytes.size() == 16 + 8 * n, "%s: truncated or mismatched optimizer state (%lld values, model has %zu)",
          path.c_str(), (long long)h[1], n);
    m.resize(n);
    v.resize(n);
    std::memcpy(m.data(), bytes.data() + 16, n * 4);
    std::memcpy(v.data(), bytes.data() + 16 + n * 4, n * 4);
}

// ZeRO-1 optimizer shard of one rank: header (magic|version 2, world, rank, parameters,
// shard begin, shard size) then the shard's m and v as fp32. The fp32 masters need no copy:
// model.bin holds them (gathered).
void write_optimizer_shard(const std::string& path, const GPT& model, int world, int rank) {
    std::vector<float> m = model.get_shard_moments(0), v = model.get_shard_moments(1);
    std::string bytes(48, '\0');
    int64_t* h = reinterpret_cast<int64_t*>(&bytes[0]);
    h[0] = ((int64_t)kOptimMagic << 8) | 2;
    h[1] = world; h[2] = rank; h[3] = (int64_t)model.num_params(); h[4] = (int64_t)model.shard_begin(); h[5] = (int64_t)m.size();
    bytes.append(reinterpret_cast<const char*>(m.data()), m.size() * 4);
    bytes.append(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    write_file_atomic(path, bytes);
}
// One rank's shard file, checked against what the reader expects (the writer's world and rank, n
// parameters, the shard starting at `begin` of the padded layout); its m and v.
void read_shard_file(const std::string& path, int world, int rank, size_t n, size_t begin, std::vector<float>& m,
                     std::vector<float>& v) {
    std::string bytes = read_file(path, "optimizer shard");
    CHECK(bytes.size() >= 48, "%s: truncated optimizer shard", path.c_str());
    const int64_t* h = reinterpret_cast<const int64_t*>(bytes.data());
    CHECK(h[0] == (((int64_t)kOptimMagic << 8) | 2), "%s: not an optimizer shard file (wrong magic or version)", path.c_str());
    CHECK(h[1] == world && h[2] == rank && h[3] == (int64_t)n && h[4] == (int64_t)begin,
          "%s: shard of rank %lld/%lld at %lld over %lld parameters does not match rank %d/%d at %zu over %zu",
          path.c_str(), (long long)h[2], (long long)h[1], (long long)h[4], (long long)h[3], rank, world, begin, n);
    const size_t size = (size_t)h[5];
    CHECK(bytes.size() == 48 + 8 * size, "%s: truncated optimizer shard (%zu bytes, expected %zu)", path.c_str(),
          bytes.size(), 48 + 8 * size);
    const float* data = reinterpret_cast<const float*>(bytes.data() + 48);
    m.assign(data, data + size);
    v.assign(data + size, data + 2 * size);
}
// This rank's shard, written by the same layout (same world).
void read_optimizer_shard(const std::string& path, GPT& model, int world, int rank) {
    std::vector<float> m, v;
    read_shard_file(path, world, rank, model.num_params(), model.shard_begin(), m, v);
    CHECK(m.size() == model.shard_size(), "%s: shard of %zu values, this rank's shard has %zu", path.c_str(), m.size(),
          model.shard_size());
    model.set_shard_moments(0, m);
    model.set_shard_moments(1, v);
}

// The whole optimizer state (m, v over all n parameters) of a checkpoint written by `world` ranks:
// optim.bin (ZeRO 0) or the ranks' ZeRO-1 shards put together, each checked to be the next
// piece of the padded layout (n rounded up to a multiple of world; the padding holds zeros and is
// dropped). Used to resume on another number of ranks or another ZeRO stage.
void read_full_optimizer(const std::string& dir, int world, size_t n, std::vector<float>& m, std::vector<float>& v) {
    if (access((dir + "/optim.bin").c_str(), F_OK) == 0) {
        read_optimizer(dir + "/optim.bin", n, m, v);
        return;
    }
    m.clear();
    v.clear();
    std::vector<float> shard_m, shard_v;
    for (int r = 0; r < world; r++) {
        read_shard_file(dir + strformat("/optim_rank%d.bin", r), world, r, n, m.size(), shard_m, shard_v);
        m.insert(m.end(), shard_m.begin(), shard_m.end());
        v.insert(v.end(), shard_v.begin(), shard_v.end());
    }
    CHECK(m.size() >= n && m.size() - n < (size_t)world, "%s: the %d optimizer shards hold %zu values for %zu parameters",
          dir.c_str(), world, m.size(), n);
    m.resize(n);
    v.resize(n);
}

// Text sample: tokens drawn from softmax(logits) (top-k 40) after <|endoftext|>.
std::string generate(GPT& model, Rng& rng, const Tokenizer* tok, int n_tokens) {
    std::vector<int> ctx = {Tokenizer::kEndOfText};
    std::vector<int> out;
    for (int i = 0; i < n_tokens; i++) {
        int start = std::max(0, (int)ctx.size() - model.T);
        int t = (int)ctx.size() - start;
        model.forward(ctx.data() + start, nullptr, 1, t, false, 1.0f, 0);
        std::vector<float> logits = model.logits_row(0, t - 1);
        logits.resize(model.cfg.vocab);
        const int k = 40;
        std::vector<int> idx(logits.size());
        for (size_t j = 0; j < idx.size(); j++) idx[j] = (int)j;
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
        std::vector<double> p(k);
        double sum = 0;
        for (int j = 0; j < k; j++) sum += p[j] = std::exp((double)logits[idx[j]] - logits[idx[0]]);
        double u = rng.uniform() * sum;
        int pick = idx[k - 1];
        for (int j = 0; j < k; j++) {
            if ((u -= p[j]) <= 0) { pick = idx[j]; break; }
        }
        ctx.push_back(pick);
        out.push_back(pick);
    }
    if (!tok) {
        std::string s;
        for (int id : out) s += std::to_string(id) + " ";
        return s;
    }
    return tok->decode(out);
}

struct Checkpoint {
    std::string dir;
    json state;
};

Checkpoint find_resume_checkpoint(const std::string& out) {
    std::string dir = latest_checkpoint(out);
    CHECK(!dir.empty(), "--resume: no complete checkpoint in %s; train without --resume first", out.c_str());
    json state = json::parse(read_file(dir + "/state.json", "train state"), nullptr, false);
    CHECK(!state.is_discarded() && state.contains("options") && state.contains("step"),
          "%s/state.json: malformed train state; delete that checkpoint folder to use the previous one", dir.c_str());
    return {dir, state};
}

// On resume, every option given on the command line must agree with the checkpoint unless it
// does not change the training trajectory (option_may_change_on_resume).
TrainOptions merge_resume_options(const CLI::App& app, const TrainOptions& cli, const json& saved_json) {
    TrainOptions saved = saved_json.get<TrainOptions>();
    json cj = cli, sj = saved;
    for (const CLI::Option* opt : app.get_options()) {
        if (opt->count() == 0 || opt->get_lnames().empty()) continue;
        std::string field = opt->get_lnames()[0];
        for (char& ch : field) if (ch == '-') ch = '_';
        if (!cj.contains(field)) continue;
        if (option_may_change_on_resume(field)) {
            sj[field] = cj[field];
        } else if (cj[field] != sj[field]) {
            FAIL("--%s %s contradicts the checkpoint being resumed (%s); drop the option or use a new --out",
                 opt->get_lnames()[0].c_str(), cj[field].dump().c_str(), sj[field].dump().c_str());
        }
    }
    TrainOptions merged = sj.get<TrainOptions>();
    merged.resume = true;
    merged.stop_at = cli.stop_at;  // an interruption point belongs to one invocation, never to the run
    return merged;
}

int run(int argc, char** argv) {
    CLI::App app{"Train a GPT on token shards (see README.md)."};
    TrainOptions opt;
    add_train_options(app, opt);
    if (!parse_command_line(app, argc, argv)) return 0;

    // ---- ranks: --nproc starts them here; torchrun / mpirun started this one
    const Launch launch = discover_launch();
    if (opt.nproc > 1 && launch.method == "single") return spawn_ranks(opt.nproc, argc, argv);
    CHECK(opt.nproc <= 1 || opt.nproc == launch.world, "--nproc %d, but the launcher started %d ranks", opt.nproc, launch.world);
    const int rank = launch.rank, world = launch.world;
    g_rank = rank;
    g_world = world;
    if (rank != 0 && !std::freopen("/dev/null", "w", stdout)) FAIL("rank %d: cannot silence stdout", rank);  // rank 0 reports

    Checkpoint ckpt;
    if (opt.resume) {
        ckpt = find_resume_checkpoint(opt.out);
        opt = merge_resume_options(app, opt, ckpt.state["options"]);
    }
    const bool cuda = opt.device == "cuda" || (opt.device == "auto" && cuda_available());
    resolve_defaults(opt, cuda);
    CHECK(opt.batch >= 1 && opt.seq >= 1, "--batch %d and --seq %d must be positive", opt.batch, opt.seq);
    CHECK(opt.steps >= 1, "--steps %d must be positive", opt.steps);
    const long tokens_per_micro = (long)opt.batch * opt.seq * world;  // one micro-step of every rank
    CHECK(opt.total_batch % tokens_per_micro == 0,
          "--total-batch %ld is not a multiple of --batch * --seq * ranks = %d * %d * %d = %ld; pick a multiple", opt.total_batch,
          opt.batch, opt.seq, world, tokens_per_micro);
    const int accum = (int)(opt.total_batch / tokens_per_micro);
    CHECK(opt.clip >= 0 && opt.lr > 0, "--clip must be >= 0 and --lr > 0");
    ensure_writable_dir(opt.out, "output folder");

    // ---- communicator (before the backend: NCCL picks this rank's GPU); all ranks must agree
    g_comm = make_communicator(opt.comm, launch, cuda, opt.out, opt.comm_timeout);
    Communicator& comm = *g_comm;
    check_same_on_all_ranks(comm, "options (or the checkpoint resumed)", json(opt).dump() + "|" + ckpt.dir);
    if (!cuda && launch.local_world > 1 && !std::getenv("OMP_NUM_THREADS"))  // share the cores among this node's ranks
        omp_set_num_threads(std::max(1, omp_get_num_procs() / launch.local_world));

    // ---- backend and model
    std::unique_ptr<Ops> ops = cuda ? make_cuda_ops(opt.precision == "fp32" ? DType::F32 : DType::BF16) : make_cpu_ops();
    ModelFile loaded;
    GPTConfig cfg = model_config(opt, &loaded);
    GPT model(cfg, *ops, opt.batch, opt.seq, DataParallel{&comm, opt.zero, opt.bucket_grads});
    std::printf("%s\n", model.memory_plan().c_str());

    int start_step = 0;
    Rng sample_rng(Rng::derive(opt.seed, 99));
    DataLoaderState train_state;
    if (opt.resume) {
        // Another number of ranks or ZeRO stage continues the same run: the optimizer state is put
        // together from the saved ranks' pieces and cut for this layout, and the data loader
        // resumes at the same window of the epoch (same total batch: more ranks, fewer
        // accumulation steps). Only the summation order of the gradients differs.
        const int saved_world = ckpt.state.value("world", 1);
        const bool own_shard = saved_world == world && model.zero_stage() == 1 &&
                               access((ckpt.dir + strformat("/optim_rank%d.bin", rank)).c_str(), F_OK) == 0;
        ModelFile m = read_model_file(ckpt.dir + "/model.bin");
        model.set_params(m.params);
        if (own_shard) {
            read_optimizer_shard(ckpt.dir + strformat("/optim_rank%d.bin", rank), model, world, rank);
        } else {
            std::vector<float> mm, vv;
            read_full_optimizer(ckpt.dir, saved_world, model.num_params(), mm, vv);
            if (model.zero_stage() == 1) {  // this rank's piece of the padded layout (padding: 0)
                auto piece = [&](const std::vector<float>& all) {
                    std::vector<float> p(model.shard_size(), 0.f);
                    for (size_t i = 0; i < p.size() && model.shard_begin() + i < all.size(); i++) p[i] = all[model.shard_begin() + i];
                    return p;
                };
                model.set_shard_moments(0, piece(mm));
                model.set_shard_moments(1, piece(vv));
            } else {
                model.set_moments(0, mm);
                model.set_moments(1, vv);
            }
        }
        start_step = ckpt.state["step"].get<int>();
        train_state = ckpt.state["train_loader"].get<DataLoaderState>();
        if (saved_world != world) {
            train_state = rescale_loader_state(train_state, opt.batch, saved_world, world);
            std::printf("resuming a run of %d rank(s) on %d\n", saved_world, world);
        }
        sample_rng.state = ckpt.state["sample_rng"].get<uint64_t>();
        std::printf("resuming from %s at step %d\n", ckpt.dir.c_str(), start_step);
    } else if (!loaded.params.empty()) {
        CHECK(loaded.attn_params_per_layer == 0 || loaded.params.size() == model.num_params(),
              "%s has %zu attention parameters per layer, --attention %s needs another count",
              opt.model.c_str(), loaded.attn_params_per_layer, cfg.attn.name.c_str());
        if (loaded.params.size() != model.num_params()) {  // a plain GPT-2 file: attention params from the seed
            model.init_weights(opt.seed);
            std::vector<float> p = model.get_params();
            std::copy(loaded.params.begin(), loaded.params.end(), p.begin());
            model.set_params(p);
        } else {
            model.set_params(loaded.params);
        }
        std::printf("loaded weights from %s\n", opt.model.c_str());
    } else {
        model.init_weights(opt.seed);
    }

    // ---- data
    DataLoader train_loader(opt.data + "/train_*.bin", opt.batch, opt.seq, rank, world, opt.seed, true, cfg.vocab);
    train_loader.restore(train_state);
    std::unique_ptr<DataLoader> val_loader;
    if (opt.eval_every > 0) val_loader = std::make_unique<DataLoader>(opt.data + "/val_*.bin", opt.batch, opt.seq, rank, world, opt.seed, false, cfg.vocab);
    std::unique_ptr<Tokenizer> tokenizer;
    if (file_exists(opt.data + "/tokenizer/encoder.json")) tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(opt.data + "/tokenizer"));
    else std::printf("note: %s/tokenizer/ not found: samples are printed as token ids\n", opt.data.c_str());

    json config_json = opt;
    std::printf("config: %s\n", config_json.dump().c_str());
    std::printf("model: L=%d H=%d C=%d context=%d pos=%s attention=%s; %zu parameters; device %s (%s)\n", cfg.L, cfg.H, cfg.C,
                cfg.max_seq, cfg.pos.c_str(), cfg.attn.name.c_str(), model.num_params(), ops->name().c_str(), dtype_name(ops->act_dtype()));
    std::printf("batch: %d x %d tokens, %d accumulation steps, %d rank(s) = %ld tokens per step; %d steps; train data %zu tokens\n",
                opt.batch, opt.seq, accum, world, opt.total_batch, opt.steps, train_loader.num_tokens());
    if (world > 1) std::printf("data parallel: %d ranks (%s launch, %s communicator), ZeRO-%d\n", world, launch.method.c_str(), comm.name().c_str(), opt.zero);

    JsonlLog log(rank == 0 ? opt.out + "/log.jsonl" : "/dev/null", rank == 0 && opt.resume ? start_step : -1);  // rank 0 logs
    StatusLine status;
    LrSchedule sched{opt.lr, opt.lr_final, opt.warmup, opt.steps, opt.schedule};
    std::vector<int> inputs((size_t)opt.batch * opt.seq), targets((size_t)opt.batch * opt.seq);

    // Every rank writes its part into rank 0's temporary folder (rank 0: model, state and the
    // replicated optimizer state; under ZeRO-1 each rank its optimizer shard); rank 0 commits
    // only after a collective has confirmed that every part is complete.
    auto checkpoint = [&](int step) {
        std::string dir;
        if (rank == 0) dir = begin_checkpoint(opt.out, step);
        comm.broadcast_host(dir, 0);
        std::vector<float> params = model.get_params();  // a collective under ZeRO-1
        std::string failure;
        try {
            if (model.zero_stage() == 1) write_optimizer_shard(dir + strformat("/optim_rank%d.bin", rank), model, world, rank);
            if (rank == 0) {
                write_model_file(dir + "/model.bin", cfg, model.attn_params_per_layer(), params);
                if (model.zero_stage() == 0) write_optimizer(dir + "/optim.bin", model.get_moments(0), model.get_moments(1));
                json state = {{"step", step}, {"options", opt}, {"train_loader", train_loader.state()},
                              {"sample_rng", sample_rng.state}, {"world", world}};
                write_file_atomic(dir + "/state.json", state.dump(2));
            }
        } catch (const std::exception& e) {
            failure = e.what();
        }
        double failed_ranks = failure.empty() ? 0 : 1;
        comm.all_reduce_sum_host(&failed_ranks, 1);
        if (!failure.empty()) throw Error(failure);
        CHECK(failed_ranks == 0, "checkpoint of step %d: %.0f other rank(s) could not write their part (see their errors); not committed",
              step, failed_ranks);
        if (rank != 0) return;
        commit_checkpoint(opt.out, step);
        prune_checkpoints(opt.out, opt.keep);
        status.print(strformat("checkpoint %s", checkpoint_dir(opt.out, step).c_str()));
    };

    auto evaluate = [&](int step) {
        val_loader->reset();
        int n = std::min<int>(opt.eval_batches, (int)val_loader->batches_per_epoch());
        double sum = 0;
        for (int i = 0; i < n; i++) {
            val_loader->next_batch(inputs.data(), targets.data());
            sum += model.forward(inputs.data(), targets.data(), opt.batch, opt.seq, false, 1.0f, step);
        }
        comm.all_reduce_sum_host(&sum, 1);
        float val = (float)(sum / world / std::max(1, n));
        CHECK(std::isfinite(val), "validation loss is %f at step %d: training diverged; lower --lr or raise --warmup", val, step);
        status.print(strformat("step %d: val loss %.4f", step, val));
        log.write({{"step", step}, {"val_loss", val}});
    };

    // ---- the loop
    const int stop = opt.stop_at > 0 ? std::min(opt.stop_at, opt.steps) : opt.steps;
    auto t_start = std::chrono::steady_clock::now();
    long tokens_done = 0;
    for (int step = start_step; step < stop; step++) {
        auto t0 = std::chrono::steady_clock::now();
        float lr = sched.at(step);
        model.zero_grad();
        double loss = 0;
        for (int micro = 0; micro < accum; micro++) {
            train_loader.next_batch(inputs.data(), targets.data());
            loss += model.forward(inputs.data(), targets.data(), opt.batch, opt.seq, true, 1.0f / (accum * world), step);
            model.backward(micro == accum - 1);  // the last one starts the per-layer all-reduces (--bucket-grads)
        }
        model.reduce_gradients();  // the sum over ranks of 1/world-scaled gradients: their mean
        loss /= accum;
        if (world > 1) {
            comm.all_reduce_sum_host(&loss, 1);
            loss /= world;
        }
        float norm = model.grad_norm();
        CHECK(std::isfinite(loss) && std::isfinite(norm),
              "loss %f / gradient norm %f is not finite at step %d: training diverged; lower --lr or raise --warmup", loss, norm, step + 1);
        float scale = (opt.clip > 0 && norm > opt.clip) ? opt.clip / norm : 1.0f;
        model.adamw_step(lr, opt.beta1, opt.beta2, opt.adam_eps, opt.weight_decay, step + 1, scale);
        ops->synchronize();
        auto t1 = std::chrono::steady_clock::now();
        double dt = std::chrono::duration<double>(t1 - t0).count();
        tokens_done += opt.total_batch;
        double elapsed = std::chrono::duration<double>(t1 - t_start).count();
        double tok_s = opt.total_batch / dt;
        double eta = elapsed / (step + 1 - start_step) * (stop - step - 1);
        status.update(strformat("step %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f tok/s | %.0f ms | ETA %s", step + 1, opt.steps,
                                loss, lr, norm, tok_s, dt * 1e3, format_duration(eta).c_str()));
        log.write({{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"tokens_per_s", tok_s}, {"ms", dt * 1e3}});

        const int done = step + 1;
        if (opt.eval_every > 0 && (done % opt.eval_every == 0 || done == opt.steps)) evaluate(done);
        if (rank == 0 && opt.sample_every > 0 && (done % opt.sample_every == 0 || done == opt.steps))
            status.print(strformat("---- sample at step %d ----\n%s\n----", done, generate(model, sample_rng, tokenizer.get(), opt.sample_tokens).c_str()));
        if ((opt.ckpt_every > 0 && done % opt.ckpt_every == 0) || done == stop) checkpoint(done);
    }
    if (size_t used = ops->device_memory_used()) std::printf("peak device memory %.2f GiB (in use at the end, CUDA context included)\n", used / 1073741824.0);
    if (start_step >= stop) std::printf("nothing to do: the checkpoint is at step %d, --steps is %d\n", start_step, opt.steps);
    std::printf("done: %ld tokens in %s\n", tokens_done, format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count()).c_str());
    comm.barrier();  // no rank leaves while another may still need it
    end_launch(launch);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const int status = run(argc, argv);
        g_comm.reset();
        return status;
    } catch (const std::exception& e) {
        if (g_comm) g_comm->abort(e.what());  // the other ranks stop now rather than at their timeout
        std::fflush(stdout);
        if (g_world > 1 && std::strncmp(e.what(), "rank ", 5) != 0) std::fprintf(stderr, "\nerror: [rank %d/%d] %s\n", g_rank, g_world, e.what());
        else std::fprintf(stderr, "\nerror: %s\n", e.what());
        return 1;
    }
}
