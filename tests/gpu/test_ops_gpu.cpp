// CudaOps against the CPU reference (CpuOps), op by op, forward and backward, in both precisions
// (fp32 and bf16 with fp32 master weights), at several shapes including odd ones (N = 1, C not a
// multiple of 32). Each test draws fresh random inputs (the seed is printed), gives both backends
// the same values (after bf16 rounding), poisons the GPU outputs with NaN first, and compares
// ‖gpu − cpu‖/‖cpu‖ in double with a tolerance per dtype (gpu_test_util.h). Every backward runs
// twice from the same state and must give the same bits (determinism).
// Shape requirements of CudaOps: rope needs an even head size; nothing else.
#include "gpu_test_util.h"  // first: it switches off gtest's FAIL() (check.h has its own)

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "attention.h"
#include "ops.h"

using namespace gpu_test;

namespace {

// fp32 parameter gradients, moments and statistics computed from identical inputs: only the
// summation order differs (bf16 GEMMs accumulate in the tensor cores: a little looser).
double fp32_result_tolerance(DType act) { return act == DType::F32 ? 1e-5 : 1e-4; }

class CudaOpsP : public ::testing::TestWithParam<DType> {
protected:
    void SetUp() override {
        if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
        gpu = make_cuda_ops(GetParam());
        cpu = make_cpu_ops();
        act = gpu->act_dtype();
        rng.seed(fresh_seed());
    }
    // values in the activation dtype / in fp32 on both backends
    Mirror act_mirror(const std::vector<float>& v) { return mirror(*gpu, act, *cpu, v); }
    Mirror f32_mirror(const std::vector<float>& v) { return mirror(*gpu, DType::F32, *cpu, v); }
    // a GPU output filled with NaN, and its CPU counterpart
    Buffer gpu_out(DType dtype, size_t n) {
        Buffer b(*gpu, dtype, n, "gpu output");
        poison(*gpu, b.t());
        return b;
    }
    Buffer cpu_out(size_t n) { return Buffer(*cpu, DType::F32, n, "cpu output"); }
    double tol() const { return output_tolerance(act); }
    double grad_tol() const { return fp32_result_tolerance(act); }

    std::unique_ptr<Ops> gpu, cpu;
    DType act = DType::F32;
    std::mt19937 rng;
};

std::string shape_name(std::initializer_list<std::pair<const char*, long>> dims) {
    std::string s;
    for (auto& d : dims) s += std::string(s.empty() ? "" : " ") + d.first + "=" + std::to_string(d.second);
    return s;
}

// ---------------------------------------------------------------- properties
TEST_P(CudaOpsP, Properties) {
    EXPECT_EQ(gpu->name(), "cuda");
    EXPECT_EQ(gpu->act_dtype(), GetParam());
    EXPECT_EQ(gpu->has_master_weights(), GetParam() == DType::BF16);
}

// ---------------------------------------------------------------- memory
TEST_P(CudaOpsP, UploadDownloadCopyZero) {
    const size_t n = 1001;
    std::vector<float> values = normal(rng, n, 0.0f, 3.0f);
    Buffer a(*gpu, act, n), f(*gpu, DType::F32, n), b(*gpu, act, n);
    upload(*gpu, f.t(), values);
    EXPECT_TRUE(bitwise_equal(download(*gpu, f.t()), values));  // fp32 round trip is exact
    upload(*gpu, a.t(), values);
    const std::vector<float> stored = download(*gpu, a.t());
    EXPECT_LT(rel_err(stored, values), tol());
    // copy converts: fp32 -> act gives what upload gives; act -> act is exact
    poison(*gpu, b.t());
    gpu->copy(b.t(), f.t());
    EXPECT_TRUE(bitwise_equal(download(*gpu, b.t()), stored));
    poison(*gpu, f.t());
    gpu->copy(f.t(), a.t());
    EXPECT_TRUE(bitwise_equal(download(*gpu, f.t()), stored));
    gpu->zero(b.t());
    EXPECT_TRUE(bitwise_equal(download(*gpu, b.t()), std::vector<float>(n, 0.0f)));
    // fresh allocations are zero-filled
    Buffer z(*gpu, act, 77);
    EXPECT_TRUE(bitwise_equal(download(*gpu, z.t()), std::vector<float>(77, 0.0f)));
    // ints
    std::vector<int> ints = random_ints(rng, 33, -5, 1000), back(33);
    Buffer ib(*gpu, DType::F32, 33);
    gpu->upload_ints(ib.ints(), ints.data(), ints.size());
    std::vector<float> raw = download(*gpu, ib.t());
    std::memcpy(back.data(), raw.data(), back.size() * sizeof(int));
    EXPECT_EQ(back, ints);
}

TEST_P(CudaOpsP, OutOfMemoryNamesTheBuffer) {
    try {
        gpu->alloc(size_t(1) << 52, "huge test buffer");  // 4 PiB
        GTEST_FAIL() << "allocation of 4 PiB succeeded";
    } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("out of GPU memory allocating huge test buffer"), std::string::npos) << msg;
        EXPECT_NE(msg.find("reduce --batch or --seq"), std::string::npos) << msg;
    }
    // the failure is not sticky: the next allocation and copy work
    Buffer b(*gpu, act, 10);
    std::vector<float> v(10, 1.5f);
    upload(*gpu, b.t(), v);
    EXPECT_TRUE(bitwise_equal(download(*gpu, b.t()), v));
}

// ---------------------------------------------------------------- encoder
TEST_P(CudaOpsP, Encoder) {
    struct Shape { int B, T, C, Vp; };
    for (Shape s : {Shape{1, 1, 8, 16}, Shape{2, 5, 37, 11}, Shape{4, 64, 96, 300}, Shape{3, 33, 130, 7}}) {
        SCOPED_TRACE(shape_name({{"B", s.B}, {"T", s.T}, {"C", s.C}, {"Vp", s.Vp}}));
        const int maxT = s.T + 3, N = s.B * s.T;
        IntMirror tokens = int_mirror(*gpu, *cpu, random_ints(rng, N, 0, s.Vp));  // many repeats
        Mirror wte = act_mirror(normal(rng, (size_t)s.Vp * s.C));
        Mirror wpe = act_mirror(normal(rng, (size_t)maxT * s.C));
        // forward
        Buffer out_g = gpu_out(act, (size_t)N * s.C), out_c = cpu_out((size_t)N * s.C);
        gpu->encoder_forward(out_g.t(), tokens.gpu.ints(), wte.gpu.t(), wpe.gpu.t(), s.B, s.T, s.C);
        cpu->encoder_forward(out_c.t(), tokens.cpu.ints(), wte.cpu.t(), wpe.cpu.t(), s.B, s.T, s.C);
        EXPECT_LT(rel_err(download(*gpu, out_g.t()), download(*cpu, out_c.t())), tol());
        // backward: dwte, dwpe accumulate onto random values
        Mirror dout = act_mirror(normal(rng, (size_t)N * s.C));
        const std::vector<float> dwte0 = normal(rng, (size_t)s.Vp * s.C), dwpe0 = normal(rng, (size_t)maxT * s.C);
        Mirror dwte = f32_mirror(dwte0), dwpe = f32_mirror(dwpe0);
        cpu->encoder_backward(dwte.cpu.t(), dwpe.cpu.t(), dout.cpu.t(), tokens.cpu.ints(), tokens.host.data(), s.B, s.T, s.C);
        std::vector<float> first_dwte, first_dwpe;
        for (int run = 0; run < 2; run++) {
            upload(*gpu, dwte.gpu.t(), dwte0);
            upload(*gpu, dwpe.gpu.t(), dwpe0);
            gpu->encoder_backward(dwte.gpu.t(), dwpe.gpu.t(), dout.gpu.t(), tokens.gpu.ints(), tokens.host.data(),
                                  s.B, s.T, s.C);
            std::vector<float> g_dwte = download(*gpu, dwte.gpu.t()), g_dwpe = download(*gpu, dwpe.gpu.t());
            if (run == 0) {
                EXPECT_LT(rel_err(g_dwte, download(*cpu, dwte.cpu.t())), grad_tol());
                EXPECT_LT(rel_err(g_dwpe, download(*cpu, dwpe.cpu.t())), grad_tol());
                first_dwte = g_dwte;
                first_dwpe = g_dwpe;
            } else {
                EXPECT_TRUE(bitwise_equal(g_dwte, first_dwte)) << "encoder backward dwte not deterministic";
                EXPECT_TRUE(bitwise_equal(g_dwpe, first_dwpe)) << "encoder backward dwpe not deterministic";
            }
        }
    }
}

TEST_P(CudaOpsP, EncoderBackwardRejectsTokenOutsideVocab) {
    const int B = 1, T = 4, C = 8, Vp = 16;
    Buffer dwte(*gpu, DType::F32, (size_t)Vp * C), dwpe(*gpu, DType::F32, (size_t)T * C), dout(*gpu, act, (size_t)T * C);
    std::vector<int> tokens = {1, 2, Vp, 3};
    Buffer tok(*gpu, DType::F32, 4);
    gpu->upload_ints(tok.ints(), tokens.data(), tokens.size());
    EXPECT_THROW(gpu->encoder_backward(dwte.t(), dwpe.t(), dout.t(), tok.ints(), tokens.data(), B, T, C), Error);
}

// ---------------------------------------------------------------- layernorm
TEST_P(CudaOpsP, LayerNorm) {
    struct Shape { int N, C; };
    for (Shape s : {Shape{1, 8}, Shape{3, 37}, Shape{64, 768}, Shape{300, 130}, Shape{1000, 33}}) {
        SCOPED_TRACE(shape_name({{"N", s.N}, {"C", s.C}}));
        const size_t NC = (size_t)s.N * s.C;
        Mirror inp = act_mirror(normal(rng, NC, 3.0f, 1.5f));  // row means far from 0: mean compares relatively
        Mirror w = act_mirror(uniform(rng, s.C, 0.5f, 1.5f));
        Mirror b = act_mirror(uniform(rng, s.C, -0.5f, 0.5f));
        // forward
        Buffer out_g = gpu_out(act, NC), mean_g = gpu_out(DType::F32, s.N), rstd_g = gpu_out(DType::F32, s.N);
        Buffer out_c = cpu_out(NC), mean_c = cpu_out(s.N), rstd_c = cpu_out(s.N);
        gpu->layernorm_forward(out_g.t(), mean_g.t(), rstd_g.t(), inp.gpu.t(), w.gpu.t(), b.gpu.t(), s.N, s.C);
        cpu->layernorm_forward(out_c.t(), mean_c.t(), rstd_c.t(), inp.cpu.t(), w.cpu.t(), b.cpu.t(), s.N, s.C);
        EXPECT_LT(rel_err(download(*gpu, out_g.t()), download(*cpu, out_c.t())), tol());
        EXPECT_LT(rel_err(download(*gpu, mean_g.t()), download(*cpu, mean_c.t())), 1e-5);
        EXPECT_LT(rel_err(download(*gpu, rstd_g.t()), download(*cpu, rstd_c.t())), 1e-5);
        // backward from the CPU's statistics (the same fp32 values on both)
        Mirror mean = f32_mirror(download(*cpu, mean_c.t())), rstd = f32_mirror(download(*cpu, rstd_c.t()));
        Mirror dout = act_mirror(normal(rng, NC));
        const std::vector<float> dinp0 = normal(rng, NC), dw0 = normal(rng, s.C), db0 = normal(rng, s.C);
        Mirror dinp = act_mirror(dinp0), dw = f32_mirror(dw0), db = f32_mirror(db0);
        cpu->layernorm_backward(dinp.cpu.t(), dw.cpu.t(), db.cpu.t(), dout.cpu.t(), inp.cpu.t(), w.cpu.t(),
                                mean.cpu.t(), rstd.cpu.t(), s.N, s.C);
        std::vector<float> first[3];
        for (int run = 0; run < 2; run++) {
            upload(*gpu, dinp.gpu.t(), dinp0);
            upload(*gpu, dw.gpu.t(), dw0);
            upload(*gpu, db.gpu.t(), db0);
            gpu->layernorm_backward(dinp.gpu.t(), dw.gpu.t(), db.gpu.t(), dout.gpu.t(), inp.gpu.t(), w.gpu.t(),
                                    mean.gpu.t(), rstd.gpu.t(), s.N, s.C);
            std::vector<float> got[3] = {download(*gpu, dinp.gpu.t()), download(*gpu, dw.gpu.t()),
                                         download(*gpu, db.gpu.t())};
            if (run == 0) {
                EXPECT_LT(rel_err(got[0], download(*cpu, dinp.cpu.t())), tol()) << "dinp";
                EXPECT_LT(rel_err(got[1], download(*cpu, dw.cpu.t())), grad_tol()) << "dw";
                EXPECT_LT(rel_err(got[2], download(*cpu, db.cpu.t())), grad_tol()) << "db";
                for (int i = 0; i < 3; i++) first[i] = got[i];
            } else {
                for (int i = 0; i < 3; i++) EXPECT_TRUE(bitwise_equal(got[i], first[i])) << "layernorm backward output " << i << " not deterministic";
            }
        }
    }
}

// residual_layernorm_forward: bitwise residual_forward then layernorm_forward on the GPU (the same
// rounded values summed in the same order), and the CPU's within the usual tolerances
TEST_P(CudaOpsP, ResidualLayerNorm) {
    struct Shape { int N, C; };
    for (Shape s : {Shape{1, 8}, Shape{3, 37}, Shape{64, 768}, Shape{1000, 33}}) {
        SCOPED_TRACE(shape_name({{"N", s.N}, {"C", s.C}}));
        const size_t NC = (size_t)s.N * s.C;
        Mirror a = act_mirror(normal(rng, NC, 1.0f, 1.5f)), b = act_mirror(normal(rng, NC));
        Mirror w = act_mirror(uniform(rng, s.C, 0.5f, 1.5f)), bias = act_mirror(uniform(rng, s.C, -0.5f, 0.5f));
        Buffer res_f = gpu_out(act, NC), out_f = gpu_out(act, NC), mean_f = gpu_out(DType::F32, s.N),
               rstd_f = gpu_out(DType::F32, s.N);
        gpu->residual_layernorm_forward(res_f.t(), out_f.t(), mean_f.t(), rstd_f.t(), a.gpu.t(), b.gpu.t(),
                                        w.gpu.t(), bias.gpu.t(), s.N, s.C);
        Buffer res_u = gpu_out(act, NC), out_u = gpu_out(act, NC), mean_u = gpu_out(DType::F32, s.N),
               rstd_u = gpu_out(DType::F32, s.N);
        gpu->residual_forward(res_u.t(), a.gpu.t(), b.gpu.t());
        gpu->layernorm_forward(out_u.t(), mean_u.t(), rstd_u.t(), res_u.t(), w.gpu.t(), bias.gpu.t(), s.N, s.C);
        EXPECT_TRUE(bitwise_equal(download(*gpu, res_f.t()), download(*gpu, res_u.t()))) << "residual";
        EXPECT_TRUE(bitwise_equal(download(*gpu, out_f.t()), download(*gpu, out_u.t()))) << "out";
        EXPECT_TRUE(bitwise_equal(download(*gpu, mean_f.t()), download(*gpu, mean_u.t()))) << "mean";
        EXPECT_TRUE(bitwise_equal(download(*gpu, rstd_f.t()), download(*gpu, rstd_u.t()))) << "rstd";
        Buffer res_c = cpu_out(NC), out_c = cpu_out(NC), mean_c = cpu_out(s.N), rstd_c = cpu_out(s.N);
        cpu->residual_layernorm_forward(res_c.t(), out_c.t(), mean_c.t(), rstd_c.t(), a.cpu.t(), b.cpu.t(),
                                        w.cpu.t(), bias.cpu.t(), s.N, s.C);
        EXPECT_LT(rel_err(download(*gpu, res_f.t()), download(*cpu, res_c.t())), tol()) << "residual vs CPU";
        EXPECT_LT(rel_err(download(*gpu, out_f.t()), download(*cpu, out_c.t())), tol()) << "out vs CPU";
    }
}

// ---------------------------------------------------------------- matmul
TEST_P(CudaOpsP, Matmul) {
    struct Shape { int N, IC, OC; };
    for (Shape s : {Shape{1, 8, 8}, Shape{5, 16, 24}, Shape{64, 96, 72}, Shape{37, 13, 7}, Shape{3, 1, 5},
                    Shape{300, 40, 130}, Shape{128, 768, 2304}}) {
        for (bool with_bias : {true, false}) {
            SCOPED_TRACE(shape_name({{"N", s.N}, {"IC", s.IC}, {"OC", s.OC}, {"bias", with_bias}}));
            const size_t NI = (size_t)s.N * s.IC, NO = (size_t)s.N * s.OC, OI = (size_t)s.OC * s.IC;
            Mirror inp = act_mirror(normal(rng, NI));
            Mirror w = act_mirror(normal(rng, OI, 0.0f, 1.0f / std::sqrt((float)s.IC)));
            Mirror bias = act_mirror(normal(rng, s.OC));
            const Tensor bias_g = with_bias ? bias.gpu.t() : Tensor{}, bias_c = with_bias ? bias.cpu.t() : Tensor{};
            // forward
            Buffer out_g = gpu_out(act, NO), out_c = cpu_out(NO);
            gpu->matmul_forward(out_g.t(), inp.gpu.t(), w.gpu.t(), bias_g, s.N, s.IC, s.OC);
            cpu->matmul_forward(out_c.t(), inp.cpu.t(), w.cpu.t(), bias_c, s.N, s.IC, s.OC);
            EXPECT_LT(rel_err(download(*gpu, out_g.t()), download(*cpu, out_c.t())), tol()) << "out";
            // backward: dinp overwritten (poisoned first), dw and dbias accumulate onto random values
            Mirror dout = act_mirror(normal(rng, NO));
            const std::vector<float> dw0 = normal(rng, OI), dbias0 = normal(rng, s.OC);
            Mirror dw = f32_mirror(dw0), dbias = f32_mirror(dbias0);
            Buffer dinp_g(*gpu, act, NI), dinp_c = cpu_out(NI);
            const Tensor dbias_g = with_bias ? dbias.gpu.t() : Tensor{}, dbias_c = with_bias ? dbias.cpu.t() : Tensor{};
            cpu->matmul_backward(dinp_c.t(), dw.cpu.t(), dbias_c, dout.cpu.t(), inp.cpu.t(), w.cpu.t(), s.N, s.IC, s.OC);
            std::vector<float> first[3];
            for (int run = 0; run < 2; run++) {
                poison(*gpu, dinp_g.t());
                upload(*gpu, dw.gpu.t(), dw0);
                upload(*gpu, dbias.gpu.t(), dbias0);
                gpu->matmul_backward(dinp_g.t(), dw.gpu.t(), dbias_g, dout.gpu.t(), inp.gpu.t(), w.gpu.t(), s.N, s.IC,
                                     s.OC);
                std::vector<float> got[3] = {download(*gpu, dinp_g.t()), download(*gpu, dw.gpu.t()),
                                             download(*gpu, dbias.gpu.t())};
                if (run == 0) {
                    EXPECT_LT(rel_err(got[0], download(*cpu, dinp_c.t())), tol()) << "dinp";
                    EXPECT_LT(rel_err(got[1], download(*cpu, dw.cpu.t())), grad_tol()) << "dw";
                    if (with_bias)
                        EXPECT_LT(rel_err(got[2], download(*cpu, dbias.cpu.t())), grad_tol()) << "dbias";
                    else
                        EXPECT_TRUE(bitwise_equal(got[2], dbias0)) << "dbias touched without a bias";
                    for (int i = 0; i < 3; i++) first[i] = got[i];
                } else {
                    for (int i = 0; i < 3; i++) EXPECT_TRUE(bitwise_equal(got[i], first[i])) << "matmul backward output " << i << " not deterministic";
                }
            }
        }
    }
}

// ---------------------------------------------------------------- the MLP's fused matmul + GELU
// matmul_gelu_forward / matmul_backward_gelu (bf16: GELU in cuBLASLt's epilogue) against the CPU's
// composition (matmul then gelu), on the model's shapes and odd ones (no cuBLASLt algorithm: the
// fallback). The fused bf16 path rounds once where the composition rounds twice: bf16 tolerances.
TEST_P(CudaOpsP, MatmulGelu) {
    struct Shape { int N, IC, OC; };
    for (Shape s : {Shape{64, 96, 384}, Shape{37, 13, 52}, Shape{256, 768, 3072}, Shape{5, 16, 64}}) {
        for (bool with_bias : {true, false}) {
            SCOPED_TRACE(shape_name({{"N", s.N}, {"IC", s.IC}, {"OC", s.OC}, {"bias", with_bias}}));
            const size_t NI = (size_t)s.N * s.IC, NO = (size_t)s.N * s.OC, OI = (size_t)s.OC * s.IC;
            Mirror inp = act_mirror(normal(rng, NI));
            Mirror w = act_mirror(normal(rng, OI, 0.0f, 1.0f / std::sqrt((float)s.IC)));
            Mirror bias = act_mirror(normal(rng, s.OC));
            const Tensor bias_g = with_bias ? bias.gpu.t() : Tensor{}, bias_c = with_bias ? bias.cpu.t() : Tensor{};
            Buffer act_g = gpu_out(act, NO), pre_g = gpu_out(act, NO), act_c = cpu_out(NO), pre_c = cpu_out(NO);
            gpu->matmul_gelu_forward(act_g.t(), pre_g.t(), inp.gpu.t(), w.gpu.t(), bias_g, s.N, s.IC, s.OC);
            cpu->matmul_gelu_forward(act_c.t(), pre_c.t(), inp.cpu.t(), w.cpu.t(), bias_c, s.N, s.IC, s.OC);
            EXPECT_LT(rel_err(download(*gpu, pre_g.t()), download(*cpu, pre_c.t())), tol()) << "pre";
            EXPECT_LT(rel_err(download(*gpu, act_g.t()), download(*cpu, act_c.t())), tol()) << "act";
            // backward of the next layer (OC -> IC = this OC) through the GELU: a layer whose input is
            // act (N, OC) and output (N, IC2)
            const int IC2 = s.OC, OC2 = s.IC;
            Mirror w2 = act_mirror(normal(rng, (size_t)OC2 * IC2, 0.0f, 1.0f / std::sqrt((float)IC2)));
            Mirror dout = act_mirror(normal(rng, (size_t)s.N * OC2));
            Mirror pre = act_mirror(download(*cpu, pre_c.t())), a = act_mirror(download(*cpu, act_c.t()));
            const std::vector<float> dw0 = normal(rng, (size_t)OC2 * IC2), db0 = normal(rng, OC2);
            Mirror dw = f32_mirror(dw0), db = f32_mirror(db0);
            Buffer dinp_g(*gpu, act, NO), dinp_c = cpu_out(NO);
            cpu->matmul_backward_gelu(dinp_c.t(), dw.cpu.t(), db.cpu.t(), dout.cpu.t(), a.cpu.t(), w2.cpu.t(),
                                      pre.cpu.t(), s.N, IC2, OC2);
            std::vector<float> first;
            for (int run = 0; run < 2; run++) {
                poison(*gpu, dinp_g.t());
                upload(*gpu, dw.gpu.t(), dw0);
                upload(*gpu, db.gpu.t(), db0);
                gpu->matmul_backward_gelu(dinp_g.t(), dw.gpu.t(), db.gpu.t(), dout.gpu.t(), a.gpu.t(), w2.gpu.t(),
                                          pre.gpu.t(), s.N, IC2, OC2);
                const std::vector<float> got = download(*gpu, dinp_g.t());
                if (run == 0) {
                    EXPECT_LT(rel_err(got, download(*cpu, dinp_c.t())), tol()) << "dinp";
                    EXPECT_LT(rel_err(download(*gpu, dw.gpu.t()), download(*cpu, dw.cpu.t())), grad_tol()) << "dw";
                    EXPECT_LT(rel_err(download(*gpu, db.gpu.t()), download(*cpu, db.cpu.t())), grad_tol()) << "db";
                    first = got;
                } else {
                    EXPECT_TRUE(bitwise_equal(got, first)) << "fused backward not deterministic";
                }
            }
        }
    }
}

// ---------------------------------------------------------------- GELU
TEST_P(CudaOpsP, Gelu) {
    for (size_t n : {size_t(1), size_t(37), size_t(100003)}) {
        SCOPED_TRACE(shape_name({{"n", (long)n}}));
        Mirror inp = act_mirror(normal(rng, n, 0.0f, 2.0f));
        Buffer out_g = gpu_out(act, n), out_c = cpu_out(n);
        gpu->gelu_forward(out_g.t(), inp.gpu.t());
        cpu->gelu_forward(out_c.t(), inp.cpu.t());
        EXPECT_LT(rel_err(download(*gpu, out_g.t()), download(*cpu, out_c.t())), tol()) << "forward";

        Mirror dout = act_mirror(normal(rng, n));
        Buffer dinp_g = gpu_out(act, n), dinp_c = cpu_out(n);
        gpu->gelu_backward(dinp_g.t(), inp.gpu.t(), dout.gpu.t());
        cpu->gelu_backward(dinp_c.t(), inp.cpu.t(), dout.cpu.t());
        const std::vector<float> ref = download(*cpu, dinp_c.t()), got = download(*gpu, dinp_g.t());
        EXPECT_LT(rel_err(got, ref), tol()) << "backward";
        // in place (dinp aliases dout), as the model calls it; elementwise, so the same bits
        gpu->gelu_backward(dout.gpu.t(), inp.gpu.t(), dout.gpu.t());
        EXPECT_TRUE(bitwise_equal(download(*gpu, dout.gpu.t()), got)) << "in-place backward differs";
    }
}

// ---------------------------------------------------------------- residual
TEST_P(CudaOpsP, ResidualAndAddInplace) {
    for (size_t n : {size_t(1), size_t(37), size_t(100003)}) {
        SCOPED_TRACE(shape_name({{"n", (long)n}}));
        Mirror a = act_mirror(normal(rng, n)), b = act_mirror(normal(rng, n));
        Buffer out_g = gpu_out(act, n), out_c = cpu_out(n);
        gpu->residual_forward(out_g.t(), a.gpu.t(), b.gpu.t());
        cpu->residual_forward(out_c.t(), a.cpu.t(), b.cpu.t());
        EXPECT_LT(rel_err(download(*gpu, out_g.t()), download(*cpu, out_c.t())), tol()) << "residual";
        // acc (act) += x (act)
        gpu->add_inplace(a.gpu.t(), b.gpu.t());
        cpu->add_inplace(a.cpu.t(), b.cpu.t());
        EXPECT_LT(rel_err(download(*gpu, a.gpu.t()), download(*cpu, a.cpu.t())), tol()) << "add_inplace";
        // mixed dtypes: fp32 acc += act x, and act acc += fp32 x
        const std::vector<float> acc0 = normal(rng, n);
        Buffer acc32(*gpu, DType::F32, n);
        upload(*gpu, acc32.t(), acc0);
        gpu->add_inplace(acc32.t(), b.gpu.t());
        std::vector<float> expect(n);
        for (size_t i = 0; i < n; i++) expect[i] = (float)((double)acc0[i] + b.host[i]);
        EXPECT_LT(rel_err(download(*gpu, acc32.t()), expect), 1e-6) << "fp32 += act";
        Mirror x32 = f32_mirror(normal(rng, n));
        const std::vector<float> before = download(*gpu, b.gpu.t());
        gpu->add_inplace(b.gpu.t(), x32.gpu.t());
        for (size_t i = 0; i < n; i++) expect[i] = (float)((double)before[i] + x32.host[i]);
        EXPECT_LT(rel_err(download(*gpu, b.gpu.t()), expect), tol()) << "act += fp32";
    }
}

// ---------------------------------------------------------------- cross-entropy
TEST_P(CudaOpsP, CrossEntropy) {
    struct Shape { int N, V, Vp; };
    for (Shape s : {Shape{1, 5, 8}, Shape{7, 100, 128}, Shape{33, 1000, 1024}, Shape{4, 50257, 50304},
                    Shape{3, 37, 37}}) {
        SCOPED_TRACE(shape_name({{"N", s.N}, {"V", s.V}, {"Vp", s.Vp}}));
        const size_t NV = (size_t)s.N * s.Vp;
        // std 1: no row's loss is tiny, where fp32 log(1 + δ) differs from the fp64 reference by > 1e-5
        std::vector<float> values = normal(rng, NV, 0.0f, 1.0f);
        // padding columns hold garbage (NaN): they must be excluded and get a zero gradient
        for (int r = 0; r < s.N; r++)
            for (int c = s.V; c < s.Vp; c++) values[(size_t)r * s.Vp + c] = std::nanf("");
        IntMirror targets = int_mirror(*gpu, *cpu, random_ints(rng, s.N, 0, s.V));
        const float dloss = 1.0f / s.N;
        for (bool backward : {false, true}) {
            SCOPED_TRACE(backward ? "with backward" : "forward only");
            Mirror logits = act_mirror(values);
            Buffer losses_g = gpu_out(DType::F32, s.N), losses_c = cpu_out(s.N);
            gpu->crossentropy(logits.gpu.t(), losses_g.t(), targets.gpu.ints(), s.N, s.V, s.Vp, dloss, backward);
            cpu->crossentropy(logits.cpu.t(), losses_c.t(), targets.cpu.ints(), s.N, s.V, s.Vp, dloss, backward);
            EXPECT_LT(rel_err(download(*gpu, losses_g.t()), download(*cpu, losses_c.t())), 1e-5) << "losses";
            const std::vector<float> got = download(*gpu, logits.gpu.t());
            if (!backward) {
                EXPECT_TRUE(bitwise_equal(got, logits.host)) << "forward-only crossentropy changed the logits";
                continue;
            }
            EXPECT_LT(rel_err(got, download(*cpu, logits.cpu.t())), tol()) << "dlogits";
            bool padding_zero = true;
            for (int r = 0; r < s.N; r++)
                for (int c = s.V; c < s.Vp; c++) padding_zero &= got[(size_t)r * s.Vp + c] == 0.0f;
            EXPECT_TRUE(padding_zero) << "padding columns must get a zero gradient";
            // determinism
            Mirror again = act_mirror(values);
            gpu->crossentropy(again.gpu.t(), losses_g.t(), targets.gpu.ints(), s.N, s.V, s.Vp, dloss, true);
            EXPECT_TRUE(bitwise_equal(download(*gpu, again.gpu.t()), got)) << "crossentropy not deterministic";
        }
    }
}

// ---------------------------------------------------------------- RoPE
TEST_P(CudaOpsP, Rope) {
    struct Shape { int B, T, H, d; };
    for (Shape s : {Shape{1, 1, 1, 2}, Shape{2, 17, 3, 16}, Shape{2, 64, 4, 64}, Shape{1, 40, 2, 6}}) {
        SCOPED_TRACE(shape_name({{"B", s.B}, {"T", s.T}, {"H", s.H}, {"d", s.d}}));
        const size_t n = (size_t)s.B * s.T * 3 * s.H * s.d;
        const float theta = 10000.0f;
        for (bool inverse : {false, true}) {
            SCOPED_TRACE(inverse ? "inverse" : "forward");
            Mirror qkv = act_mirror(normal(rng, n));
            gpu->rope(qkv.gpu.t(), s.B, s.T, s.H, s.d, theta, inverse);
            cpu->rope(qkv.cpu.t(), s.B, s.T, s.H, s.d, theta, inverse);
            const std::vector<float> got = download(*gpu, qkv.gpu.t());
            EXPECT_LT(rel_err(got, download(*cpu, qkv.cpu.t())), act == DType::F32 ? 2e-5 : tol());
            // v is untouched
            bool v_same = true;
            const size_t hd = (size_t)s.H * s.d;
            for (size_t row = 0; row < (size_t)s.B * s.T; row++)
                for (size_t i = 0; i < hd; i++) v_same &= got[row * 3 * hd + 2 * hd + i] == qkv.host[row * 3 * hd + 2 * hd + i];
            EXPECT_TRUE(v_same) << "rope changed v";
        }
        if (act == DType::F32) {  // the inverse undoes the forward
            std::vector<float> x = normal(rng, n);
            Buffer b(*gpu, DType::F32, n);
            upload(*gpu, b.t(), x);
            gpu->rope(b.t(), s.B, s.T, s.H, s.d, theta, false);
            gpu->rope(b.t(), s.B, s.T, s.H, s.d, theta, true);
            EXPECT_LT(rel_err(download(*gpu, b.t()), x), 1e-6) << "inverse(forward(x)) != x";
        }
    }
}

// ---------------------------------------------------------------- optimizer
TEST_P(CudaOpsP, SumSquares) {
    for (size_t n : {size_t(1), size_t(1000), size_t(3000001)}) {
        SCOPED_TRACE(shape_name({{"n", (long)n}}));
        Mirror g = f32_mirror(normal(rng, n));
        const double got = gpu->sum_squares(g.gpu.t()), ref = cpu->sum_squares(g.cpu.t());
        EXPECT_LT(std::fabs(got - ref) / ref, 1e-10);
        const double again = gpu->sum_squares(g.gpu.t());
        EXPECT_EQ(std::memcmp(&got, &again, sizeof(double)), 0) << "sum_squares not deterministic";
    }
}

TEST_P(CudaOpsP, AdamW) {
    for (size_t n : {size_t(1), size_t(1000), size_t(100003)}) {
        SCOPED_TRACE(shape_name({{"n", (long)n}}));
        const std::vector<float> p0 = normal(rng, n, 0.0f, 0.5f);
        Mirror grads = f32_mirror(normal(rng, n));
        Mirror m = f32_mirror(normal(rng, n, 0.0f, 0.1f));
        Mirror v = f32_mirror(uniform(rng, n, 0.0f, 0.01f));
        const AdamWStep step{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.5f};
        // CPU: fp32 params updated in place
        Buffer p_c(*cpu, DType::F32, n);
        upload(*cpu, p_c.t(), p0);
        cpu->adamw(p_c.t(), Tensor{}, grads.cpu.t(), m.cpu.t(), v.cpu.t(), step);
        // GPU: fp32 master + act params (bf16 precision), or fp32 params alone
        Buffer params_g(*gpu, act, n);
        upload(*gpu, params_g.t(), p0);
        Buffer master_g(*gpu, DType::F32, gpu->has_master_weights() ? n : 0);
        const Tensor master_t = gpu->has_master_weights() ? master_g.t() : Tensor{};
        if (gpu->has_master_weights()) upload(*gpu, master_g.t(), p0);
        gpu->adamw(params_g.t(), master_t, grads.gpu.t(), m.gpu.t(), v.gpu.t(), step);

        const std::vector<float> ref = download(*cpu, p_c.t());
        const std::vector<float> got = download(*gpu, gpu->has_master_weights() ? master_g.t() : params_g.t());
        EXPECT_LT(rel_err(got, ref), 1e-6) << "updated weights";
        std::vector<float> got_delta(n), ref_delta(n);  // the update itself, more sensitive
        for (size_t i = 0; i < n; i++) {
            got_delta[i] = got[i] - p0[i];
            ref_delta[i] = ref[i] - p0[i];
        }
        EXPECT_LT(rel_err(got_delta, ref_delta), 1e-3) << "update";
        EXPECT_LT(rel_err(download(*gpu, m.gpu.t()), download(*cpu, m.cpu.t())), 1e-6) << "m";
        EXPECT_LT(rel_err(download(*gpu, v.gpu.t()), download(*cpu, v.cpu.t())), 1e-6) << "v";
        if (gpu->has_master_weights()) {  // params are the round-to-nearest copy of the master
            EXPECT_TRUE(bitwise_equal(download(*gpu, params_g.t()), stored_values(*gpu, act, got)))
                << "bf16 params are not the rounded master weights";
        }
    }
}

// ---------------------------------------------------------------- attention registry
TEST_P(CudaOpsP, UnknownAttentionListsVariants) {
    AttnConfig cfg;
    cfg.name = "no-such-attention";
    try {
        gpu->make_attention(cfg);
        GTEST_FAIL() << "unknown attention accepted";
    } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("no-such-attention"), std::string::npos) << msg;
        EXPECT_NE(msg.find("softmax"), std::string::npos) << msg;
    }
}

INSTANTIATE_TEST_SUITE_P(CudaOps, CudaOpsP, ::testing::Values(DType::F32, DType::BF16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                             return std::string(precision_name(info.param));
                         });

}  // namespace
