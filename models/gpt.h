// The GPT-2 model, written once against the `Ops` backend interface (src/ops.h).
//
// Architecture: token embedding + learned positions (or RoPE on q and k), L pre-LayerNorm blocks
// (LN -> QKV -> causal attention (a pluggable `Attention` module) -> projection -> residual;
// LN -> FC 4C -> GELU(tanh) -> projection -> residual), final LN, output layer tied to the token
// embedding, vocabulary padded to a multiple of 128 with the padded logits masked.
//
// Memory: parameters, gradients, optimizer state and activations each live in one arena whose
// layout comes from a spec table (`ParamSpec`, `ActSpec`); `memory_plan()` lists them.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "attention.h"
#include "comm.h"
#include "ops.h"

struct GPTConfig {
    int max_seq = 1024;        // context length: rows of the position table (learned positions)
    int vocab = 50257;         // real vocabulary
    int padded_vocab = 50304;  // vocab rounded up to a multiple of 128 (rows of wte)
    int L = 12, H = 12, C = 768;
    std::string pos = "learned";  // learned | rope
    float rope_theta = 10000.0f;
    AttnConfig attn;
    int head_dim() const { return C / H; }
};

// Named presets: tiny (seconds on a CPU), mini, d6, d12 (GPT-2 124M), d24, d36, d48.
GPTConfig gpt_preset(const std::string& name);
std::vector<std::string> gpt_preset_names();
// Checks divisibility, even head dim for RoPE, vocab padding; throws Error naming the value.
void validate_config(const GPTConfig& cfg);

// The parameter tensors in llm.c's order (the model file lists them in this order), then the
// attention module's learned parameters (L, P) when it has any.
enum ParamId { WTE, WPE, LN1W, LN1B, QKVW, QKVB, ATTPROJW, ATTPROJB, LN2W, LN2B, FCW, FCB,
               FCPROJW, FCPROJB, LNFW, LNFB, ATTNP, NUM_PARAM_TENSORS };
struct ParamSpec {
    const char* name;
    size_t size;   // elements
    bool decay;    // AdamW weight decay applies (2-D weights)
};
std::vector<ParamSpec> param_specs(const GPTConfig& cfg, size_t attn_params_per_layer);

// How a model is trained across ranks: none (comm = nullptr), or data parallel over `comm` with
// the optimizer state replicated (zero 0) or sharded (zero 1, ZeRO-1), the gradients of the last
// micro-step reduced per layer during the backward (bucket_grads, zero 0 only).
struct DataParallel {
    Communicator* comm = nullptr;
    int zero = 0;
    bool bucket_grads = true;
};

class GPT {
public:
    // Allocates every arena for micro-batches of at most (B, T) tokens; under ZeRO-1 the optimizer
    // state only for this rank's shard.
    GPT(const GPTConfig& cfg, Ops& ops, int B, int T, const DataParallel& dp = {});
    ~GPT();
    GPT(const GPT&) = delete;
    GPT& operator=(const GPT&) = delete;

    const GPTConfig cfg;
    Ops& ops;
    const int B, T;  // maximum micro-batch shape

    size_t num_params() const { return num_params_; }
    size_t attn_params_per_layer() const { return attn_params_per_layer_; }
    // Human-readable table of every arena (MiB) for the start-up print.
    std::string memory_plan() const;
    size_t total_bytes() const;

    // GPT-2 initialisation (normal 0.02, residual projections scaled by 1/sqrt(2L), LN = 1/0).
    void init_weights(uint64_t seed);
    // All parameters as fp32 (the masters when the backend keeps them), in param_specs order.
    std::vector<float> get_params() const;
    void set_params(const std::vector<float>& host);
    // Gradients of the last backward(s), fp32, same layout.
    std::vector<float> get_grads() const;
    // Adam moments, fp32, same layout.
    std::vector<float> get_moments(int which) const;  // 0 = m, 1 = v
    void set_moments(int which, const std::vector<float>& host);

    // Forward over tokens (b, t) <= (B, T) on the host. With targets: returns the mean loss and,
    // when `train`, leaves dloss/dlogits (scaled by grad_scale / (b*t)) for backward().
    // Without targets (nullptr) computes logits only (see last_logits).
    float forward(const int* tokens, const int* targets, int b, int t, bool train,
                  float grad_scale, int64_t step);
    void zero_grad();
    // last_micro_step: the last backward before reduce_gradients(). With data parallel under
    // ZeRO 0 and bucketing on (DataParallel), each layer's gradients start their all-reduce
    // (asynchronous, see gradient_buckets) as soon as they are complete, overlapping the rest of
    // the backward; the gradients must then not be touched until reduce_gradients().
    void backward(bool last_micro_step = false);
    // Logits (Vp floats) of row (bi, ti) of the last forward, on the host.
    std::vector<float> logits_row(int bi, int ti) const;

    // Global L2 norm of the gradients (deterministic).
    float grad_norm();
    // One AdamW step over every parameter tensor (decay on 2-D weights only).
    void adamw_step(float lr, float beta1, float beta2, float eps, float weight_decay, int step,
                    float grad_scale);

    // ---- data parallel over the ranks of `dp.comm` (src/comm.h), fixed at construction (see
    // DataParallel). zero 0: every rank keeps the whole optimizer state; gradients are
    // all-reduced. zero 1 (ZeRO-1): the parameters are laid out padded to a multiple of world;
    // rank r owns elements [shard_begin, shard_begin + shard_size) of that layout and keeps only
    // their AdamW m, v (and fp32 masters); gradients are reduce-scattered, AdamW updates the
    // shard, the parameters are all-gathered. The loss must be scaled by 1/world (forward's
    // grad_scale) so the summed gradients are the mean. Under zero 1, get_params() is a
    // collective (it gathers the masters): every rank calls it.
    // bucket_grads (zero 0 only; --bucket-grads): reduce the gradients per layer, overlapped with
    // the backward of the last micro-step; otherwise one collective after it.
    int zero_stage() const { return zero_; }
    // After the last micro-step's backward: sums the gradients over the ranks (zero 0: all of
    // them; zero 1: this rank's shard). When backward(true) started the buckets: waits for them;
    // otherwise one collective over the whole gradient arena (zero 1 always: one reduce-scatter).
    void reduce_gradients();
    // The all-reduce buckets of the gradient arena, fp32 views: element l < L holds layer l's
    // slices of every per-layer tensor (12 slices, plus the attention module's), started from
    // layer L-1 down to 0; element L holds wte, wpe, lnfw, lnfb, started after the backward.
    // Together they cover the arena exactly once (empty tensors left out).
    std::vector<std::vector<Tensor>> gradient_buckets() const;
    size_t shard_begin() const { return shard_begin_; }
    size_t shard_size() const { return shard_size_; }
    // ZeRO-1 optimizer state of this rank's shard (shard_size floats): 0 = m, 1 = v
    std::vector<float> get_shard_moments(int which) const;
    void set_shard_moments(int which, const std::vector<float>& host);

private:
    Tensor param(int id) const { return params_[id]; }
    Tensor grad(int id) const { return grads_[id]; }

    std::unique_ptr<Attention> attn_;
    size_t attn_params_per_layer_ = 0;
    std::vector<ParamSpec> specs_;
    size_t num_params_ = 0;

    // arenas
    void* params_mem_ = nullptr;   // act dtype (num_params)
    void* master_mem_ = nullptr;   // fp32 (num_params), only with master weights
    void* grads_mem_ = nullptr;    // fp32 (num_params)
    void* m_mem_ = nullptr;        // fp32 (num_params)
    void* v_mem_ = nullptr;        // fp32 (num_params)
    void* acts_mem_ = nullptr;     // mixed dtypes, see ActLayout in gpt.cpp
    void* attn_workspace_ = nullptr;
    int* tokens_dev_ = nullptr;    // (B, T)
    int* targets_dev_ = nullptr;   // (B, T)
    std::vector<Tensor> params_, grads_;  // per-tensor views of the flat arenas
    struct Acts;
    std::unique_ptr<Acts> acts_;
    std::vector<size_t> act_bytes_;   // for the memory plan
    size_t acts_total_ = 0, workspace_bytes_ = 0;

    // data parallel (DataParallel)
    Communicator* comm_ = nullptr;
    int zero_ = 0;
    bool bucket_grads_ = true;
    bool grads_in_flight_ = false;               // backward(true) started the buckets; reduce_gradients() waits
    size_t padded_ = 0;                          // num_params rounded up to a multiple of world (zero 1)
    size_t shard_begin_ = 0, shard_size_ = 0;    // this rank's shard of the padded layout (zero 1)
    struct DecayRun { size_t offset, count; bool decay; };
    std::vector<DecayRun> decay_runs() const;    // [0, num_params) as runs of equal weight-decay flag

    // state of the last forward, for backward()
    int last_b_ = 0, last_t_ = 0;
    int64_t last_step_ = 0;
    std::vector<int> last_tokens_;
    bool have_grads_for_backward_ = false;
};
