// The one option table of the programs. Every option of `build/train` is a field of
// `TrainOptions` whose name is the long option with '-' turned into '_' (so --weight-decay is
// weight_decay); `add_train_options` declares them, with defaults and help, in one place, and
// the same struct is the JSON stored in checkpoints. `build/attn` reuses the model/attention
// part through `add_attention_options`.
#pragma once
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "attention.h"

struct TrainOptions {
    // ---- device and model
    std::string device = "auto";      // auto | cpu | cuda
    std::string precision = "bf16";   // bf16 | fp32 (CUDA; the CPU is always fp32)
    std::string model = "";           // preset name or llm.c model file; "" = tiny on CPU, d6 on CUDA
    int layers = 0, heads = 0, channels = 0, max_seq = 0;  // override the preset (0 = keep)
    std::string pos = "learned";      // learned | rope
    // ---- attention (see ATTENTION.md for each variant)
    std::string attention = "softmax";
    int attn_window = 4096;
    int attn_features = 256;
    int attn_redraw = 1000;
    int attn_degree = 4;
    int attn_sketch_size = 32;
    std::string attn_sketch = "learned";  // learned | random
    int attn_block = 256;
    bool attn_exact_diag = true;
    int attn_lsh_bits = 7;
    int attn_samples = 256;
    int attn_min_seq = 4096;
    // ---- data
    std::string data = "";            // folder with train_*.bin, val_*.bin and tokenizer/
    // ---- batch and schedule
    int batch = 0;                    // micro-batch B (0 = 8 on CPU, 16 on CUDA)
    int seq = 0;                      // T (0 = 64 on CPU, 512 on CUDA)
    long total_batch = 0;             // tokens per optimizer step (0 = batch*seq)
    int steps = 0;                    // optimizer steps (0 = 200 on CPU, 400 on CUDA)
    int stop_at = 0;                  // stop after this step as if interrupted (0 = run to --steps)
    float lr = 1e-3f;
    int warmup = 0;                   // warmup steps (0 = steps/20)
    std::string schedule = "cosine";  // cosine | linear | constant
    float lr_final = 0.1f;            // final lr as a fraction of --lr
    float weight_decay = 0.1f;
    float beta1 = 0.9f, beta2 = 0.95f, adam_eps = 1e-8f;
    float clip = 1.0f;                // global-norm clipping (0 = off)
    // ---- evaluation, sampling, logging, checkpoints
    int eval_every = 50;
    int eval_batches = 10;
    int sample_every = 100;
    int sample_tokens = 64;
    std::string out = "out";
    int ckpt_every = 100;
    int keep = 2;
    bool resume = false;
    uint64_t seed = 1337;
    // ---- data parallel (README: launches)
    int nproc = 0;                    // start this many ranks on this node (0/1 = none, or the launcher's)
    int zero = 0;                     // 0: optimizer state on every rank; 1: sharded (ZeRO-1)
    std::string comm = "auto";        // auto | single | shm | nccl
    double comm_timeout = 600;        // seconds a rank waits for the others before giving up
    bool bucket_grads = true;         // ZeRO 0: all-reduce per layer, overlapped with the backward
};
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE_WITH_DEFAULT(TrainOptions, device, precision, model, layers, heads, channels,
    max_seq, pos, attention, attn_window, attn_features, attn_redraw, attn_degree, attn_sketch_size, attn_sketch,
    attn_block, attn_exact_diag, attn_lsh_bits, attn_samples, attn_min_seq, data, batch, seq, total_batch, steps, stop_at,
    lr, warmup, schedule, lr_final, weight_decay, beta1, beta2, adam_eps, clip, eval_every, eval_batches,
    sample_every, sample_tokens, out, ckpt_every, keep, resume, seed, nproc, zero, comm, comm_timeout, bucket_grads)

void add_train_options(CLI::App& app, TrainOptions& o);
// Parses a program's command line: false after printing --help (the program then exits 0); a bad
// or contradicting option fails with one line (Error) naming it and pointing to --help.
bool parse_command_line(CLI::App& app, int argc, char** argv);
void add_attention_options(CLI::App& app, TrainOptions& o);
AttnConfig attention_config(const TrainOptions& o);
// Options that may differ when resuming (they do not change the training trajectory).
bool option_may_change_on_resume(const std::string& field);
