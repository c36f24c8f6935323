// Exact causal softmax attention as plain-loop templates on the scalar type T: the CPU `softmax`
// variant (softmax.cpp) runs them in float, the tests in double, and `local` reuses them with a
// key window. Query i attends to keys j in [i-W+1, i] (W keys including itself), or to all
// keys j <= i when W <= 0. scale = 1/sqrt(d). Accumulators are double.
//
// Forward saves LSE_i = log Σ_j exp(S_ij), S = scale·q·kᵀ. Backward recomputes P = exp(S - LSE),
// takes Δ_i = Σ_c dO_ic·O_ic, dS = P∘(dP - Δ), dP = dO·Vᵀ, and forms dQ = scale·dS·K (pass over
// queries), dK = scale·dSᵀ·Q and dV = Pᵀ·dO (pass over keys), so every sum runs in a fixed order
// on one thread: deterministic. A row with no key (impossible for W >= 1) gives o = 0,
// LSE = -inf and zero gradients, never NaN.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"

// Element (b, h, t, i) of a (B, H, T, d) tensor at p + b*sb + h*sh + t*st + i.
template <typename T>
struct HeadView {
    T* p = nullptr;
    int64_t sb = 0, sh = 0, st = 0;
    T* row(int b, int h, int t) const { return p + b * sb + h * sh + t * st; }
};
// A HeadTensor's fp32 data as a view (the caller checks dtype).
inline HeadView<float> head_view_f32(const HeadTensor& t) { return {t.f32(), t.sb, t.sh, t.st}; }
inline HeadView<const float> head_view_cf32(const HeadTensor& t) { return {t.f32(), t.sb, t.sh, t.st}; }

// First key seen by query i, and last query that sees key j, for a window W (<= 0: full causal).
inline int attn_first_key(int i, int window) { return window > 0 ? std::max(0, i - window + 1) : 0; }
inline int attn_last_query(int j, int T, int window) { return window > 0 ? std::min(T - 1, j + window - 1) : T - 1; }

// o (B,H,T,d) <- q, k, v (B,H,T,d); lse (B,H,T) contiguous.
template <typename T>
void softmax_attention_forward_ref(const AttnShape& s, int window, HeadView<T> o, HeadView<const T> q,
                                   HeadView<const T> k, HeadView<const T> v, T* lse) {
    const int B = s.B, H = s.H, n = s.T, d = s.d;
    const double scale = 1.0 / std::sqrt((double)d);
#pragma omp parallel
    {
        std::vector<double> score(n), acc(d);
#pragma omp for collapse(3) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < n; i++) {
                    const T* qi = q.row(b, h, i);
                    const int j0 = attn_first_key(i, window);
                    double maxs = -std::numeric_limits<double>::infinity();
                    for (int j = j0; j <= i; j++) {
                        const T* kj = k.row(b, h, j);
                        double dot = 0;
                        for (int c = 0; c < d; c++) dot += (double)qi[c] * kj[c];
                        score[j] = dot * scale;
                        maxs = std::max(maxs, score[j]);
                    }
                    std::fill(acc.begin(), acc.end(), 0.0);
                    double sum = 0;
                    for (int j = j0; j <= i; j++) {
                        const double p = std::exp(score[j] - maxs);
                        sum += p;
                        const T* vj = v.row(b, h, j);
                        for (int c = 0; c < d; c++) acc[c] += p * vj[c];
                    }
                    T* oi = o.row(b, h, i);
                    const int64_t r = ((int64_t)b * H + h) * n + i;
                    if (sum == 0) {  // no key in the window: output 0, LSE -inf
                        for (int c = 0; c < d; c++) oi[c] = 0;
                        lse[r] = -std::numeric_limits<T>::infinity();
                        continue;
                    }
                    for (int c = 0; c < d; c++) oi[c] = (T)(acc[c] / sum);
                    lse[r] = (T)(maxs + std::log(sum));
                }
    }
}

// dq, dk, dv (B,H,T,d) overwritten <- dout, q, k, v, o (B,H,T,d) and the forward's lse (B,H,T).
template <typename T>
void softmax_attention_backward_ref(const AttnShape& s, int window, HeadView<T> dq, HeadView<T> dk,
                                    HeadView<T> dv, HeadView<const T> dout, HeadView<const T> q,
                                    HeadView<const T> k, HeadView<const T> v, HeadView<const T> o,
                                    const T* lse) {
    const int B = s.B, H = s.H, n = s.T, d = s.d;
    const double scale = 1.0 / std::sqrt((double)d);
    std::vector<double> delta(s.rows());  // (B,H,T): Δ_i = Σ_c dO_ic·O_ic
    auto dot = [d](const T* a, const T* b) {
        double acc = 0;
        for (int c = 0; c < d; c++) acc += (double)a[c] * b[c];
        return acc;
    };
    // P_ij and dS_ij of query i and key j (Δ_i must be known)
    auto p_ds = [&](int b, int h, int i, int j, double& p, double& ds) {
        const int64_t r = ((int64_t)b * H + h) * n + i;
        p = std::exp(dot(q.row(b, h, i), k.row(b, h, j)) * scale - (double)lse[r]);
        ds = p * (dot(dout.row(b, h, i), v.row(b, h, j)) - delta[r]);
    };
#pragma omp parallel
    {
        std::vector<double> acc(d);
        // pass over queries: Δ_i and dQ_i = scale·Σ_j dS_ij·K_j
#pragma omp for collapse(3) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < n; i++) {
                    const int64_t r = ((int64_t)b * H + h) * n + i;
                    delta[r] = dot(dout.row(b, h, i), o.row(b, h, i));
                    std::fill(acc.begin(), acc.end(), 0.0);
                    for (int j = attn_first_key(i, window); j <= i; j++) {
                        double p, ds;
                        p_ds(b, h, i, j, p, ds);
                        const T* kj = k.row(b, h, j);
                        for (int c = 0; c < d; c++) acc[c] += ds * kj[c];
                    }
                    T* dqi = dq.row(b, h, i);
                    for (int c = 0; c < d; c++) dqi[c] = (T)(acc[c] * scale);
                }
        // pass over keys: dK_j = scale·Σ_i dS_ij·Q_i, dV_j = Σ_i P_ij·dO_i
        std::vector<double> acc_v(d);
#pragma omp for collapse(3) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int j = 0; j < n; j++) {
                    std::fill(acc.begin(), acc.end(), 0.0);
                    std::fill(acc_v.begin(), acc_v.end(), 0.0);
                    const int i1 = attn_last_query(j, n, window);
                    for (int i = j; i <= i1; i++) {
                        double p, ds;
                        p_ds(b, h, i, j, p, ds);
                        const T* qi = q.row(b, h, i);
                        const T* doi = dout.row(b, h, i);
                        for (int c = 0; c < d; c++) {
                            acc[c] += ds * qi[c];
                            acc_v[c] += p * doi[c];
                        }
                    }
                    T* dkj = dk.row(b, h, j);
                    T* dvj = dv.row(b, h, j);
                    for (int c = 0; c < d; c++) {
                        dkj[c] = (T)(acc[c] * scale);
                        dvj[c] = (T)acc_v[c];
                    }
                }
    }
}
