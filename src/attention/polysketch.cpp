// `polysketch` on the CPU: PolySketchFormer's polynomial attention with a learned (or random)
// sketch, the fp32 reference of the CUDA variant (ATTENTION.md §4), with its exact handwritten
// backward into q, k, v and the sketch parameters. The sketch network M and its parameter layout
// are in polysketch_sketch.h.
//
// Per head: q̂ = LayerNorm(q), k̂ = LayerNorm(k) over d (no affine, no 1/sqrt(d)); A = M(q̂),
// B = M(k̂) (T, r); C = [V | 1] (T, d+1). Query i gives key j ≤ i the weight
//   w_ij = <q̂_i, k̂_j>^p   if i, j are in the same block and exact_diag (a local exact window),
//   w_ij = <A_i, B_j>^2   otherwise (features A ⊗ A, never materialised),
// out_i = Σ_j w_ij C_j and o_i = out_i[:d] / (1 + out_i[d]). Causal block algorithm, block b:
// per block l, H_l[a,b,:] = Σ_{t∈l} B_ta B_tb C_t (r, r, d+1); Z_l = Σ of H over earlier blocks;
// out_l = tril(W_ll) C_l + Σ_ab A_ta A_tb Z_l[a,b,:]. T need not be a multiple of b.
//
// Backward with g_t = dL/dout_t = [dO_t / (1+δ_t), −(dO_t·o_t) / (1+δ_t)]:
//   intra-block: dw_ij = g_i·C_j; dC_j += w_ij g_i; then through w (power rule) into q̂, k̂ or A, B;
//   inter-block: dA_t += 2 Σ_b (Z_l[a,b,:]·g_t) A_tb (prefix Z, forward sweep),
//                dC_t += Σ_ab B_ta B_tb R_l[a,b,:] and dB_t += 2 Σ_b (R_l[a,b,:]·C_t) B_tb with
//                the suffix state R_l = Σ_{t in later blocks} A_t ⊗ A_t ⊗ g_t (backward sweep);
//   then through M into the sketch parameters and q̂, k̂, and through the LayerNorms into q, k.
// Saved for the backward: only 1 + δ per row (B*H*T floats); q̂, k̂, A, B and the activations of
// M are recomputed. The sketch-parameter gradient is summed over a fixed number of slots in a
// fixed order, so it is deterministic whatever the number of threads.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention/cpu_variants.h"
#include "attention/polysketch_sketch.h"
#include "attention/cpu_row_math.h"
#include "check.h"

namespace {

// Applies the sketch M (learned or random) to one row at a time, holding the scratch of one
// thread; backward() is the gradient of the last forward().
template <typename Real>
class RowSketch {
public:
    RowSketch(const PolySketchDims& D, const Real* sketch)
        : D_(D), sketch_(sketch), layout_(polysketch_layout(D.d, D.r)), acts_(layout_),
          p1_(D.r), p2_(D.r) {}
    void forward(const Real* x, Real* m) {  // x (d), m (r)
        if (D_.learned) sketch_forward(layout_, sketch_, x, m, acts_);
        else random_sketch_forward(D_.d, D_.r, sketch_, x, m, p1_.data(), p2_.data());
    }
    void backward(const Real* dm, Real* dx, Real* dparams) {  // dm (r), dx (d) overwritten
        if (D_.learned) sketch_backward(layout_, sketch_, dparams, acts_, dm, dx);
        else random_sketch_backward(D_.d, D_.r, sketch_, p1_.data(), p2_.data(), dm, dx);
    }

private:
    PolySketchDims D_;
    const Real* sketch_;
    PolySketchLayout layout_;
    SketchRowActs<Real> acts_;
    std::vector<Real> p1_, p2_;  // (r) x S1, x S2 of the random sketch
};

// What one (b, h) head recomputes from q, k: q̂, k̂ with their rstd, and the sketches A, B.
template <typename Real>
struct HeadFeatures {
    std::vector<Real> qh, kh;          // (T, d)
    std::vector<Real> q_rstd, k_rstd;  // (T)
    std::vector<Real> A, Bk;           // (T, r)
};

template <typename Real>
void compute_head_features(const PolySketchDims& D, RowSketch<Real>& sk, StridedHeads<const Real*> q,
                           StridedHeads<const Real*> k, int b, int h, HeadFeatures<Real>& F) {
    const int T = D.T, d = D.d, r = D.r;
    F.qh.resize((size_t)T * d);
    F.kh.resize((size_t)T * d);
    F.q_rstd.resize(T);
    F.k_rstd.resize(T);
    F.A.resize((size_t)T * r);
    F.Bk.resize((size_t)T * r);
    for (int t = 0; t < T; t++) {
        F.q_rstd[t] = sketch_layernorm(q.row(b, h, t), &F.qh[(size_t)t * d], d);
        F.k_rstd[t] = sketch_layernorm(k.row(b, h, t), &F.kh[(size_t)t * d], d);
        sk.forward(&F.qh[(size_t)t * d], &F.A[(size_t)t * r]);
        sk.forward(&F.kh[(size_t)t * d], &F.Bk[(size_t)t * r]);
    }
}

// C (T, d+1) = [V | 1] of one head
template <typename Real>
void gather_values(const PolySketchDims& D, StridedHeads<const Real*> v, int b, int h, std::vector<Real>& C) {
    const int d = D.d;
    C.resize((size_t)D.T * (d + 1));
    for (int t = 0; t < D.T; t++) {
        const Real* vt = v.row(b, h, t);
        std::copy(vt, vt + d, &C[(size_t)t * (d + 1)]);
        C[(size_t)t * (d + 1) + d] = 1;
    }
}

// Weight of key j for query i in the same block, and the base s it is a power of
// (w = s^p exact, or w = s^2 sketched).
template <typename Real>
Real diag_block_weight(const PolySketchDims& D, const HeadFeatures<Real>& F, int i, int j, Real& s) {
    if (D.exact_diag) {
        s = dot(&F.qh[(size_t)i * D.d], &F.kh[(size_t)j * D.d], D.d);
        return int_pow(s, D.degree);
    }
    s = dot(&F.A[(size_t)i * D.r], &F.Bk[(size_t)j * D.r], D.r);
    return s * s;
}

// S (r, r, d+1) += Σ_{t in [t0, t1)} X_t ⊗ X_t ⊗ Y_t with X (T, r), Y (T, d+1)
template <typename Real>
void add_outer_state(std::vector<Real>& S, const Real* X, const Real* Y, int t0, int t1, int r, int e) {
    for (int t = t0; t < t1; t++) {
        const Real* x = X + (size_t)t * r;
        const Real* y = Y + (size_t)t * e;
        for (int a = 0; a < r; a++)
            for (int c = 0; c < r; c++) {
                Real w = x[a] * x[c];
                Real* s = &S[((size_t)a * r + c) * e];
                for (int i = 0; i < e; i++) s[i] += w * y[i];
            }
    }
}

template <typename Real>
void forward_head(const PolySketchDims& D, const HeadFeatures<Real>& F, const std::vector<Real>& C,
                  StridedHeads<Real*> o, int b, int h, Real* denom) {
    const int T = D.T, d = D.d, r = D.r, e = d + 1;
    std::vector<Real> Z((size_t)r * r * e, 0);  // (r, r, d+1) state of the earlier blocks
    std::vector<Real> u(e);                     // (d+1) out of one row
    for (int l0 = 0; l0 < T; l0 += D.block) {
        const int l1 = std::min(l0 + D.block, T);
        for (int i = l0; i < l1; i++) {
            std::fill(u.begin(), u.end(), (Real)0);
            if (l0 > 0) {
                const Real* A = &F.A[(size_t)i * r];
                for (int a = 0; a < r; a++)
                    for (int c = 0; c < r; c++) {
                        Real w = A[a] * A[c];
                        const Real* z = &Z[((size_t)a * r + c) * e];
                        for (int x = 0; x < e; x++) u[x] += w * z[x];
                    }
            }
            for (int j = l0; j <= i; j++) {
                Real s;
                Real w = diag_block_weight(D, F, i, j, s);
                const Real* cj = &C[(size_t)j * e];
                for (int x = 0; x < e; x++) u[x] += w * cj[x];
            }
            Real den = 1 + u[d];
            denom[i] = den;
            Real* oi = o.row(b, h, i);
            for (int x = 0; x < d; x++) oi[x] = u[x] / den;
        }
        add_outer_state(Z, F.Bk.data(), C.data(), l0, l1, r, e);
    }
}

// Gradient of one head. dA, dB (T, r), dqh, dkh (T, d), dC (T, d+1) are accumulated here
// (they must be zero on entry); the sketch and LayerNorm backward follow in the caller.
template <typename Real>
void backward_head_core(const PolySketchDims& D, const HeadFeatures<Real>& F, const std::vector<Real>& C,
                        const std::vector<Real>& G, std::vector<Real>& dA, std::vector<Real>& dB,
                        std::vector<Real>& dqh, std::vector<Real>& dkh, std::vector<Real>& dC) {
    const int T = D.T, d = D.d, r = D.r, e = d + 1;
    // intra-block: the exact (or sketched) weights of the diagonal blocks
    for (int l0 = 0; l0 < T; l0 += D.block) {
        const int l1 = std::min(l0 + D.block, T);
        for (int i = l0; i < l1; i++)
            for (int j = l0; j <= i; j++) {
                Real s;
                Real w = diag_block_weight(D, F, i, j, s);
                const Real* gi = &G[(size_t)i * e];
                Real dw = dot(gi, &C[(size_t)j * e], e);
                Real* dcj = &dC[(size_t)j * e];
                for (int x = 0; x < e; x++) dcj[x] += w * gi[x];
                if (D.exact_diag) {
                    Real ds = D.degree * int_pow(s, D.degree - 1) * dw;
                    for (int x = 0; x < d; x++) {
                        dqh[(size_t)i * d + x] += ds * F.kh[(size_t)j * d + x];
                        dkh[(size_t)j * d + x] += ds * F.qh[(size_t)i * d + x];
                    }
                } else {
                    Real ds = 2 * s * dw;
                    for (int x = 0; x < r; x++) {
                        dA[(size_t)i * r + x] += ds * F.Bk[(size_t)j * r + x];
                        dB[(size_t)j * r + x] += ds * F.A[(size_t)i * r + x];
                    }
                }
            }
    }
    std::vector<Real> S((size_t)r * r * e, 0);  // (r, r, d+1): prefix Z, then suffix R
    std::vector<Real> Y((size_t)r * r);         // (r, r) contraction of S with one g or C row
    // inter-block, forward sweep: dA_t from the prefix state Z of the earlier blocks
    for (int l0 = 0; l0 < T; l0 += D.block) {
        const int l1 = std::min(l0 + D.block, T);
        if (l0 > 0)
            for (int t = l0; t < l1; t++) {
                const Real* g = &G[(size_t)t * e];
                const Real* A = &F.A[(size_t)t * r];
                for (int a = 0; a < r * r; a++) Y[a] = dot(&S[(size_t)a * e], g, e);
                for (int a = 0; a < r; a++) dA[(size_t)t * r + a] += 2 * dot(&Y[(size_t)a * r], A, r);
            }
        add_outer_state(S, F.Bk.data(), C.data(), l0, l1, r, e);
    }
    // inter-block, backward sweep: dB_t, dC_t from the suffix state R of the later blocks
    std::fill(S.begin(), S.end(), (Real)0);
    const int last0 = ((T - 1) / D.block) * D.block;
    for (int l0 = last0; l0 >= 0; l0 -= D.block) {
        const int l1 = std::min(l0 + D.block, T);
        if (l1 < T)
            for (int t = l0; t < l1; t++) {
                const Real* c = &C[(size_t)t * e];
                const Real* Bt = &F.Bk[(size_t)t * r];
                Real* dc = &dC[(size_t)t * e];
                for (int a = 0; a < r; a++)
                    for (int b2 = 0; b2 < r; b2++) {
                        const Real* s = &S[((size_t)a * r + b2) * e];
                        Real w = Bt[a] * Bt[b2];
                        for (int x = 0; x < e; x++) dc[x] += w * s[x];
                        Y[(size_t)a * r + b2] = dot(s, c, e);
                    }
                for (int a = 0; a < r; a++) dB[(size_t)t * r + a] += 2 * dot(&Y[(size_t)a * r], Bt, r);
            }
        add_outer_state(S, F.A.data(), G.data(), l0, l1, r, e);
    }
}

// Threads only pay for themselves on more than a few hundred rows (tiny test problems would
// spend their time waking threads).
bool worth_threads(const PolySketchDims& D) { return D.B * D.H > 1 && (int64_t)D.B * D.H * D.T >= 512; }

}  // namespace

template <typename Real>
void polysketch_attention_forward(const PolySketchDims& D, StridedHeads<Real*> o,
                                  StridedHeads<const Real*> q, StridedHeads<const Real*> k,
                                  StridedHeads<const Real*> v, const Real* sketch, Real* denom) {
#pragma omp parallel if (worth_threads(D))
    {
        RowSketch<Real> sk(D, sketch);
        HeadFeatures<Real> F;
        std::vector<Real> C;
#pragma omp for schedule(static)
        for (int bh = 0; bh < D.B * D.H; bh++) {
            const int b = bh / D.H, h = bh % D.H;
            compute_head_features(D, sk, q, k, b, h, F);
            gather_values(D, v, b, h, C);
            forward_head(D, F, C, o, b, h, denom + (size_t)bh * D.T);
        }
    }
}

template <typename Real>
void polysketch_attention_backward(const PolySketchDims& D, StridedHeads<Real*> dq,
                                   StridedHeads<Real*> dk, StridedHeads<Real*> dv, Real* dsketch,
                                   StridedHeads<const Real*> dout, StridedHeads<const Real*> q,
                                   StridedHeads<const Real*> k, StridedHeads<const Real*> v,
                                   StridedHeads<const Real*> o, const Real* sketch,
                                   const Real* denom) {
    const int T = D.T, d = D.d, r = D.r, e = d + 1, BH = D.B * D.H;
    const size_t num_params = D.learned ? polysketch_layout(d, r).total : 0;
    // Heads bh = slot, slot + num_slots, ... add their sketch gradient into slot `slot`; the slots
    // are summed in order at the end (deterministic for any thread count).
    const int num_slots = std::min(8, BH);
    std::vector<std::vector<Real>> slot_grad(num_slots, std::vector<Real>(num_params, 0));
#pragma omp parallel for schedule(static, 1) if (worth_threads(D))
    for (int slot = 0; slot < num_slots; slot++) {
        RowSketch<Real> sk(D, sketch);
        HeadFeatures<Real> F;
        std::vector<Real> C, G((size_t)T * e);
        std::vector<Real> dA, dB, dqh, dkh, dC, dx(d), dxhat(d), m(r);
        for (int bh = slot; bh < BH; bh += num_slots) {
            const int b = bh / D.H, h = bh % D.H;
            compute_head_features(D, sk, q, k, b, h, F);
            gather_values(D, v, b, h, C);
            // g_t = [dO_t, −dO_t·o_t] / (1 + δ_t)
            for (int t = 0; t < T; t++) {
                const Real* dO = dout.row(b, h, t);
                const Real* ot = o.row(b, h, t);
                const Real den = denom[(size_t)bh * T + t];
                Real* g = &G[(size_t)t * e];
                for (int x = 0; x < d; x++) g[x] = dO[x] / den;
                g[d] = -dot(dO, ot, d) / den;
            }
            dA.assign((size_t)T * r, 0);
            dB.assign((size_t)T * r, 0);
            dqh.assign((size_t)T * d, 0);
            dkh.assign((size_t)T * d, 0);
            dC.assign((size_t)T * e, 0);
            backward_head_core(D, F, C, G, dA, dB, dqh, dkh, dC);
            Real* dparams = slot_grad[slot].data();
            for (int t = 0; t < T; t++) {
                // through M (recomputing its activations), then the LayerNorm of q, k
                const Real* qh = &F.qh[(size_t)t * d];
                const Real* kh = &F.kh[(size_t)t * d];
                sk.forward(qh, m.data());
                sk.backward(&dA[(size_t)t * r], dx.data(), dparams);
                for (int x = 0; x < d; x++) dxhat[x] = dqh[(size_t)t * d + x] + dx[x];
                sketch_layernorm_backward(qh, F.q_rstd[t], dxhat.data(), dq.row(b, h, t), d);
                sk.forward(kh, m.data());
                sk.backward(&dB[(size_t)t * r], dx.data(), dparams);
                for (int x = 0; x < d; x++) dxhat[x] = dkh[(size_t)t * d + x] + dx[x];
                sketch_layernorm_backward(kh, F.k_rstd[t], dxhat.data(), dk.row(b, h, t), d);
                Real* dvt = dv.row(b, h, t);
                for (int x = 0; x < d; x++) dvt[x] = dC[(size_t)t * e + x];
            }
        }
    }
    if (D.learned)
        for (int s = 0; s < num_slots; s++)
            for (size_t i = 0; i < num_params; i++) dsketch[i] += slot_grad[s][i];
}

template void polysketch_attention_forward<float>(const PolySketchDims&, StridedHeads<float*>,
    StridedHeads<const float*>, StridedHeads<const float*>, StridedHeads<const float*>, const float*, float*);
template void polysketch_attention_forward<double>(const PolySketchDims&, StridedHeads<double*>,
    StridedHeads<const double*>, StridedHeads<const double*>, StridedHeads<const double*>, const double*, double*);
template void polysketch_attention_backward<float>(const PolySketchDims&, StridedHeads<float*>,
    StridedHeads<float*>, StridedHeads<float*>, float*, StridedHeads<const float*>, StridedHeads<const float*>,
    StridedHeads<const float*>, StridedHeads<const float*>, StridedHeads<const float*>, const float*, const float*);
template void polysketch_attention_backward<double>(const PolySketchDims&, StridedHeads<double*>,
    StridedHeads<double*>, StridedHeads<double*>, double*, StridedHeads<const double*>, StridedHeads<const double*>,
    StridedHeads<const double*>, StridedHeads<const double*>, StridedHeads<const double*>, const double*, const double*);

namespace {

template <typename Ptr>
StridedHeads<Ptr> strided(const HeadTensor& t, const char* what) {
    CHECK(t.dtype == DType::F32, "polysketch (CPU): %s is %s; the CPU reference takes fp32", what, dtype_name(t.dtype));
    return StridedHeads<Ptr>{static_cast<Ptr>(t.ptr), t.sb, t.sh, t.st};
}

class CpuPolySketchAttention : public Attention {
public:
    explicit CpuPolySketchAttention(const AttnConfig& cfg) : cfg_(cfg) {
        CHECK(cfg.degree >= 2 && cfg.degree % 2 == 0,
              "--degree %d: polysketch needs an even degree >= 2 (the weights must be non-negative)", cfg.degree);
        CHECK(cfg.sketch_size >= 1, "--sketch-size %d: polysketch needs a sketch size >= 1", cfg.sketch_size);
        CHECK(cfg.block >= 1, "--block %d: polysketch needs a block size >= 1", cfg.block);
    }
    std::string name() const override { return "polysketch"; }
    size_t num_params(int d) const override {
        return cfg_.sketch_learned ? polysketch_layout(d, cfg_.sketch_size).total : 0;
    }
    std::vector<bool> param_decay_mask(int d) const override {
        if (!cfg_.sketch_learned) return {};
        return polysketch_decay_mask(polysketch_layout(d, cfg_.sketch_size));
    }
    void init_params(float* host_params, int d, uint64_t seed) const override {
        if (cfg_.sketch_learned) polysketch_init_params(host_params, polysketch_layout(d, cfg_.sketch_size), seed);
    }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // 1 + δ per row

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q, HeadTensor k,
                 HeadTensor v, float* saved, Tensor params, void* workspace) override {
        std::vector<float> random_S;
        const float* sketch = sketch_weights(s, ctx, params, random_S);
        polysketch_attention_forward<float>(dims(s), strided<float*>(o, "o"), strided<const float*>(q, "q"),
                                            strided<const float*>(k, "k"), strided<const float*>(v, "v"),
                                            sketch, saved);
    }
    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk, HeadTensor dv,
                  Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k, HeadTensor v, HeadTensor o,
                  const float* saved, Tensor params, void* workspace) override {
        std::vector<float> random_S;
        const float* sketch = sketch_weights(s, ctx, params, random_S);
        float* dsketch = nullptr;
        if (cfg_.sketch_learned) {
            CHECK(dparams.dtype == DType::F32 && dparams.n == num_params(s.d),
                  "polysketch (CPU): dparams holds %zu %s values; expected %zu fp32", dparams.n,
                  dtype_name(dparams.dtype), num_params(s.d));
            dsketch = dparams.f32();
        }
        polysketch_attention_backward<float>(
            dims(s), strided<float*>(dq, "dq"), strided<float*>(dk, "dk"), strided<float*>(dv, "dv"), dsketch,
            strided<const float*>(dout, "dout"), strided<const float*>(q, "q"), strided<const float*>(k, "k"),
            strided<const float*>(v, "v"), strided<const float*>(o, "o"), sketch, saved);
    }

private:
    PolySketchDims dims(const AttnShape& s) const {
        PolySketchDims D;
        D.B = s.B; D.H = s.H; D.T = s.T; D.d = s.d;
        D.r = cfg_.sketch_size;
        D.block = cfg_.block;
        D.degree = cfg_.degree;
        D.learned = cfg_.sketch_learned;
        D.exact_diag = cfg_.exact_diag;
        return D;
    }
    // The learned parameters, or the random S (2, d, r) of this layer drawn into `random_S`.
    const float* sketch_weights(const AttnShape& s, const AttnContext& ctx, const Tensor& params,
                                std::vector<float>& random_S) const {
        if (!cfg_.sketch_learned) {
            random_S = polysketch_random_sketch(s.d, cfg_.sketch_size, cfg_.seed, ctx.layer);
            return random_S.data();
        }
        CHECK(params.dtype == DType::F32 && params.n == num_params(s.d),
              "polysketch (CPU): params hold %zu %s values; expected %zu fp32 (the learned sketch for d=%d, r=%d)",
              params.n, dtype_name(params.dtype), num_params(s.d), s.d, cfg_.sketch_size);
        return params.f32();
    }
    AttnConfig cfg_;
};

}  // namespace

std::unique_ptr<Attention> make_cpu_polysketch_attention(const AttnConfig& cfg) {
    return std::make_unique<CpuPolySketchAttention>(cfg);
}
