// The option table (see options.h).
#include "options.h"

#include <cstdio>

#include "check.h"

void add_attention_options(CLI::App& app, TrainOptions& o) {
    app.add_option("--attention", o.attention, "attention of every layer: softmax, local, performer, polynomial, polysketch, hyper")->capture_default_str();
    app.add_option("--attn-window", o.attn_window, "local: window W (query i sees keys i-W+1..i)")->capture_default_str();
    app.add_option("--attn-features", o.attn_features, "performer: random features m")->capture_default_str();
    app.add_option("--attn-redraw", o.attn_redraw, "performer: redraw features every N steps (0 = never)")->capture_default_str();
    app.add_option("--attn-degree", o.attn_degree, "polynomial/polysketch: even degree p")->capture_default_str();
    app.add_option("--attn-sketch-size", o.attn_sketch_size, "polysketch: sketch size r")->capture_default_str();
    app.add_option("--attn-sketch", o.attn_sketch, "polysketch: learned or random sketch")->check(CLI::IsMember({"learned", "random"}))->capture_default_str();
    app.add_option("--attn-block", o.attn_block, "polysketch block b / hyper block size")->capture_default_str();
    app.add_option("--attn-exact-diag", o.attn_exact_diag, "polysketch: exact polynomial on diagonal blocks (true/false)")->capture_default_str();
    app.add_option("--attn-lsh-bits", o.attn_lsh_bits, "hyper: LSH sign projections")->capture_default_str();
    app.add_option("--attn-samples", o.attn_samples, "hyper: sampled key columns")->capture_default_str();
    app.add_option("--attn-min-seq", o.attn_min_seq, "hyper: exact attention at or below this length")->capture_default_str();
    app.add_option("--seed", o.seed, "random seed (weights, data order, random features)")->capture_default_str();
    app.add_option("--device", o.device, "cpu, cuda, or auto (cuda when a GPU is present)")->check(CLI::IsMember({"auto", "cpu", "cuda"}))->capture_default_str();
    app.add_option("--precision", o.precision, "CUDA compute precision: bf16 (fp32 masters) or fp32")->check(CLI::IsMember({"bf16", "fp32"}))->capture_default_str();
}

void add_train_options(CLI::App& app, TrainOptions& o) {
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a repeated option: the last wins
    add_attention_options(app, o);
    app.add_option("--model", o.model, "preset (tiny, mini, d6, d12, d24, d36, d48) or llm.c model file; default tiny on CPU, d6 on CUDA");
    app.add_option("--layers", o.layers, "override the preset's number of layers");
    app.add_option("--heads", o.heads, "override the preset's number of heads");
    app.add_option("--channels", o.channels, "override the preset's channels");
    app.add_option("--max-seq", o.max_seq, "override the context length (rows of the position table)");
    app.add_option("--pos", o.pos, "positions: learned table or rope")->check(CLI::IsMember({"learned", "rope"}))->capture_default_str();
    app.add_option("--data", o.data, "folder with train_*.bin, val_*.bin shards and tokenizer/ (default: the Brown corpus cache)");
    app.add_option("--batch", o.batch, "micro-batch size B (default 8 on CPU, 16 on CUDA)");
    app.add_option("--seq", o.seq, "sequence length T (default 64 on CPU, 512 on CUDA)");
    app.add_option("--total-batch", o.total_batch, "tokens per optimizer step; gradient accumulation makes up the rest (default B*T)");
    app.add_option("--steps", o.steps, "optimizer steps (default 500 on CPU, 400 on CUDA)");
    app.add_option("--stop-at", o.stop_at, "stop (with a checkpoint) after this step, as if interrupted; --resume continues");
    app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
    app.add_option("--warmup", o.warmup, "linear warmup steps (default steps/20)");
    app.add_option("--schedule", o.schedule, "decay after warmup: cosine, linear or constant")->check(CLI::IsMember({"cosine", "linear", "constant"}))->capture_default_str();
    app.add_option("--lr-final", o.lr_final, "final learning rate as a fraction of --lr")->capture_default_str();
    app.add_option("--weight-decay", o.weight_decay, "AdamW decoupled weight decay (2-D weights only)")->capture_default_str();
    app.add_option("--beta1", o.beta1, "AdamW beta1")->capture_default_str();
    app.add_option("--beta2", o.beta2, "AdamW beta2")->capture_default_str();
    app.add_option("--adam-eps", o.adam_eps, "AdamW epsilon")->capture_default_str();
    app.add_option("--clip", o.clip, "clip the global gradient norm to this (0 = off)")->capture_default_str();
    app.add_option("--eval-every", o.eval_every, "validation loss every N steps (0 = off)")->capture_default_str();
    app.add_option("--eval-batches", o.eval_batches, "validation batches per evaluation")->capture_default_str();
    app.add_option("--sample-every", o.sample_every, "print a generated text sample every N steps (0 = off)")->capture_default_str();
    app.add_option("--sample-tokens", o.sample_tokens, "tokens per sample")->capture_default_str();
    app.add_option("--out", o.out, "output folder: log.jsonl, checkpoints")->capture_default_str();
    app.add_option("--ckpt-every", o.ckpt_every, "checkpoint every N steps (0 = only at the end)")->capture_default_str();
    app.add_option("--keep", o.keep, "keep the newest K checkpoints")->capture_default_str();
    app.add_flag("--resume", o.resume, "continue from the newest complete checkpoint in --out");
    app.add_option("--nproc", o.nproc, "start N ranks on this node (data parallel; one per GPU); see README for torchrun/mpirun");
    app.add_option("--zero", o.zero, "0: every rank keeps the optimizer state; 1: shard it over the ranks (ZeRO-1)")->check(CLI::IsMember({0, 1}))->capture_default_str();
    app.add_option("--comm", o.comm, "communicator: auto (nccl on GPUs, shm on the CPU), single, shm, nccl")->check(CLI::IsMember({"auto", "single", "shm", "nccl"}))->capture_default_str();
    app.add_option("--comm-timeout", o.comm_timeout, "seconds a rank waits for the others (rendezvous, collectives) before exiting with an error")->capture_default_str();
    app.add_option("--bucket-grads", o.bucket_grads, "ZeRO 0: all-reduce the gradients per layer, overlapped with the backward (true), or in one collective after it (false)")->capture_default_str();
}

bool parse_command_line(CLI::App& app, int argc, char** argv) {
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::printf("%s", app.help().c_str());
        return false;
    } catch (const CLI::ParseError& e) {
        FAIL("%s (see --help)", e.what());
    }
    return true;
}

AttnConfig attention_config(const TrainOptions& o) {
    AttnConfig a;
    a.name = o.attention;
    a.window = o.attn_window;
    a.features = o.attn_features;
    a.redraw = o.attn_redraw;
    a.degree = o.attn_degree;
    a.sketch_size = o.attn_sketch_size;
    a.sketch_learned = o.attn_sketch == "learned";
    a.block = o.attn_block;
    a.exact_diag = o.attn_exact_diag;
    a.lsh_bits = o.attn_lsh_bits;
    a.samples = o.attn_samples;
    a.min_seq = o.attn_min_seq;
    a.seed = o.seed;
    CHECK(a.window >= 1, "--attn-window %d must be >= 1", a.window);
    CHECK(a.features >= 1, "--attn-features %d must be >= 1", a.features);
    CHECK(a.degree >= 2 && a.degree % 2 == 0, "--attn-degree %d must be even and >= 2", a.degree);
    CHECK(a.sketch_size >= 1 && a.block >= 1, "--attn-sketch-size and --attn-block must be >= 1");
    CHECK(a.lsh_bits >= 1 && a.lsh_bits <= 16, "--attn-lsh-bits %d must be in [1, 16]", a.lsh_bits);
    CHECK(a.samples >= 0 && a.min_seq >= 1, "--attn-samples must be >= 0 and --attn-min-seq >= 1");
    return a;
}

bool option_may_change_on_resume(const std::string& f) {
    static const char* allowed[] = {"steps", "stop_at", "eval_every", "eval_batches", "sample_every", "sample_tokens",
                                    "out", "ckpt_every", "keep", "resume", "data", "device",
                                    "nproc", "comm", "comm_timeout", "bucket_grads", "zero"};
    for (const char* a : allowed)
        if (f == a) return true;
    return false;
}
