// Tests of the CPU `polysketch` attention (src/attention/polysketch.cpp, polysketch_sketch.h):
// the block algorithm against a naive O(T²) evaluation of the same weights (with its own
// implementation of the sketch network), the degenerate case exact_diag with b ≥ T against naive
// `polynomial` attention, fp64 finite-difference gradients for q, k, v and every learned sketch
// parameter (learned and random sketch, exact_diag on and off, T not a multiple of b), the fp32
// Attention class on strided (fused-qkv) views against the fp64 core, large inputs, the random
// sketch's unbiasedness, and the parameter layout, mask and init.
// check.h defines FAIL (throw Error); gtest must not define its own.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"
#include "attention/cpu_variants.h"
#include "attention/polysketch_sketch.h"
#include "attn_test_util.h"
#include "check.h"
#include "rng.h"

namespace {

using Vec = std::vector<double>;

Vec random_normal(size_t n, Rng& rng, double scale = 1.0) {
    Vec x(n);
    for (double& v : x) v = scale * rng.normal();
    return x;
}

// A problem in fp64 with contiguous (B, H, T, d) q, k, v and the sketch weights (learned
// parameters, or the random S (2, d, r)).
struct Problem {
    PolySketchDims D;
    Vec q, k, v, sketch;
    size_t size() const { return (size_t)D.B * D.H * D.T * D.d; }
};

Problem make_problem(bool learned, bool exact_diag, int B, int H, int T, int d, int r, int block, uint64_t seed) {
    Problem P;
    P.D.B = B; P.D.H = H; P.D.T = T; P.D.d = d; P.D.r = r;
    P.D.block = block;
    P.D.degree = 4;
    P.D.learned = learned;
    P.D.exact_diag = exact_diag;
    Rng rng(seed);
    P.q = random_normal(P.size(), rng);
    P.k = random_normal(P.size(), rng);
    P.v = random_normal(P.size(), rng);
    if (learned) {
        PolySketchLayout L = polysketch_layout(d, r);
        std::vector<float> init(L.total);
        polysketch_init_params(init.data(), L, seed + 1);
        P.sketch.assign(init.begin(), init.end());
        // move the LayerNorm affines away from (1, 0) so their gradients are exercised in general
        for (int f = 0; f < 2; f++)
            for (int g = 0; g < 2; g++)
                for (int i = 0; i < L.blk[f][g].n_in; i++) {
                    P.sketch[L.blk[f][g].ln_w + i] += 0.3 * rng.normal();
                    P.sketch[L.blk[f][g].ln_b + i] += 0.3 * rng.normal();
                }
    } else {
        std::vector<float> S = polysketch_random_sketch(d, r, seed + 2, 0);
        P.sketch.assign(S.begin(), S.end());
    }
    return P;
}

template <typename Ptr>
StridedHeads<Ptr> view(Ptr p, const PolySketchDims& D) {
    return StridedHeads<Ptr>{p, (int64_t)D.H * D.T * D.d, (int64_t)D.T * D.d, D.d};
}

Vec core_forward(const Problem& P, Vec* denom = nullptr) {
    Vec o(P.size()), den((size_t)P.D.B * P.D.H * P.D.T);
    polysketch_attention_forward<double>(P.D, view(o.data(), P.D), view(P.q.data(), P.D), view(P.k.data(), P.D),
                                         view(P.v.data(), P.D), P.sketch.data(), den.data());
    if (denom) *denom = den;
    return o;
}

// ---------------------------------------------------------------- naive references

Vec naive_layernorm(const double* x, int n) {
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += x[i] / n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean) / n;
    Vec y(n);
    for (int i = 0; i < n; i++) y[i] = (x[i] - mean) / std::sqrt(var + 1e-5);
    return y;
}

double naive_gelu(double x) { return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }

// M(x) straight from ATTENTION.md §4 and the layout comment of polysketch_sketch.h
Vec naive_sketch(const PolySketchDims& D, const Vec& sketch, const double* x) {
    const int d = D.d, r = D.r;
    Vec m(r);
    if (!D.learned) {
        for (int c = 0; c < r; c++) {
            double a = 0, b = 0;
            for (int i = 0; i < d; i++) { a += x[i] * sketch[i * r + c]; b += x[i] * sketch[d * r + i * r + c]; }
            m[c] = a * b / std::sqrt((double)r);
        }
        return m;
    }
    const PolySketchLayout L = polysketch_layout(d, r);
    Vec f[2];
    for (int fi = 0; fi < 2; fi++) {
        Vec y(x, x + d);
        for (int g = 0; g < 2; g++) {
            const PolySketchLayout::Block& b = L.blk[fi][g];
            Vec n = naive_layernorm(y.data(), b.n_in);
            for (int i = 0; i < b.n_in; i++) n[i] = n[i] * sketch[b.ln_w + i] + sketch[b.ln_b + i];
            Vec hidden(8 * r);
            for (int o = 0; o < 8 * r; o++) {
                double s = 0;
                for (int i = 0; i < b.n_in; i++) s += sketch[b.w_in + o * b.n_in + i] * n[i];
                hidden[o] = naive_gelu(s);
            }
            y.assign(r, 0);
            for (int o = 0; o < r; o++)
                for (int i = 0; i < 8 * r; i++) y[o] += sketch[b.w_out + o * 8 * r + i] * hidden[i];
        }
        f[fi] = y;
    }
    for (int c = 0; c < r; c++) m[c] = std::sqrt((double)r) * std::tanh(f[0][c] * f[1][c] / std::sqrt((double)r));
    return m;
}

double dotv(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

// O(T²) evaluation: polynomial = true gives `polynomial` attention (every weight <q̂, k̂>^p)
Vec naive_forward(const Problem& P, bool polynomial) {
    const PolySketchDims& D = P.D;
    const int T = D.T, d = D.d;
    Vec o(P.size());
    for (int b = 0; b < D.B; b++)
        for (int h = 0; h < D.H; h++) {
            const size_t base = ((size_t)b * D.H + h) * T * d;
            std::vector<Vec> qh(T), kh(T), A(T), Bk(T);
            for (int t = 0; t < T; t++) {
                qh[t] = naive_layernorm(&P.q[base + t * d], d);
                kh[t] = naive_layernorm(&P.k[base + t * d], d);
                if (!polynomial) {
                    A[t] = naive_sketch(D, P.sketch, qh[t].data());
                    Bk[t] = naive_sketch(D, P.sketch, kh[t].data());
                }
            }
            for (int i = 0; i < T; i++) {
                Vec num(d, 0);
                double den = 1;
                for (int j = 0; j <= i; j++) {
                    bool exact = polynomial || (D.exact_diag && i / D.block == j / D.block);
                    double w = exact ? std::pow(dotv(qh[i], kh[j]), D.degree) : std::pow(dotv(A[i], Bk[j]), 2);
                    den += w;
                    for (int x = 0; x < d; x++) num[x] += w * P.v[base + j * d + x];
                }
                for (int x = 0; x < d; x++) o[base + i * d + x] = num[x] / den;
            }
        }
    return o;
}

// ---------------------------------------------------------------- forward

TEST(PolySketchAttention, BlockAlgorithmEqualsNaive) {
    for (bool learned : {true, false})
        for (bool exact_diag : {true, false})
            for (int block : {1, 4, 5, 13, 16}) {
                Problem P = make_problem(learned, exact_diag, 2, 2, 13, 8, 4, block, 100 + block);
                Vec o = core_forward(P), ref = naive_forward(P, false);
                EXPECT_LT(max_abs_diff(o, ref), 1e-10 * (1 + max_abs(ref)))
                    << "learned=" << learned << " exact_diag=" << exact_diag << " block=" << block;
            }
}

TEST(PolySketchAttention, ExactDiagWithOneBlockEqualsPolynomial) {
    for (bool learned : {true, false})
        for (int block : {13, 20}) {
            Problem P = make_problem(learned, true, 2, 2, 13, 8, 4, block, 7 + block);
            Vec o = core_forward(P), ref = naive_forward(P, true);
            EXPECT_LT(max_abs_diff(o, ref), 1e-10 * (1 + max_abs(ref))) << "learned=" << learned << " block=" << block;
        }
    // and with several blocks it must differ (the test can see the sketch at all)
    Problem P = make_problem(true, true, 1, 1, 13, 8, 4, 5, 3);
    EXPECT_GT(max_abs_diff(core_forward(P), naive_forward(P, true)), 1e-3);
}

TEST(PolySketchAttention, RandomSketchIsUnbiasedForTheSquaredDot) {
    // E <M(q), M(k)> = <q, k>², with standard deviation <= 3 |q|²|k|² / sqrt(r)
    const int d = 8, r = 4096;
    std::vector<float> Sf = polysketch_random_sketch(d, r, 42, 3);
    Vec S(Sf.begin(), Sf.end()), mq(r), mk(r), p1(r), p2(r);
    Rng rng(5);
    for (int trial = 0; trial < 10; trial++) {
        Vec q = random_normal(d, rng), k = random_normal(d, rng);
        random_sketch_forward(d, r, S.data(), q.data(), mq.data(), p1.data(), p2.data());
        random_sketch_forward(d, r, S.data(), k.data(), mk.data(), p1.data(), p2.data());
        double qk = dotv(q, k);
        EXPECT_NEAR(dotv(mq, mk), qk * qk, 0.25 * dotv(q, q) * dotv(k, k));
    }
}

// ---------------------------------------------------------------- gradients

// loss = Σ o ∘ R
double loss_of(const Problem& P, const Vec& R) { return dotv(core_forward(P), R); }

void check_gradients(bool learned, bool exact_diag) {
    SCOPED_TRACE(testing::Message() << "learned=" << learned << " exact_diag=" << exact_diag);
    Problem P = make_problem(learned, exact_diag, 1, 2, 13, 8, 4, 5, learned * 2 + exact_diag + 11);
    Rng rng(99);
    Vec R = random_normal(P.size(), rng);
    Vec den, o = core_forward(P, &den);
    Vec dq(P.size()), dk(P.size()), dv(P.size()), dsketch(P.sketch.size(), 0);
    polysketch_attention_backward<double>(P.D, view(dq.data(), P.D), view(dk.data(), P.D), view(dv.data(), P.D),
                                          dsketch.data(), view((const double*)R.data(), P.D),
                                          view((const double*)P.q.data(), P.D), view((const double*)P.k.data(), P.D),
                                          view((const double*)P.v.data(), P.D), view((const double*)o.data(), P.D),
                                          P.sketch.data(), den.data());
    struct Named { const char* name; Vec* x; const Vec* grad; };
    std::vector<Named> inputs = {{"q", &P.q, &dq}, {"k", &P.k, &dk}, {"v", &P.v, &dv}};
    if (learned) inputs.push_back({"sketch params", &P.sketch, &dsketch});
    else EXPECT_EQ(max_abs(dsketch), 0.0);  // the random sketch is not a parameter
    const double h = 1e-5;
    for (const Named& in : inputs) {
        const double scale = 1 + max_abs(*in.grad);
        EXPECT_GT(max_abs(*in.grad), 1e-3) << in.name << ": gradient is (nearly) zero";
        double worst = 0;
        size_t worst_i = 0;
        for (size_t i = 0; i < in.x->size(); i++) {
            const double x0 = (*in.x)[i];
            (*in.x)[i] = x0 + h;
            double lp = loss_of(P, R);
            (*in.x)[i] = x0 - h;
            double lm = loss_of(P, R);
            (*in.x)[i] = x0;
            double err = std::abs((lp - lm) / (2 * h) - (*in.grad)[i]);
            if (err > worst) { worst = err; worst_i = i; }
        }
        EXPECT_LT(worst, 1e-6 * scale) << in.name << ": worst at element " << worst_i << " of " << in.x->size()
                                       << " (gradient there " << (*in.grad)[worst_i] << ")";
    }
}

TEST(PolySketchAttention, GradientsMatchFiniteDifferencesLearnedExactDiag) { check_gradients(true, true); }
TEST(PolySketchAttention, GradientsMatchFiniteDifferencesLearnedSketchedDiag) { check_gradients(true, false); }
TEST(PolySketchAttention, GradientsMatchFiniteDifferencesRandomExactDiag) { check_gradients(false, true); }
TEST(PolySketchAttention, GradientsMatchFiniteDifferencesRandomSketchedDiag) { check_gradients(false, false); }

// ---------------------------------------------------------------- the fp32 Attention class

AttnConfig polysketch_config(bool learned, bool exact_diag, int r, int block) {
    AttnConfig cfg;
    cfg.name = "polysketch";
    cfg.sketch_size = r;
    cfg.sketch_learned = learned;
    cfg.block = block;
    cfg.exact_diag = exact_diag;
    cfg.seed = 77;
    return cfg;
}

// Runs the fp32 class on fused views (qkv (B, T, 3, H, d), o (B, T, H, d)) and compares with the
// fp64 core on the same numbers.
void check_class_against_core(bool learned, bool exact_diag, double input_scale) {
    SCOPED_TRACE(testing::Message() << "learned=" << learned << " exact_diag=" << exact_diag
                                    << " scale=" << input_scale);
    const int B = 2, H = 3, T = 37, d = 16, r = 8, block = 8, layer = 2;
    AttnConfig cfg = polysketch_config(learned, exact_diag, r, block);
    std::unique_ptr<Attention> attn = make_cpu_polysketch_attention(cfg);
    const size_t P = attn->num_params(d);
    std::vector<float> params(P), dparams(P);
    attn->init_params(params.data(), d, 1234);
    Rng rng(31);
    for (float& x : dparams) x = rng.normal();  // backward must add to it
    const std::vector<float> dparams0 = dparams;

    std::vector<float> qkv((size_t)B * T * 3 * H * d), o((size_t)B * T * H * d), dout(o.size()),
        dqkv(qkv.size()), saved(attn->saved_size(AttnShape{B, H, T, d}));
    for (float& x : qkv) x = (float)(input_scale * rng.normal());
    for (float& x : dout) x = rng.normal();
    auto fused = [&](float* base, int which) {
        return HeadTensor{base + (size_t)which * H * d, DType::F32, (int64_t)T * 3 * H * d, d, (int64_t)3 * H * d};
    };
    auto out_view = [&](float* base) { return HeadTensor{base, DType::F32, (int64_t)T * H * d, d, (int64_t)H * d}; };
    AttnShape s{B, H, T, d};
    AttnContext ctx{layer, 5};
    Tensor tparams{params.data(), DType::F32, P}, tdparams{dparams.data(), DType::F32, P};
    if (!learned) tparams = tdparams = Tensor{};
    attn->forward(s, ctx, out_view(o.data()), fused(qkv.data(), 0), fused(qkv.data(), 1), fused(qkv.data(), 2),
                  saved.data(), tparams, nullptr);
    attn->backward(s, ctx, fused(dqkv.data(), 0), fused(dqkv.data(), 1), fused(dqkv.data(), 2), tdparams,
                   out_view(dout.data()), fused(qkv.data(), 0), fused(qkv.data(), 1), fused(qkv.data(), 2),
                   out_view(o.data()), saved.data(), tparams, nullptr);

    // the same problem in fp64, contiguous (B, H, T, d)
    Problem Pd;
    Pd.D = PolySketchDims{B, H, T, d, r, block, 4, learned, exact_diag};
    const size_t n = Pd.size();
    Pd.q.resize(n); Pd.k.resize(n); Pd.v.resize(n);
    Vec dout_d(n);
    auto at = [&](int b, int h, int t) { return (((size_t)b * H + h) * T + t) * d; };
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                for (int i = 0; i < d; i++) {
                    const size_t f = (((size_t)b * T + t) * 3 * H + h) * d + i;
                    Pd.q[at(b, h, t) + i] = qkv[f];
                    Pd.k[at(b, h, t) + i] = qkv[f + H * d];
                    Pd.v[at(b, h, t) + i] = qkv[f + 2 * H * d];
                    dout_d[at(b, h, t) + i] = dout[(((size_t)b * T + t) * H + h) * d + i];
                }
    if (learned) Pd.sketch.assign(params.begin(), params.end());
    else {
        std::vector<float> S = polysketch_random_sketch(d, r, cfg.seed, layer);
        Pd.sketch.assign(S.begin(), S.end());
    }
    Vec den, o_ref = core_forward(Pd, &den);
    Vec dq(n), dk(n), dv(n), dsk(Pd.sketch.size(), 0);
    polysketch_attention_backward<double>(Pd.D, view(dq.data(), Pd.D), view(dk.data(), Pd.D), view(dv.data(), Pd.D),
                                          dsk.data(), view((const double*)dout_d.data(), Pd.D),
                                          view((const double*)Pd.q.data(), Pd.D), view((const double*)Pd.k.data(), Pd.D),
                                          view((const double*)Pd.v.data(), Pd.D), view((const double*)o_ref.data(), Pd.D),
                                          Pd.sketch.data(), den.data());

    // bring the fp32 results into the same contiguous layout
    Vec o32(n), dq32(n), dk32(n), dv32(n);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++)
                for (int i = 0; i < d; i++) {
                    const size_t f = (((size_t)b * T + t) * 3 * H + h) * d + i;
                    o32[at(b, h, t) + i] = o[(((size_t)b * T + t) * H + h) * d + i];
                    dq32[at(b, h, t) + i] = dqkv[f];
                    dk32[at(b, h, t) + i] = dqkv[f + H * d];
                    dv32[at(b, h, t) + i] = dqkv[f + 2 * H * d];
                }
    for (const Vec* x : {&o32, &dq32, &dk32, &dv32})
        for (double val : *x) ASSERT_TRUE(std::isfinite(val));
    EXPECT_LT(max_abs_diff(o32, o_ref), 1e-4 * (1 + max_abs(o_ref)));
    EXPECT_LT(max_abs_diff(dq32, dq), 2e-3 * (1 + max_abs(dq)));
    EXPECT_LT(max_abs_diff(dk32, dk), 2e-3 * (1 + max_abs(dk)));
    EXPECT_LT(max_abs_diff(dv32, dv), 1e-4 * (1 + max_abs(dv)));
    if (learned) {
        Vec added(P);
        for (size_t i = 0; i < P; i++) {
            ASSERT_TRUE(std::isfinite(dparams[i]));
            added[i] = (double)dparams[i] - dparams0[i];
        }
        EXPECT_LT(max_abs_diff(added, dsk), 2e-3 * (1 + max_abs(dsk)));
        EXPECT_GT(max_abs(dsk), 1e-3);
    }
}

TEST(PolySketchAttention, FloatClassOnFusedViewsMatchesDoubleCore) {
    for (bool learned : {true, false})
        for (bool exact_diag : {true, false}) check_class_against_core(learned, exact_diag, 1.0);
}

TEST(PolySketchAttention, LargeInputsStayFiniteAndAccurate) {
    for (bool learned : {true, false}) check_class_against_core(learned, true, 8.0);
}

TEST(PolySketchAttention, BitwiseSameForAnyThreadCount) {
    // large enough (B*H*T >= 512 rows) that the CPU code uses threads
    const int B = 2, H = 4, T = 70, d = 8, r = 4;
    std::unique_ptr<Attention> attn = make_cpu_polysketch_attention(polysketch_config(true, true, r, 16));
    const size_t n = (size_t)B * H * T * d, P = attn->num_params(d);
    std::vector<float> q(n), k(n), v(n), dout(n), params(P);
    Rng rng(8);
    for (std::vector<float>* x : {&q, &k, &v, &dout})
        for (float& y : *x) y = rng.normal();
    attn->init_params(params.data(), d, 9);
    auto run = [&](int threads) {
        const int old = omp_get_max_threads();
        omp_set_num_threads(threads);
        std::vector<float> o(n), dq(n), dk(n), dv(n), dparams(P), saved(attn->saved_size(AttnShape{B, H, T, d}));
        auto ht = [&](std::vector<float>& x) { return head_tensor_bhtd(x.data(), DType::F32, H, T, d); };
        Tensor tp{params.data(), DType::F32, P}, tdp{dparams.data(), DType::F32, P};
        AttnShape s{B, H, T, d};
        attn->forward(s, AttnContext{}, ht(o), ht(q), ht(k), ht(v), saved.data(), tp, nullptr);
        attn->backward(s, AttnContext{}, ht(dq), ht(dk), ht(dv), tdp, ht(dout), ht(q), ht(k), ht(v), ht(o),
                       saved.data(), tp, nullptr);
        omp_set_num_threads(old);
        o.insert(o.end(), dq.begin(), dq.end());
        o.insert(o.end(), dk.begin(), dk.end());
        o.insert(o.end(), dv.begin(), dv.end());
        o.insert(o.end(), dparams.begin(), dparams.end());
        return o;
    };
    EXPECT_EQ(run(1), run(3));
}

// ---------------------------------------------------------------- parameters

TEST(PolySketchAttention, ParameterLayoutMaskAndInit) {
    const int d = 64, r = 32;
    std::unique_ptr<Attention> attn = make_cpu_polysketch_attention(polysketch_config(true, true, r, 256));
    EXPECT_EQ(attn->name(), "polysketch");
    const size_t g1 = 2 * d + 8 * r * d + r * 8 * r, g2 = 2 * r + 8 * r * r + r * 8 * r;
    ASSERT_EQ(attn->num_params(d), 2 * (g1 + g2));
    std::vector<bool> mask = attn->param_decay_mask(d);
    ASSERT_EQ(mask.size(), attn->num_params(d));
    EXPECT_EQ((size_t)std::count(mask.begin(), mask.end(), true), 2 * (g1 + g2 - 2 * d - 2 * r));

    std::vector<float> p(attn->num_params(d)), p2(p.size()), p3(p.size());
    attn->init_params(p.data(), d, 5);
    attn->init_params(p2.data(), d, 5);
    attn->init_params(p3.data(), d, 6);
    EXPECT_EQ(p, p2);
    EXPECT_NE(p, p3);
    const PolySketchLayout L = polysketch_layout(d, r);
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 2; g++) {
            const PolySketchLayout::Block& b = L.blk[f][g];
            for (int i = 0; i < b.n_in; i++) {
                EXPECT_EQ(p[b.ln_w + i], 1.0f);
                EXPECT_EQ(p[b.ln_b + i], 0.0f);
                EXPECT_FALSE(mask[b.ln_w + i]);
                EXPECT_FALSE(mask[b.ln_b + i]);
            }
            double ss = 0;
            const size_t n_in = (size_t)L.hidden * b.n_in;
            for (size_t i = 0; i < n_in; i++) ss += (double)p[b.w_in + i] * p[b.w_in + i];
            EXPECT_NEAR(std::sqrt(ss / n_in), 1 / std::sqrt((double)b.n_in), 0.05 / std::sqrt((double)b.n_in));
            EXPECT_TRUE(mask[b.w_in] && mask[b.w_out + (size_t)r * L.hidden - 1]);
        }

    std::unique_ptr<Attention> random = make_cpu_polysketch_attention(polysketch_config(false, true, r, 256));
    EXPECT_EQ(random->num_params(d), 0u);
    EXPECT_TRUE(random->param_decay_mask(d).empty());
    EXPECT_NE(polysketch_random_sketch(d, r, 1, 0), polysketch_random_sketch(d, r, 1, 1));
    EXPECT_EQ(polysketch_random_sketch(d, r, 1, 2), polysketch_random_sketch(d, r, 1, 2));
}

TEST(PolySketchAttention, RegistryAndBadOptions) {
    AttnConfig cfg = polysketch_config(true, true, 8, 16);
    EXPECT_EQ(make_cpu_attention(cfg)->name(), "polysketch");
    cfg.degree = 3;
    EXPECT_THROW(make_cpu_polysketch_attention(cfg), Error);
}

}  // namespace
