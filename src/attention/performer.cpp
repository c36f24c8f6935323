// `performer` on the CPU: FAVOR+ causal linear attention with positive orthogonal random
// features (../shared/ATTENTION.md §3). Holds the draw of Ω (performer_features), the reference
// forward/backward as templates on the scalar type (float for the Attention class, double for the
// finite-difference tests) and the Attention class. The exact formulas, the causal key stabiliser
// and the chunked scan are documented in performer_features.h.
#include "attention/performer_features.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "attention/cpu_variants.h"
#include "attention/cpu_row_math.h"
#include "check.h"
#include "rng.h"

std::vector<float> performer_features(const AttnConfig& cfg, int layer, int64_t step, int d) {
    const int m = cfg.features;
    CHECK(m >= 1, "--features %d: the Performer needs at least one random feature", m);
    CHECK(d >= 1, "performer: head dimension %d must be >= 1", d);
    CHECK(cfg.redraw >= 0, "--redraw %d: must be >= 0 (0 = never redraw the features)", cfg.redraw);
    CHECK(step >= 0, "performer: step %lld must be >= 0", (long long)step);
    const int64_t draw = cfg.redraw > 0 ? step / cfg.redraw : 0;
    Rng rng(Rng::derive(cfg.seed, (uint64_t)layer, (uint64_t)draw));

    std::vector<float> omega((size_t)m * d);   // (m, d)
    std::vector<double> block((size_t)d * d);  // (d, d): Gaussian, then orthonormal rows
    for (int row0 = 0; row0 < m; row0 += d) {
        for (double& x : block) x = rng.normal();
        for (int r = 0; r < d; r++) {  // modified Gram-Schmidt on the rows
            double* br = &block[(size_t)r * d];
            for (int p = 0; p < r; p++) {
                const double* bp = &block[(size_t)p * d];
                double dot = 0;
                for (int i = 0; i < d; i++) dot += br[i] * bp[i];
                for (int i = 0; i < d; i++) br[i] -= dot * bp[i];
            }
            double norm2 = 0;
            for (int i = 0; i < d; i++) norm2 += br[i] * br[i];
            CHECK(norm2 > 1e-24, "performer: degenerate Gaussian block (seed %llu, layer %d, draw %lld); use another --seed",
                  (unsigned long long)cfg.seed, layer, (long long)draw);
            const double inv = 1.0 / std::sqrt(norm2);
            for (int i = 0; i < d; i++) br[i] *= inv;
        }
        const int rows = std::min(d, m - row0);
        for (int r = 0; r < rows; r++) {  // row norm = norm of a fresh Gaussian d-vector
            double norm2 = 0;
            for (int i = 0; i < d; i++) {
                const double g = rng.normal();
                norm2 += g * g;
            }
            const double norm = std::sqrt(norm2);
            for (int i = 0; i < d; i++)
                omega[(size_t)(row0 + r) * d + i] = (float)(norm * block[(size_t)r * d + i]);
        }
    }
    return omega;
}

namespace {

constexpr double kMinDenominator = 1e-30;  // R_i at or below this: o_i = 0, no gradient

// One (b, h) head's inputs scaled and its features. x̃ (T, d) = d^(-1/4)·x; e (T, m) = exp(a − c)
// (the exp part); phi (T, m) = m^(-1/2)·(e + ε).
template <typename T>
struct Features {
    std::vector<T> xt, e, phi;
};

// Loads x̃ and fills e with the logits a_f = ω_fᵀx̃ − ‖x̃‖²/2.
template <typename T>
void load_logits(Features<T>& F, const HeadTensor& x, int b, int h, int n, int d,
                 const float* omega, int m) {
    const T in_scale = (T)std::pow((double)d, -0.25);
    F.xt.assign((size_t)n * d, 0);
    F.e.assign((size_t)n * m, 0);
    for (int t = 0; t < n; t++) {
        const T* xr = row_ptr<T>(x, b, h, t);
        T* xt = &F.xt[(size_t)t * d];
        T half_norm2 = 0;
        for (int i = 0; i < d; i++) {
            xt[i] = in_scale * xr[i];
            half_norm2 += xt[i] * xt[i];
        }
        half_norm2 *= (T)0.5;
        for (int f = 0; f < m; f++) {
            const float* w = omega + (size_t)f * d;
            T dot = 0;
            for (int i = 0; i < d; i++) dot += (T)w[i] * xt[i];
            F.e[(size_t)t * m + f] = dot - half_norm2;
        }
    }
}

// Turns the logits in F.e into e = exp(a − c_t) and fills phi.
template <typename T>
void finish_features(Features<T>& F, const T* c, int n, int m, T epsilon) {
    const T phi_scale = (T)(1.0 / std::sqrt((double)m));
    F.phi.assign((size_t)n * m, 0);
    for (int t = 0; t < n; t++)
        for (int f = 0; f < m; f++) {
            T& e = F.e[(size_t)t * m + f];
            e = std::exp(e - c[t]);
            F.phi[(size_t)t * m + f] = phi_scale * (e + epsilon);
        }
}

// Through the feature map: dx = d^(-1/4)·(Ωᵀ(dφ∘m^(-1/2)e) − x̃·Σ_f dφ_f·m^(-1/2)e_f), stabiliser
// held constant. dphi (T, m); writes dx rows of the HeadTensor.
template <typename T>
void feature_backward(const Features<T>& F, const std::vector<T>& dphi, const float* omega, int m,
                      int n, int d, const HeadTensor& dx, int b, int h) {
    const T in_scale = (T)std::pow((double)d, -0.25);
    const T phi_scale = (T)(1.0 / std::sqrt((double)m));
    std::vector<T> dxt(d);
    for (int t = 0; t < n; t++) {
        std::fill(dxt.begin(), dxt.end(), (T)0);
        T sum_da = 0;
        for (int f = 0; f < m; f++) {
            const T da = dphi[(size_t)t * m + f] * phi_scale * F.e[(size_t)t * m + f];
            sum_da += da;
            const float* w = omega + (size_t)f * d;
            for (int i = 0; i < d; i++) dxt[i] += da * (T)w[i];
        }
        T* out = row_ptr<T>(dx, b, h, t);
        const T* xt = &F.xt[(size_t)t * d];
        for (int i = 0; i < d; i++) out[i] = in_scale * (dxt[i] - xt[i] * sum_da);
    }
}

// Prefix state S (m, d+1) += the keys c0..c1-1 of head (b, h): φ(k_j)·[v_j | 1], everything in
// the frame of the chunk's last key (the carried state is rescaled by exp(ck[c0-1] - ck[c1-1])).
template <typename T>
void add_chunk_to_state(std::vector<T>& S, const Features<T>& K, const T* ck, const HeadTensor& v, int b, int h,
                        int c0, int c1, int m, int d) {
    const int dc = d + 1;
    if (c0 > 0) {
        const T r = std::exp(ck[c0 - 1] - ck[c1 - 1]);
        for (T& x : S) x *= r;
    }
    for (int j = c0; j < c1; j++) {
        const T r = std::exp(ck[j] - ck[c1 - 1]);
        const T* pk = &K.phi[(size_t)j * m];
        const T* vj = row_ptr<T>(v, b, h, j);
        for (int f = 0; f < m; f++) {
            const T pf = pk[f] * r;
            T* Sf = &S[(size_t)f * dc];
            for (int c = 0; c < d; c++) Sf[c] += pf * vj[c];
            Sf[d] += pf;
        }
    }
}

}  // namespace

template <typename T>
void performer_forward(const AttnShape& s, const float* omega, int m, T epsilon, HeadTensor o,
                       HeadTensor q, HeadTensor k, HeadTensor v, T* saved) {
    const int n = s.T, d = s.d, dc = d + 1;
    T* saved_R = saved;
    T* saved_cq = saved + s.rows();
    T* saved_ck = saved + 2 * s.rows();
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++) {
            const size_t row0 = ((size_t)b * s.H + h) * n;
            T* cq = saved_cq + row0;  // (T) query stabilisers
            T* ck = saved_ck + row0;  // (T) key stabilisers: running max over positions
            Features<T> Q, K;
            load_logits(Q, q, b, h, n, d, omega, m);
            load_logits(K, k, b, h, n, d, omega, m);
            T running = -std::numeric_limits<T>::infinity();
            for (int t = 0; t < n; t++) {
                cq[t] = *std::max_element(&Q.e[(size_t)t * m], &Q.e[(size_t)t * m] + m);
                running = std::max(running, *std::max_element(&K.e[(size_t)t * m], &K.e[(size_t)t * m] + m));
                ck[t] = running;
            }
            finish_features(Q, cq, n, m, epsilon);
            finish_features(K, ck, n, m, epsilon);

            std::vector<T> S((size_t)m * dc, 0);  // (m, d+1) prefix state, frame ck[chunk start − 1]
            std::vector<T> out(dc);
            for (int c0 = 0; c0 < n; c0 += kPerformerChunk) {
                const int c1 = std::min(c0 + kPerformerChunk, n);
                for (int i = c0; i < c1; i++) {
                    std::fill(out.begin(), out.end(), (T)0);
                    const T* pq = &Q.phi[(size_t)i * m];
                    if (c0 > 0) {  // earlier chunks: Sᵀφq_i, moved into query i's frame
                        const T r = std::exp(ck[c0 - 1] - ck[i]);
                        for (int f = 0; f < m; f++) {
                            const T pf = pq[f] * r;
                            const T* Sf = &S[(size_t)f * dc];
                            for (int c = 0; c < dc; c++) out[c] += pf * Sf[c];
                        }
                    }
                    for (int j = c0; j <= i; j++) {  // this chunk: tril(Φq Φkᵀ)·[V|1]
                        const T w = dot(pq, &K.phi[(size_t)j * m], m) * std::exp(ck[j] - ck[i]);
                        const T* vj = row_ptr<T>(v, b, h, j);
                        for (int c = 0; c < d; c++) out[c] += w * vj[c];
                        out[d] += w;
                    }
                    const T R = out[d];
                    T* oi = row_ptr<T>(o, b, h, i);
                    const bool ok = R > (T)kMinDenominator;
                    for (int c = 0; c < d; c++) oi[c] = ok ? out[c] / R : (T)0;
                    saved_R[row0 + i] = ok ? R : (T)0;
                }
                add_chunk_to_state(S, K, ck, v, b, h, c0, c1, m, d);  // S += this chunk's keys
            }
        }
}

template <typename T>
void performer_backward(const AttnShape& s, const float* omega, int m, T epsilon, HeadTensor dq,
                        HeadTensor dk, HeadTensor dv, HeadTensor dout, HeadTensor q, HeadTensor k,
                        HeadTensor v, HeadTensor o, const T* saved) {
    const int n = s.T, d = s.d, dc = d + 1;
    const T* saved_R = saved;
    const T* saved_cq = saved + s.rows();
    const T* saved_ck = saved + 2 * s.rows();
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++) {
            const size_t row0 = ((size_t)b * s.H + h) * n;
            const T* ck = saved_ck + row0;
            Features<T> Q, K;
            load_logits(Q, q, b, h, n, d, omega, m);
            load_logits(K, k, b, h, n, d, omega, m);
            finish_features(Q, saved_cq + row0, n, m, epsilon);
            finish_features(K, ck, n, m, epsilon);

            // g (T, d+1): gradient w.r.t. out_i = [dO_i/R_i, −(dO_i·o_i)/R_i]
            std::vector<T> g((size_t)n * dc, 0);
            for (int i = 0; i < n; i++) {
                const T R = saved_R[row0 + i];
                if (!(R > 0)) continue;  // guarded row: o_i = 0 is constant
                const T* doi = row_ptr<T>(dout, b, h, i);
                const T* oi = row_ptr<T>(o, b, h, i);
                T* gi = &g[(size_t)i * dc];
                for (int c = 0; c < d; c++) gi[c] = doi[c] / R;
                gi[d] = -dot(doi, oi, d) / R;
            }
            // C_j·g_i with C_j = [v_j | 1]
            auto cdotg = [&](int j, const T* gi) { return dot(row_ptr<T>(v, b, h, j), gi, d) + gi[d]; };

            // forward scan: dφq_i = Σ_{j≤i} exp(ck_j − ck_i)·φk_j·(C_j·g_i)
            std::vector<T> dphq((size_t)n * m, 0), dphk((size_t)n * m, 0), dC((size_t)n * dc, 0);
            std::vector<T> S((size_t)m * dc, 0);
            for (int c0 = 0; c0 < n; c0 += kPerformerChunk) {
                const int c1 = std::min(c0 + kPerformerChunk, n);
                for (int i = c0; i < c1; i++) {
                    const T* gi = &g[(size_t)i * dc];
                    T* dpq = &dphq[(size_t)i * m];
                    if (c0 > 0) {
                        const T r = std::exp(ck[c0 - 1] - ck[i]);
                        for (int f = 0; f < m; f++) dpq[f] += r * dot(&S[(size_t)f * dc], gi, dc);
                    }
                    for (int j = c0; j <= i; j++) {
                        const T coef = cdotg(j, gi) * std::exp(ck[j] - ck[i]);
                        const T* pk = &K.phi[(size_t)j * m];
                        for (int f = 0; f < m; f++) dpq[f] += coef * pk[f];
                    }
                }
                add_chunk_to_state(S, K, ck, v, b, h, c0, c1, m, d);  // S += this chunk's keys
            }

            // reverse scan with the suffix state G = Σ_{i in later chunks} exp(ck_last − ck_i)·φq_i·g_iᵀ
            // (m, d+1), in the frame of the current chunk's last key:
            // dφk_j = Σ_{i≥j} exp(ck_j − ck_i)·φq_i·(C_j·g_i), dC_j = Σ_{i≥j} w_ij·g_i
            std::vector<T> G((size_t)m * dc, 0);
            const int last_chunk = ((n - 1) / kPerformerChunk) * kPerformerChunk;
            for (int c0 = last_chunk; c0 >= 0; c0 -= kPerformerChunk) {
                const int c1 = std::min(c0 + kPerformerChunk, n);
                for (int j = c0; j < c1; j++) {
                    const T* pk = &K.phi[(size_t)j * m];
                    const T* vj = row_ptr<T>(v, b, h, j);
                    T* dpk = &dphk[(size_t)j * m];
                    T* dCj = &dC[(size_t)j * dc];
                    const T rj = std::exp(ck[j] - ck[c1 - 1]);
                    for (int f = 0; f < m; f++) {  // later chunks
                        const T* Gf = &G[(size_t)f * dc];
                        dpk[f] += rj * (dot(Gf, vj, d) + Gf[d]);
                        const T pf = rj * pk[f];
                        for (int c = 0; c < dc; c++) dCj[c] += pf * Gf[c];
                    }
                    for (int i = j; i < c1; i++) {  // this chunk
                        const T* gi = &g[(size_t)i * dc];
                        const T* pq = &Q.phi[(size_t)i * m];
                        const T rho = std::exp(ck[j] - ck[i]);
                        const T coef = cdotg(j, gi) * rho;
                        for (int f = 0; f < m; f++) dpk[f] += coef * pq[f];
                        const T w = dot(pq, pk, m) * rho;
                        for (int c = 0; c < dc; c++) dCj[c] += w * gi[c];
                    }
                }
                if (c0 == 0) break;
                // move G to the frame of the previous chunk's last key, then add this chunk's queries
                const T r = std::exp(ck[c0 - 1] - ck[c1 - 1]);
                for (T& x : G) x *= r;
                for (int i = c0; i < c1; i++) {
                    const T ri = std::exp(ck[c0 - 1] - ck[i]);
                    const T* gi = &g[(size_t)i * dc];
                    const T* pq = &Q.phi[(size_t)i * m];
                    for (int f = 0; f < m; f++) {
                        const T pf = ri * pq[f];
                        T* Gf = &G[(size_t)f * dc];
                        for (int c = 0; c < dc; c++) Gf[c] += pf * gi[c];
                    }
                }
            }

            feature_backward(Q, dphq, omega, m, n, d, dq, b, h);
            feature_backward(K, dphk, omega, m, n, d, dk, b, h);
            for (int j = 0; j < n; j++) {
                T* dvj = row_ptr<T>(dv, b, h, j);
                for (int c = 0; c < d; c++) dvj[c] = dC[(size_t)j * dc + c];
            }
        }
}

template void performer_forward<float>(const AttnShape&, const float*, int, float, HeadTensor,
                                       HeadTensor, HeadTensor, HeadTensor, float*);
template void performer_forward<double>(const AttnShape&, const float*, int, double, HeadTensor,
                                        HeadTensor, HeadTensor, HeadTensor, double*);
template void performer_backward<float>(const AttnShape&, const float*, int, float, HeadTensor,
                                        HeadTensor, HeadTensor, HeadTensor, HeadTensor, HeadTensor,
                                        HeadTensor, HeadTensor, const float*);
template void performer_backward<double>(const AttnShape&, const float*, int, double, HeadTensor,
                                         HeadTensor, HeadTensor, HeadTensor, HeadTensor, HeadTensor,
                                         HeadTensor, HeadTensor, const double*);

namespace {

void check_fp32(const HeadTensor& x, const char* what) {
    CHECK(x.dtype == DType::F32, "performer (CPU): %s is %s, the CPU reference takes fp32", what,
          dtype_name(x.dtype));
}

class PerformerAttention : public Attention {
public:
    explicit PerformerAttention(const AttnConfig& cfg) : cfg_(cfg) {
        CHECK(cfg.features >= 1, "--features %d: the Performer needs at least one random feature", cfg.features);
        CHECK(cfg.redraw >= 0, "--redraw %d: must be >= 0 (0 = never redraw the features)", cfg.redraw);
    }
    std::string name() const override { return "performer"; }
    size_t saved_size(const AttnShape& s) const override { return performer_saved_size(s); }

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        check_fp32(o, "o"), check_fp32(q, "q"), check_fp32(k, "k"), check_fp32(v, "v");
        performer_forward<float>(s, features(ctx, s.d).data(), cfg_.features, (float)kPerformerEpsilon,
                                 o, q, k, v, saved);
    }
    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                  HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k,
                  HeadTensor v, HeadTensor o, const float* saved, Tensor params,
                  void* workspace) override {
        check_fp32(dq, "dq"), check_fp32(dk, "dk"), check_fp32(dv, "dv"), check_fp32(dout, "dout");
        performer_backward<float>(s, features(ctx, s.d).data(), cfg_.features, (float)kPerformerEpsilon,
                                  dq, dk, dv, dout, q, k, v, o, saved);
    }

private:
    // Ω of this layer for ctx.step, redrawn only when the draw index changes.
    const std::vector<float>& features(const AttnContext& ctx, int d) {
        const int64_t draw = cfg_.redraw > 0 ? ctx.step / cfg_.redraw : 0;
        Cached& c = cache_[ctx.layer];
        if (c.omega.empty() || c.draw != draw || c.d != d)
            c = Cached{draw, d, performer_features(cfg_, ctx.layer, ctx.step, d)};
        return c.omega;
    }
    struct Cached {
        int64_t draw = -1;
        int d = 0;
        std::vector<float> omega;  // (m, d)
    };
    AttnConfig cfg_;
    std::map<int, Cached> cache_;  // layer -> its current Ω
};

}  // namespace

std::unique_ptr<Attention> make_cpu_performer_attention(const AttnConfig& cfg) {
    return std::make_unique<PerformerAttention>(cfg);
}
