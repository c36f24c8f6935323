// CpuOps: the fp32 CPU reference backend. Every op of src/ops.h runs the plain-loop templates of
// src/cpu_kernels.h instantiated with float (OpenMP where the result stays deterministic).
// Memory is host memory: zeroed, 64-byte aligned; upload/download are copies.
#pragma once
#include <memory>
#include <string>

#include "ops.h"

class CpuOps : public Ops {
public:
    std::string name() const override { return "cpu"; }
    DType act_dtype() const override { return DType::F32; }
    bool has_master_weights() const override { return false; }

    void* alloc(size_t bytes, const std::string& what) override;
    void release(void* p) override;
    void upload(Tensor dst, const float* src) override;
    void download(float* dst, Tensor src) override;
    void upload_ints(int* dst, const int* src, size_t n) override;
    void zero(Tensor t) override;
    void copy(Tensor dst, Tensor src) override;

    void encoder_forward(Tensor out, const int* tokens, Tensor wte, Tensor wpe, int B, int T,
                         int C) override;
    void encoder_backward(Tensor dwte, Tensor dwpe, Tensor dout, const int* tokens,
                          const int* tokens_host, int B, int T, int C) override;
    void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor w, Tensor b,
                           int N, int C) override;
    void layernorm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp, Tensor w,
                            Tensor mean, Tensor rstd, int N, int C) override;
    void matmul_forward(Tensor out, Tensor inp, Tensor w, Tensor bias, int N, int IC,
                        int OC) override;
    void matmul_backward(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w,
                         int N, int IC, int OC) override;
    void gelu_forward(Tensor out, Tensor inp) override;
    void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) override;
    void residual_forward(Tensor out, Tensor a, Tensor b) override;
    void add_inplace(Tensor acc, Tensor x) override;
    void crossentropy(Tensor logits, Tensor losses, const int* targets, int N, int V, int Vp,
                      float dloss, bool backward) override;
    void rope(Tensor qkv, int B, int T, int H, int d, float theta, bool inverse) override;

    double sum_squares(Tensor grads) override;
    void adamw(Tensor params, Tensor master, Tensor grads, Tensor m, Tensor v,
               const AdamWStep& s) override;

    std::unique_ptr<Attention> make_attention(const AttnConfig& cfg) override;
};
