// Declarations of the CUDA launchers, one group per file of cuda/. `CudaOps` (cuda_ops.cu) checks
// the tensors and calls these; they only launch. Templated launchers take the activation type T
// (float or bf16) and are instantiated for both in their .cu file. Parameter gradients, moments
// and statistics are always fp32 pointers. All launches go to `stream` and are followed by
// CUDA_LAUNCH_CHECK.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>

#include "attention.h"
#include "common.cuh"
#include "ops.h"

namespace gpu {

// ---------------------------------------------------------------- memory (cuda_ops.cu)
// cudaMalloc + zero fill; out of memory throws Error naming `what`, the size and the free memory.
void* device_alloc(size_t bytes, const std::string& what);
// A scratch buffer owned by CudaOps that grows to the largest size asked for (so it is allocated
// once for a fixed model and batch) and is freed with its owner. Users on one stream in turn.
struct DeviceScratch {
    std::string what;
    void* ptr = nullptr;
    size_t bytes = 0;
    explicit DeviceScratch(std::string name) : what(std::move(name)) {}
    ~DeviceScratch();
    DeviceScratch(const DeviceScratch&) = delete;
    DeviceScratch& operator=(const DeviceScratch&) = delete;
    void* get(size_t need);  // at least `need` bytes, contents undefined
};

// ---------------------------------------------------------------- reductions over rows
// Deterministic column sums of an (N, C) matrix: rows are split into `column_chunks(N)` chunks of
// `column_chunk_rows(N)` consecutive rows; one pass writes a per-chunk partial (chunks, C), a
// second adds the partials in chunk order. No atomics, so the result depends only on N and C.
inline int column_chunk_rows(int N) { return std::max(1, (N + 255) / 256); }
inline int column_chunks(int N) { return (N + column_chunk_rows(N) - 1) / column_chunk_rows(N); }
// dst (C) += Σ_k partials (chunks, C)[k] in order k = 0, 1, ...   (norm.cu)
void add_column_partials(float* dst, const float* partials, int chunks, int C, cudaStream_t stream);
// partials (column_chunks(N), C) <- per-chunk sums of x (N, C)   (norm.cu)
template <typename T>
void column_sum_partials(float* partials, const T* x, int N, int C, cudaStream_t stream);
// Σ x² over n fp32 values, in double, fixed grid and order (norm.cu). Synchronizes.
double sum_squares(const float* x, size_t n, DeviceScratch& scratch, cudaStream_t stream);

// ---------------------------------------------------------------- encoder.cu
// out (B,T,C) = wte (Vp,C)[tokens (B,T)] + wpe (maxT,C)[t]
template <typename T>
void encoder_forward(T* out, const int* tokens, const T* wte, const T* wpe, int B, int T_, int C,
                     cudaStream_t stream);
// dwte (vocab,C) += dout rows bucketed by token (buckets built on the host from tokens_host,
// rows of a bucket summed in order); dwpe (maxT,C) += dout summed over b in order.
template <typename T>
void encoder_backward(float* dwte, float* dwpe, const T* dout, const int* tokens_host, int B,
                      int T_, int C, int vocab, DeviceScratch& scratch, cudaStream_t stream);

// ---------------------------------------------------------------- layernorm.cu
// out (N,C), mean (N), rstd (N) <- inp (N,C), w (C), b (C); one warp per row, eps = 1e-5
template <typename T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b,
                       int N, int C, cudaStream_t stream);
// residual (N,C) = a + b, then out, mean, rstd = LayerNorm of it: bitwise residual_forward then
// layernorm_forward, in one pass
template <typename T>
void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b, const T* w,
                                const T* bias, int N, int C, cudaStream_t stream);
// dinp (N,C) +=, dw (C) +=, db (C) += (deterministic, partials in scratch)
template <typename T>
void layernorm_backward(T* dinp, float* dw, float* db, const T* dout, const T* inp, const T* w,
                        const float* mean, const float* rstd, int N, int C,
                        DeviceScratch& scratch, cudaStream_t stream);

// ---------------------------------------------------------------- matmul.cu (cuBLASLt)
// Handles and the workspace, created once per CudaOps.
struct Blas {
    cublasLtHandle_t lt = nullptr;
    cublasHandle_t blas = nullptr;  // cublasGemmEx fallback when cuBLASLt offers no algorithm
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    Blas();
    ~Blas();
    Blas(const Blas&) = delete;
    Blas& operator=(const Blas&) = delete;
};
// out (N,OC) = inp (N,IC) @ w (OC,IC)ᵀ + bias (OC, may be null); out, inp, w, bias all `dtype`.
// With gelu_pre: gelu_pre (N,OC) = that product, out = gelu(gelu_pre) (fused in bf16).
void matmul_forward(Blas& blas, void* out, const void* inp, const void* w, const void* bias,
                    DType dtype, int N, int IC, int OC, cudaStream_t stream, void* gelu_pre = nullptr);
// dinp (N,IC) = dout @ w; dw (OC,IC) fp32 += doutᵀ @ inp; dbias (OC) fp32 += colsum(dout)
// (dbias may be null). dinp, dout, inp, w are `dtype`. With gelu_pre (N,IC): dinp ∘= gelu′(gelu_pre)
// (the gradient at the input of the GELU whose output is inp; fused in bf16).
void matmul_backward(Blas& blas, void* dinp, float* dw, float* dbias, const void* dout,
                     const void* inp, const void* w, DType dtype, int N, int IC, int OC,
                     DeviceScratch& scratch, cudaStream_t stream, const void* gelu_pre = nullptr);

// ---------------------------------------------------------------- gelu.cu (tanh approximation)
template <typename T>
void gelu_forward(T* out, const T* inp, size_t n, cudaStream_t stream);
// dinp = gelu'(inp) * dout; dinp may alias dout
template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, size_t n, cudaStream_t stream);

// ---------------------------------------------------------------- residual.cu (elementwise)
template <typename T>
void residual_forward(T* out, const T* a, const T* b, size_t n, cudaStream_t stream);
// acc += x, any combination of float / bf16
template <typename TAcc, typename TX>
void add_inplace(TAcc* acc, const TX* x, size_t n, cudaStream_t stream);
// dst = src converted (round to nearest for bf16)
template <typename TDst, typename TSrc>
void convert(TDst* dst, const TSrc* src, size_t n, cudaStream_t stream);

// ---------------------------------------------------------------- classifier.cu
// Fused softmax cross-entropy, one block per row of logits (N,Vp), columns >= V masked.
// losses (N) = -log softmax[target]; with backward, logits <- dloss * (softmax - onehot).
template <typename T>
void crossentropy(T* logits, float* losses, const int* targets, int N, int V, int Vp, float dloss,
                  bool backward, cudaStream_t stream);

// ---------------------------------------------------------------- rope.cu
// qkv (B,T,3,H,d) in place: pairs (x[2i], x[2i+1]) of q and k rotated by ±t·theta^(-2i/d)
template <typename T>
void rope(T* qkv, int B, int T_, int H, int d, float theta, bool inverse, cudaStream_t stream);

// ---------------------------------------------------------------- adamw.cu
// params (n) and master (n fp32, may be null: then params must be fp32 and are the master)
// updated from grads (n), moments m, v (n), exactly the CPU formula.
template <typename T>
void adamw(T* params, float* master, const float* grads, float* m, float* v, size_t n,
           const AdamWStep& s, cudaStream_t stream);

}  // namespace gpu

// ---------------------------------------------------------------- attention/registry.cu
// `--attention NAME` -> the CUDA implementation; throws Error listing the CUDA variants.
std::unique_ptr<Attention> make_cuda_attention(const AttnConfig& cfg);
std::vector<std::string> cuda_attention_names();
