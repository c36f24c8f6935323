// Tests of the CPU reference backend: every kernel of src/cpu_kernels.h against central finite
// differences in double (scalar loss L = Σ r ⊙ out with random r), the float instantiation
// against the double one, CpuOps' methods against the templates, AdamW against a scalar
// formula, sum_squares, determinism across OpenMP thread counts, and the error messages.
// check.h defines FAIL (throw Error); gtest must not define its own.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "check.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "rng.h"
#include "test_util.h"

namespace {
using Vec = std::vector<double>;
using VecF = std::vector<float>;

Vec randn(size_t n, Rng& rng, double scale = 1.0) {
    Vec x(n);
    for (auto& e : x) e = scale * rng.normal();
    return x;
}
VecF to_float(const Vec& x) { return VecF(x.begin(), x.end()); }
Vec to_double(const VecF& x) { return Vec(x.begin(), x.end()); }
double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}
Vec sub(const Vec& a, const Vec& b) {
    Vec c(a.size());
    for (size_t i = 0; i < a.size(); i++) c[i] = a[i] - b[i];
    return c;
}

// Gradient of loss() with respect to x by central differences (x restored afterwards).
Vec fd_grad(Vec& x, const std::function<double()>& loss, double h = 1e-5) {
    Vec g(x.size());
    for (size_t i = 0; i < x.size(); i++) g[i] = central_difference(x, i, h, loss);
    return g;
}

// max |got - want| / max(1, max |want|) must be below tol
void expect_close(const Vec& got, const Vec& want, double tol, const char* what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double scale = 1, err = 0;
    size_t worst = 0;
    for (size_t i = 0; i < want.size(); i++) scale = std::max(scale, std::abs(want[i]));
    for (size_t i = 0; i < want.size(); i++) {
        ASSERT_TRUE(std::isfinite(got[i])) << what << "[" << i << "] = " << got[i];
        const double e = std::abs(got[i] - want[i]);
        if (e > err) err = e, worst = i;
    }
    EXPECT_LE(err / scale, tol) << what << ": worst element " << worst << " got " << got[worst] << " want "
                                << want[worst];
}
// Relative error of the float result against the double one: max |f - d| / max |d|.
void expect_float_matches(const VecF& f, const Vec& d, const char* what, double tol = 1e-5) {
    ASSERT_EQ(f.size(), d.size()) << what;
    double err = 0, scale = 1e-30;
    for (size_t i = 0; i < d.size(); i++) {
        err = std::max(err, std::abs((double)f[i] - d[i]));
        scale = std::max(scale, std::abs(d[i]));
    }
    EXPECT_LT(err / scale, tol) << what;
}
// Rounds x to float in place, so float and double instantiations see the same inputs.
void round_to_float(Vec& x) {
    for (auto& e : x) e = (float)e;
}
}  // namespace

// ================================================================ finite differences (double)

// One thread: the checks run thousands of tiny forwards, where thread start-up would dominate.
class CpuOpsGrad : public ::testing::Test {
protected:
    void SetUp() override { saved_threads_ = omp_get_max_threads(), omp_set_num_threads(1); }
    void TearDown() override { omp_set_num_threads(saved_threads_); }
    int saved_threads_ = 1;
};

TEST_F(CpuOpsGrad, Encoder) {
    Rng rng(11);
    const int B = 2, T = 5, C = 6, V = 7, maxT = 8;
    std::vector<int> tokens = {3, 1, 3, 0, 6, 1, 1, 5, 3, 2};  // repeats test the scatter-add
    Vec wte = randn((size_t)V * C, rng), wpe = randn((size_t)maxT * C, rng), r = randn((size_t)B * T * C, rng);
    Vec out(r.size());
    auto loss = [&] {
        cpu::encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
        return dot(r, out);
    };
    Vec dwte0 = randn(wte.size(), rng), dwpe0 = randn(wpe.size(), rng);  // "+=" onto these
    Vec dwte = dwte0, dwpe = dwpe0;
    cpu::encoder_backward(dwte.data(), dwpe.data(), r.data(), tokens.data(), B, T, C);
    expect_close(sub(dwte, dwte0), fd_grad(wte, loss), 1e-8, "dwte");
    expect_close(sub(dwpe, dwpe0), fd_grad(wpe, loss), 1e-8, "dwpe");
}

TEST_F(CpuOpsGrad, LayerNorm) {
    Rng rng(12);
    const int N = 5, C = 13;
    Vec inp = randn((size_t)N * C, rng, 2.0), w = randn(C, rng), b = randn(C, rng), r = randn((size_t)N * C, rng);
    for (int n = 0; n < N; n++) inp[(size_t)n * C] += 3.0 * n;  // rows with nonzero mean
    Vec out(r.size()), mean(N), rstd(N);
    auto loss = [&] {
        cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), N, C);
        return dot(r, out);
    };
    loss();
    // forward against the formula
    for (int n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += inp[n * C + c] / C;
        for (int c = 0; c < C; c++) v += (inp[n * C + c] - m) * (inp[n * C + c] - m) / C;
        EXPECT_NEAR(mean[n], m, 1e-12);
        EXPECT_NEAR(rstd[n], 1 / std::sqrt(v + 1e-5), 1e-10);
    }
    Vec dinp0 = randn(inp.size(), rng), dw0 = randn(C, rng), db0 = randn(C, rng);
    Vec dinp = dinp0, dw = dw0, db = db0;
    cpu::layernorm_backward(dinp.data(), dw.data(), db.data(), r.data(), inp.data(), w.data(), mean.data(),
                            rstd.data(), N, C);
    expect_close(sub(dinp, dinp0), fd_grad(inp, loss), 1e-7, "dinp");
    expect_close(sub(dw, dw0), fd_grad(w, loss), 1e-7, "dw");
    expect_close(sub(db, db0), fd_grad(b, loss), 1e-7, "db");
}

// Shapes that exercise both the full register tiles (8 rows × 16 doubles) and the ragged edges.
void check_matmul_grad(int N, int IC, int OC, bool with_bias, uint64_t seed) {
    Rng rng(seed);
    Vec inp = randn((size_t)N * IC, rng), w = randn((size_t)OC * IC, rng), bias = randn(OC, rng);
    Vec r = randn((size_t)N * OC, rng), out(r.size());
    auto loss = [&] {
        cpu::matmul_forward(out.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, N, IC, OC);
        return dot(r, out);
    };
    Vec dinp = randn(inp.size(), rng);  // overwritten
    Vec dw0 = randn(w.size(), rng), db0 = randn(OC, rng), dw = dw0, db = db0;
    cpu::matmul_backward(dinp.data(), dw.data(), with_bias ? db.data() : nullptr, r.data(), inp.data(), w.data(),
                         N, IC, OC);
    expect_close(dinp, fd_grad(inp, loss), 1e-8, "dinp");
    expect_close(sub(dw, dw0), fd_grad(w, loss), 1e-8, "dw");
    if (with_bias) expect_close(sub(db, db0), fd_grad(bias, loss), 1e-8, "dbias");
    else expect_close(db, db0, 0, "dbias untouched");
}
TEST_F(CpuOpsGrad, Matmul) {
    check_matmul_grad(5, 7, 3, true, 13);
    check_matmul_grad(9, 20, 40, true, 14);
    check_matmul_grad(11, 33, 18, false, 15);
}

// Larger shapes (several 64-blocks, K beyond one 256-chunk) against plain double loops.
TEST_F(CpuOpsGrad, MatmulMatchesNaiveOnLargeShapes) {
    Rng rng(16);
    const int N = 300, IC = 270, OC = 131;
    Vec inp = randn((size_t)N * IC, rng), w = randn((size_t)OC * IC, rng), bias = randn(OC, rng);
    Vec dout = randn((size_t)N * OC, rng), out(dout.size()), dinp(inp.size()), dw(w.size(), 0.0), db(OC, 0.0);
    cpu::matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, IC, OC);
    cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, IC, OC);
    Vec out_ref(out.size()), dinp_ref(dinp.size(), 0.0), dw_ref(dw.size(), 0.0), db_ref(OC, 0.0);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias[o];
            for (int i = 0; i < IC; i++) s += inp[n * IC + i] * w[o * IC + i];
            out_ref[n * OC + o] = s;
            const double g = dout[n * OC + o];
            db_ref[o] += g;
            for (int i = 0; i < IC; i++) {
                dinp_ref[n * IC + i] += g * w[o * IC + i];
                dw_ref[o * IC + i] += g * inp[n * IC + i];
            }
        }
    expect_close(out, out_ref, 1e-12, "out");
    expect_close(dinp, dinp_ref, 1e-12, "dinp");
    expect_close(dw, dw_ref, 1e-12, "dw");
    expect_close(db, db_ref, 1e-12, "dbias");
}

TEST_F(CpuOpsGrad, Gelu) {
    Rng rng(17);
    const size_t n = 40;
    Vec inp = randn(n, rng, 2.5), r = randn(n, rng), out(n);
    auto loss = [&] {
        cpu::gelu_forward(out.data(), inp.data(), n);
        return dot(r, out);
    };
    Vec dinp(n);
    cpu::gelu_backward(dinp.data(), inp.data(), r.data(), n);
    expect_close(dinp, fd_grad(inp, loss), 1e-8, "dinp");
    // in place (dinp aliasing dout)
    Vec inplace = r;
    cpu::gelu_backward(inplace.data(), inp.data(), inplace.data(), n);
    expect_close(inplace, dinp, 0, "in-place dinp");
    // known value of the tanh approximation
    double x = 1.0, y;
    cpu::gelu_forward(&y, &x, 1);
    EXPECT_NEAR(y, 0.8411919906082768, 1e-12);
}

TEST_F(CpuOpsGrad, ResidualAndAddInplace) {
    Rng rng(18);
    const size_t n = 23;
    Vec a = randn(n, rng), b = randn(n, rng), r = randn(n, rng), out(n);
    auto loss = [&] {
        cpu::residual_forward(out.data(), a.data(), b.data(), n);
        return dot(r, out);
    };
    expect_close(fd_grad(a, loss), r, 1e-8, "da");
    expect_close(fd_grad(b, loss), r, 1e-8, "db");
    Vec acc = a;
    cpu::add_inplace(acc.data(), b.data(), n);
    for (size_t i = 0; i < n; i++) EXPECT_EQ(acc[i], a[i] + b[i]);
}

TEST_F(CpuOpsGrad, CrossEntropyWithPadding) {
    Rng rng(19);
    const int N = 4, V = 10, Vp = 16;
    const double dloss = 0.37;
    Vec logits = randn((size_t)N * Vp, rng, 3.0);
    for (int n = 0; n < N; n++)
        for (int c = V; c < Vp; c++) logits[n * Vp + c] = 50.0 + c;  // padding must be ignored
    std::vector<int> targets = {0, 9, 4, 4};
    Vec losses(N);
    auto loss = [&] {
        Vec scratch = logits;
        cpu::crossentropy(scratch.data(), losses.data(), targets.data(), N, V, Vp, dloss, false);
        double s = 0;
        for (double l : losses) s += dloss * l;
        return s;
    };
    loss();
    for (int n = 0; n < N; n++) {  // -log softmax[target] over the real vocabulary
        double z = 0;
        for (int c = 0; c < V; c++) z += std::exp(logits[n * Vp + c]);
        EXPECT_NEAR(losses[n], std::log(z) - logits[n * Vp + targets[n]], 1e-12);
    }
    Vec grad = logits;
    Vec losses_bwd(N);
    cpu::crossentropy(grad.data(), losses_bwd.data(), targets.data(), N, V, Vp, dloss, true);
    expect_close(losses_bwd, losses, 0, "losses with backward");
    expect_close(grad, fd_grad(logits, loss), 1e-8, "dlogits");
    for (int n = 0; n < N; n++)
        for (int c = V; c < Vp; c++) EXPECT_EQ(grad[n * Vp + c], 0.0) << "padding gradient";
}

TEST_F(CpuOpsGrad, RopeInverseIsBackward) {
    Rng rng(20);
    const int B = 2, T = 5, H = 3, d = 8;
    const double theta = 10000.0;
    const size_t n = (size_t)B * T * 3 * H * d;
    Vec x = randn(n, rng), r = randn(n, rng);
    auto loss = [&] {
        Vec y = x;
        cpu::rope(y.data(), B, T, H, d, theta, false);
        return dot(r, y);
    };
    Vec grad = r;
    cpu::rope(grad.data(), B, T, H, d, theta, true);
    expect_close(grad, fd_grad(x, loss), 1e-8, "drope");
    // inverse undoes forward; position 0 and v are unchanged; one known rotation
    Vec y = x;
    cpu::rope(y.data(), B, T, H, d, theta, false);
    Vec back = y;
    cpu::rope(back.data(), B, T, H, d, theta, true);
    expect_close(back, x, 1e-14, "inverse(forward(x))");
    for (int i = 0; i < 3 * H * d; i++) EXPECT_NEAR(y[i], x[i], 1e-15) << "t = 0";
    const size_t row1 = (size_t)3 * H * d;  // b = 0, t = 1
    for (int i = 2 * H * d; i < 3 * H * d; i++) EXPECT_EQ(y[row1 + i], x[row1 + i]) << "v untouched";
    // every rotated pair against the formula: angle = t·theta^(-2i/d)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int qk = 0; qk < 2; qk++)
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < d / 2; i++) {
                        const size_t p = (((size_t)b * T + t) * 3 * H + (size_t)qk * H + h) * d + 2 * i;
                        const double a = t * std::pow(theta, -2.0 * i / d);
                        EXPECT_NEAR(y[p], x[p] * std::cos(a) - x[p + 1] * std::sin(a), 1e-14);
                        EXPECT_NEAR(y[p + 1], x[p] * std::sin(a) + x[p + 1] * std::cos(a), 1e-14);
                    }
}

// ================================================================ float vs double

TEST(CpuOpsFloat, MatchesDouble) {
    Rng rng(21);
    const int B = 2, T = 9, C = 40, N = B * T, OC = 70, V = 50, Vp = 64, H = 2, d = 10;
    Vec inp = randn((size_t)N * C, rng), w = randn((size_t)OC * C, rng), bias = randn(OC, rng);
    Vec lw = randn(C, rng), lb = randn(C, rng), dout = randn((size_t)N * OC, rng), dC = randn((size_t)N * C, rng);
    for (Vec* v : {&inp, &w, &bias, &lw, &lb, &dout, &dC}) round_to_float(*v);

    {  // matmul
        Vec out((size_t)N * OC), dinp(inp.size()), dw(w.size(), 0.0), db(OC, 0.0);
        cpu::matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
        cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, C, OC);
        VecF outf(out.size()), dinpf(dinp.size()), dwf(dw.size(), 0.f), dbf(OC, 0.f);
        VecF inpf = to_float(inp), wf = to_float(w), bf = to_float(bias), doutf = to_float(dout);
        cpu::matmul_forward(outf.data(), inpf.data(), wf.data(), bf.data(), N, C, OC);
        cpu::matmul_backward(dinpf.data(), dwf.data(), dbf.data(), doutf.data(), inpf.data(), wf.data(), N, C, OC);
        expect_float_matches(outf, out, "matmul out");
        expect_float_matches(dinpf, dinp, "matmul dinp");
        expect_float_matches(dwf, dw, "matmul dw");
        expect_float_matches(dbf, db, "matmul dbias");
    }
    {  // layernorm
        Vec out(inp.size()), mean(N), rstd(N), dinp(inp.size(), 0.0), dw(C, 0.0), db(C, 0.0);
        cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), lw.data(), lb.data(), N, C);
        cpu::layernorm_backward(dinp.data(), dw.data(), db.data(), dC.data(), inp.data(), lw.data(), mean.data(),
                                rstd.data(), N, C);
        VecF outf(out.size()), meanf(N), rstdf(N), dinpf(inp.size(), 0.f), dwf(C, 0.f), dbf(C, 0.f);
        VecF inpf = to_float(inp), lwf = to_float(lw), lbf = to_float(lb), dCf = to_float(dC);
        cpu::layernorm_forward(outf.data(), meanf.data(), rstdf.data(), inpf.data(), lwf.data(), lbf.data(), N, C);
        cpu::layernorm_backward(dinpf.data(), dwf.data(), dbf.data(), dCf.data(), inpf.data(), lwf.data(),
                                meanf.data(), rstdf.data(), N, C);
        expect_float_matches(outf, out, "layernorm out");
        expect_float_matches(rstdf, rstd, "layernorm rstd");
        expect_float_matches(dinpf, dinp, "layernorm dinp");
        expect_float_matches(dwf, dw, "layernorm dw");
        expect_float_matches(dbf, db, "layernorm db");
    }
    {  // gelu
        Vec out(inp.size()), dinp(inp.size());
        cpu::gelu_forward(out.data(), inp.data(), inp.size());
        cpu::gelu_backward(dinp.data(), inp.data(), dC.data(), inp.size());
        VecF inpf = to_float(inp), dCf = to_float(dC), outf(out.size()), dinpf(dinp.size());
        cpu::gelu_forward(outf.data(), inpf.data(), inp.size());
        cpu::gelu_backward(dinpf.data(), inpf.data(), dCf.data(), inp.size());
        expect_float_matches(outf, out, "gelu out");
        expect_float_matches(dinpf, dinp, "gelu dinp");
    }
    {  // encoder
        std::vector<int> tokens(N);
        for (auto& t : tokens) t = (int)rng.below(V);
        Vec wte = randn((size_t)Vp * C, rng), wpe = randn((size_t)T * C, rng);
        round_to_float(wte), round_to_float(wpe);
        Vec out(inp.size()), dwte(wte.size(), 0.0), dwpe(wpe.size(), 0.0);
        cpu::encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
        cpu::encoder_backward(dwte.data(), dwpe.data(), dC.data(), tokens.data(), B, T, C);
        VecF wtef = to_float(wte), wpef = to_float(wpe), dCf = to_float(dC), outf(out.size());
        VecF dwtef(wte.size(), 0.f), dwpef(wpe.size(), 0.f);
        cpu::encoder_forward(outf.data(), tokens.data(), wtef.data(), wpef.data(), B, T, C);
        cpu::encoder_backward(dwtef.data(), dwpef.data(), dCf.data(), tokens.data(), B, T, C);
        expect_float_matches(outf, out, "encoder out");
        expect_float_matches(dwtef, dwte, "encoder dwte");
        expect_float_matches(dwpef, dwpe, "encoder dwpe");
    }
    {  // cross-entropy
        Vec logits = randn((size_t)N * Vp, rng, 2.0);
        round_to_float(logits);
        std::vector<int> targets(N);
        for (auto& t : targets) t = (int)rng.below(V);
        Vec losses(N);
        VecF logitsf = to_float(logits), lossesf(N);
        cpu::crossentropy(logits.data(), losses.data(), targets.data(), N, V, Vp, 1.0 / N, true);
        cpu::crossentropy(logitsf.data(), lossesf.data(), targets.data(), N, V, Vp, 1.0f / N, true);
        expect_float_matches(lossesf, losses, "crossentropy losses");
        expect_float_matches(logitsf, logits, "crossentropy dlogits");
    }
    {  // rope
        Vec qkv = randn((size_t)N * 3 * H * d, rng);
        round_to_float(qkv);
        VecF qkvf = to_float(qkv);
        cpu::rope(qkv.data(), B, T, H, d, 10000.0, false);
        cpu::rope(qkvf.data(), B, T, H, d, 10000.0, false);
        expect_float_matches(qkvf, qkv, "rope");
    }
}

// ================================================================ CpuOps

namespace {
// A host vector uploaded into memory of `ops` (freed with it).
struct DeviceBuf {
    Ops& ops;
    Tensor t;
    DeviceBuf(Ops& o, const VecF& host) : ops(o) {
        t = Tensor{ops.alloc(host.size() * 4, "test buffer"), DType::F32, host.size()};
        ops.upload(t, host.data());
    }
    ~DeviceBuf() { ops.release(t.ptr); }
    VecF get() {
        VecF h(t.n);
        ops.download(h.data(), t);
        return h;
    }
};
VecF randnf(size_t n, Rng& rng, double scale = 1.0) { return to_float(randn(n, rng, scale)); }
}  // namespace

TEST(CpuOps, MethodsMatchTemplates) {
    auto ops = make_cpu_ops();
    EXPECT_EQ(ops->name(), "cpu");
    EXPECT_EQ(ops->act_dtype(), DType::F32);
    EXPECT_FALSE(ops->has_master_weights());
    Rng rng(22);
    const int B = 2, T = 6, C = 24, N = B * T, OC = 20, V = 30, Vp = 32, H = 2, d = 4;
    std::vector<int> tokens(N), targets(N);
    for (int i = 0; i < N; i++) tokens[i] = (int)rng.below(V), targets[i] = (int)rng.below(V);
    VecF wte = randnf((size_t)Vp * C, rng), wpe = randnf((size_t)T * C, rng), x = randnf((size_t)N * C, rng);
    VecF w = randnf((size_t)OC * C, rng), bias = randnf(OC, rng), lw = randnf(C, rng), lb = randnf(C, rng);
    VecF dy = randnf((size_t)N * OC, rng), dx = randnf((size_t)N * C, rng), logits = randnf((size_t)N * Vp, rng);
    VecF qkv = randnf((size_t)N * 3 * H * d, rng);

    DeviceBuf d_wte(*ops, wte), d_wpe(*ops, wpe), d_x(*ops, x), d_w(*ops, w), d_bias(*ops, bias), d_lw(*ops, lw),
        d_lb(*ops, lb), d_dy(*ops, dy), d_dx(*ops, dx), d_logits(*ops, logits), d_qkv(*ops, qkv);
    DeviceBuf d_out(*ops, VecF((size_t)N * OC)), d_enc(*ops, VecF((size_t)N * C)), d_mean(*ops, VecF(N)),
        d_rstd(*ops, VecF(N)), d_ln(*ops, VecF((size_t)N * C)), d_dwte(*ops, VecF(wte.size())),
        d_dwpe(*ops, VecF(wpe.size())), d_dinp(*ops, VecF(x.size())), d_dw(*ops, VecF(w.size())),
        d_db(*ops, VecF(OC)), d_ldinp(*ops, VecF(x.size())), d_ldw(*ops, VecF(C)), d_ldb(*ops, VecF(C)),
        d_gelu(*ops, VecF(x.size())), d_dgelu(*ops, VecF(x.size())), d_res(*ops, VecF(x.size())),
        d_losses(*ops, VecF(N));
    int* d_tokens = (int*)ops->alloc(N * sizeof(int), "tokens");
    int* d_targets = (int*)ops->alloc(N * sizeof(int), "targets");
    ops->upload_ints(d_tokens, tokens.data(), N);
    ops->upload_ints(d_targets, targets.data(), N);

    ops->encoder_forward(d_enc.t, d_tokens, d_wte.t, d_wpe.t, B, T, C);
    ops->encoder_backward(d_dwte.t, d_dwpe.t, d_dx.t, d_tokens, tokens.data(), B, T, C);
    ops->layernorm_forward(d_ln.t, d_mean.t, d_rstd.t, d_x.t, d_lw.t, d_lb.t, N, C);
    ops->layernorm_backward(d_ldinp.t, d_ldw.t, d_ldb.t, d_dx.t, d_x.t, d_lw.t, d_mean.t, d_rstd.t, N, C);
    ops->matmul_forward(d_out.t, d_x.t, d_w.t, d_bias.t, N, C, OC);
    ops->matmul_backward(d_dinp.t, d_dw.t, d_db.t, d_dy.t, d_x.t, d_w.t, N, C, OC);
    ops->gelu_forward(d_gelu.t, d_x.t);
    ops->gelu_backward(d_dgelu.t, d_x.t, d_dx.t);
    ops->residual_forward(d_res.t, d_x.t, d_dx.t);
    ops->add_inplace(d_res.t, d_x.t);
    ops->crossentropy(d_logits.t, d_losses.t, d_targets, N, V, Vp, 0.5f, true);
    ops->rope(d_qkv.t, B, T, H, d, 500.f, false);

    VecF enc(x.size()), dwte(wte.size(), 0.f), dwpe(wpe.size(), 0.f), ln(x.size()), mean(N), rstd(N);
    VecF ldinp(x.size(), 0.f), ldw(C, 0.f), ldb(C, 0.f), out((size_t)N * OC), dinp(x.size()), dw(w.size(), 0.f);
    VecF db(OC, 0.f), gelu(x.size()), dgelu(x.size()), res(x.size()), losses(N);
    cpu::encoder_forward(enc.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    cpu::encoder_backward(dwte.data(), dwpe.data(), dx.data(), tokens.data(), B, T, C);
    cpu::layernorm_forward(ln.data(), mean.data(), rstd.data(), x.data(), lw.data(), lb.data(), N, C);
    cpu::layernorm_backward(ldinp.data(), ldw.data(), ldb.data(), dx.data(), x.data(), lw.data(), mean.data(),
                            rstd.data(), N, C);
    cpu::matmul_forward(out.data(), x.data(), w.data(), bias.data(), N, C, OC);
    cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), N, C, OC);
    cpu::gelu_forward(gelu.data(), x.data(), x.size());
    cpu::gelu_backward(dgelu.data(), x.data(), dx.data(), x.size());
    cpu::residual_forward(res.data(), x.data(), dx.data(), x.size());
    cpu::add_inplace(res.data(), x.data(), x.size());
    cpu::crossentropy(logits.data(), losses.data(), targets.data(), N, V, Vp, 0.5f, true);
    cpu::rope(qkv.data(), B, T, H, d, 500.0, false);

    EXPECT_EQ(d_enc.get(), enc);
    EXPECT_EQ(d_dwte.get(), dwte);
    EXPECT_EQ(d_dwpe.get(), dwpe);
    EXPECT_EQ(d_ln.get(), ln);
    EXPECT_EQ(d_mean.get(), mean);
    EXPECT_EQ(d_rstd.get(), rstd);
    EXPECT_EQ(d_ldinp.get(), ldinp);
    EXPECT_EQ(d_ldw.get(), ldw);
    EXPECT_EQ(d_ldb.get(), ldb);
    EXPECT_EQ(d_out.get(), out);
    EXPECT_EQ(d_dinp.get(), dinp);
    EXPECT_EQ(d_dw.get(), dw);
    EXPECT_EQ(d_db.get(), db);
    EXPECT_EQ(d_gelu.get(), gelu);
    EXPECT_EQ(d_dgelu.get(), dgelu);
    EXPECT_EQ(d_res.get(), res);
    EXPECT_EQ(d_logits.get(), logits);
    EXPECT_EQ(d_losses.get(), losses);
    EXPECT_EQ(d_qkv.get(), qkv);

    // copy, zero, sum_squares
    DeviceBuf d_copy(*ops, VecF(x.size()));
    ops->copy(d_copy.t, d_x.t);
    EXPECT_EQ(d_copy.get(), x);
    EXPECT_EQ(ops->sum_squares(d_x.t), cpu::sum_squares(x.data(), x.size()));
    ops->zero(d_copy.t);
    EXPECT_EQ(d_copy.get(), VecF(x.size(), 0.f));
    ops->release(d_tokens);
    ops->release(d_targets);
}

TEST(CpuOps, AllocIsZeroedAndAligned) {
    auto ops = make_cpu_ops();
    const size_t n = 1001;
    float* p = (float*)ops->alloc(n * 4, "zeroed");
    EXPECT_EQ((uintptr_t)p % 64, 0u);
    for (size_t i = 0; i < n; i++) ASSERT_EQ(p[i], 0.f);
    ops->release(p);
}

TEST(CpuOps, ErrorsSayWhatToDo) {
    auto ops = make_cpu_ops();
    try {
        ops->alloc((size_t)1 << 62, "activations");
        GTEST_FAIL() << "expected an out-of-memory error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("out of host memory allocating activations"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("reduce --batch or --seq"), std::string::npos) << e.what();
    }
    float host[4] = {1, 2, 3, 4};
    uint16_t bf[4];
    EXPECT_THROW(ops->upload(Tensor{bf, DType::BF16, 4}, host), Error);
    float logits[8] = {}, losses[2];
    int bad_targets[2] = {1, 5};
    EXPECT_THROW(ops->crossentropy(Tensor{logits, DType::F32, 8}, Tensor{losses, DType::F32, 2}, bad_targets, 2, 4,
                                   4, 1.f, true),
                 Error);
}

TEST(CpuOps, AdamWMatchesScalarFormula) {
    auto ops = make_cpu_ops();
    Rng rng(23);
    const size_t n = 257;
    VecF p = randnf(n, rng), m(n, 0.f), v(n, 0.f);
    Vec pd(p.begin(), p.end()), md(n, 0.0), vd(n, 0.0);
    AdamWStep s{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0, 0.5f};
    for (int step = 1; step <= 4; step++) {
        s.step = step;
        VecF g = randnf(n, rng);
        ops->adamw(Tensor{p.data(), DType::F32, n}, Tensor{}, Tensor{g.data(), DType::F32, n},
                   Tensor{m.data(), DType::F32, n}, Tensor{v.data(), DType::F32, n}, s);
        for (size_t i = 0; i < n; i++) {  // the formula, written out
            const double gi = (double)g[i] * s.grad_scale;
            md[i] = s.beta1 * md[i] + (1 - s.beta1) * gi;
            vd[i] = s.beta2 * vd[i] + (1 - s.beta2) * gi * gi;
            const double mhat = md[i] / (1 - std::pow((double)s.beta1, step));
            const double vhat = vd[i] / (1 - std::pow((double)s.beta2, step));
            pd[i] -= s.lr * (mhat / (std::sqrt(vhat) + s.eps) + s.weight_decay * pd[i]);
        }
    }
    expect_close(to_double(p), pd, 1e-6, "params");
    expect_close(to_double(m), md, 1e-6, "m");
    expect_close(to_double(v), vd, 1e-6, "v");
}

TEST(CpuOps, SumSquares) {
    Rng rng(24);
    const size_t n = 100003;  // several chunks plus a ragged one
    VecF x = randnf(n, rng);
    long double want = 0;
    for (float e : x) want += (long double)e * e;
    EXPECT_NEAR(cpu::sum_squares(x.data(), n), (double)want, 1e-9 * (double)want);
    EXPECT_EQ(cpu::sum_squares(x.data(), 0), 0.0);
}

// Same inputs, 1 thread and 2 threads: bitwise equal results.
TEST(CpuOps, DeterministicAcrossThreadCounts) {
    Rng rng(25);
    const int B = 3, T = 50, C = 96, N = B * T, OC = 200, V = 40;
    std::vector<int> tokens(N);
    for (auto& t : tokens) t = (int)rng.below(8);  // many repeats
    VecF x = randnf((size_t)N * C, rng), w = randnf((size_t)OC * C, rng), bias = randnf(OC, rng);
    VecF dy = randnf((size_t)N * OC, rng), dx = randnf((size_t)N * C, rng), lw = randnf(C, rng), lb = randnf(C, rng);
    auto run = [&](int threads) {
        omp_set_num_threads(threads);
        std::vector<VecF> r;
        VecF out((size_t)N * OC), dinp(x.size()), dw(w.size(), 0.f), db(OC, 0.f);
        cpu::matmul_forward(out.data(), x.data(), w.data(), bias.data(), N, C, OC);
        cpu::matmul_backward(dinp.data(), dw.data(), db.data(), dy.data(), x.data(), w.data(), N, C, OC);
        VecF ln(x.size()), mean(N), rstd(N), ldinp(x.size(), 0.f), ldw(C, 0.f), ldb(C, 0.f);
        cpu::layernorm_forward(ln.data(), mean.data(), rstd.data(), x.data(), lw.data(), lb.data(), N, C);
        cpu::layernorm_backward(ldinp.data(), ldw.data(), ldb.data(), dx.data(), x.data(), lw.data(), mean.data(),
                                rstd.data(), N, C);
        VecF dwte((size_t)V * C, 0.f), dwpe((size_t)T * C, 0.f);
        cpu::encoder_backward(dwte.data(), dwpe.data(), dx.data(), tokens.data(), B, T, C);
        VecF logits = dy, losses(N);
        std::vector<int> targets(tokens);
        cpu::crossentropy(logits.data(), losses.data(), targets.data(), N, OC - 8, OC, 0.1f, true);
        VecF ss = {(float)cpu::sum_squares(dy.data(), dy.size())};
        r = {out, dinp, dw, db, ln, ldinp, ldw, ldb, dwte, dwpe, logits, losses, ss};
        return r;
    };
    const int saved = omp_get_max_threads();
    auto one = run(1), two = run(2);
    omp_set_num_threads(saved);
    ASSERT_EQ(one.size(), two.size());
    for (size_t i = 0; i < one.size(); i++)
        EXPECT_EQ(0, std::memcmp(one[i].data(), two[i].data(), one[i].size() * 4)) << "output " << i;
}
