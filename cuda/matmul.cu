// Matrix products of the linear layers through cuBLASLt. Our matrices are row-major; cuBLAS is
// column-major, so a row-major (R, K) matrix is a column-major (K, R) one and every product is
// written for the transposes:
//   forward   outᵀ (OC,N) = w (IC,OC)ᵀ · inpᵀ (IC,N)  + bias      (bias epilogue)
//   backward  dinpᵀ (IC,N) = w (IC,OC) · doutᵀ (OC,N)             (act dtype, overwritten)
//             dwᵀ (IC,OC) += inpᵀ (IC,N) · dout (N,OC)            (fp32 C/D with bf16 A/B, beta=1)
//   dbias (OC) += column sums of dout by our own deterministic two-pass kernel (norm.cu).
// GELU fusions (bf16, the MLP's fc / fcproj pair): the forward may apply GELU in the epilogue and
// keep its input (GELU_AUX(_BIAS): out = gelu(product + bias), aux = product + bias), the
// backward may multiply dinp by GELU′ of a stored input (DGELU): each saves one elementwise pass
// over (N, 4C). Where cuBLASLt has no algorithm, the product and the gelu.cu kernels do the same.
// Compute is fp32 (CUBLAS_COMPUTE_32F: no TF32 in fp32 mode). When cuBLASLt's heuristic offers
// no algorithm for a shape/alignment, the same product goes through cublasGemmEx instead (and the
// bias through a small kernel), so odd shapes work too, only slower.
#include "kernels.cuh"

namespace gpu {
namespace {

constexpr size_t kWorkspaceBytes = 32ull << 20;  // what cuBLASLt recommends for Hopper

// out (N,OC) += bias (OC) broadcast over rows (fallback path only)
template <typename T>
__global__ void add_bias_kernel(T* out, const T* bias, int N, int OC) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * OC) return;
    out[idx] = from_f32<T>(to_f32(out[idx]) + to_f32(bias[idx % OC]));
}

// Largest power of two (up to 256) dividing the address: what cuBLASLt may assume.
uint32_t pointer_alignment(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    uint32_t align = 256;
    while (align > 1 && a % align != 0) align /= 2;
    return align;
}

cudaDataType_t cuda_type(DType t) { return t == DType::F32 ? CUDA_R_32F : CUDA_R_16BF; }

// D (m,n) = alpha·op(A)·op(B) + beta·D [+ bias (m)], column-major, fp32 compute.
struct Gemm {
    bool trans_a = false, trans_b = false;
    int m = 0, n = 0, k = 0;
    const void* A = nullptr; int lda = 0;
    const void* B = nullptr; int ldb = 0;
    void* D = nullptr; int ldd = 0;
    cudaDataType_t ab_type = CUDA_R_32F, d_type = CUDA_R_32F;
    float beta = 0.0f;
    const void* bias = nullptr;  // d_type, length m
    enum class Gelu { None, Forward, Backward } gelu = Gelu::None;
    void* aux = nullptr;  // d_type (m, n), leading dim ldd: Forward writes GELU's input, Backward reads it
};

// Owner of the cuBLASLt descriptors of one call (destroyed even when a check throws).
struct LtDescriptors {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~LtDescriptors() {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (c) cublasLtMatrixLayoutDestroy(c);
        if (b) cublasLtMatrixLayoutDestroy(b);
        if (a) cublasLtMatrixLayoutDestroy(a);
        if (op) cublasLtMatmulDescDestroy(op);
    }
};

// Runs g through cuBLASLt; returns false (having launched nothing) when no algorithm supports it.
bool gemm_lt(Blas& blas, const Gemm& g, cudaStream_t stream) {
    LtDescriptors d;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    cublasLtEpilogue_t epilogue = g.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (g.gelu == Gemm::Gelu::Forward) epilogue = g.bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    if (g.gelu == Gemm::Gelu::Backward) epilogue = CUBLASLT_EPILOGUE_DGELU;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (g.bias)
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
    if (g.gelu != Gemm::Gelu::None) {
        const int64_t ld_aux = g.ldd;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux, sizeof(ld_aux)));
    }
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, g.ab_type, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, g.ab_type, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, g.d_type, g.m, g.n, g.ldd));
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
    const uint64_t ws = blas.workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    const uint32_t align_a = pointer_alignment(g.A), align_b = pointer_alignment(g.B), align_d = pointer_alignment(g.D);
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));

    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(blas.lt, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found);
    // No algorithm (or a layout the heuristic rejects): nothing ran, cublasGemmEx takes over and
    // reports the error itself if the problem is really invalid.
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) return false;
    const float alpha = 1.0f;
    const cublasStatus_t run = cublasLtMatmul(blas.lt, d.op, &alpha, g.A, d.a, g.B, d.b, &g.beta, g.D, d.c, g.D, d.c,
                                              &heuristic.algo, blas.workspace, blas.workspace_bytes, stream);
    if (run == CUBLAS_STATUS_NOT_SUPPORTED || run == CUBLAS_STATUS_INVALID_VALUE) return false;  // not launched
    CUBLAS_CHECK(run);
    return true;
}

// The same product through cublasGemmEx; the bias (if any) by add_bias_kernel on (n, m) row-major;
// a GELU epilogue by the gelu.cu kernels (Forward: the product into aux, then D = gelu(aux);
// Backward: D = gelu′(aux) ∘ product).
void gemm_fallback(Blas& blas, const Gemm& g, cudaStream_t stream) {
    if (g.gelu == Gemm::Gelu::Forward) {
        Gemm pre = g;
        pre.gelu = Gemm::Gelu::None;
        pre.D = g.aux;
        gemm_fallback(blas, pre, stream);
        gelu_forward(static_cast<bf16*>(g.D), static_cast<const bf16*>(g.aux), (size_t)g.m * g.n, stream);
        return;
    }
    CUBLAS_CHECK(cublasSetStream(blas.blas, stream));
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(blas.blas, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              g.m, g.n, g.k, &alpha, g.A, g.ab_type, g.lda, g.B, g.ab_type, g.ldb, &g.beta,
                              g.D, g.d_type, g.ldd, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (g.bias) {
        const size_t total = (size_t)g.n * g.m;
        if (g.d_type == CUDA_R_32F)
            add_bias_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(static_cast<float*>(g.D), static_cast<const float*>(g.bias), g.n, g.m);
        else
            add_bias_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(static_cast<bf16*>(g.D), static_cast<const bf16*>(g.bias), g.n, g.m);
        CUDA_LAUNCH_CHECK();
    }
    if (g.gelu == Gemm::Gelu::Backward)
        gelu_backward(static_cast<bf16*>(g.D), static_cast<const bf16*>(g.aux), static_cast<const bf16*>(g.D),
                      (size_t)g.m * g.n, stream);
}

void gemm(Blas& blas, const Gemm& g, cudaStream_t stream) {
    if (g.m == 0 || g.n == 0) return;
    // The bias epilogue wants an aligned vector; otherwise add it separately on the fallback.
    if (g.bias && pointer_alignment(g.bias) < 16) {
        gemm_fallback(blas, g, stream);
        return;
    }
    if (!gemm_lt(blas, g, stream)) gemm_fallback(blas, g, stream);
}

}  // namespace

Blas::Blas() {
    CUBLAS_CHECK(cublasLtCreate(&lt));
    CUBLAS_CHECK(cublasCreate(&blas));
    workspace_bytes = kWorkspaceBytes;
    workspace = device_alloc(workspace_bytes, "cuBLASLt workspace");
}

Blas::~Blas() {
    if (workspace) cudaFree(workspace);
    if (blas) cublasDestroy(blas);
    if (lt) cublasLtDestroy(lt);
}

void matmul_forward(Blas& blas, void* out, const void* inp, const void* w, const void* bias,
                    DType dtype, int N, int IC, int OC, cudaStream_t stream, void* gelu_pre) {
    if (gelu_pre && (dtype != DType::BF16 || IC == 0)) {  // fp32 (the checking path): unfused
        matmul_forward(blas, gelu_pre, inp, w, bias, dtype, N, IC, OC, stream, nullptr);
        if (dtype == DType::F32)
            gelu_forward(static_cast<float*>(out), static_cast<const float*>(gelu_pre), (size_t)N * OC, stream);
        else
            gelu_forward(static_cast<bf16*>(out), static_cast<const bf16*>(gelu_pre), (size_t)N * OC, stream);
        return;
    }
    Gemm g;
    g.trans_a = true;  // w (OC,IC) row-major = (IC,OC) column-major, transposed
    g.m = OC; g.n = N; g.k = IC;
    g.A = w; g.lda = IC;
    g.B = inp; g.ldb = IC;
    g.D = out; g.ldd = OC;
    g.ab_type = g.d_type = cuda_type(dtype);
    g.bias = bias;
    if (gelu_pre) {
        g.gelu = Gemm::Gelu::Forward;
        g.aux = gelu_pre;
    }
    if (IC == 0) {  // empty product: out = bias (or 0); cuBLAS would reject k = 0
        CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)N * OC * dtype_size(dtype), stream));
        if (!bias || N == 0 || OC == 0) return;
        const size_t total = (size_t)N * OC;
        if (dtype == DType::F32)
            add_bias_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(static_cast<float*>(out), static_cast<const float*>(bias), N, OC);
        else
            add_bias_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(static_cast<bf16*>(out), static_cast<const bf16*>(bias), N, OC);
        CUDA_LAUNCH_CHECK();
        return;
    }
    gemm(blas, g, stream);
}

void matmul_backward(Blas& blas, void* dinp, float* dw, float* dbias, const void* dout,
                     const void* inp, const void* w, DType dtype, int N, int IC, int OC,
                     DeviceScratch& scratch, cudaStream_t stream, const void* gelu_pre) {
    if (N == 0 || IC == 0 || OC == 0) return;  // nothing to add; dinp is empty or has no terms
    if (gelu_pre && dtype != DType::BF16) {  // fp32 (the checking path): unfused
        matmul_backward(blas, dinp, dw, dbias, dout, inp, w, dtype, N, IC, OC, scratch, stream, nullptr);
        gelu_backward(static_cast<float*>(dinp), static_cast<const float*>(gelu_pre), static_cast<const float*>(dinp),
                      (size_t)N * IC, stream);
        return;
    }
    // dinpᵀ (IC,N) = w (IC,OC) · doutᵀ (OC,N)
    Gemm gi;
    gi.m = IC; gi.n = N; gi.k = OC;
    gi.A = w; gi.lda = IC;
    gi.B = dout; gi.ldb = OC;
    gi.D = dinp; gi.ldd = IC;
    gi.ab_type = gi.d_type = cuda_type(dtype);
    if (gelu_pre) {
        gi.gelu = Gemm::Gelu::Backward;
        gi.aux = const_cast<void*>(gelu_pre);
    }
    gemm(blas, gi, stream);
    // dwᵀ (IC,OC) += inpᵀ (IC,N) · dout (N,OC): B = doutᵀ (OC,N) transposed
    Gemm gw;
    gw.trans_b = true;
    gw.m = IC; gw.n = OC; gw.k = N;
    gw.A = inp; gw.lda = IC;
    gw.B = dout; gw.ldb = OC;
    gw.D = dw; gw.ldd = IC;
    gw.ab_type = cuda_type(dtype);
    gw.d_type = CUDA_R_32F;
    gw.beta = 1.0f;
    gemm(blas, gw, stream);
    if (dbias) {
        const int chunks = column_chunks(N);
        float* partials = static_cast<float*>(scratch.get((size_t)chunks * OC * sizeof(float)));  // (chunks, OC)
        if (dtype == DType::F32)
            column_sum_partials(partials, static_cast<const float*>(dout), N, OC, stream);
        else
            column_sum_partials(partials, static_cast<const bf16*>(dout), N, OC, stream);
        add_column_partials(dbias, partials, chunks, OC, stream);
    }
}

}  // namespace gpu
