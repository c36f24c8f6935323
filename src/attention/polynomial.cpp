// `polynomial` on the CPU: exact O(T²) causal polynomial attention (../shared/ATTENTION.md §4,
// the function PolySketch approximates). Per (b, h), with q̂ = LayerNorm(q), k̂ = LayerNorm(k) over
// d (eps 1e-5, no learned affine, no 1/sqrt(d)) and p = cfg.degree (even, so weights are ≥ 0):
//   w_ij = ⟨q̂_i, k̂_j⟩^p (j ≤ i),  D_i = 1 + Σ_{j≤i} w_ij,  o_i = Σ_{j≤i} w_ij·v_j / D_i.
// Backward (exact, through the LayerNorms): Δ_i = dO_i·o_i, dw_ij = (dO_i·v_j − Δ_i)/D_i,
// ds_ij = p·s_ij^(p−1)·dw_ij, dq̂_i = Σ_j ds_ij·k̂_j, dk̂_j = Σ_i ds_ij·q̂_i, dv_j = Σ_i (w_ij/D_i)·dO_i,
// then dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂∘x̂)). saved (5 × (B, H, T)): D, mean_q, rstd_q,
// mean_k, rstd_k. The math is a template on the scalar (float for the class, double in tests).
#include <cmath>
#include <vector>

#include "attention/cpu_variants.h"
#include "attention/cpu_row_math.h"
#include "check.h"

namespace {

constexpr double kLayerNormEps = 1e-5;

// mean and rstd (T) of one head's rows of x (B, H, T, d)
template <typename T>
void layernorm_stats(const HeadTensor& x, int b, int h, int n, int d, T* mean, T* rstd) {
    for (int t = 0; t < n; t++) {
        const T* xr = row_ptr<T>(x, b, h, t);
        T mu = 0;
        for (int i = 0; i < d; i++) mu += xr[i];
        mu /= d;
        T var = 0;
        for (int i = 0; i < d; i++) var += (xr[i] - mu) * (xr[i] - mu);
        var /= d;
        mean[t] = mu;
        rstd[t] = (T)1 / std::sqrt(var + (T)kLayerNormEps);
    }
}

// x̂ (T, d) = (x − mean)·rstd of one head
template <typename T>
void layernorm_rows(const HeadTensor& x, int b, int h, int n, int d, const T* mean, const T* rstd,
                    std::vector<T>& xhat) {
    xhat.assign((size_t)n * d, 0);
    for (int t = 0; t < n; t++) {
        const T* xr = row_ptr<T>(x, b, h, t);
        for (int i = 0; i < d; i++) xhat[(size_t)t * d + i] = (xr[i] - mean[t]) * rstd[t];
    }
}

// dx rows <- rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂∘x̂))
template <typename T>
void layernorm_rows_backward(const HeadTensor& dx, int b, int h, int n, int d, const T* rstd,
                             const std::vector<T>& xhat, const std::vector<T>& dxhat) {
    for (int t = 0; t < n; t++) {
        const T* xh = &xhat[(size_t)t * d];
        const T* dxh = &dxhat[(size_t)t * d];
        T mean_dxh = 0, mean_dxh_xh = 0;
        for (int i = 0; i < d; i++) {
            mean_dxh += dxh[i];
            mean_dxh_xh += dxh[i] * xh[i];
        }
        mean_dxh /= d;
        mean_dxh_xh /= d;
        T* out = row_ptr<T>(dx, b, h, t);
        for (int i = 0; i < d; i++) out[i] = rstd[t] * (dxh[i] - mean_dxh - xh[i] * mean_dxh_xh);
    }
}

}  // namespace

template <typename T>
void polynomial_attention_forward(const AttnShape& s, int degree, HeadTensor o, HeadTensor q,
                                  HeadTensor k, HeadTensor v, T* saved) {
    const int n = s.T, d = s.d;
    const size_t rows = s.rows();
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++) {
            const size_t row0 = ((size_t)b * s.H + h) * n;
            T* D = saved + row0;
            std::vector<T> qh, kh, acc(d);
            layernorm_stats(q, b, h, n, d, saved + rows + row0, saved + 2 * rows + row0);
            layernorm_stats(k, b, h, n, d, saved + 3 * rows + row0, saved + 4 * rows + row0);
            layernorm_rows(q, b, h, n, d, saved + rows + row0, saved + 2 * rows + row0, qh);
            layernorm_rows(k, b, h, n, d, saved + 3 * rows + row0, saved + 4 * rows + row0, kh);
            for (int i = 0; i < n; i++) {
                std::fill(acc.begin(), acc.end(), (T)0);
                T denom = 1;
                for (int j = 0; j <= i; j++) {
                    const T w = int_pow(dot(&qh[(size_t)i * d], &kh[(size_t)j * d], d), degree);
                    denom += w;
                    const T* vj = row_ptr<T>(v, b, h, j);
                    for (int c = 0; c < d; c++) acc[c] += w * vj[c];
                }
                D[i] = denom;
                T* oi = row_ptr<T>(o, b, h, i);
                for (int c = 0; c < d; c++) oi[c] = acc[c] / denom;
            }
        }
}

template <typename T>
void polynomial_attention_backward(const AttnShape& s, int degree, HeadTensor dq, HeadTensor dk,
                                   HeadTensor dv, HeadTensor dout, HeadTensor q, HeadTensor k,
                                   HeadTensor v, HeadTensor o, const T* saved) {
    const int n = s.T, d = s.d;
    const size_t rows = s.rows();
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++) {
            const size_t row0 = ((size_t)b * s.H + h) * n;
            const T* D = saved + row0;
            std::vector<T> qh, kh;  // (T, d) recomputed from the saved statistics
            layernorm_rows(q, b, h, n, d, saved + rows + row0, saved + 2 * rows + row0, qh);
            layernorm_rows(k, b, h, n, d, saved + 3 * rows + row0, saved + 4 * rows + row0, kh);
            std::vector<T> dqh((size_t)n * d, 0), dkh((size_t)n * d, 0);  // (T, d)
            std::vector<T> dvh((size_t)n * d, 0);                         // (T, d)
            for (int i = 0; i < n; i++) {
                const T* doi = row_ptr<T>(dout, b, h, i);
                const T delta = dot(doi, row_ptr<T>(o, b, h, i), d);
                const T* qi = &qh[(size_t)i * d];
                T* dqi = &dqh[(size_t)i * d];
                for (int j = 0; j <= i; j++) {
                    const T* kj = &kh[(size_t)j * d];
                    const T score = dot(qi, kj, d);
                    const T pw = int_pow(score, degree - 1);
                    const T a = pw * score / D[i];  // w_ij / D_i
                    const T ds = degree * pw * (dot(doi, row_ptr<T>(v, b, h, j), d) - delta) / D[i];
                    T* dkj = &dkh[(size_t)j * d];
                    T* dvj = &dvh[(size_t)j * d];
                    for (int c = 0; c < d; c++) {
                        dqi[c] += ds * kj[c];
                        dkj[c] += ds * qi[c];
                        dvj[c] += a * doi[c];
                    }
                }
            }
            layernorm_rows_backward(dq, b, h, n, d, saved + 2 * rows + row0, qh, dqh);
            layernorm_rows_backward(dk, b, h, n, d, saved + 4 * rows + row0, kh, dkh);
            for (int j = 0; j < n; j++) {
                T* out = row_ptr<T>(dv, b, h, j);
                for (int c = 0; c < d; c++) out[c] = dvh[(size_t)j * d + c];
            }
        }
}

template void polynomial_attention_forward<float>(const AttnShape&, int, HeadTensor, HeadTensor,
                                                  HeadTensor, HeadTensor, float*);
template void polynomial_attention_forward<double>(const AttnShape&, int, HeadTensor, HeadTensor,
                                                   HeadTensor, HeadTensor, double*);
template void polynomial_attention_backward<float>(const AttnShape&, int, HeadTensor, HeadTensor,
                                                   HeadTensor, HeadTensor, HeadTensor, HeadTensor,
                                                   HeadTensor, HeadTensor, const float*);
template void polynomial_attention_backward<double>(const AttnShape&, int, HeadTensor, HeadTensor,
                                                    HeadTensor, HeadTensor, HeadTensor, HeadTensor,
                                                    HeadTensor, HeadTensor, const double*);

namespace {

void check_fp32(const HeadTensor& x, const char* what) {
    CHECK(x.dtype == DType::F32, "polynomial (CPU): %s is %s, the CPU reference takes fp32", what,
          dtype_name(x.dtype));
}

class PolynomialAttention : public Attention {
public:
    explicit PolynomialAttention(const AttnConfig& cfg) : degree_(cfg.degree) {
        CHECK(degree_ >= 2 && degree_ % 2 == 0,
              "--degree %d: polynomial attention needs an even degree >= 2 (odd powers give negative weights)",
              degree_);
    }
    std::string name() const override { return "polynomial"; }
    size_t saved_size(const AttnShape& s) const override { return polynomial_saved_size(s); }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        check_fp32(o, "o"), check_fp32(q, "q"), check_fp32(k, "k"), check_fp32(v, "v");
        polynomial_attention_forward<float>(s, degree_, o, q, k, v, saved);
    }
    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                  HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k,
                  HeadTensor v, HeadTensor o, const float* saved, Tensor params,
                  void* workspace) override {
        check_fp32(dq, "dq"), check_fp32(dk, "dk"), check_fp32(dv, "dv"), check_fp32(dout, "dout");
        polynomial_attention_backward<float>(s, degree_, dq, dk, dv, dout, q, k, v, o, saved);
    }

private:
    int degree_;  // p
};

}  // namespace

std::unique_ptr<Attention> make_cpu_polynomial_attention(const AttnConfig& cfg) {
    return std::make_unique<PolynomialAttention>(cfg);
}
