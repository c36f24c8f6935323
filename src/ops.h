// The backend interface. The GPT model in models/ is written once against `Ops`; `CpuOps`
// (src/cpu_ops.*) is the fp32 reference, `CudaOps` (cuda/) the fast path. Every buffer is a
// `Tensor`: a pointer in the backend's memory, its dtype and element count. Shapes are in the
// comments of each call. Conventions:
//   - "+=" outputs accumulate (parameter gradients across micro-steps, residual gradients);
//     every other output is overwritten.
//   - Parameter gradients are always fp32. Parameters and activations are in `act_dtype()`
//     (fp32 on CPU, bf16 on CUDA by default); statistics (mean, rstd, losses) are fp32.
//   - Linear weights are (OC, IC), row-major, as in PyTorch and llm.c: out = inp @ wᵀ + b.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

enum class DType { F32, BF16 };
inline size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::F32 ? "fp32" : "bf16"; }

struct Tensor {
    void* ptr = nullptr;
    DType dtype = DType::F32;
    size_t n = 0;  // number of elements
    float* f32() const { return static_cast<float*>(ptr); }
    bool empty() const { return ptr == nullptr; }
    Tensor slice(size_t offset, size_t count) const {  // elements [offset, offset+count)
        return Tensor{static_cast<char*>(ptr) + offset * dtype_size(dtype), dtype, count};
    }
};

struct AttnConfig;
class Attention;

// One AdamW step's hyperparameters (decoupled weight decay, bias-corrected moments).
struct AdamWStep {
    float lr, beta1, beta2, eps, weight_decay;
    int step;           // 1-based, for bias correction
    float grad_scale;   // multiplies the gradient first (clipping and 1/accumulation)
};

class Ops {
public:
    virtual ~Ops() = default;
    virtual std::string name() const = 0;     // "cpu" or "cuda"
    virtual DType act_dtype() const = 0;      // dtype of parameters used in compute and activations
    virtual bool has_master_weights() const = 0;  // true when params are a low-precision copy of fp32 masters

    // ---- memory: allocations are zero-filled; failure throws Error naming `what` and the size
    virtual void* alloc(size_t bytes, const std::string& what) = 0;
    virtual void release(void* p) = 0;
    virtual void upload(Tensor dst, const float* src) = 0;      // host fp32 (dst.n) -> dst, converting
    virtual void download(float* dst, Tensor src) = 0;          // src -> host fp32 (src.n)
    virtual void upload_ints(int* dst, const int* src, size_t n) = 0;
    virtual void zero(Tensor t) = 0;
    virtual void copy(Tensor dst, Tensor src) = 0;               // same n, converting dtype
    virtual void synchronize() {}
    // Device memory in use now (whole process, including library workspaces), for the log; 0 on
    // the CPU.
    virtual size_t device_memory_used() { return 0; }

    // ---- the network's ops (N = B*T rows)
    // out (B,T,C) = wte[tokens] + wpe[t]; tokens (B,T) in backend memory. wpe (and dwpe) have
    // n = 0 for RoPE models: no position is added.
    virtual void encoder_forward(Tensor out, const int* tokens, Tensor wte, Tensor wpe,
                                 int B, int T, int C) = 0;
    // dwte (Vp,C) +=, dwpe (maxT,C) +=; tokens_host is the same (B,T) batch on the host
    // (CUDA buckets rows by token on the host so the backward is deterministic)
    virtual void encoder_backward(Tensor dwte, Tensor dwpe, Tensor dout, const int* tokens,
                                  const int* tokens_host, int B, int T, int C) = 0;
    // out (N,C), mean (N) fp32, rstd (N) fp32 <- inp (N,C), w (C), b (C); eps = 1e-5
    virtual void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                   Tensor w, Tensor b, int N, int C) = 0;
    // dinp (N,C) +=, dw (C) +=, db (C) +=
    virtual void layernorm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp,
                                    Tensor w, Tensor mean, Tensor rstd, int N, int C) = 0;
    // out (N,OC) = inp (N,IC) @ w (OC,IC)ᵀ + bias (OC, may be empty)
    virtual void matmul_forward(Tensor out, Tensor inp, Tensor w, Tensor bias,
                                int N, int IC, int OC) = 0;
    // dinp (N,IC) = dout @ w (overwritten); dw (OC,IC) += doutᵀ @ inp; dbias (OC) += colsum(dout)
    // (dbias may be empty)
    virtual void matmul_backward(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp,
                                 Tensor w, int N, int IC, int OC) = 0;
    // GELU, tanh approximation: out (n) = gelu(inp); dinp = gelu'(inp) * dout (dinp may alias dout)
    virtual void gelu_forward(Tensor out, Tensor inp) = 0;
    virtual void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) = 0;
    // The MLP's pairs, which a backend may fuse (CUDA: the GELU in the matmul's epilogue):
    // pre (N,OC) = inp @ wᵀ + bias, act (N,OC) = gelu(pre)
    virtual void matmul_gelu_forward(Tensor act, Tensor pre, Tensor inp, Tensor w, Tensor bias, int N, int IC,
                                     int OC) {
        matmul_forward(pre, inp, w, bias, N, IC, OC);
        gelu_forward(act, pre);
    }
    // matmul_backward with inp = gelu(pre), then dinp = gelu'(pre) * dinp: the gradient at pre (N,IC)
    virtual void matmul_backward_gelu(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w,
                                      Tensor pre, int N, int IC, int OC) {
        matmul_backward(dinp, dw, dbias, dout, inp, w, N, IC, OC);
        gelu_backward(dinp, pre, dinp);
    }
    // out = a + b (n elements)
    virtual void residual_forward(Tensor out, Tensor a, Tensor b) = 0;
    // residual (N,C) = a + b, then layernorm_forward of it into out, mean, rstd: the same values as
    // the two ops (CUDA fuses them into one pass over the row)
    virtual void residual_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a,
                                            Tensor b, Tensor w, Tensor bias, int N, int C) {
        residual_forward(residual, a, b);
        layernorm_forward(out, mean, rstd, residual, w, bias, N, C);
    }
    // acc += x (n elements), used to sum residual-stream gradients
    virtual void add_inplace(Tensor acc, Tensor x) = 0;
    // Fused softmax cross-entropy over logits (N, Vp) whose columns >= V are padding (masked).
    // losses (N) fp32 = -log softmax(logits)[target]. With backward, logits are overwritten by
    // dloss * (softmax - onehot(target)) (padding columns set to 0).
    virtual void crossentropy(Tensor logits, Tensor losses, const int* targets, int N, int V,
                              int Vp, float dloss, bool backward) = 0;
    // RoPE on q and k of qkv (B,T,3H·d) in place; inverse=true applies the transpose (backward)
    virtual void rope(Tensor qkv, int B, int T, int H, int d, float theta, bool inverse) = 0;

    // ---- optimizer
    // Σ x² over fp32 grads, summed in a fixed order (deterministic)
    virtual double sum_squares(Tensor grads) = 0;
    // params (n, act dtype) and master (n fp32, empty when !has_master_weights()) updated from
    // grads (n fp32) and moments m, v (n fp32)
    virtual void adamw(Tensor params, Tensor master, Tensor grads, Tensor m, Tensor v,
                       const AdamWStep& s) = 0;

    // ---- attention variant for this backend (registry lookup; throws for an unknown name)
    virtual std::unique_ptr<Attention> make_attention(const AttnConfig& cfg) = 0;
};

std::unique_ptr<Ops> make_cpu_ops();
// Defined in cuda/ when built with CUDA; the stub in src/ throws with a message saying how to build.
std::unique_ptr<Ops> make_cuda_ops(DType precision);
bool cuda_available();
