// The CPU kernels: forward and backward of every op of the network as plain-loop function
// templates on the scalar type T. `CpuOps` (src/cpu_ops.cpp) instantiates them with float; the
// unit tests instantiate them with double so finite differences are exact to ~1e-7. Every
// function is deterministic whatever the number of OpenMP threads: threads only ever split
// independent rows or columns, and every reduction over rows runs in a fixed order (a column's
// sum is owned by one thread, chunks of fixed size are added in order).
// Shapes follow src/ops.h: N = B*T rows, C channels, linear weights (OC, IC).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace cpu {

// ---------------------------------------------------------------- encoder
// out (B,T,C) = wte (Vp,C)[tokens (B,T)] + wpe (maxT,C)[t]; wpe is null for RoPE models
template <typename T>
void encoder_forward(T* out, const int* tokens, const T* wte, const T* wpe, int B, int T_, int C) {
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < (int64_t)B * T_; row++) {
        const T* we = wte + (int64_t)tokens[row] * C;
        T* o = out + row * C;
        if (!wpe) { for (int c = 0; c < C; c++) o[c] = we[c]; continue; }
        const T* pe = wpe + (row % T_) * C;
        for (int c = 0; c < C; c++) o[c] = we[c] + pe[c];
    }
}

// dwte (Vp,C) += scatter of dout (B,T,C) by token; dwpe (maxT,C) += dout summed over batches
// (dwpe null: no position table).
// Threads own channel slices and walk the rows in order, so repeated tokens add in a fixed order.
template <typename T>
void encoder_backward(T* dwte, T* dwpe, const T* dout, const int* tokens, int B, int T_, int C) {
    const int slice = 64;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += slice) {
        const int c1 = std::min(C, c0 + slice);
        for (int64_t row = 0; row < (int64_t)B * T_; row++) {
            const T* d = dout + row * C;
            T* we = dwte + (int64_t)tokens[row] * C;
            for (int c = c0; c < c1; c++) we[c] += d[c];
            if (!dwpe) continue;
            T* pe = dwpe + (row % T_) * C;
            for (int c = c0; c < c1; c++) pe[c] += d[c];
        }
    }
}

// ---------------------------------------------------------------- layernorm
constexpr double kLayerNormEps = 1e-5;

// out (N,C) = (inp - mean) * rstd * w + b; mean (N), rstd (N) saved for the backward.
template <typename T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* inp, const T* w, const T* b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* x = inp + (int64_t)n * C;
        double sum = 0;
        for (int c = 0; c < C; c++) sum += x[c];
        const double m = sum / C;
        double var = 0;
        for (int c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
        const double s = 1.0 / std::sqrt(var / C + kLayerNormEps);
        T* o = out + (int64_t)n * C;
        for (int c = 0; c < C; c++) o[c] = (T)((x[c] - m) * s * w[c] + b[c]);
        mean[n] = (T)m;
        rstd[n] = (T)s;
    }
}

// dinp (N,C) +=, dw (C) +=, db (C) +=. Rows are independent for dinp; dw and db are reduced over
// rows by the thread that owns the channel slice, in row order.
template <typename T>
void layernorm_backward(T* dinp, T* dw, T* db, const T* dout, const T* inp, const T* w,
                        const T* mean, const T* rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const T* x = inp + (int64_t)n * C;
        const T* dy = dout + (int64_t)n * C;
        const double m = mean[n], s = rstd[n];
        double dnorm_mean = 0, dnorm_norm_mean = 0;
        for (int c = 0; c < C; c++) {
            const double norm = (x[c] - m) * s, dnorm = (double)w[c] * dy[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        T* dx = dinp + (int64_t)n * C;
        for (int c = 0; c < C; c++) {
            const double norm = (x[c] - m) * s, dnorm = (double)w[c] * dy[c];
            dx[c] += (T)((dnorm - dnorm_mean - norm * dnorm_norm_mean) * s);
        }
    }
    const int slice = 64;
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += slice) {
        const int c1 = std::min(C, c0 + slice);
        double acc_w[slice] = {}, acc_b[slice] = {};
        for (int n = 0; n < N; n++) {
            const T* x = inp + (int64_t)n * C;
            const T* dy = dout + (int64_t)n * C;
            const double m = mean[n], s = rstd[n];
            for (int c = c0; c < c1; c++) {
                acc_w[c - c0] += (x[c] - m) * s * dy[c];
                acc_b[c - c0] += dy[c];
            }
        }
        for (int c = c0; c < c1; c++) { dw[c] += (T)acc_w[c - c0]; db[c] += (T)acc_b[c - c0]; }
    }
}

// ---------------------------------------------------------------- matmul
// One GEMM building block: C (M, NC) (+)= A (M, K) @ B (K, NC), A with arbitrary strides (so the
// backward can read doutᵀ), B and C row-major. Register tiles of kMR × kNR outputs keep their
// partial sums in registers and vectorize over the NR columns; each output is summed over k in
// order within chunks of kKC that are added to C in order, so the result does not depend on
// threads. The 8 × 2-vector tile replaced a 4 × 16 `omp simd` tile the compiler kept in 4
// registers: the logits GEMM of the tiny model (N 512, IC 128, OC 50304, fp32) went from 124 to
// 39 ms forward and 311 to 106 ms backward on the 2-core CI machine (AVX-512).
namespace detail {
constexpr int kKC = 256;
// Register tile: kMR rows × kNV vectors of 64 bytes (GCC vector extensions: one AVX-512 register,
// or two AVX2 ones, whatever -march gives); 8 × 2 = 16 accumulators hide the FMA latency.
constexpr int kMR = 8, kNV = 2;  // kMR and kNR divide the 64 × 64 work items: no scalar edges
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
    typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
    typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
template <typename T>
constexpr int kNR = kNV * kLanes<T>;  // columns of a register tile: 32 floats, 16 doubles

template <typename T>
inline void gemm_tile(int K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
    using V = Vec<T>;
    V acc[kMR][kNV] = {};
    for (int k = 0; k < K; k++) {
        V b[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; v++) __builtin_memcpy(&b[v], B + k * ldb + v * kLanes<T>, sizeof(V));
#pragma GCC unroll 16
        for (int r = 0; r < kMR; r++) {
            const T a = A[r * sam + k * sak];
#pragma GCC unroll 4
            for (int v = 0; v < kNV; v++) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < kMR; r++)
        for (int v = 0; v < kNV; v++) {
            T* c = C + r * ldc + v * kLanes<T>;
            V out = acc[r][v];
            if (accumulate) {
                V old;
                __builtin_memcpy(&old, c, sizeof(V));
                out += old;
            }
            __builtin_memcpy(c, &out, sizeof(V));
        }
}

// The same for the ragged edge (mr <= kMR rows, nr <= kNR columns), scalar.
template <typename T>
inline void gemm_tile_edge(int mr, int nr, int K, const T* A, int64_t sam, int64_t sak, const T* B,
                           int64_t ldb, T* C, int64_t ldc, bool accumulate) {
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nr; j++) {
            T acc = 0;
            for (int k = 0; k < K; k++) acc += A[r * sam + k * sak] * B[k * ldb + j];
            C[r * ldc + j] = accumulate ? C[r * ldc + j] + acc : acc;
        }
}

template <typename T>
void gemm_block(int M, int NC, int K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb,
                T* C, int64_t ldc, bool accumulate) {
    if (K == 0 && !accumulate) {
        for (int m = 0; m < M; m++)
            for (int j = 0; j < NC; j++) C[m * ldc + j] = 0;
        return;
    }
    for (int k0 = 0; k0 < K; k0 += kKC) {
        const int kc = std::min(kKC, K - k0);
        const bool acc = accumulate || k0 > 0;
        for (int m0 = 0; m0 < M; m0 += kMR) {
            const int mr = std::min(kMR, M - m0);
            for (int n0 = 0; n0 < NC; n0 += kNR<T>) {
                const int nr = std::min(kNR<T>, NC - n0);
                const T* a = A + m0 * sam + k0 * sak;
                const T* b = B + k0 * ldb + n0;
                T* c = C + m0 * ldc + n0;
                if (mr == kMR && nr == kNR<T>)
                    gemm_tile(kc, a, sam, sak, b, ldb, c, ldc, acc);
                else
                    gemm_tile_edge(mr, nr, kc, a, sam, sak, b, ldb, c, ldc, acc);
            }
        }
    }
}
constexpr int kRowBlock = 64, kColBlock = 64;  // work item of one thread: 64 × 64 outputs
}  // namespace detail

// out (N,OC) = inp (N,IC) @ w (OC,IC)ᵀ + bias (OC, may be null).
// Each work item transposes its 64 rows of w into a per-thread (IC, 64) buffer so the inner loop
// runs along contiguous output columns; consecutive items of a thread share the same w block.
template <typename T>
void matmul_forward(T* out, const T* inp, const T* w, const T* bias, int N, int IC, int OC) {
    using namespace detail;
    const int row_blocks = (N + kRowBlock - 1) / kRowBlock;
    const int col_blocks = (OC + kColBlock - 1) / kColBlock;
#pragma omp parallel
    {
        std::vector<T> wT((size_t)IC * kColBlock);  // (IC, 64): rows o0..o0+63 of w, transposed
        int wT_block = -1;
#pragma omp for collapse(2) schedule(static)
        for (int cb = 0; cb < col_blocks; cb++)
            for (int rb = 0; rb < row_blocks; rb++) {
                const int o0 = cb * kColBlock, oc = std::min(kColBlock, OC - o0);
                const int n0 = rb * kRowBlock, nr = std::min(kRowBlock, N - n0);
                if (wT_block != cb) {
                    for (int o = 0; o < oc; o++)
                        for (int i = 0; i < IC; i++) wT[(size_t)i * kColBlock + o] = w[(int64_t)(o0 + o) * IC + i];
                    wT_block = cb;
                }
                T* c = out + (int64_t)n0 * OC + o0;
                gemm_block(nr, oc, IC, inp + (int64_t)n0 * IC, IC, 1, wT.data(), kColBlock, c, OC, false);
                if (bias)
                    for (int n = 0; n < nr; n++)
                        for (int o = 0; o < oc; o++) c[(int64_t)n * OC + o] += bias[o0 + o];
            }
    }
}

// dinp (N,IC) = dout (N,OC) @ w (OC,IC) (overwritten); dw (OC,IC) += doutᵀ @ inp;
// dbias (OC) += column sums of dout (dbias may be null). dw and dbias are summed over rows in a
// fixed order by the thread owning the output block.
template <typename T>
void matmul_backward(T* dinp, T* dw, T* dbias, const T* dout, const T* inp, const T* w, int N, int IC,
                     int OC) {
    using namespace detail;
    const int row_blocks = (N + kRowBlock - 1) / kRowBlock;
    const int in_blocks = (IC + kColBlock - 1) / kColBlock;
    const int out_blocks = (OC + kColBlock - 1) / kColBlock;
#pragma omp parallel for collapse(2) schedule(static)
    for (int rb = 0; rb < row_blocks; rb++)
        for (int ib = 0; ib < in_blocks; ib++) {
            const int n0 = rb * kRowBlock, nr = std::min(kRowBlock, N - n0);
            const int i0 = ib * kColBlock, ic = std::min(kColBlock, IC - i0);
            gemm_block(nr, ic, OC, dout + (int64_t)n0 * OC, OC, 1, w + i0, IC,
                       dinp + (int64_t)n0 * IC + i0, IC, false);
        }
#pragma omp parallel for collapse(2) schedule(static)
    for (int ob = 0; ob < out_blocks; ob++)
        for (int ib = 0; ib < in_blocks; ib++) {
            const int o0 = ob * kColBlock, oc = std::min(kColBlock, OC - o0);
            const int i0 = ib * kColBlock, ic = std::min(kColBlock, IC - i0);
            // A = doutᵀ: element (o, n) at dout[n*OC + o]
            gemm_block(oc, ic, N, dout + o0, 1, OC, inp + i0, IC, dw + (int64_t)o0 * IC + i0, IC, true);
        }
    if (dbias) {
#pragma omp parallel for schedule(static)
        for (int ob = 0; ob < out_blocks; ob++) {
            const int o0 = ob * kColBlock, oc = std::min(kColBlock, OC - o0);
            double acc[kColBlock] = {};
            for (int n = 0; n < N; n++)
                for (int o = 0; o < oc; o++) acc[o] += dout[(int64_t)n * OC + o0 + o];
            for (int o = 0; o < oc; o++) dbias[o0 + o] += (T)acc[o];
        }
    }
}

// ---------------------------------------------------------------- GELU (tanh approximation)
// gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
template <typename T>
void gelu_forward(T* out, const T* inp, size_t n) {
    const T s = (T)0.7978845608028654;  // √(2/π)
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) {
        const T x = inp[i];
        out[i] = (T)0.5 * x * ((T)1 + std::tanh(s * (x + (T)0.044715 * x * x * x)));
    }
}

// dinp = gelu'(inp) · dout; dinp may alias dout (elementwise).
template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, size_t n) {
    const T s = (T)0.7978845608028654;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) {
        const T x = inp[i];
        const T th = std::tanh(s * (x + (T)0.044715 * x * x * x));
        const T sech2 = (T)1 - th * th;
        const T grad = (T)0.5 * ((T)1 + th) + (T)0.5 * x * sech2 * s * ((T)1 + (T)3 * (T)0.044715 * x * x);
        dinp[i] = grad * dout[i];
    }
}

// ---------------------------------------------------------------- residual
// out = a + b; its backward is the identity into both inputs (add_inplace sums those).
template <typename T>
void residual_forward(T* out, const T* a, const T* b, size_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) out[i] = a[i] + b[i];
}

// acc += x
template <typename T>
void add_inplace(T* acc, const T* x, size_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) acc[i] += x[i];
}

// ---------------------------------------------------------------- cross-entropy
// Fused softmax cross-entropy over logits (N, Vp); columns >= V are padding, treated as -inf.
// losses (N) = -log softmax(logits)[target]. With backward, each logits row is overwritten by
// dloss·(softmax - onehot(target)), padding columns set to 0. Targets must lie in [0, V).
// One exponential per logit, in T (the row sum in double); with backward the exponentials wait in
// the row itself. This replaced two double-precision passes (exp for the sum, again for the
// gradient): the tiny model's CPU step (8×64 tokens, 2 cores) went from 324 to 253 ms.
template <typename T>
void crossentropy(T* logits, T* losses, const int* targets, int N, int V, int Vp, T dloss, bool backward) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        T* x = logits + (int64_t)n * Vp;
        T maxv = x[0];
        for (int c = 1; c < V; c++) maxv = std::max(maxv, x[c]);
        const int target = targets[n];
        const T x_target = x[target];
        double sum = 0;
        if (backward) {
            for (int c = 0; c < V; c++) {
                const T e = std::exp(x[c] - maxv);
                x[c] = e;
                sum += (double)e;
            }
        } else {
            for (int c = 0; c < V; c++) sum += (double)std::exp(x[c] - maxv);
        }
        losses[n] = (T)(std::log(sum) - (double)(x_target - maxv));
        if (!backward) continue;
        const T scale = (T)((double)dloss / sum);  // dloss·p = scale·e
        for (int c = 0; c < V; c++) x[c] = scale * x[c];
        x[target] -= dloss;
        for (int c = V; c < Vp; c++) x[c] = 0;
    }
}

// ---------------------------------------------------------------- RoPE
// Rotary position embedding on q and k of qkv (B, T, 3, H, d) in place: within each head, the
// interleaved pair (x[2i], x[2i+1]) at position t is rotated by the angle t·theta^(-2i/d).
// The map is orthogonal, so its backward is the rotation by -angle (inverse = true).
template <typename T>
void rope(T* qkv, int B, int T_, int H, int d, double theta, bool inverse) {
    const int half = d / 2;
    std::vector<double> inv_freq(half);  // theta^(-2i/d)
    for (int i = 0; i < half; i++) inv_freq[i] = std::pow(theta, -2.0 * i / d);
    const double sign = inverse ? -1.0 : 1.0;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < (int64_t)B * T_; row++) {
        const int t = (int)(row % T_);
        T* x = qkv + row * 3 * H * d;
        for (int i = 0; i < half; i++) {
            const double angle = sign * t * inv_freq[i];
            const T c = (T)std::cos(angle), s = (T)std::sin(angle);
            for (int qk = 0; qk < 2; qk++)  // q heads then k heads; v is left alone
                for (int h = 0; h < H; h++) {
                    T* p = x + ((int64_t)qk * H + h) * d + 2 * i;
                    const T x0 = p[0], x1 = p[1];
                    p[0] = x0 * c - x1 * s;
                    p[1] = x0 * s + x1 * c;
                }
        }
    }
}

// ---------------------------------------------------------------- optimizer
// Σ x² accumulated in double: fixed chunks summed in parallel, then the chunk sums in order.
template <typename T>
double sum_squares(const T* x, size_t n) {
    const size_t chunk = 1 << 14;
    const int64_t chunks = (int64_t)((n + chunk - 1) / chunk);
    std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static)
    for (int64_t ci = 0; ci < chunks; ci++) {
        const size_t end = std::min(n, (size_t)(ci + 1) * chunk);
        double acc = 0;
        for (size_t i = (size_t)ci * chunk; i < end; i++) acc += (double)x[i] * (double)x[i];
        partial[ci] = acc;
    }
    double total = 0;
    for (double p : partial) total += p;
    return total;
}

// AdamW with decoupled weight decay on params (n) from grads (n), moments m, v (n):
//   g = grad·grad_scale; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
//   p -= lr·( m̂/(√v̂ + eps) + wd·p ), m̂ = m/(1-β1^step), v̂ = v/(1-β2^step).
template <typename T>
void adamw(T* params, const T* grads, T* m, T* v, size_t n, double lr, double beta1, double beta2,
           double eps, double weight_decay, int step, double grad_scale) {
    const double bc1 = 1.0 - std::pow(beta1, step), bc2 = 1.0 - std::pow(beta2, step);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < (int64_t)n; i++) {
        const T g = (T)(grads[i] * grad_scale);
        const T mi = (T)(beta1 * m[i] + (1.0 - beta1) * g);
        const T vi = (T)(beta2 * v[i] + (1.0 - beta2) * g * g);
        m[i] = mi;
        v[i] = vi;
        const double mhat = mi / bc1, vhat = vi / bc2;
        params[i] = (T)(params[i] - lr * (mhat / (std::sqrt(vhat) + eps) + weight_decay * params[i]));
    }
}

}  // namespace cpu
