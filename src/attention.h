// The attention-module interface: every causal attention variant (softmax, local, performer,
// polynomial, polysketch, hyper) implements `Attention` once per backend, and a registry per
// backend maps `--attention NAME` to it (src/attention_registry.cpp for the CPU,
// cuda/attention/registry.cu for CUDA). Adding a variant = one CPU file, one CUDA file and one
// line in each registry. The math of each variant is in ../shared/ATTENTION.md (copied in the
// README's attention section).
//
// q, k, v, o and their gradients are `HeadTensor`s: element (b, h, t, i) of a (B, H, T, d)
// tensor lives at ptr + b*sb + h*sh + t*st + i (in elements). In the model they are views into
// the fused qkv buffer (B, T, 3, H, d) and the output (B, T, H, d); in tools they are plain
// contiguous (B, H, T, d).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ops.h"

struct HeadTensor {
    void* ptr = nullptr;
    DType dtype = DType::F32;
    int64_t sb = 0, sh = 0, st = 0;  // strides in elements of batch, head, time (dim stride 1)
    float* f32() const { return static_cast<float*>(ptr); }
};
// Contiguous (B, H, T, d)
inline HeadTensor head_tensor_bhtd(void* p, DType dt, int H, int T, int d) {
    return HeadTensor{p, dt, (int64_t)H * T * d, (int64_t)T * d, d};
}

struct AttnShape {
    int B = 1, H = 1, T = 1, d = 64;
    // storage dtype of q, k, v, o: workspace_bytes may size for it (F32, the default, is the
    // largest and always enough); a variant may refuse a call whose tensors are wider than this.
    DType dtype = DType::F32;
    size_t rows() const { return (size_t)B * H * T; }
};

// Every option of every variant, with the defaults of ATTENTION.md. Stored in checkpoints.
struct AttnConfig {
    std::string name = "softmax";  // softmax | local | performer | polynomial | polysketch | hyper
    int window = 4096;             // local: query i sees keys i-W+1 .. i (W keys including itself)
    int features = 256;            // performer: number of random features m
    int redraw = 1000;             // performer: redraw the features every N steps (0 = never)
    int degree = 4;                // polynomial / polysketch: even power p
    int sketch_size = 32;          // polysketch: sketch size r
    bool sketch_learned = true;    // polysketch: learned sketch (true) or random Gaussian
    int block = 256;               // polysketch block b; hyper block size
    bool exact_diag = true;        // polysketch: exact polynomial on diagonal blocks
    int lsh_bits = 7;              // hyper: number of sign projections
    int samples = 256;             // hyper: sampled key columns m
    int min_seq = 4096;            // hyper: exact causal attention at or below this length
    uint64_t seed = 1337;          // random features / projections derive from this
};

// Per-call context: which layer and which optimizer step, so random state (Performer features,
// HyperAttention projections and samples) is a pure function of (seed, layer, step) and is
// reproduced exactly on resume.
struct AttnContext {
    int layer = 0;
    int64_t step = 0;
};

class Attention {
public:
    virtual ~Attention() = default;
    virtual std::string name() const = 0;
    // Learned parameters of one layer (fp32 masters, e.g. PolySketch's sketch network); 0 if none.
    virtual size_t num_params(int d) const { (void)d; return 0; }
    // Which of the learned parameters are 2-D weights (weight decay applies); size num_params(d).
    virtual std::vector<bool> param_decay_mask(int d) const { return std::vector<bool>(num_params(d), false); }
    virtual void init_params(float* host_params, int d, uint64_t seed) const { (void)host_params; (void)d; (void)seed; }
    // fp32 floats saved by forward for backward, per layer (e.g. the LSE: B*H*T).
    virtual size_t saved_size(const AttnShape& s) const = 0;
    // Scratch bytes needed by forward or backward (shared across layers).
    virtual size_t workspace_bytes(const AttnShape& s) const { (void)s; return 0; }

    // o (B,H,T,d) <- q, k, v; writes `saved` (saved_size floats, fp32) for the backward.
    // params: this layer's learned parameters in act dtype (empty if none).
    virtual void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                         HeadTensor k, HeadTensor v, float* saved, Tensor params,
                         void* workspace) = 0;
    // dq, dk, dv overwritten; dparams (fp32, num_params) +=. Exact gradient of the forward.
    virtual void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                          HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q,
                          HeadTensor k, HeadTensor v, HeadTensor o, const float* saved,
                          Tensor params, void* workspace) = 0;
};

// CPU registry (src/attention_registry.cpp): throws Error for an unknown name.
std::unique_ptr<Attention> make_cpu_attention(const AttnConfig& cfg);
std::vector<std::string> attention_names();
