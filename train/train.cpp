// build/train: the training program. Reads options (src/options.h, the one table), builds the
// backend and the model, then loops: micro-batches with gradient accumulation, global-norm
// clipping, AdamW with the LR schedule, a status line, JSON-lines log, validation loss, text
// samples and atomic checkpoints that --resume continues bit for bit.
#include <sys/stat.h>

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

#include "check.h"
#include "data/dataloader.h"
#include "data/tokenizer.h"
#include "fileio.h"
#include "log.h"
#include "models/gpt.h"
#include "models/model_file.h"
#include "ops.h"
#include "options.h"
#include "rng.h"
#include "schedule.h"

using nlohmann::json;

namespace {

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
    if (o.steps == 0) o.steps = cuda ? 400 : 200;
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
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        std::printf("%s", app.help().c_str());
        return 0;
    } catch (const CLI::ParseError& e) {
        FAIL("%s (see --help)", e.what());
    }

    Checkpoint ckpt;
    if (opt.resume) {
        ckpt = find_resume_checkpoint(opt.out);
        opt = merge_resume_options(app, opt, ckpt.state["options"]);
    }
    const bool cuda = opt.device == "cuda" || (opt.device == "auto" && cuda_available());
    resolve_defaults(opt, cuda);
    CHECK(opt.batch >= 1 && opt.seq >= 1, "--batch %d and --seq %d must be positive", opt.batch, opt.seq);
    CHECK(opt.steps >= 1, "--steps %d must be positive", opt.steps);
    const long tokens_per_micro = (long)opt.batch * opt.seq;
    CHECK(opt.total_batch % tokens_per_micro == 0,
          "--total-batch %ld is not a multiple of --batch * --seq = %ld; pick a multiple", opt.total_batch, tokens_per_micro);
    const int accum = (int)(opt.total_batch / tokens_per_micro);
    CHECK(opt.clip >= 0 && opt.lr > 0, "--clip must be >= 0 and --lr > 0");
    ensure_writable_dir(opt.out, "output folder");

    // ---- backend and model
    std::unique_ptr<Ops> ops = cuda ? make_cuda_ops(opt.precision == "fp32" ? DType::F32 : DType::BF16) : make_cpu_ops();
    ModelFile loaded;
    GPTConfig cfg = model_config(opt, &loaded);
    GPT model(cfg, *ops, opt.batch, opt.seq);
    std::printf("%s\n", model.memory_plan().c_str());

    int start_step = 0;
    Rng sample_rng(Rng::derive(opt.seed, 99));
    DataLoaderState train_state;
    if (opt.resume) {
        ModelFile m = read_model_file(ckpt.dir + "/model.bin");
        model.set_params(m.params);
        std::vector<float> mm, vv;
        read_optimizer(ckpt.dir + "/optim.bin", model.num_params(), mm, vv);
        model.set_moments(0, mm);
        model.set_moments(1, vv);
        start_step = ckpt.state["step"].get<int>();
        train_state = ckpt.state["train_loader"].get<DataLoaderState>();
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
    DataLoader train_loader(opt.data + "/train_*.bin", opt.batch, opt.seq, 0, 1, opt.seed, true, cfg.vocab);
    train_loader.restore(train_state);
    std::unique_ptr<DataLoader> val_loader;
    if (opt.eval_every > 0) val_loader = std::make_unique<DataLoader>(opt.data + "/val_*.bin", opt.batch, opt.seq, 0, 1, opt.seed, false, cfg.vocab);
    std::unique_ptr<Tokenizer> tokenizer;
    if (file_exists(opt.data + "/tokenizer/encoder.json")) tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(opt.data + "/tokenizer"));
    else std::printf("note: %s/tokenizer/ not found: samples are printed as token ids\n", opt.data.c_str());

    json config_json = opt;
    std::printf("config: %s\n", config_json.dump().c_str());
    std::printf("model: L=%d H=%d C=%d context=%d pos=%s attention=%s; %zu parameters; device %s (%s)\n", cfg.L, cfg.H, cfg.C,
                cfg.max_seq, cfg.pos.c_str(), cfg.attn.name.c_str(), model.num_params(), ops->name().c_str(), dtype_name(ops->act_dtype()));
    std::printf("batch: %d x %d tokens, %d accumulation steps = %ld tokens per step; %d steps; train data %zu tokens\n",
                opt.batch, opt.seq, accum, opt.total_batch, opt.steps, train_loader.num_tokens());

    JsonlLog log(opt.out + "/log.jsonl", opt.resume ? start_step : -1);
    StatusLine status;
    LrSchedule sched{opt.lr, opt.lr_final, opt.warmup, opt.steps, opt.schedule};
    std::vector<int> inputs((size_t)opt.batch * opt.seq), targets((size_t)opt.batch * opt.seq);

    auto checkpoint = [&](int step) {
        std::string dir = begin_checkpoint(opt.out, step);
        write_model_file(dir + "/model.bin", cfg, model.attn_params_per_layer(), model.get_params());
        write_optimizer(dir + "/optim.bin", model.get_moments(0), model.get_moments(1));
        json state = {{"step", step}, {"options", opt}, {"train_loader", train_loader.state()},
                      {"sample_rng", sample_rng.state}};
        write_file_atomic(dir + "/state.json", state.dump(2));
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
        float val = (float)(sum / std::max(1, n));
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
            loss += model.forward(inputs.data(), targets.data(), opt.batch, opt.seq, true, 1.0f / accum, step);
            model.backward();
        }
        loss /= accum;
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
        if (opt.sample_every > 0 && (done % opt.sample_every == 0 || done == opt.steps))
            status.print(strformat("---- sample at step %d ----\n%s\n----", done, generate(model, sample_rng, tokenizer.get(), opt.sample_tokens).c_str()));
        if ((opt.ckpt_every > 0 && done % opt.ckpt_every == 0) || done == stop) checkpoint(done);
    }
    if (size_t used = ops->device_memory_used()) std::printf("peak device memory %.2f GiB (in use at the end, CUDA context included)\n", used / 1073741824.0);
    if (start_step >= stop) std::printf("nothing to do: the checkpoint is at step %d, --steps is %d\n", start_step, opt.steps);
    std::printf("done: %ld tokens in %s\n", tokens_done, format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count()).c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "\nerror: %s\n", e.what());
        return 1;
    }
}
