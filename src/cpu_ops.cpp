// CpuOps (see cpu_ops.h): each method checks its tensors (fp32, large enough) and calls the float
// instantiation of the matching template in cpu_kernels.h.
#include "cpu_ops.h"

#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "check.h"
#include "cpu_kernels.h"

namespace {
// The fp32 data of `t`, after checking its dtype and that it holds at least `need` elements.
float* f32(Tensor t, size_t need, const char* what) {
    CHECK(t.dtype == DType::F32, "cpu: %s is %s, the CPU backend works in fp32", what, dtype_name(t.dtype));
    CHECK(t.n >= need, "cpu: %s has %zu elements, %zu needed", what, t.n, need);
    CHECK(need == 0 || t.ptr != nullptr, "cpu: %s is null", what);
    return t.f32();
}
// Optional tensor (a bias): null when empty.
float* f32_or_null(Tensor t, size_t need, const char* what) {
    return t.empty() ? nullptr : f32(t, need, what);
}
}  // namespace

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

// ---------------------------------------------------------------- memory
void* CpuOps::alloc(size_t bytes, const std::string& what) {
    const size_t align = 64, rounded = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded > 0 ? rounded : align);
    if (!p)
        FAIL("out of host memory allocating %s (%.1f MiB): reduce --batch or --seq", what.c_str(),
             bytes / (1024.0 * 1024.0));
    std::memset(p, 0, rounded);
    return p;
}
void CpuOps::release(void* p) { std::free(p); }
void CpuOps::upload(Tensor dst, const float* src) {
    std::memcpy(f32(dst, dst.n, "upload destination"), src, dst.n * sizeof(float));
}
void CpuOps::download(float* dst, Tensor src) {
    std::memcpy(dst, f32(src, src.n, "download source"), src.n * sizeof(float));
}
void CpuOps::upload_ints(int* dst, const int* src, size_t n) { std::memcpy(dst, src, n * sizeof(int)); }
void CpuOps::zero(Tensor t) {
    if (t.n) std::memset(f32(t, t.n, "zero"), 0, t.n * sizeof(float));
}
void CpuOps::copy(Tensor dst, Tensor src) {
    CHECK(dst.n == src.n, "cpu: copy of %zu elements into %zu", src.n, dst.n);
    if (src.n) std::memmove(f32(dst, dst.n, "copy destination"), f32(src, src.n, "copy source"), src.n * sizeof(float));
}

// ---------------------------------------------------------------- the network's ops
void CpuOps::encoder_forward(Tensor out, const int* tokens, Tensor wte, Tensor wpe, int B, int T, int C) {
    const size_t N = (size_t)B * T;
    const size_t vocab = wte.n / C;
    for (size_t i = 0; i < N; i++)
        CHECK(tokens[i] >= 0 && (size_t)tokens[i] < vocab, "token id %d at position %zu is outside the vocabulary [0, %zu)",
              tokens[i], i, vocab);
    cpu::encoder_forward(f32(out, N * C, "encoder out"), tokens, f32(wte, 0, "wte"),
                         wpe.n ? f32(wpe, (size_t)T * C, "wpe") : nullptr, B, T, C);
}
void CpuOps::encoder_backward(Tensor dwte, Tensor dwpe, Tensor dout, const int* tokens,
                              const int* tokens_host, int B, int T, int C) {
    const size_t N = (size_t)B * T;
    const size_t vocab = dwte.n / C;
    for (size_t i = 0; i < N; i++)
        CHECK(tokens[i] >= 0 && (size_t)tokens[i] < vocab, "token id %d at position %zu is outside the vocabulary [0, %zu)",
              tokens[i], i, vocab);
    cpu::encoder_backward(f32(dwte, 0, "dwte"), dwpe.n ? f32(dwpe, (size_t)T * C, "dwpe") : nullptr,
                          f32(dout, N * C, "encoder dout"), tokens, B, T, C);
}
void CpuOps::layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor w, Tensor b,
                               int N, int C) {
    const size_t NC = (size_t)N * C;
    cpu::layernorm_forward(f32(out, NC, "layernorm out"), f32(mean, N, "layernorm mean"),
                           f32(rstd, N, "layernorm rstd"), f32(inp, NC, "layernorm inp"),
                           f32(w, C, "layernorm w"), f32(b, C, "layernorm b"), N, C);
}
void CpuOps::layernorm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp, Tensor w,
                                Tensor mean, Tensor rstd, int N, int C) {
    const size_t NC = (size_t)N * C;
    cpu::layernorm_backward(f32(dinp, NC, "layernorm dinp"), f32(dw, C, "layernorm dw"),
                            f32(db, C, "layernorm db"), f32(dout, NC, "layernorm dout"),
                            f32(inp, NC, "layernorm inp"), f32(w, C, "layernorm w"),
                            f32(mean, N, "layernorm mean"), f32(rstd, N, "layernorm rstd"), N, C);
}
void CpuOps::matmul_forward(Tensor out, Tensor inp, Tensor w, Tensor bias, int N, int IC, int OC) {
    cpu::matmul_forward(f32(out, (size_t)N * OC, "matmul out"), f32(inp, (size_t)N * IC, "matmul inp"),
                        f32(w, (size_t)OC * IC, "matmul w"), f32_or_null(bias, OC, "matmul bias"), N, IC, OC);
}
void CpuOps::matmul_backward(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w,
                             int N, int IC, int OC) {
    cpu::matmul_backward(f32(dinp, (size_t)N * IC, "matmul dinp"), f32(dw, (size_t)OC * IC, "matmul dw"),
                         f32_or_null(dbias, OC, "matmul dbias"), f32(dout, (size_t)N * OC, "matmul dout"),
                         f32(inp, (size_t)N * IC, "matmul inp"), f32(w, (size_t)OC * IC, "matmul w"), N, IC, OC);
}
void CpuOps::gelu_forward(Tensor out, Tensor inp) {
    cpu::gelu_forward(f32(out, inp.n, "gelu out"), f32(inp, inp.n, "gelu inp"), inp.n);
}
void CpuOps::gelu_backward(Tensor dinp, Tensor inp, Tensor dout) {
    cpu::gelu_backward(f32(dinp, inp.n, "gelu dinp"), f32(inp, inp.n, "gelu inp"),
                       f32(dout, inp.n, "gelu dout"), inp.n);
}
void CpuOps::residual_forward(Tensor out, Tensor a, Tensor b) {
    cpu::residual_forward(f32(out, a.n, "residual out"), f32(a, a.n, "residual a"), f32(b, a.n, "residual b"), a.n);
}
void CpuOps::add_inplace(Tensor acc, Tensor x) {
    cpu::add_inplace(f32(acc, x.n, "add_inplace acc"), f32(x, x.n, "add_inplace x"), x.n);
}
void CpuOps::crossentropy(Tensor logits, Tensor losses, const int* targets, int N, int V, int Vp,
                          float dloss, bool backward) {
    CHECK(V > 0 && V <= Vp, "crossentropy: vocab %d must be in [1, padded vocab %d]", V, Vp);
    for (int n = 0; n < N; n++)
        CHECK(targets[n] >= 0 && targets[n] < V, "target token id %d at position %d is outside the vocabulary [0, %d)",
              targets[n], n, V);
    cpu::crossentropy(f32(logits, (size_t)N * Vp, "logits"), f32(losses, N, "losses"), targets, N, V, Vp,
                      dloss, backward);
}
void CpuOps::rope(Tensor qkv, int B, int T, int H, int d, float theta, bool inverse) {
    CHECK(d % 2 == 0, "rope: head size %d must be even", d);
    cpu::rope(f32(qkv, (size_t)B * T * 3 * H * d, "rope qkv"), B, T, H, d, (double)theta, inverse);
}

// ---------------------------------------------------------------- optimizer
double CpuOps::sum_squares(Tensor grads) { return cpu::sum_squares(f32(grads, grads.n, "grads"), grads.n); }
void CpuOps::adamw(Tensor params, Tensor master, Tensor grads, Tensor m, Tensor v, const AdamWStep& s) {
    CHECK(master.empty(), "cpu: adamw was given master weights, but the CPU backend keeps none");
    const size_t n = params.n;
    cpu::adamw(f32(params, n, "params"), f32(grads, n, "grads"), f32(m, n, "adam m"), f32(v, n, "adam v"), n,
               s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, s.step, s.grad_scale);
}

std::unique_ptr<Attention> CpuOps::make_attention(const AttnConfig& cfg) { return make_cpu_attention(cfg); }
