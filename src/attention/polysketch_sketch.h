// PolySketch's sketch M: R^d -> R^r (ATTENTION.md §4), shared by the CPU reference
// (polysketch.cpp) and the CUDA variant: the parameter layout of the learned sketch network, its
// initialisation and decay mask, the seeded draw of the random sketch, the per-row forward and
// backward of M (templated on the scalar type: float in the model, double in the fp64
// finite-difference tests), and the reference entry points of the whole attention.
//
// Learned sketch (default), one per layer, shared by all heads and by q and k:
//   M(x) = sqrt(r) * tanh(f1(x) ∘ f2(x) / sqrt(r)),   f = g2 ∘ g1,
//   g1: LayerNorm(d)  -> Linear(d -> 8r) -> GELU(tanh) -> Linear(8r -> r)
//   g2: LayerNorm(r)  -> Linear(r -> 8r) -> GELU(tanh) -> Linear(8r -> r)
// The Linears have no bias; the LayerNorms (eps 1e-5) have a learned scale and bias, as flax's
// LayerNorm in the paper's code. Parameter layout (floats, in this order):
//   for f in (f1, f2): for g in (g1, g2): ln_w (n_in), ln_b (n_in), w_in (8r, n_in), w_out (r, 8r)
// with n_in = d for g1 and r for g2; Linear weights are (out, in) row-major as everywhere.
// Init: ln_w = 1, ln_b = 0, Linear weights ~ N(0, 1/fan_in) (flax's lecun_normal).
//
// Random sketch (sketch_learned = false): M(x) = (x S1) ∘ (x S2) / sqrt(r) with S1, S2 (d, r)
// standard Gaussian drawn from Rng(Rng::derive(seed, layer)), S1 first, row-major; these are not
// parameters. E <M(q), M(k)> = <q, k>^2, so <M(q), M(k)>^2 estimates the degree-4 kernel.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "rng.h"

// ---------------------------------------------------------------- layout, init, random draw

struct PolySketchLayout {
    // One block g: LayerNorm(n_in) with affine -> Linear(n_in, hidden) -> GELU -> Linear(hidden, r).
    struct Block {
        int n_in = 0;
        size_t ln_w = 0, ln_b = 0;  // offsets of (n_in) each
        size_t w_in = 0;            // offset of (hidden, n_in)
        size_t w_out = 0;           // offset of (r, hidden)
    };
    int d = 0, r = 0, hidden = 0;
    Block blk[2][2];  // [f1 | f2][g1 | g2]
    size_t total = 0;  // number of parameters
};

inline PolySketchLayout polysketch_layout(int d, int r) {
    PolySketchLayout L;
    L.d = d;
    L.r = r;
    L.hidden = 8 * r;
    size_t off = 0;
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 2; g++) {
            PolySketchLayout::Block& b = L.blk[f][g];
            b.n_in = g == 0 ? d : r;
            b.ln_w = off; off += b.n_in;
            b.ln_b = off; off += b.n_in;
            b.w_in = off; off += (size_t)L.hidden * b.n_in;
            b.w_out = off; off += (size_t)r * L.hidden;
        }
    L.total = off;
    return L;
}

// true for the Linear weights (weight decay applies), false for the LayerNorm scales and biases
inline std::vector<bool> polysketch_decay_mask(const PolySketchLayout& L) {
    std::vector<bool> mask(L.total, false);
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 2; g++) {
            const PolySketchLayout::Block& b = L.blk[f][g];
            for (size_t i = b.w_in; i < b.w_out + (size_t)L.r * L.hidden; i++) mask[i] = true;
        }
    return mask;
}

inline void polysketch_init_params(float* params, const PolySketchLayout& L, uint64_t seed) {
    Rng rng(seed);
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 2; g++) {
            const PolySketchLayout::Block& b = L.blk[f][g];
            for (int i = 0; i < b.n_in; i++) { params[b.ln_w + i] = 1.0f; params[b.ln_b + i] = 0.0f; }
            float std_in = 1.0f / std::sqrt((float)b.n_in), std_out = 1.0f / std::sqrt((float)L.hidden);
            for (size_t i = 0; i < (size_t)L.hidden * b.n_in; i++) params[b.w_in + i] = std_in * rng.normal();
            for (size_t i = 0; i < (size_t)L.r * L.hidden; i++) params[b.w_out + i] = std_out * rng.normal();
        }
}

// S (2, d, r): S1 then S2, standard Gaussian, a pure function of (seed, layer)
inline std::vector<float> polysketch_random_sketch(int d, int r, uint64_t seed, int layer) {
    Rng rng(Rng::derive(seed, (uint64_t)layer));
    std::vector<float> S((size_t)2 * d * r);
    for (float& s : S) s = rng.normal();
    return S;
}

// ---------------------------------------------------------------- per-row forward / backward of M

constexpr double kPolySketchLnEps = 1e-5;

// Activations of one row through the learned sketch, kept for its backward.
template <typename Real>
struct SketchRowActs {
    struct BlockActs {
        std::vector<Real> xhat;    // (n_in) normalised input, before the affine
        std::vector<Real> normed;  // (n_in) after the affine: the input of the first Linear
        Real rstd = 0;
        std::vector<Real> pre;   // (hidden) before the GELU
        std::vector<Real> act;   // (hidden) after the GELU
        std::vector<Real> out;   // (r)
    };
    BlockActs blk[2][2];
    std::vector<Real> tanh_z;  // (r) tanh(f1 ∘ f2 / sqrt(r))
    std::vector<Real> tmp_in, tmp_hidden;  // scratch of the backward: (max(d, r)), (hidden)
    std::vector<Real> df1, df2, dy, dx_f;  // scratch of the backward: (r), (r), (r), (d)
    explicit SketchRowActs(const PolySketchLayout& L) {
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++) {
                BlockActs& a = blk[f][g];
                a.xhat.resize(L.blk[f][g].n_in);
                a.normed.resize(L.blk[f][g].n_in);
                a.pre.resize(L.hidden);
                a.act.resize(L.hidden);
                a.out.resize(L.r);
            }
        tanh_z.resize(L.r);
        tmp_in.resize(L.d > L.r ? L.d : L.r);
        tmp_hidden.resize(L.hidden);
        df1.resize(L.r);
        df2.resize(L.r);
        dy.resize(L.r);
        dx_f.resize(L.d);
    }
};

// GELU, tanh approximation, and its derivative
template <typename Real>
inline Real sketch_gelu(Real x) {
    const Real c = (Real)0.7978845608028654, a = (Real)0.044715;
    return (Real)0.5 * x * ((Real)1 + std::tanh(c * (x + a * x * x * x)));
}
template <typename Real>
inline Real sketch_gelu_grad(Real x) {
    const Real c = (Real)0.7978845608028654, a = (Real)0.044715;
    Real t = std::tanh(c * (x + a * x * x * x));
    return (Real)0.5 * ((Real)1 + t) + (Real)0.5 * x * ((Real)1 - t * t) * c * ((Real)1 + 3 * a * x * x);
}

// LayerNorm without affine over n values: xhat (n), returns rstd
template <typename Real>
inline Real sketch_layernorm(const Real* x, Real* xhat, int n) {
    Real mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    Real rstd = (Real)1 / std::sqrt(var + (Real)kPolySketchLnEps);
    for (int i = 0; i < n; i++) xhat[i] = (x[i] - mean) * rstd;
    return rstd;
}
// dx (n) = gradient through the no-affine LayerNorm, given xhat, rstd and dxhat
template <typename Real>
inline void sketch_layernorm_backward(const Real* xhat, Real rstd, const Real* dxhat, Real* dx, int n) {
    Real mean_d = 0, mean_dx = 0;
    for (int i = 0; i < n; i++) { mean_d += dxhat[i]; mean_dx += dxhat[i] * xhat[i]; }
    mean_d /= n;
    mean_dx /= n;
    for (int i = 0; i < n; i++) dx[i] = rstd * (dxhat[i] - mean_d - xhat[i] * mean_dx);
}

// One block g: in (n_in) -> a.out (r)
template <typename Real>
inline void sketch_block_forward(const PolySketchLayout& L, const PolySketchLayout::Block& b,
                                 const Real* params, const Real* in,
                                 typename SketchRowActs<Real>::BlockActs& a) {
    const int n = b.n_in, H = L.hidden, r = L.r;
    a.rstd = sketch_layernorm(in, a.xhat.data(), n);
    Real* normed = a.normed.data();
    for (int i = 0; i < n; i++) normed[i] = a.xhat[i] * params[b.ln_w + i] + params[b.ln_b + i];
    for (int o = 0; o < H; o++) {
        const Real* w = params + b.w_in + (size_t)o * n;
        Real s = 0;
        for (int i = 0; i < n; i++) s += w[i] * normed[i];
        a.pre[o] = s;
        a.act[o] = sketch_gelu(s);
    }
    for (int o = 0; o < r; o++) {
        const Real* w = params + b.w_out + (size_t)o * H;
        Real s = 0;
        for (int i = 0; i < H; i++) s += w[i] * a.act[i];
        a.out[o] = s;
    }
}

// One block g backward: dout (r) -> din (n_in) overwritten; dparams +=
template <typename Real>
inline void sketch_block_backward(const PolySketchLayout& L, const PolySketchLayout::Block& b,
                                  const Real* params, Real* dparams,
                                  const typename SketchRowActs<Real>::BlockActs& a, const Real* dout,
                                  Real* din, Real* dhidden /*(hidden)*/, Real* dnormed /*(n_in)*/) {
    const int n = b.n_in, H = L.hidden, r = L.r;
    // w_out: out = W_out act
    for (int i = 0; i < H; i++) dhidden[i] = 0;
    for (int o = 0; o < r; o++) {
        const Real* w = params + b.w_out + (size_t)o * H;
        Real* dw = dparams + b.w_out + (size_t)o * H;
        for (int i = 0; i < H; i++) { dw[i] += dout[o] * a.act[i]; dhidden[i] += dout[o] * w[i]; }
    }
    for (int i = 0; i < H; i++) dhidden[i] *= sketch_gelu_grad(a.pre[i]);
    // w_in: pre = W_in normed, normed = xhat * ln_w + ln_b
    for (int i = 0; i < n; i++) dnormed[i] = 0;
    for (int o = 0; o < H; o++) {
        const Real* w = params + b.w_in + (size_t)o * n;
        Real* dw = dparams + b.w_in + (size_t)o * n;
        for (int i = 0; i < n; i++) {
            dw[i] += dhidden[o] * a.normed[i];
            dnormed[i] += dhidden[o] * w[i];
        }
    }
    for (int i = 0; i < n; i++) {
        dparams[b.ln_w + i] += dnormed[i] * a.xhat[i];
        dparams[b.ln_b + i] += dnormed[i];
        dnormed[i] *= params[b.ln_w + i];  // now d xhat
    }
    sketch_layernorm_backward(a.xhat.data(), a.rstd, dnormed, din, n);
}

// Learned sketch of one row: m (r) = M(x), x (d); acts keeps what the backward needs
template <typename Real>
inline void sketch_forward(const PolySketchLayout& L, const Real* params, const Real* x, Real* m,
                           SketchRowActs<Real>& acts) {
    for (int f = 0; f < 2; f++) {
        sketch_block_forward(L, L.blk[f][0], params, x, acts.blk[f][0]);
        sketch_block_forward(L, L.blk[f][1], params, acts.blk[f][0].out.data(), acts.blk[f][1]);
    }
    const Real sr = std::sqrt((Real)L.r);
    const std::vector<Real>&f1 = acts.blk[0][1].out, &f2 = acts.blk[1][1].out;
    for (int i = 0; i < L.r; i++) {
        acts.tanh_z[i] = std::tanh(f1[i] * f2[i] / sr);
        m[i] = sr * acts.tanh_z[i];
    }
}

// Learned sketch backward of one row (acts from sketch_forward of the same x):
// dx (d) overwritten, dparams +=
template <typename Real>
inline void sketch_backward(const PolySketchLayout& L, const Real* params, Real* dparams,
                            SketchRowActs<Real>& acts, const Real* dm, Real* dx) {
    const int r = L.r;
    const std::vector<Real>&f1 = acts.blk[0][1].out, &f2 = acts.blk[1][1].out;
    for (int i = 0; i < r; i++) {
        // m = sqrt(r) tanh(f1 f2 / sqrt(r)): the sqrt(r) factors cancel
        Real dz = dm[i] * ((Real)1 - acts.tanh_z[i] * acts.tanh_z[i]);
        acts.df1[i] = dz * f2[i];
        acts.df2[i] = dz * f1[i];
    }
    for (int i = 0; i < L.d; i++) dx[i] = 0;
    for (int f = 0; f < 2; f++) {
        const Real* df = f == 0 ? acts.df1.data() : acts.df2.data();
        sketch_block_backward(L, L.blk[f][1], params, dparams, acts.blk[f][1], df, acts.dy.data(),
                              acts.tmp_hidden.data(), acts.tmp_in.data());
        sketch_block_backward(L, L.blk[f][0], params, dparams, acts.blk[f][0], acts.dy.data(),
                              acts.dx_f.data(), acts.tmp_hidden.data(), acts.tmp_in.data());
        for (int i = 0; i < L.d; i++) dx[i] += acts.dx_f[i];
    }
}

// Random sketch of one row: m (r) = (x S1) ∘ (x S2) / sqrt(r); S (2, d, r); p1, p2 (r) get x S1, x S2
template <typename Real>
inline void random_sketch_forward(int d, int r, const Real* S, const Real* x, Real* m, Real* p1, Real* p2) {
    const Real* S1 = S;
    const Real* S2 = S + (size_t)d * r;
    for (int c = 0; c < r; c++) { p1[c] = 0; p2[c] = 0; }
    for (int i = 0; i < d; i++)
        for (int c = 0; c < r; c++) {
            p1[c] += x[i] * S1[(size_t)i * r + c];
            p2[c] += x[i] * S2[(size_t)i * r + c];
        }
    const Real inv_sr = (Real)1 / std::sqrt((Real)r);
    for (int c = 0; c < r; c++) m[c] = p1[c] * p2[c] * inv_sr;
}
// dx (d) overwritten, given p1 = x S1, p2 = x S2 and dm (r)
template <typename Real>
inline void random_sketch_backward(int d, int r, const Real* S, const Real* p1, const Real* p2,
                                   const Real* dm, Real* dx) {
    const Real* S1 = S;
    const Real* S2 = S + (size_t)d * r;
    const Real inv_sr = (Real)1 / std::sqrt((Real)r);
    for (int i = 0; i < d; i++) {
        Real s = 0;
        for (int c = 0; c < r; c++)
            s += dm[c] * inv_sr * (p2[c] * S1[(size_t)i * r + c] + p1[c] * S2[(size_t)i * r + c]);
        dx[i] = s;
    }
}

// ---------------------------------------------------------------- the attention (polysketch.cpp)

// Element (b, h, t, i) of a (B, H, T, d) tensor at ptr + b*sb + h*sh + t*st + i.
template <typename Ptr>
struct StridedHeads {
    Ptr ptr = nullptr;
    int64_t sb = 0, sh = 0, st = 0;
    Ptr row(int b, int h, int t) const { return ptr + b * sb + h * sh + t * st; }
};

struct PolySketchDims {
    int B = 1, H = 1, T = 1, d = 64;
    int r = 32;          // sketch size
    int block = 256;     // block size b of the causal block algorithm
    int degree = 4;      // p of the exact weight <q̂, k̂>^p on diagonal blocks (exact_diag)
    bool learned = true;
    bool exact_diag = true;
};

// o (B,H,T,d) <- q, k, v. sketch: the learned parameters (polysketch_layout(d, r).total) or the
// random S (2, d, r). denom (B*H*T): the saved 1 + δ of every row, (b, h, t) row-major.
template <typename Real>
void polysketch_attention_forward(const PolySketchDims& D, StridedHeads<Real*> o,
                                  StridedHeads<const Real*> q, StridedHeads<const Real*> k,
                                  StridedHeads<const Real*> v, const Real* sketch, Real* denom);

// dq, dk, dv overwritten; dsketch (learned parameters) += (unused for the random sketch).
template <typename Real>
void polysketch_attention_backward(const PolySketchDims& D, StridedHeads<Real*> dq,
                                   StridedHeads<Real*> dk, StridedHeads<Real*> dv, Real* dsketch,
                                   StridedHeads<const Real*> dout, StridedHeads<const Real*> q,
                                   StridedHeads<const Real*> k, StridedHeads<const Real*> v,
                                   StridedHeads<const Real*> o, const Real* sketch,
                                   const Real* denom);
