// The GPT-2 model: presets, parameter and activation layout, forward and backward wiring, and
// the optimizer step, all through `Ops` so the same code runs on the CPU and on CUDA.
#include "gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "check.h"
#include "rng.h"

// ---------------------------------------------------------------- presets and validation

namespace {
struct Preset { const char* name; int L, H, C, max_seq; };
const Preset kPresets[] = {
    {"tiny", 2, 2, 128, 256},    // trains in seconds on a CPU (head dim 64, as the flash kernel needs)
    {"mini", 4, 4, 256, 512},
    {"d6", 6, 6, 384, 1024},
    {"d12", 12, 12, 768, 1024},  // GPT-2 124M
    {"d24", 24, 16, 1024, 1024}, // GPT-2 350M
    {"d36", 36, 20, 1280, 1024}, // GPT-2 774M
    {"d48", 48, 25, 1600, 1024}, // GPT-2 1558M
};
}  // namespace

GPTConfig gpt_preset(const std::string& name) {
    for (const Preset& p : kPresets) {
        if (name != p.name) continue;
        GPTConfig c;
        c.L = p.L; c.H = p.H; c.C = p.C; c.max_seq = p.max_seq;
        return c;
    }
    std::string known;
    for (const Preset& p : kPresets) known += std::string(known.empty() ? "" : ", ") + p.name;
    FAIL("--model %s: unknown preset and no such file (presets: %s)", name.c_str(), known.c_str());
}

std::vector<std::string> gpt_preset_names() {
    std::vector<std::string> v;
    for (const Preset& p : kPresets) v.push_back(p.name);
    return v;
}

void validate_config(const GPTConfig& c) {
    CHECK(c.L >= 1 && c.H >= 1 && c.C >= 1, "model: layers %d, heads %d, channels %d must be positive", c.L, c.H, c.C);
    CHECK(c.C % c.H == 0, "model: channels %d are not divisible by heads %d; pick --channels a multiple of --heads", c.C, c.H);
    CHECK(c.vocab >= 1 && c.padded_vocab >= c.vocab, "model: padded vocab %d < vocab %d", c.padded_vocab, c.vocab);
    CHECK(c.max_seq >= 1, "model: context length %d must be positive", c.max_seq);
    CHECK(c.pos == "learned" || c.pos == "rope", "--pos %s: expected learned or rope", c.pos.c_str());
    if (c.pos == "rope") CHECK(c.head_dim() % 2 == 0, "--pos rope needs an even head dim, got %d", c.head_dim());
}

std::vector<ParamSpec> param_specs(const GPTConfig& c, size_t attn_params_per_layer) {
    const size_t L = c.L, C = c.C, Vp = c.padded_vocab;
    const size_t maxT = c.pos == "learned" ? c.max_seq : 0;  // RoPE models have no position table
    return {
        {"wte", Vp * C, true},           {"wpe", maxT * C, true},
        {"ln1w", L * C, false},          {"ln1b", L * C, false},
        {"qkvw", L * 3 * C * C, true},   {"qkvb", L * 3 * C, false},
        {"attprojw", L * C * C, true},   {"attprojb", L * C, false},
        {"ln2w", L * C, false},          {"ln2b", L * C, false},
        {"fcw", L * 4 * C * C, true},    {"fcb", L * 4 * C, false},
        {"fcprojw", L * C * 4 * C, true}, {"fcprojb", L * C, false},
        {"lnfw", C, false},              {"lnfb", C, false},
        {"attn", L * attn_params_per_layer, false},  // decay per element: Attention::param_decay_mask
    };
}

// ---------------------------------------------------------------- activations

// Every activation buffer, sized for the maximum micro-batch (B, T); N = B*T. Per-layer buffers
// hold L slices of that size; a smaller forward uses the first b*t rows of each slice.
struct GPT::Acts {
    Tensor encoded;              // (N, C)
    Tensor ln1, ln1_mean, ln1_rstd;   // (L, N, C), (L, N) fp32, (L, N) fp32
    Tensor qkv;                  // (L, N, 3C)  (q and k after RoPE when pos = rope)
    Tensor atty;                 // (L, N, C)
    Tensor attn_saved;           // (L, saved_size) fp32
    Tensor residual2;            // (L, N, C)
    Tensor ln2, ln2_mean, ln2_rstd;   // (L, N, C), (L, N), (L, N)
    Tensor fch, fch_gelu;        // (L, N, 4C)
    Tensor residual3;            // (L, N, C)
    Tensor lnf, lnf_mean, lnf_rstd;   // (N, C), (N), (N)
    Tensor logits;               // (N, Vp); holds dlogits after a training forward
    Tensor losses;               // (N) fp32
    Tensor proj_out;             // (N, C) scratch for the two projections' outputs
    // gradients of activations (backward scratch)
    Tensor dresidual;            // (N, C)
    Tensor dbtc;                 // (N, C)
    Tensor datty;                // (N, C)
    Tensor dqkv;                 // (N, 3C)
    Tensor dbt4c;                // (N, 4C)
};

GPT::GPT(const GPTConfig& c, Ops& o, int B_, int T_, const DataParallel& dp) : cfg(c), ops(o), B(B_), T(T_) {
    validate_config(cfg);
    CHECK(B >= 1, "--batch %d must be positive", B);
    CHECK(T >= 1 && T <= cfg.max_seq, "--seq %d is beyond the model's context %d; lower --seq or use a model with a longer context",
          T, cfg.max_seq);
    attn_ = ops.make_attention(cfg.attn);
    attn_params_per_layer_ = attn_->num_params(cfg.head_dim());
    specs_ = param_specs(cfg, attn_params_per_layer_);

    // ---- parameters, gradients, optimizer state: one arena each, same layout
    num_params_ = 0;
    for (const ParamSpec& s : specs_) num_params_ += s.size;
    size_t arena_n = num_params_, state_n = num_params_;  // replicated optimizer state
    if (dp.comm) {
        CHECK(dp.zero == 0 || dp.zero == 1, "--zero %d: expected 0 (replicated optimizer state) or 1 (sharded, ZeRO-1)", dp.zero);
        comm_ = dp.comm;
        zero_ = dp.zero;
        bucket_grads_ = dp.bucket_grads;
    }
    if (zero_ == 1) {
        // ZeRO-1: parameters and gradients padded to a multiple of world (the collectives move
        // equal chunks; the padding stays 0); rank r keeps the optimizer state of its shard only
        const size_t world = comm_->world();
        padded_ = (num_params_ + world - 1) / world * world;
        shard_size_ = padded_ / world;
        shard_begin_ = comm_->rank() * shard_size_;
        arena_n = padded_;
        state_n = shard_size_;
    }
    const DType adt = ops.act_dtype();
    params_mem_ = ops.alloc(arena_n * dtype_size(adt), "parameters");
    if (ops.has_master_weights()) master_mem_ = ops.alloc(state_n * 4, zero_ ? "master weights (shard)" : "master weights");
    grads_mem_ = ops.alloc(arena_n * 4, "gradients");
    m_mem_ = ops.alloc(state_n * 4, zero_ ? "AdamW m (shard)" : "AdamW m");
    v_mem_ = ops.alloc(state_n * 4, zero_ ? "AdamW v (shard)" : "AdamW v");
    Tensor P{params_mem_, adt, num_params_}, G{grads_mem_, DType::F32, num_params_};
    size_t off = 0;
    for (const ParamSpec& s : specs_) {  // per-tensor views (the optimizer works on flat runs)
        params_.push_back(P.slice(off, s.size));
        grads_.push_back(G.slice(off, s.size));
        off += s.size;
    }

    // ---- activations: a spec table (dtype, elements) laid out in one arena
    const size_t N = (size_t)B * T, L = cfg.L, C = cfg.C, Vp = cfg.padded_vocab;
    AttnShape shape{B, cfg.H, T, cfg.head_dim(), adt};
    const size_t saved = attn_->saved_size(shape);
    acts_ = std::make_unique<Acts>();
    Acts& a = *acts_;
    const DType F = DType::F32;
    struct Spec { Tensor* t; DType dt; size_t n; };
    std::vector<Spec> table = {
        {&a.encoded, adt, N * C},
        {&a.ln1, adt, L * N * C}, {&a.ln1_mean, F, L * N}, {&a.ln1_rstd, F, L * N},
        {&a.qkv, adt, L * N * 3 * C}, {&a.atty, adt, L * N * C}, {&a.attn_saved, F, L * saved},
        {&a.residual2, adt, L * N * C},
        {&a.ln2, adt, L * N * C}, {&a.ln2_mean, F, L * N}, {&a.ln2_rstd, F, L * N},
        {&a.fch, adt, L * N * 4 * C}, {&a.fch_gelu, adt, L * N * 4 * C},
        {&a.residual3, adt, L * N * C},
        {&a.lnf, adt, N * C}, {&a.lnf_mean, F, N}, {&a.lnf_rstd, F, N},
        {&a.logits, adt, N * Vp}, {&a.losses, F, N}, {&a.proj_out, adt, N * C},
        {&a.dresidual, adt, N * C}, {&a.dbtc, adt, N * C}, {&a.datty, adt, N * C},
        {&a.dqkv, adt, N * 3 * C}, {&a.dbt4c, adt, N * 4 * C},
    };
    acts_total_ = 0;
    for (const Spec& s : table) acts_total_ += (s.n * dtype_size(s.dt) + 255) / 256 * 256;
    acts_mem_ = ops.alloc(acts_total_, "activations");
    size_t byte = 0;
    for (const Spec& s : table) {
        *s.t = Tensor{static_cast<char*>(acts_mem_) + byte, s.dt, s.n};
        byte += (s.n * dtype_size(s.dt) + 255) / 256 * 256;
        act_bytes_.push_back(s.n * dtype_size(s.dt));
    }
    workspace_bytes_ = attn_->workspace_bytes(shape);
    if (workspace_bytes_) attn_workspace_ = ops.alloc(workspace_bytes_, "attention workspace");
    tokens_dev_ = static_cast<int*>(ops.alloc(N * sizeof(int), "tokens"));
    targets_dev_ = static_cast<int*>(ops.alloc(N * sizeof(int), "targets"));
}

GPT::~GPT() {
    for (void* p : {params_mem_, master_mem_, grads_mem_, m_mem_, v_mem_, acts_mem_, attn_workspace_,
                    (void*)tokens_dev_, (void*)targets_dev_})
        if (p) ops.release(p);
}

size_t GPT::total_bytes() const {
    size_t p = num_params_ * dtype_size(ops.act_dtype());
    const size_t state_n = zero_ == 1 ? shard_size_ : num_params_;
    return p + (master_mem_ ? state_n * 4 : 0) + num_params_ * 4 + 2 * state_n * 4 + acts_total_ + workspace_bytes_;
}

std::string GPT::memory_plan() const {
    auto mib = [](size_t b) { return b / 1048576.0; };
    std::string s;
    s += strformat("memory plan (%s, %s): %zu parameters\n", ops.name().c_str(), dtype_name(ops.act_dtype()), num_params_);
    s += strformat("  %-22s %10.1f MiB\n", "parameters", mib(num_params_ * dtype_size(ops.act_dtype())));
    const size_t state_n = zero_ == 1 ? shard_size_ : num_params_;  // ZeRO-1: this rank's shard
    if (master_mem_) s += strformat("  %-22s %10.1f MiB\n", "master weights (fp32)", mib(state_n * 4));
    s += strformat("  %-22s %10.1f MiB\n", "gradients (fp32)", mib(num_params_ * 4));
    s += strformat("  %-22s %10.1f MiB\n", "AdamW m, v (fp32)", mib(2 * state_n * 4));
    if (zero_ == 1) s += strformat("  (ZeRO-1: optimizer state sharded over %d ranks, %zu elements each)\n", comm_->world(), shard_size_);
    s += strformat("  %-22s %10.1f MiB   (B=%d, T=%d)\n", "activations", mib(acts_total_), B, T);
    if (workspace_bytes_) s += strformat("  %-22s %10.1f MiB\n", "attention workspace", mib(workspace_bytes_));
    s += strformat("  %-22s %10.1f MiB", "total", mib(total_bytes()));
    return s;
}

// ---------------------------------------------------------------- parameters on the host

void GPT::init_weights(uint64_t seed) {
    std::vector<float> h(num_params_, 0.0f);
    Rng rng(seed);
    const float std_resid = 0.02f / std::sqrt(2.0f * cfg.L);
    size_t off = 0;
    for (int id = 0; id < NUM_PARAM_TENSORS; id++) {
        const ParamSpec& s = specs_[id];
        float* p = h.data() + off;
        if (id == LN1W || id == LN2W || id == LNFW) {
            for (size_t i = 0; i < s.size; i++) p[i] = 1.0f;
        } else if (id == ATTNP) {
            const int d = cfg.head_dim();
            for (int l = 0; l < cfg.L; l++)
                attn_->init_params(p + l * attn_params_per_layer_, d, Rng::derive(seed, 7, l));
        } else if (s.decay) {  // 2-D weights
            const float sd = (id == ATTPROJW || id == FCPROJW) ? std_resid : 0.02f;
            for (size_t i = 0; i < s.size; i++) p[i] = sd * rng.normal();
        }  // biases and LN biases stay 0
        off += s.size;
    }
    // padded vocabulary rows of wte are zero (never used as inputs, masked as outputs)
    std::memset(h.data() + (size_t)cfg.vocab * cfg.C, 0, (size_t)(cfg.padded_vocab - cfg.vocab) * cfg.C * 4);
    set_params(h);
}

std::vector<float> GPT::get_params() const {
    std::vector<float> h(num_params_);
    if (zero_ == 1 && master_mem_) {  // the fp32 masters are sharded: gather them (a collective)
        Tensor all{ops.alloc(padded_ * 4, "gathered master weights"), DType::F32, padded_};
        ops.copy(all.slice(shard_begin_, shard_size_), Tensor{master_mem_, DType::F32, shard_size_});
        comm_->all_gather(all);
        ops.download(h.data(), all.slice(0, num_params_));
        ops.release(all.ptr);
        return h;
    }
    Tensor src = master_mem_ ? Tensor{master_mem_, DType::F32, num_params_}
                             : Tensor{params_mem_, ops.act_dtype(), num_params_};
    ops.download(h.data(), src);
    return h;
}

void GPT::set_params(const std::vector<float>& h) {
    CHECK(h.size() == num_params_, "parameters: got %zu values, the model has %zu", h.size(), num_params_);
    ops.upload(Tensor{params_mem_, ops.act_dtype(), num_params_}, h.data());
    if (zero_ == 1 && master_mem_) {  // this rank's shard of the masters (padding stays 0)
        if (shard_begin_ < num_params_)
            ops.upload(Tensor{master_mem_, DType::F32, std::min(shard_size_, num_params_ - shard_begin_)}, h.data() + shard_begin_);
        return;
    }
    if (master_mem_) ops.upload(Tensor{master_mem_, DType::F32, num_params_}, h.data());
}

std::vector<float> GPT::get_grads() const {
    std::vector<float> h(num_params_);
    ops.download(h.data(), Tensor{grads_mem_, DType::F32, num_params_});
    return h;
}

std::vector<float> GPT::get_moments(int which) const {
    CHECK(zero_ == 0, "optimizer state is sharded (ZeRO-1): use get_shard_moments");
    std::vector<float> h(num_params_);
    ops.download(h.data(), Tensor{which == 0 ? m_mem_ : v_mem_, DType::F32, num_params_});
    return h;
}

void GPT::set_moments(int which, const std::vector<float>& h) {
    CHECK(zero_ == 0, "optimizer state is sharded (ZeRO-1): use set_shard_moments");
    CHECK(h.size() == num_params_, "optimizer state: got %zu values, the model has %zu", h.size(), num_params_);
    ops.upload(Tensor{which == 0 ? m_mem_ : v_mem_, DType::F32, num_params_}, h.data());
}

// ---------------------------------------------------------------- forward

namespace {
// Views of q, k, v (B, H, T, d) inside qkv (B, T, 3, H, d) and of o (B, H, T, d) inside (B, T, H, d).
HeadTensor qkv_view(Tensor qkv, int which, int T, int C, int d) {
    char* p = static_cast<char*>(qkv.ptr) + (size_t)which * C * dtype_size(qkv.dtype);
    return HeadTensor{p, qkv.dtype, (int64_t)T * 3 * C, d, 3 * C};
}
HeadTensor out_view(Tensor o, int T, int C, int d) { return HeadTensor{o.ptr, o.dtype, (int64_t)T * C, d, C}; }
}  // namespace

float GPT::forward(const int* tokens, const int* targets, int b, int t, bool train, float grad_scale,
                   int64_t step) {
    CHECK(b >= 1 && b <= B && t >= 1 && t <= T, "forward: batch (%d, %d) exceeds the allocated (%d, %d)", b, t, B, T);
    const int C = cfg.C, L = cfg.L, Vp = cfg.padded_vocab, d = cfg.head_dim();
    const size_t N = (size_t)b * t, NMAX = (size_t)B * T;
    for (size_t i = 0; i < N; i++)
        CHECK(tokens[i] >= 0 && tokens[i] < cfg.vocab, "token id %d at position %zu is outside the vocabulary [0, %d)", tokens[i], i, cfg.vocab);
    ops.upload_ints(tokens_dev_, tokens, N);
    if (targets) ops.upload_ints(targets_dev_, targets, N);
    Acts& a = *acts_;
    AttnShape shape{b, cfg.H, t, d, ops.act_dtype()};
    const size_t saved_stride = a.attn_saved.n / L;
    auto layer = [&](Tensor x, int l, size_t width) { return x.slice(l * NMAX * width, N * width); };
    auto rows = [&](Tensor x, size_t width) { return x.slice(0, N * width); };

    ops.encoder_forward(rows(a.encoded, C), tokens_dev_, param(WTE), param(WPE), b, t, C);
    // Every LayerNorm but the first runs fused with the residual add before it
    // (residual_layernorm_forward): ln2 with residual2, the next layer's ln1 (or lnf) with residual3.
    ops.layernorm_forward(layer(a.ln1, 0, C), layer(a.ln1_mean, 0, 1), layer(a.ln1_rstd, 0, 1),
                          rows(a.encoded, C), param(LN1W).slice(0, C), param(LN1B).slice(0, C), N, C);
    Tensor lnf = rows(a.lnf, C), logits = rows(a.logits, Vp);
    for (int l = 0; l < L; l++) {
        Tensor residual = l == 0 ? rows(a.encoded, C) : layer(a.residual3, l - 1, C);
        Tensor ln1 = layer(a.ln1, l, C), qkv = layer(a.qkv, l, 3 * C), atty = layer(a.atty, l, C);
        Tensor attnp = attn_params_per_layer_ ? param(ATTNP).slice(l * attn_params_per_layer_, attn_params_per_layer_) : Tensor{};
        // attention half: residual2 = residual + proj(attention(qkv(ln1(residual)))), ln1 made above
        ops.matmul_forward(qkv, ln1, param(QKVW).slice((size_t)l * 3 * C * C, (size_t)3 * C * C),
                           param(QKVB).slice(l * 3 * C, 3 * C), N, C, 3 * C);
        if (cfg.pos == "rope") ops.rope(qkv, b, t, cfg.H, d, cfg.rope_theta, false);
        attn_->forward(shape, AttnContext{l, step}, out_view(atty, t, C, d), qkv_view(qkv, 0, t, C, d),
                       qkv_view(qkv, 1, t, C, d), qkv_view(qkv, 2, t, C, d),
                       a.attn_saved.f32() + l * saved_stride, attnp, attn_workspace_);
        Tensor proj = rows(a.proj_out, C);
        ops.matmul_forward(proj, atty, param(ATTPROJW).slice((size_t)l * C * C, (size_t)C * C),
                           param(ATTPROJB).slice(l * C, C), N, C, C);
        // MLP half: residual3 = residual2 + fcproj(gelu(fc(ln2(residual2))))
        Tensor residual2 = layer(a.residual2, l, C);
        Tensor ln2 = layer(a.ln2, l, C), fch = layer(a.fch, l, 4 * C), fch_gelu = layer(a.fch_gelu, l, 4 * C);
        ops.residual_layernorm_forward(residual2, ln2, layer(a.ln2_mean, l, 1), layer(a.ln2_rstd, l, 1), residual,
                                       proj, param(LN2W).slice(l * C, C), param(LN2B).slice(l * C, C), N, C);
        ops.matmul_gelu_forward(fch_gelu, fch, ln2, param(FCW).slice((size_t)l * 4 * C * C, (size_t)4 * C * C),
                                param(FCB).slice(l * 4 * C, 4 * C), N, C, 4 * C);
        ops.matmul_forward(proj, fch_gelu, param(FCPROJW).slice((size_t)l * C * 4 * C, (size_t)C * 4 * C),
                           param(FCPROJB).slice(l * C, C), N, 4 * C, C);
        if (l + 1 < L)  // residual3, and the next layer's ln1 of it
            ops.residual_layernorm_forward(layer(a.residual3, l, C), layer(a.ln1, l + 1, C),
                                           layer(a.ln1_mean, l + 1, 1), layer(a.ln1_rstd, l + 1, 1), residual2, proj,
                                           param(LN1W).slice((l + 1) * C, C), param(LN1B).slice((l + 1) * C, C), N, C);
        else  // residual3, and the final LayerNorm of it
            ops.residual_layernorm_forward(layer(a.residual3, l, C), lnf, rows(a.lnf_mean, 1), rows(a.lnf_rstd, 1),
                                           residual2, proj, param(LNFW), param(LNFB), N, C);
    }
    ops.matmul_forward(logits, lnf, param(WTE), Tensor{}, N, C, Vp);  // tied output layer

    last_b_ = b; last_t_ = t; last_step_ = step;
    have_grads_for_backward_ = false;
    if (!targets) return 0.0f;
    for (size_t i = 0; i < N; i++)
        CHECK(targets[i] >= 0 && targets[i] < cfg.vocab, "target id %d at position %zu is outside the vocabulary [0, %d)", targets[i], i, cfg.vocab);
    Tensor losses = rows(a.losses, 1);
    ops.crossentropy(logits, losses, targets_dev_, N, cfg.vocab, Vp, grad_scale / N, train);
    std::vector<float> host(N);
    ops.download(host.data(), losses);
    double sum = 0;
    for (float x : host) sum += x;
    if (train) {
        last_tokens_.assign(tokens, tokens + N);
        have_grads_for_backward_ = true;
    }
    return (float)(sum / N);
}

std::vector<float> GPT::logits_row(int bi, int ti) const {
    const int Vp = cfg.padded_vocab;
    std::vector<float> h(Vp);
    ops.download(h.data(), acts_->logits.slice(((size_t)bi * last_t_ + ti) * Vp, Vp));
    return h;
}

// ---------------------------------------------------------------- backward (mirrors forward)

void GPT::zero_grad() {
    CHECK(!grads_in_flight_, "zero_grad: the gradients are still being reduced; call reduce_gradients() first");
    ops.zero(Tensor{grads_mem_, DType::F32, num_params_});
}

void GPT::backward(bool last_micro_step) {
    CHECK(have_grads_for_backward_, "backward() needs a preceding training forward with targets");
    CHECK(!grads_in_flight_, "backward: the gradients are still being reduced; call reduce_gradients() first");
    have_grads_for_backward_ = false;
    // per-layer all-reduce buckets, each started once its gradients are complete (ZeRO 0)
    const bool start_buckets = last_micro_step && comm_ && zero_ == 0 && bucket_grads_;
    const std::vector<std::vector<Tensor>> buckets = start_buckets ? gradient_buckets() : std::vector<std::vector<Tensor>>{};
    const int b = last_b_, t = last_t_, C = cfg.C, L = cfg.L, Vp = cfg.padded_vocab, d = cfg.head_dim();
    const size_t N = (size_t)b * t, NMAX = (size_t)B * T;
    Acts& a = *acts_;
    AttnShape shape{b, cfg.H, t, d, ops.act_dtype()};
    const size_t saved_stride = a.attn_saved.n / L;
    auto layer = [&](Tensor x, int l, size_t width) { return x.slice(l * NMAX * width, N * width); };
    auto rows = [&](Tensor x, size_t width) { return x.slice(0, N * width); };
    Tensor dresidual = rows(a.dresidual, C), dbtc = rows(a.dbtc, C), datty = rows(a.datty, C);
    Tensor dqkv = rows(a.dqkv, 3 * C), dbt4c = rows(a.dbt4c, 4 * C);

    // logits hold dlogits (written by the fused cross-entropy)
    ops.matmul_backward(dbtc, grad(WTE), Tensor{}, rows(a.logits, Vp), rows(a.lnf, C), param(WTE), N, C, Vp);
    ops.zero(dresidual);
    ops.layernorm_backward(dresidual, grad(LNFW), grad(LNFB), dbtc, layer(a.residual3, L - 1, C), param(LNFW),
                           rows(a.lnf_mean, 1), rows(a.lnf_rstd, 1), N, C);
    for (int l = L - 1; l >= 0; l--) {
        Tensor residual = l == 0 ? rows(a.encoded, C) : layer(a.residual3, l - 1, C);
        Tensor qkv = layer(a.qkv, l, 3 * C), atty = layer(a.atty, l, C);
        // MLP half (dresidual is the gradient of residual3, and flows on to residual2)
        ops.matmul_backward_gelu(dbt4c, grad(FCPROJW).slice((size_t)l * C * 4 * C, (size_t)C * 4 * C),
                                 grad(FCPROJB).slice(l * C, C), dresidual, layer(a.fch_gelu, l, 4 * C),
                                 param(FCPROJW).slice((size_t)l * C * 4 * C, (size_t)C * 4 * C),
                                 layer(a.fch, l, 4 * C), N, 4 * C, C);  // dbt4c: the gradient at fch
        ops.matmul_backward(dbtc, grad(FCW).slice((size_t)l * 4 * C * C, (size_t)4 * C * C),
                            grad(FCB).slice(l * 4 * C, 4 * C), dbt4c, layer(a.ln2, l, C),
                            param(FCW).slice((size_t)l * 4 * C * C, (size_t)4 * C * C), N, C, 4 * C);
        ops.layernorm_backward(dresidual, grad(LN2W).slice(l * C, C), grad(LN2B).slice(l * C, C), dbtc,
                               layer(a.residual2, l, C), param(LN2W).slice(l * C, C),
                               layer(a.ln2_mean, l, 1), layer(a.ln2_rstd, l, 1), N, C);
        // attention half (dresidual is now the gradient of residual2, and flows on to residual)
        ops.matmul_backward(datty, grad(ATTPROJW).slice((size_t)l * C * C, (size_t)C * C),
                            grad(ATTPROJB).slice(l * C, C), dresidual, atty,
                            param(ATTPROJW).slice((size_t)l * C * C, (size_t)C * C), N, C, C);
        Tensor attnp, dattnp;
        if (attn_params_per_layer_) {
            attnp = param(ATTNP).slice(l * attn_params_per_layer_, attn_params_per_layer_);
            dattnp = grad(ATTNP).slice(l * attn_params_per_layer_, attn_params_per_layer_);
        }
        attn_->backward(shape, AttnContext{l, last_step_}, qkv_view(dqkv, 0, t, C, d), qkv_view(dqkv, 1, t, C, d),
                        qkv_view(dqkv, 2, t, C, d), dattnp, out_view(datty, t, C, d),
                        qkv_view(qkv, 0, t, C, d), qkv_view(qkv, 1, t, C, d), qkv_view(qkv, 2, t, C, d),
                        out_view(atty, t, C, d), a.attn_saved.f32() + l * saved_stride, attnp, attn_workspace_);
        if (cfg.pos == "rope") ops.rope(dqkv, b, t, cfg.H, d, cfg.rope_theta, true);
        ops.matmul_backward(dbtc, grad(QKVW).slice((size_t)l * 3 * C * C, (size_t)3 * C * C),
                            grad(QKVB).slice(l * 3 * C, 3 * C), dqkv, layer(a.ln1, l, C),
                            param(QKVW).slice((size_t)l * 3 * C * C, (size_t)3 * C * C), N, C, 3 * C);
        ops.layernorm_backward(dresidual, grad(LN1W).slice(l * C, C), grad(LN1B).slice(l * C, C), dbtc,
                               residual, param(LN1W).slice(l * C, C), layer(a.ln1_mean, l, 1),
                               layer(a.ln1_rstd, l, 1), N, C);
        if (start_buckets) comm_->all_reduce_sum_async(buckets[l]);  // layer l's gradients are final
    }
    ops.encoder_backward(grad(WTE), grad(WPE), dresidual, tokens_dev_, last_tokens_.data(), b, t, C);
    if (start_buckets) {
        comm_->all_reduce_sum_async(buckets[L]);  // wte (also the output layer), wpe, final LN
        grads_in_flight_ = true;
    }
}

// ---------------------------------------------------------------- optimizer

float GPT::grad_norm() {
    if (zero_ == 1) {  // the reduced gradients are sharded: sum the shards' squares over the ranks
        double sum = ops.sum_squares(Tensor{grads_mem_, DType::F32, padded_}.slice(shard_begin_, shard_size_));
        comm_->all_reduce_sum_host(&sum, 1);
        return (float)std::sqrt(sum);
    }
    return (float)std::sqrt(ops.sum_squares(Tensor{grads_mem_, DType::F32, num_params_})); }

void GPT::adamw_step(float lr, float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale) {
    // AdamW over the runs of equal decay flag (decay_runs: one per tensor, per-element masks of the
    // attention module split into runs). With ZeRO-1 only this rank's shard [lo, hi) of them is
    // updated (its moments and masters hold just that shard), then every rank's shard is gathered.
    const bool sharded = zero_ == 1;
    const size_t lo = sharded ? shard_begin_ : 0;
    const size_t hi = sharded ? std::min(shard_begin_ + shard_size_, num_params_) : num_params_;
    const size_t arena_n = sharded ? padded_ : num_params_, state_n = sharded ? shard_size_ : num_params_;
    Tensor P{params_mem_, ops.act_dtype(), arena_n}, G{grads_mem_, DType::F32, arena_n};
    Tensor M{m_mem_, DType::F32, state_n}, V{v_mem_, DType::F32, state_n};
    Tensor W{master_mem_, DType::F32, master_mem_ ? state_n : 0};
    for (const DecayRun& run : decay_runs()) {
        const size_t a = std::max(run.offset, lo), b = std::min(run.offset + run.count, hi);
        if (a >= b) continue;
        AdamWStep s{lr, beta1, beta2, eps, run.decay ? weight_decay : 0.0f, step, grad_scale};
        ops.adamw(P.slice(a, b - a), master_mem_ ? W.slice(a - lo, b - a) : Tensor{}, G.slice(a, b - a),
                  M.slice(a - lo, b - a), V.slice(a - lo, b - a), s);
    }
    if (sharded) comm_->all_gather(P);  // every rank's updated shard to every rank
}

// ---------------------------------------------------------------- data parallel

std::vector<GPT::DecayRun> GPT::decay_runs() const {
    std::vector<DecayRun> runs;
    size_t off = 0;
    for (int id = 0; id < NUM_PARAM_TENSORS; id++) {
        const size_t n = specs_[id].size;
        if (id != ATTNP) {
            if (n) runs.push_back({off, n, specs_[id].decay});
        } else if (n) {  // the attention module's parameters: its per-element mask, per layer
            std::vector<bool> mask = attn_->param_decay_mask(cfg.head_dim());
            CHECK(mask.size() == attn_params_per_layer_, "attention %s: decay mask of %zu entries for %zu parameters",
                  attn_->name().c_str(), mask.size(), attn_params_per_layer_);
            for (int l = 0; l < cfg.L; l++) {
                size_t base = off + l * attn_params_per_layer_, start = 0;
                for (size_t i = 1; i <= mask.size(); i++)
                    if (i == mask.size() || mask[i] != mask[start]) {
                        runs.push_back({base + start, i - start, mask[start]});
                        start = i;
                    }
            }
        }
        off += n;
    }
    return runs;
}

std::vector<std::vector<Tensor>> GPT::gradient_buckets() const {
    const size_t C = cfg.C, P = attn_params_per_layer_;
    std::vector<std::vector<Tensor>> buckets(cfg.L + 1);
    auto add = [&](std::vector<Tensor>& bucket, Tensor t) { if (t.n) bucket.push_back(t); };
    for (size_t l = 0; l < (size_t)cfg.L; l++) {  // (elements per layer of each tensor)
        const std::pair<int, size_t> per_layer[] = {
            {LN1W, C}, {LN1B, C}, {QKVW, 3 * C * C}, {QKVB, 3 * C}, {ATTPROJW, C * C}, {ATTPROJB, C},
            {LN2W, C}, {LN2B, C}, {FCW, 4 * C * C}, {FCB, 4 * C}, {FCPROJW, C * 4 * C}, {FCPROJB, C}, {ATTNP, P}};
        for (auto [id, n] : per_layer) add(buckets[l], grad(id).slice(l * n, n));
    }
    for (int id : {WTE, WPE, LNFW, LNFB}) add(buckets[cfg.L], grad(id));
    return buckets;
}

void GPT::reduce_gradients() {
    if (grads_in_flight_) {  // backward(true) started every bucket
        grads_in_flight_ = false;
        comm_->wait();
        return;
    }
    if (!comm_ || comm_->world() == 1) return;
    if (zero_ == 0) comm_->all_reduce_sum(Tensor{grads_mem_, DType::F32, num_params_});
    else comm_->reduce_scatter_sum(Tensor{grads_mem_, DType::F32, padded_});
}

std::vector<float> GPT::get_shard_moments(int which) const {
    CHECK(zero_ == 1, "get_shard_moments: the optimizer state is not sharded (--zero 0)");
    std::vector<float> h(shard_size_);
    ops.download(h.data(), Tensor{which == 0 ? m_mem_ : v_mem_, DType::F32, shard_size_});
    return h;
}

void GPT::set_shard_moments(int which, const std::vector<float>& h) {
    CHECK(zero_ == 1, "set_shard_moments: the optimizer state is not sharded (--zero 0)");
    CHECK(h.size() == shard_size_, "optimizer shard: got %zu values, this rank's shard has %zu", h.size(), shard_size_);
    ops.upload(Tensor{which == 0 ? m_mem_ : v_mem_, DType::F32, shard_size_}, h.data());
}
