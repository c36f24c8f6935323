// CudaOps: the CUDA implementation of the `Ops` interface (src/ops.h). Each method checks its
// tensors (dtype, size) on the host, picks the kernel instantiation for the activation dtype
// (float or bf16) and calls a launcher of cuda/*.cu (declared in kernels.cuh). Precision BF16
// (the default): activations and the parameters used in compute are bf16, with fp32 master
// weights updated by AdamW; precision F32 (`--precision fp32`, for checking): everything fp32, no
// masters. Parameter gradients, moments and statistics are fp32 in both. Everything runs on the
// default stream of the current device; scratch memory (cuBLASLt workspace, reduction partials,
// encoder buckets) belongs to the CudaOps and is allocated once (grown to the largest use).
#include <cstring>
#include <exception>
#include <vector>

#include "kernels.cuh"

// ---------------------------------------------------------------- memory helpers (gpu::)
namespace gpu {

void* device_alloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes > 0 ? bytes : 256);
    if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();  // clear it so later checks do not report this failure again
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        cudaGetLastError();
        FAIL("out of GPU memory allocating %s (%.1f MiB, %.1f MiB free): reduce --batch or --seq, "
             "or use a smaller --model",
             what.c_str(), bytes / 1048576.0, free_bytes / 1048576.0);
    }
    CUDA_CHECK(err);
    CUDA_CHECK(cudaMemset(p, 0, bytes));
    return p;
}

DeviceScratch::~DeviceScratch() {
    if (ptr) cudaFree(ptr);
}

void* DeviceScratch::get(size_t need) {
    if (need <= bytes) return ptr;
    if (ptr) CUDA_CHECK(cudaFree(ptr));  // cudaFree waits for the kernels still using it
    ptr = nullptr;
    bytes = 0;
    ptr = device_alloc(need, what);
    bytes = need;
    return ptr;
}

}  // namespace gpu

namespace {

// ---------------------------------------------------------------- host-side bf16 conversion
// Round to nearest even, as __float2bfloat16_rn on the device; NaN stays NaN.
uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float bf16_bits_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// ---------------------------------------------------------------- tensor checks
template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<bf16>() { return DType::BF16; }

// The data of `t` as T*, after checking its dtype and that it holds at least `need` elements.
template <typename T>
T* data(Tensor t, size_t need, const char* what) {
    CHECK(t.dtype == dtype_of<T>(), "cuda: %s is %s, expected %s", what, dtype_name(t.dtype),
          dtype_name(dtype_of<T>()));
    CHECK(t.n >= need, "cuda: %s has %zu elements, %zu needed", what, t.n, need);
    CHECK(need == 0 || t.ptr != nullptr, "cuda: %s is null", what);
    return static_cast<T*>(t.ptr);
}
float* f32(Tensor t, size_t need, const char* what) { return data<float>(t, need, what); }
// Optional fp32 tensor (dbias): null when empty.
float* f32_or_null(Tensor t, size_t need, const char* what) { return t.empty() ? nullptr : f32(t, need, what); }

// Calls fn(T{}) with T = float or bf16 following `dt`.
template <typename Fn>
void with_type(DType dt, Fn&& fn) {
    if (dt == DType::F32)
        fn(float{});
    else
        fn(bf16{});
}

class CudaOps : public Ops {
public:
    explicit CudaOps(DType precision) : act_(precision) {}

    std::string name() const override { return "cuda"; }
    DType act_dtype() const override { return act_; }
    bool has_master_weights() const override { return act_ != DType::F32; }

    // ---- memory
    void* alloc(size_t bytes, const std::string& what) override { return gpu::device_alloc(bytes, what); }
    void release(void* p) override {
        if (!p) return;
        const cudaError_t err = cudaFree(p);
        if (std::uncaught_exceptions() == 0) CUDA_CHECK(err);  // no throw while unwinding
    }
    void upload(Tensor dst, const float* src) override {
        if (dst.n == 0) return;
        CHECK(dst.ptr, "cuda: upload into a null tensor");
        if (dst.dtype == DType::F32) {
            CUDA_CHECK(cudaMemcpy(dst.ptr, src, dst.n * sizeof(float), cudaMemcpyHostToDevice));
            return;
        }
        std::vector<uint16_t> staged(dst.n);
        for (size_t i = 0; i < dst.n; i++) staged[i] = f32_to_bf16_bits(src[i]);
        CUDA_CHECK(cudaMemcpy(dst.ptr, staged.data(), dst.n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    }
    void download(float* dst, Tensor src) override {
        if (src.n == 0) return;
        CHECK(src.ptr, "cuda: download from a null tensor");
        if (src.dtype == DType::F32) {
            CUDA_CHECK(cudaMemcpy(dst, src.ptr, src.n * sizeof(float), cudaMemcpyDeviceToHost));
            return;
        }
        std::vector<uint16_t> staged(src.n);
        CUDA_CHECK(cudaMemcpy(staged.data(), src.ptr, src.n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < src.n; i++) dst[i] = bf16_bits_to_f32(staged[i]);
    }
    void upload_ints(int* dst, const int* src, size_t n) override {
        if (n) CUDA_CHECK(cudaMemcpy(dst, src, n * sizeof(int), cudaMemcpyHostToDevice));
    }
    void zero(Tensor t) override {
        if (t.n) CUDA_CHECK(cudaMemsetAsync(t.ptr, 0, t.n * dtype_size(t.dtype), stream_));
    }
    void copy(Tensor dst, Tensor src) override {
        CHECK(dst.n == src.n, "cuda: copy of %zu elements into %zu", src.n, dst.n);
        if (src.n == 0) return;
        if (dst.dtype == src.dtype) {
            CUDA_CHECK(cudaMemcpyAsync(dst.ptr, src.ptr, src.n * dtype_size(src.dtype), cudaMemcpyDeviceToDevice, stream_));
            return;
        }
        if (dst.dtype == DType::F32)
            gpu::convert(dst.f32(), static_cast<const bf16*>(src.ptr), src.n, stream_);
        else
            gpu::convert(static_cast<bf16*>(dst.ptr), src.f32(), src.n, stream_);
    }
    void synchronize() override { CUDA_CHECK(cudaDeviceSynchronize()); }
    size_t device_memory_used() override {
        size_t free_bytes = 0, total_bytes = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
        return total_bytes - free_bytes;
    }

    // ---- the network's ops
    void encoder_forward(Tensor out, const int* tokens, Tensor wte, Tensor wpe, int B, int T, int C) override {
        const size_t N = (size_t)B * T;
        with_type(out.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::encoder_forward(data<A>(out, N * C, "encoder out"), tokens, data<A>(wte, C, "wte"),
                                 wpe.n ? data<A>(wpe, (size_t)T * C, "wpe") : nullptr, B, T, C, stream_);
        });
    }
    void encoder_backward(Tensor dwte, Tensor dwpe, Tensor dout, const int* tokens, const int* tokens_host,
                          int B, int T, int C) override {
        CHECK(tokens_host, "cuda: encoder_backward needs the tokens on the host (tokens_host)");
        const size_t N = (size_t)B * T;
        const int vocab = C > 0 ? (int)(dwte.n / C) : 0;
        with_type(dout.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::encoder_backward(f32(dwte, 0, "dwte"), dwpe.n ? f32(dwpe, (size_t)T * C, "dwpe") : nullptr,
                                  data<A>(dout, N * C, "encoder dout"), tokens_host, B, T, C, vocab,
                                  bucket_scratch_, stream_);
        });
    }
    void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor w, Tensor b, int N,
                           int C) override {
        const size_t NC = (size_t)N * C;
        with_type(out.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::layernorm_forward(data<A>(out, NC, "layernorm out"), f32(mean, N, "layernorm mean"),
                                   f32(rstd, N, "layernorm rstd"), data<A>(inp, NC, "layernorm inp"),
                                   data<A>(w, C, "layernorm w"), data<A>(b, C, "layernorm b"), N, C, stream_);
        });
    }
    void layernorm_backward(Tensor dinp, Tensor dw, Tensor db, Tensor dout, Tensor inp, Tensor w, Tensor mean,
                            Tensor rstd, int N, int C) override {
        const size_t NC = (size_t)N * C;
        with_type(dinp.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::layernorm_backward(data<A>(dinp, NC, "layernorm dinp"), f32(dw, C, "layernorm dw"),
                                    f32(db, C, "layernorm db"), data<A>(dout, NC, "layernorm dout"),
                                    data<A>(inp, NC, "layernorm inp"), data<A>(w, C, "layernorm w"),
                                    f32(mean, N, "layernorm mean"), f32(rstd, N, "layernorm rstd"), N, C,
                                    reduce_scratch_, stream_);
        });
    }
    void matmul_forward(Tensor out, Tensor inp, Tensor w, Tensor bias, int N, int IC, int OC) override {
        run_matmul_forward(out, Tensor{}, inp, w, bias, N, IC, OC, kMatmulNames);
    }
    void matmul_backward(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w, int N, int IC,
                         int OC) override {
        run_matmul_backward(dinp, dw, dbias, dout, inp, w, Tensor{}, N, IC, OC, kMatmulNames);
    }
    void residual_layernorm_forward(Tensor residual, Tensor out, Tensor mean, Tensor rstd, Tensor a, Tensor b,
                                    Tensor w, Tensor bias, int N, int C) override {
        const size_t NC = (size_t)N * C;
        with_type(out.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::residual_layernorm_forward(data<A>(residual, NC, "residual_layernorm residual"),
                                            data<A>(out, NC, "residual_layernorm out"),
                                            f32(mean, N, "residual_layernorm mean"), f32(rstd, N, "residual_layernorm rstd"),
                                            data<A>(a, NC, "residual_layernorm a"), data<A>(b, NC, "residual_layernorm b"),
                                            data<A>(w, C, "residual_layernorm w"),
                                            data<A>(bias, C, "residual_layernorm bias"), N, C, stream_);
        });
    }
    void matmul_gelu_forward(Tensor act, Tensor pre, Tensor inp, Tensor w, Tensor bias, int N, int IC,
                             int OC) override {
        run_matmul_forward(act, pre, inp, w, bias, N, IC, OC, kMatmulGeluNames);
    }
    void matmul_backward_gelu(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w, Tensor pre,
                              int N, int IC, int OC) override {
        run_matmul_backward(dinp, dw, dbias, dout, inp, w, pre, N, IC, OC, kMatmulGeluNames);
    }
    void gelu_forward(Tensor out, Tensor inp) override {
        with_type(out.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::gelu_forward(data<A>(out, inp.n, "gelu out"), data<A>(inp, inp.n, "gelu inp"), inp.n, stream_);
        });
    }
    void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) override {
        with_type(dinp.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::gelu_backward(data<A>(dinp, inp.n, "gelu dinp"), data<A>(inp, inp.n, "gelu inp"),
                               data<A>(dout, inp.n, "gelu dout"), inp.n, stream_);
        });
    }
    void residual_forward(Tensor out, Tensor a, Tensor b) override {
        with_type(out.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::residual_forward(data<A>(out, a.n, "residual out"), data<A>(a, a.n, "residual a"),
                                  data<A>(b, a.n, "residual b"), a.n, stream_);
        });
    }
    void add_inplace(Tensor acc, Tensor x) override {
        CHECK(x.n >= acc.n, "cuda: add_inplace of %zu elements into %zu", x.n, acc.n);
        with_type(acc.dtype, [&](auto acc_tag) {
            with_type(x.dtype, [&](auto x_tag) {
                using TA = decltype(acc_tag);
                using TX = decltype(x_tag);
                gpu::add_inplace(data<TA>(acc, acc.n, "add_inplace acc"), data<TX>(x, acc.n, "add_inplace x"), acc.n,
                                 stream_);
            });
        });
    }
    void crossentropy(Tensor logits, Tensor losses, const int* targets, int N, int V, int Vp, float dloss,
                      bool backward) override {
        CHECK(V > 0 && V <= Vp, "cuda: crossentropy with V = %d and padded Vp = %d (need 0 < V <= Vp)", V, Vp);
        with_type(logits.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::crossentropy(data<A>(logits, (size_t)N * Vp, "logits"), f32(losses, N, "losses"), targets, N, V, Vp,
                              dloss, backward, stream_);
        });
    }
    void rope(Tensor qkv, int B, int T, int H, int d, float theta, bool inverse) override {
        CHECK(d % 2 == 0, "cuda: rope needs an even head size, got d = %d", d);
        with_type(qkv.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::rope(data<A>(qkv, (size_t)B * T * 3 * H * d, "rope qkv"), B, T, H, d, theta, inverse, stream_);
        });
    }

    // ---- optimizer
    double sum_squares(Tensor grads) override {
        return gpu::sum_squares(f32(grads, grads.n, "sum_squares grads"), grads.n, squares_scratch_, stream_);
    }
    void adamw(Tensor params, Tensor master, Tensor grads, Tensor m, Tensor v, const AdamWStep& s) override {
        const size_t n = params.n;
        float* g = f32(grads, n, "adamw grads");
        float* mm = f32(m, n, "adamw m");
        float* vv = f32(v, n, "adamw v");
        float* mw = master.empty() ? nullptr : f32(master, n, "adamw master");
        CHECK(mw || params.dtype == DType::F32,
              "cuda: adamw on %s params needs fp32 master weights (master is empty)", dtype_name(params.dtype));
        with_type(params.dtype, [&](auto tag) {
            using A = decltype(tag);
            gpu::adamw(data<A>(params, n, "adamw params"), mw, g, mm, vv, n, s, stream_);
        });
    }

    std::unique_ptr<Attention> make_attention(const AttnConfig& cfg) override { return make_cuda_attention(cfg); }

private:
    // The tensors' names in error messages of the plain matmul and of the one with the GELU
    // epilogue (pre: the GELU's input, kept by the forward, read by the backward).
    struct MatmulNames {
        bool gelu;
        const char *out, *pre, *inp, *w, *bias, *dinp, *dout, *dw, *dbias;
    };
    static constexpr MatmulNames kMatmulNames{false, "matmul out", "", "matmul inp", "matmul w", "matmul bias",
                                              "matmul dinp", "matmul dout", "matmul dw", "matmul dbias"};
    static constexpr MatmulNames kMatmulGeluNames{true, "matmul_gelu act", "matmul_gelu pre", "matmul_gelu inp",
                                                  "matmul_gelu w", "matmul_gelu bias", "matmul_gelu dinp",
                                                  "matmul_gelu dout", "matmul_gelu dw", "matmul_gelu dbias"};
    // out (N, OC) = inp·wᵀ + bias, = GELU(pre) with pre (N, OC) the product when names.gelu.
    void run_matmul_forward(Tensor out, Tensor pre, Tensor inp, Tensor w, Tensor bias, int N, int IC, int OC,
                            const MatmulNames& names) {
        const DType dt = out.dtype;
        with_type(dt, [&](auto tag) {
            using A = decltype(tag);
            A* o = data<A>(out, (size_t)N * OC, names.out);
            A* p = names.gelu ? data<A>(pre, (size_t)N * OC, names.pre) : nullptr;
            const A* x = data<A>(inp, (size_t)N * IC, names.inp);
            const A* wt = data<A>(w, (size_t)OC * IC, names.w);
            const A* b = bias.empty() ? nullptr : data<A>(bias, OC, names.bias);
            gpu::matmul_forward(blas_, o, x, wt, b, dt, N, IC, OC, stream_, p);
        });
    }
    // dinp, dw +=, dbias += of the above; with names.gelu dinp also through the GELU whose input
    // pre (N, IC) produced inp.
    void run_matmul_backward(Tensor dinp, Tensor dw, Tensor dbias, Tensor dout, Tensor inp, Tensor w, Tensor pre,
                             int N, int IC, int OC, const MatmulNames& names) {
        const DType dt = dout.dtype;
        with_type(dt, [&](auto tag) {
            using A = decltype(tag);
            A* di = data<A>(dinp, (size_t)N * IC, names.dinp);
            const A* dy = data<A>(dout, (size_t)N * OC, names.dout);
            const A* x = data<A>(inp, (size_t)N * IC, names.inp);
            const A* wt = data<A>(w, (size_t)OC * IC, names.w);
            const A* p = names.gelu ? data<A>(pre, (size_t)N * IC, names.pre) : nullptr;
            gpu::matmul_backward(blas_, di, f32(dw, (size_t)OC * IC, names.dw), f32_or_null(dbias, OC, names.dbias),
                                 dy, x, wt, dt, N, IC, OC, reduce_scratch_, stream_, p);
        });
    }
    DType act_;
    cudaStream_t stream_ = 0;  // the default stream: attention modules and NCCL see the same order
    gpu::Blas blas_;
    gpu::DeviceScratch reduce_scratch_{"reduction partials (layernorm dw/db, matmul dbias)"};
    gpu::DeviceScratch bucket_scratch_{"encoder backward token buckets"};
    gpu::DeviceScratch squares_scratch_{"sum_squares partials"};
};

}  // namespace

bool cuda_available() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();  // no driver / no device: not an error for the caller
        return false;
    }
    return count > 0;
}

std::unique_ptr<Ops> make_cuda_ops(DType precision) {
    CHECK(cuda_available(), "--device cuda: no CUDA device is visible (check nvidia-smi and "
                            "CUDA_VISIBLE_DEVICES), or use --device cpu");
    return std::make_unique<CudaOps>(precision);
}
