// Helpers shared by the GPU test suites (tests/gpu/): a fresh printed seed per test, buffers owned
// by an Ops backend, random fills, NaN poisoning of outputs, "mirrors" (the same values on the
// GPU in its dtype and on the CPU reference in fp32, so both backends see identical inputs after
// bf16 rounding), and the comparison ‖got − ref‖ / ‖ref‖ in double.
// Only needs src/ops.h: the tests compile with the host compiler, without CUDA headers.
// Include it before <gtest/gtest.h>: gtest's FAIL() would clash with check.h's FAIL, so it is
// switched off here (use GTEST_FAIL / ADD_FAILURE).
#pragma once
#ifndef GTEST_DONT_DEFINE_FAIL
#define GTEST_DONT_DEFINE_FAIL 1
#endif
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

// gtest included earlier (by a test that includes it first) defined FAIL(): give FAIL back to
// check.h, whose CHECK macro expands to it.
#ifdef FAIL
#undef FAIL
#endif
#include "check.h"
#ifndef FAIL
#define FAIL(...) throw Error(strformat(__VA_ARGS__))
#endif
#include "attention.h"
#include "ops.h"

namespace gpu_test {

// A fresh seed for this test, printed so a failure can be reproduced with GPU_TEST_SEED=<seed>.
inline uint32_t fresh_seed() {
    uint32_t seed;
    if (const char* env = std::getenv("GPU_TEST_SEED"))
        seed = (uint32_t)std::strtoul(env, nullptr, 10);
    else
        seed = std::random_device{}();
    std::printf("[   SEED   ] %u (rerun with GPU_TEST_SEED=%u)\n", seed, seed);
    ::testing::Test::RecordProperty("seed", std::to_string(seed));
    return seed;
}

// n elements of `dtype` allocated by (and freed through) an Ops backend. Int buffers (tokens,
// targets) use DType::F32 for the 4-byte element size and ints().
class Buffer {
public:
    Buffer(Ops& ops, DType dtype, size_t n, const std::string& what = "test buffer")
        : ops_(&ops), t_{ops.alloc(n * dtype_size(dtype), what), dtype, n} {}
    ~Buffer() {
        if (t_.ptr) ops_->release(t_.ptr);
    }
    Buffer(Buffer&& o) noexcept : ops_(o.ops_), t_(o.t_) { o.t_.ptr = nullptr; }
    Buffer& operator=(Buffer&& o) noexcept {
        std::swap(ops_, o.ops_);
        std::swap(t_, o.t_);
        return *this;
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    Tensor t() const { return t_; }
    int* ints() const { return static_cast<int*>(t_.ptr); }
    size_t n() const { return t_.n; }

private:
    Ops* ops_;
    Tensor t_;
};

inline std::vector<float> uniform(std::mt19937& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}
inline std::vector<float> normal(std::mt19937& rng, size_t n, float mean = 0.0f, float stddev = 1.0f) {
    std::normal_distribution<float> dist(mean, stddev);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}
inline std::vector<int> random_ints(std::mt19937& rng, size_t n, int lo, int hi_exclusive) {
    std::uniform_int_distribution<int> dist(lo, hi_exclusive - 1);
    std::vector<int> v(n);
    for (int& x : v) x = dist(rng);
    return v;
}

inline std::vector<float> download(Ops& ops, Tensor t) {
    std::vector<float> v(t.n);
    ops.download(v.data(), t);
    return v;
}
inline void upload(Ops& ops, Tensor t, const std::vector<float>& v) {
    CHECK(v.size() == t.n, "test upload of %zu values into %zu", v.size(), t.n);
    ops.upload(t, v.data());
}

// Fills t with NaN (in fp32 and in bf16 alike: what cudaMemset 0xFF gives), so an output element a
// kernel forgets to write shows up as a NaN in the comparison.
inline void poison(Ops& ops, Tensor t) {
    std::vector<float> nan(t.n, std::numeric_limits<float>::quiet_NaN());
    ops.upload(t, nan.data());
}

// The values as `ops` stores them in `dtype` (bf16 rounding included): a round trip.
inline std::vector<float> stored_values(Ops& ops, DType dtype, const std::vector<float>& v) {
    Buffer b(ops, dtype, v.size(), "round trip");
    upload(ops, b.t(), v);
    return download(ops, b.t());
}

// The same values on both backends: `gpu` in the GPU dtype, `cpu` in fp32 holding exactly what
// the GPU stores, `host` = those values.
struct Mirror {
    Buffer gpu, cpu;
    std::vector<float> host;
};
inline Mirror mirror(Ops& gpu, DType dtype, Ops& cpu, const std::vector<float>& values) {
    Buffer g(gpu, dtype, values.size(), "mirror gpu");
    upload(gpu, g.t(), values);
    std::vector<float> host = download(gpu, g.t());
    Buffer c(cpu, DType::F32, values.size(), "mirror cpu");
    upload(cpu, c.t(), host);
    return Mirror{std::move(g), std::move(c), std::move(host)};
}
// Ints (tokens, targets) on both backends.
struct IntMirror {
    Buffer gpu, cpu;
    std::vector<int> host;
};
inline IntMirror int_mirror(Ops& gpu, Ops& cpu, const std::vector<int>& values) {
    Buffer g(gpu, DType::F32, values.size(), "int mirror gpu");
    gpu.upload_ints(g.ints(), values.data(), values.size());
    Buffer c(cpu, DType::F32, values.size(), "int mirror cpu");
    cpu.upload_ints(c.ints(), values.data(), values.size());
    return IntMirror{std::move(g), std::move(c), values};
}

// ‖got − ref‖₂ / ‖ref‖₂ in double; +inf if got holds a NaN or Inf (an element left unwritten or
// broken); ‖got‖₂ when ref is all zero.
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
    if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
        const double d = (double)got[i] - (double)ref[i];
        diff += d * d;
        norm += (double)ref[i] * ref[i];
    }
    return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// ‖got − ref‖ / max(‖ref‖, floor_rms·sqrt(n)); +inf if got holds a NaN or Inf. For gradients that
// can be zero by math (e.g. dq, dk at T = 1, where o = v), where only rounding noise is left.
inline double rel_err_floor(const std::vector<float>& got, const std::vector<float>& ref, double floor_rms) {
    const double err = rel_err(got, ref);
    if (!std::isfinite(err)) return err;
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < got.size(); i++) {
        const double d = (double)got[i] - (double)ref[i];
        diff += d * d;
        norm += (double)ref[i] * ref[i];
    }
    return std::sqrt(diff) / std::max(std::sqrt(norm), floor_rms * std::sqrt((double)ref.size()));
}

// Root mean square of x in double (0 for an empty x): the scale of a tensor, for rel_err_floor.
inline double rms(const std::vector<float>& x) {
    double sum = 0.0;
    for (float v : x) sum += (double)v * v;
    return std::sqrt(sum / std::max<size_t>(1, x.size()));
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Tolerances of ‖gpu − cpu‖/‖cpu‖ for outputs stored in `dtype`: fp32 kernels differ from the
// fp64-accumulating CPU reference by summation order only (no TF32); bf16 outputs by their
// rounding (2^-9 relative at most).
inline double output_tolerance(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-2; }

inline const char* precision_name(DType dtype) { return dtype == DType::F32 ? "fp32" : "bf16"; }

// ---------------------------------------------------------------- attention-variant suites
inline float round_bf16(float x) {  // round to nearest even, as __float2bfloat16_rn
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float y;
    std::memcpy(&y, &u, 4);
    return y;
}

// One CUDA backend per precision for the whole test binary.
inline Ops& cuda_ops(DType dt) {
    static std::unique_ptr<Ops> bf16_ops, f32_ops;
    std::unique_ptr<Ops>& ops = dt == DType::BF16 ? bf16_ops : f32_ops;
    if (!ops) ops = make_cuda_ops(dt);
    return *ops;
}

// How a (B,H,T,d) tensor sits in its device buffer: contiguous, or as one of the three parts of
// the fused (B,T,3,H,d) qkv buffer (part 0,1,2 = q,k,v) / the (B,T,H,d) attention output.
struct Layout {
    int B, H, T, d;
    bool fused;
    // element offset of (b,h,t,i) of part `part` (of `parts`: 3 for qkv, 1 for o)
    size_t offset(int part, int parts, int b, int h, int t) const {
        if (!fused) return (((size_t)part * B + b) * H + h) * (size_t)T * d + (size_t)t * d;
        return (((size_t)b * T + t) * parts + part) * (size_t)H * d + (size_t)h * d;
    }
    HeadTensor view(const Tensor& buf, int part, int parts) const {
        char* base = static_cast<char*>(buf.ptr) + offset(part, parts, 0, 0, 0) * dtype_size(buf.dtype);
        if (!fused) return HeadTensor{base, buf.dtype, (int64_t)H * T * d, (int64_t)T * d, d};
        return HeadTensor{base, buf.dtype, (int64_t)T * parts * H * d, d, (int64_t)parts * H * d};
    }
    // canonical (parts × B,H,T,d) host data <-> the buffer's host image
    std::vector<float> scatter(const std::vector<float>& canon, int parts) const {
        std::vector<float> img(canon.size());
        for_each(parts, [&](size_t c, size_t o) { img[o] = canon[c]; });
        return img;
    }
    std::vector<float> gather(const std::vector<float>& img, int parts) const {
        std::vector<float> canon(img.size());
        for_each(parts, [&](size_t c, size_t o) { canon[c] = img[o]; });
        return canon;
    }
    template <typename Fn>
    void for_each(int parts, Fn fn) const {
        size_t c = 0;
        for (int p = 0; p < parts; p++)
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < T; t++)
                        for (int i = 0; i < d; i++, c++) fn(c, offset(p, parts, b, h, t) + i);
    }
};

// part `part` of `v` cut into pieces of n elements
inline std::vector<float> slice(const std::vector<float>& v, size_t part, size_t n) {
    return std::vector<float>(v.begin() + part * n, v.begin() + (part + 1) * n);
}

}  // namespace gpu_test
