// Tests of the Hopper warpgroup MMA building blocks (cuda/attention/wgmma.cuh), the first step
// towards a FlashAttention-3-style kernel. Each GPU kernel is one warpgroup (128 threads):
//   WgmmaGemm.*   C (64 x N) = A (64 x K) · B for N, K in {64, 128}:
//                 SS_BK   A and B in shared memory, B stored N x K (K-major: K in S = Q·Kᵀ)
//                 SS_BMN  B stored K x N row-major (MN-major, imm-trans-b: V in O = P·V)
//                 RS_BMN  A from registers (P in P·V), B MN-major
//                 RS_BK   A from registers, B K-major
//                 SS_AMN  A stored K x 64 (MN-major, imm-trans-a: dSᵀ in dK = dSᵀ·Q), B MN-major
//   WgmmaChain.*  S = Q·Kᵀ (SS) then O = bf16(S)·V (RS, P straight from S's accumulators, as in
//                 the flash forward). Q and K hold -1, 0, 1, so S is exact and must match bit
//                 for bit, and bf16(S) = S.
//   WgmmaLayout.* CPU only (run anywhere): the swizzled tile is a permutation of 16-byte chunks;
//                 the descriptor fields sit at the PTX ISA bit positions; and a model of the
//                 hardware's operand addressing (the canonical 128B-swizzle layouts of the PTX ISA
//                 and CUTLASS) from our descriptors finds every operand element where the tile
//                 put it, for every k16 slice.
// A is written to shared memory by ordinary stores and B by cp.async, so both ways of filling a
// tile for wgmma (each followed by fence.proxy.async) are exercised.
// Inputs are fresh random bf16 (seed printed), outputs poisoned with NaN, and the accumulators
// start as NaN (the first k16 slice runs with scale-d = 0 and must overwrite them). Reference:
// a double product on the CPU. Products of bf16 values are exact in fp32, so only the fp32
// summation differs: ‖gpu − cpu‖/‖cpu‖ <= 1e-5, and every element within 1e-4 · Σ_k |a·b|.
// GPU cases skip on a GPU whose compute capability is not 9.x (wgmma is sm_90a only).
#include "gpu_test_util.h"  // first: gtest without its FAIL, then check.h

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/attention/wgmma.cuh"
#include "cuda/common.cuh"

namespace {

using wgmma::kTileAlign;
using wgmma::kWarpgroupThreads;
using wgmma::SwizzledTile;

// ================================================================ device side
// dynamic shared memory from its first 1024-byte boundary (launches allocate kTileAlign extra)
__device__ __forceinline__ char* aligned_smem(char* raw) {
    const uint32_t addr = smem_addr(raw);
    return raw + (kTileAlign - addr % kTileAlign) % kTileAlign;
}

__device__ __forceinline__ void fill_nan(float* d, int n) {
    for (int i = 0; i < n; ++i) d[i] = __int_as_float(0x7fffffff);
}

// two consecutive bf16 of global memory as one register (the lower column in the low half)
__device__ __forceinline__ uint32_t load_pair(const bf16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// accumulators (64 x N, layout in wgmma.cuh) -> row-major c (64 x N)
template <int N>
__device__ __forceinline__ void store_acc(float* c, const float (&d)[N / 2], int tid) {
    const int w = tid / 32, lane = tid % 32, g = lane / 4, cq = lane % 4;
    const int r0 = 16 * w + g, r1 = r0 + 8;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        const int col = 8 * j + 2 * cq;
        *reinterpret_cast<float2*>(c + r0 * N + col) = make_float2(d[4 * j], d[4 * j + 1]);
        *reinterpret_cast<float2*>(c + r1 * N + col) = make_float2(d[4 * j + 2], d[4 * j + 3]);
    }
}

// Where A comes from: shared memory K-major (stored 64 x K), shared memory MN-major (stored
// K x 64), or registers (fragments read from the 64 x K matrix in global memory).
enum class AKind { kSmemK, kSmemMN, kRegs };

template <int N, int K, AKind kA, bool kBMN>
struct GemmShapes {
    using TileA =
        std::conditional_t<kA == AKind::kSmemMN, SwizzledTile<K, 64>, SwizzledTile<64, K>>;
    using TileB = std::conditional_t<kBMN, SwizzledTile<K, N>, SwizzledTile<N, K>>;
    static constexpr int kSmem =
        TileB::kBytes + (kA == AKind::kRegs ? 0 : TileA::kBytes) + kTileAlign;
};

// One warpgroup: c (64 x N, row-major fp32) = A · B, where
//   a = A (64 x K, row-major) for kSmemK and kRegs, Aᵀ (K x 64, row-major) for kSmemMN;
//   b = B (K x N, row-major) when kBMN, Bᵀ (N x K, row-major) otherwise.
// *misaligned is set when a tile does not start on a 1024-byte boundary.
template <int N, int K, AKind kA, bool kBMN>
__global__ void __launch_bounds__(kWarpgroupThreads, 1)
    gemm_kernel(const bf16* __restrict__ a, const bf16* __restrict__ b, float* __restrict__ c,
                int* __restrict__ misaligned) {
    using Shapes = GemmShapes<N, K, kA, kBMN>;
    using TileA = typename Shapes::TileA;
    using TileB = typename Shapes::TileB;
    extern __shared__ char smem_raw[];
    char* smem = aligned_smem(smem_raw);
    bf16* tile_b = reinterpret_cast<bf16*>(smem);
    bf16* tile_a = reinterpret_cast<bf16*>(smem + TileB::kBytes);  // unused for kRegs
    const int tid = threadIdx.x;
    if (tid == 0 && (smem_addr(tile_a) % kTileAlign != 0 || smem_addr(tile_b) % kTileAlign != 0))
        *misaligned = 1;

    wgmma::load_tile_async<TileB, kWarpgroupThreads>(tile_b, b, TileB::kCols, TileB::kRows, tid);
    cp_async_commit();
    uint32_t af[K / 16][4];  // kRegs: this thread's A fragments, one per k16 slice
    if constexpr (kA == AKind::kRegs) {
        const int w = tid / 32, lane = tid % 32, g = lane / 4, cq = lane % 4;
        const int r0 = 16 * w + g, r1 = r0 + 8;
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
            const int c0 = 16 * kk + 2 * cq, c1 = c0 + 8;
            af[kk][0] = load_pair(a + r0 * K + c0);
            af[kk][1] = load_pair(a + r1 * K + c0);
            af[kk][2] = load_pair(a + r0 * K + c1);
            af[kk][3] = load_pair(a + r1 * K + c1);
        }
    } else {
        wgmma::load_tile_sync<TileA, kWarpgroupThreads>(tile_a, a, TileA::kCols, TileA::kRows, tid);
    }
    cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();

    float acc[N / 2];
    fill_nan(acc, N / 2);
    const uint32_t a_addr = smem_addr(tile_a), b_addr = smem_addr(tile_b);
    const uint64_t desc_a0 =
        kA == AKind::kSmemMN ? wgmma::desc_mn_major<TileA>(a_addr) : wgmma::desc_k_major(a_addr);
    const uint64_t desc_b0 =
        kBMN ? wgmma::desc_mn_major<TileB>(b_addr) : wgmma::desc_k_major(b_addr);
    wgmma::fence_operand(acc);
    if constexpr (kA == AKind::kRegs) {
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) wgmma::fence_operand(af[kk]);
    }
    wgmma::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        const uint64_t desc_b =
            wgmma::desc_advance(desc_b0, kBMN ? wgmma::mn_major_slice_bytes(kk)
                                              : wgmma::k_major_slice_bytes<TileB>(kk));
        if constexpr (kA == AKind::kRegs) {
            wgmma::mma_rs<N, kBMN ? 1 : 0>(acc, af[kk], desc_b, kk > 0);
        } else {
            const uint64_t desc_a = wgmma::desc_advance(
                desc_a0, kA == AKind::kSmemMN ? wgmma::mn_major_slice_bytes(kk)
                                              : wgmma::k_major_slice_bytes<TileA>(kk));
            wgmma::mma_ss<N, kA == AKind::kSmemMN ? 1 : 0, kBMN ? 1 : 0>(acc, desc_a, desc_b,
                                                                         kk > 0);
        }
    }
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operand(acc);
    store_acc<N>(c, acc, tid);
}

template <int DQK, int NK, int DV>
struct ChainShapes {
    using TileQ = SwizzledTile<64, DQK>;
    using TileK = SwizzledTile<NK, DQK>;
    using TileV = SwizzledTile<NK, DV>;
    static constexpr int kSmem = TileQ::kBytes + TileK::kBytes + TileV::kBytes + kTileAlign;
};

// One warpgroup, the two matmuls of a flash forward step: s = q·kᵀ (64 x NK; q 64 x DQK, k NK x
// DQK), then o = bf16(s)·v (64 x DV; v NK x DV), all row-major.
template <int DQK, int NK, int DV>
__global__ void __launch_bounds__(kWarpgroupThreads, 1)
    chain_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                 float* __restrict__ s_out, float* __restrict__ o_out,
                 int* __restrict__ misaligned) {
    using Shapes = ChainShapes<DQK, NK, DV>;
    using TileQ = typename Shapes::TileQ;
    using TileK = typename Shapes::TileK;
    using TileV = typename Shapes::TileV;
    extern __shared__ char smem_raw[];
    char* smem = aligned_smem(smem_raw);
    bf16* tile_k = reinterpret_cast<bf16*>(smem);
    bf16* tile_v = reinterpret_cast<bf16*>(smem + TileK::kBytes);
    bf16* tile_q = reinterpret_cast<bf16*>(smem + TileK::kBytes + TileV::kBytes);
    const int tid = threadIdx.x;
    if (tid == 0 && (smem_addr(tile_q) % kTileAlign != 0 || smem_addr(tile_k) % kTileAlign != 0 ||
                     smem_addr(tile_v) % kTileAlign != 0))
        *misaligned = 1;

    wgmma::load_tile_async<TileQ, kWarpgroupThreads>(tile_q, q, DQK, 64, tid);
    wgmma::load_tile_async<TileK, kWarpgroupThreads>(tile_k, k, DQK, NK, tid);
    wgmma::load_tile_async<TileV, kWarpgroupThreads>(tile_v, v, DV, NK, tid);
    cp_async_commit();
    cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();

    // S = Q·Kᵀ: both operands K-major
    float s[NK / 2];
    fill_nan(s, NK / 2);
    const uint64_t desc_q0 = wgmma::desc_k_major(smem_addr(tile_q));
    const uint64_t desc_k0 = wgmma::desc_k_major(smem_addr(tile_k));
    wgmma::fence_operand(s);
    wgmma::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < DQK / 16; ++kk)
        wgmma::mma_ss<NK, 0, 0>(
            s, wgmma::desc_advance(desc_q0, wgmma::k_major_slice_bytes<TileQ>(kk)),
            wgmma::desc_advance(desc_k0, wgmma::k_major_slice_bytes<TileK>(kk)), kk > 0);
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operand(s);
    store_acc<NK>(s_out, s, tid);

    // O = P·V: P from S's accumulators (bf16 A fragments), V MN-major
    uint32_t p[NK / 16][4];
#pragma unroll
    for (int kk = 0; kk < NK / 16; ++kk) wgmma::acc_to_a(p[kk], s, kk);
    float o[DV / 2];
    fill_nan(o, DV / 2);
    const uint64_t desc_v0 = wgmma::desc_mn_major<TileV>(smem_addr(tile_v));
    wgmma::fence_operand(o);
#pragma unroll
    for (int kk = 0; kk < NK / 16; ++kk) wgmma::fence_operand(p[kk]);
    wgmma::warpgroup_fence();
#pragma unroll
    for (int kk = 0; kk < NK / 16; ++kk)
        wgmma::mma_rs<DV, 1>(o, p[kk],
                             wgmma::desc_advance(desc_v0, wgmma::mn_major_slice_bytes(kk)), kk > 0);
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::fence_operand(o);
    store_acc<DV>(o_out, o, tid);
}

// ================================================================ host side
// Empty when this GPU runs sm_90a code; otherwise why the GPU cases skip.
std::string not_hopper() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        (void)cudaGetLastError();  // clear the sticky "no device" error
        return "no CUDA device";
    }
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    if (prop.major != 9)
        return strformat("wgmma needs compute capability 9.x (sm_90a); %s is %d.%d", prop.name,
                         prop.major, prop.minor);
    return "";
}
#define SKIP_UNLESS_HOPPER()                     \
    do {                                         \
        const std::string why_ = not_hopper();   \
        if (!why_.empty()) GTEST_SKIP() << why_; \
    } while (0)

// n elements of T in device memory
template <typename T>
class DeviceArray {
public:
    explicit DeviceArray(size_t n) : n_(n) { CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T))); }
    ~DeviceArray() {
        const cudaError_t err = cudaFree(p_);
        if (err != cudaSuccess) ADD_FAILURE() << "cudaFree: " << cudaGetErrorString(err);
    }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    T* get() const { return p_; }
    size_t bytes() const { return n_ * sizeof(T); }

private:
    T* p_ = nullptr;
    size_t n_;
};

// host values that are exact bf16 -> device bf16
void upload_bf16(const DeviceArray<bf16>& dst, const std::vector<float>& v) {
    std::vector<uint16_t> bits(v.size());
    for (size_t i = 0; i < v.size(); i++) {
        uint32_t u;
        std::memcpy(&u, &v[i], 4);
        CHECK((u & 0xFFFFu) == 0, "upload_bf16: %g is not a bf16 value", v[i]);
        bits[i] = (uint16_t)(u >> 16);
    }
    CHECK(dst.bytes() == bits.size() * 2, "upload_bf16: size mismatch");
    CUDA_CHECK(cudaMemcpy(dst.get(), bits.data(), dst.bytes(), cudaMemcpyHostToDevice));
}
std::vector<float> download(const DeviceArray<float>& src) {
    std::vector<float> v(src.bytes() / sizeof(float));
    CUDA_CHECK(cudaMemcpy(v.data(), src.get(), src.bytes(), cudaMemcpyDeviceToHost));
    return v;
}
void poison(const DeviceArray<float>& buf) {  // every byte 0xFF: NaN
    CUDA_CHECK(cudaMemset(buf.get(), 0xFF, buf.bytes()));
}

std::vector<float> random_bf16(std::mt19937& rng, size_t n) {
    std::vector<float> v = gpu_test::uniform(rng, n);
    for (float& x : v) x = gpu_test::round_bf16(x);
    return v;
}
std::vector<float> random_signs(std::mt19937& rng, size_t n) {  // -1, 0, 1
    std::vector<float> v(n);
    const std::vector<int> ints = gpu_test::random_ints(rng, n, -1, 2);
    for (size_t i = 0; i < n; i++) v[i] = (float)ints[i];
    return v;
}

// C (rows x cols) = A·B in double, and Σ_k |A·B| per element (the scale of its rounding error);
// a(m, k), b(k, n) give the logical operands
struct Reference {
    std::vector<double> value, scale;
};
template <typename FA, typename FB>
Reference reference_product(int rows, int cols, int inner, FA a, FB b) {
    Reference r{std::vector<double>((size_t)rows * cols), std::vector<double>((size_t)rows * cols)};
    for (int m = 0; m < rows; m++)
        for (int n = 0; n < cols; n++) {
            double sum = 0.0, mag = 0.0;
            for (int k = 0; k < inner; k++) {
                const double p = (double)a(m, k) * (double)b(k, n);
                sum += p;
                mag += std::fabs(p);
            }
            r.value[(size_t)m * cols + n] = sum;
            r.scale[(size_t)m * cols + n] = mag;
        }
    return r;
}

// ‖got − ref‖/‖ref‖ <= tol_norm and every |got − ref| <= tol_elem · scale; on failure, the first
// mismatches by (row, col), which tell a wrong layout from a rounding difference.
void expect_matches(const char* what, const std::vector<float>& got, const Reference& ref, int cols,
                    double tol_norm, double tol_elem) {
    ASSERT_EQ(got.size(), ref.value.size()) << what;
    double diff2 = 0.0, norm2 = 0.0;
    size_t bad = 0;
    std::ostringstream first;
    for (size_t i = 0; i < got.size(); i++) {
        const double d = (double)got[i] - ref.value[i];
        diff2 += d * d;
        norm2 += ref.value[i] * ref.value[i];
        if (!(std::fabs(d) <= tol_elem * ref.scale[i])) {  // NaN fails too
            if (bad < 8)
                first << " (" << i / cols << "," << i % cols << "): got " << got[i] << " want "
                      << ref.value[i] << ";";
            bad++;
        }
    }
    const double rel = std::isfinite(diff2) ? std::sqrt(diff2 / std::max(norm2, 1e-300))
                                            : std::numeric_limits<double>::infinity();
    std::printf("[   INFO   ] %s: rel err %.3g, %zu of %zu elements off\n", what, rel, bad,
                got.size());
    EXPECT_LE(rel, tol_norm) << what;
    EXPECT_EQ(bad, 0u) << what << ": first mismatches (row,col):" << first.str();
}

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

void expect_aligned(const DeviceArray<int>& flag) {
    int misaligned = -1;
    CUDA_CHECK(cudaMemcpy(&misaligned, flag.get(), sizeof(int), cudaMemcpyDeviceToHost));
    EXPECT_EQ(misaligned, 0) << "a shared-memory tile did not start on a 1024-byte boundary";
}

constexpr double kTolNorm = 1e-5, kTolElem = 1e-4;

template <int N, int K, AKind kA, bool kBMN>
void run_gemm() {
    std::mt19937 rng(gpu_test::fresh_seed());
    const std::vector<float> a = random_bf16(rng, (size_t)64 * K),
                             b = random_bf16(rng, (size_t)K * N);
    const auto a_at = [&](int m, int k) {
        return kA == AKind::kSmemMN ? a[k * 64 + m] : a[m * K + k];
    };
    const auto b_at = [&](int k, int n) { return kBMN ? b[k * N + n] : b[n * K + k]; };
    const Reference ref = reference_product(64, N, K, a_at, b_at);

    DeviceArray<bf16> da(a.size()), db(b.size());
    DeviceArray<float> dc((size_t)64 * N);
    DeviceArray<int> flag(1);
    upload_bf16(da, a);
    upload_bf16(db, b);
    poison(dc);
    CUDA_CHECK(cudaMemset(flag.get(), 0, sizeof(int)));
    constexpr int smem = GemmShapes<N, K, kA, kBMN>::kSmem;
    set_smem(gemm_kernel<N, K, kA, kBMN>, smem);
    gemm_kernel<N, K, kA, kBMN>
        <<<1, kWarpgroupThreads, smem>>>(da.get(), db.get(), dc.get(), flag.get());
    CUDA_LAUNCH_CHECK();
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_aligned(flag);
    expect_matches("C", download(dc), ref, N, kTolNorm, kTolElem);
}

template <int DQK, int NK, int DV>
void run_chain() {
    std::mt19937 rng(gpu_test::fresh_seed());
    const std::vector<float> q = random_signs(rng, (size_t)64 * DQK),
                             k = random_signs(rng, (size_t)NK * DQK),
                             v = random_bf16(rng, (size_t)NK * DV);
    const Reference s_ref = reference_product(
        64, NK, DQK, [&](int m, int i) { return q[m * DQK + i]; },
        [&](int i, int n) { return k[n * DQK + i]; });
    // |S| <= DQK <= 128: an integer that bf16 holds exactly, so P = bf16(S) = S
    const Reference o_ref = reference_product(
        64, DV, NK, [&](int m, int j) { return s_ref.value[m * NK + j]; },
        [&](int j, int n) { return v[j * DV + n]; });

    DeviceArray<bf16> dq(q.size()), dk(k.size()), dv(v.size());
    DeviceArray<float> ds((size_t)64 * NK), dout((size_t)64 * DV);
    DeviceArray<int> flag(1);
    upload_bf16(dq, q);
    upload_bf16(dk, k);
    upload_bf16(dv, v);
    poison(ds);
    poison(dout);
    CUDA_CHECK(cudaMemset(flag.get(), 0, sizeof(int)));
    constexpr int smem = ChainShapes<DQK, NK, DV>::kSmem;
    set_smem(chain_kernel<DQK, NK, DV>, smem);
    chain_kernel<DQK, NK, DV><<<1, kWarpgroupThreads, smem>>>(dq.get(), dk.get(), dv.get(),
                                                              ds.get(), dout.get(), flag.get());
    CUDA_LAUNCH_CHECK();
    CUDA_CHECK(cudaDeviceSynchronize());
    expect_aligned(flag);
    expect_matches("S (exact)", download(ds), s_ref, NK, 0.0, 0.0);
    expect_matches("O", download(dout), o_ref, DV, kTolNorm, kTolElem);
}

#define WGMMA_GEMM_TEST(name, N, K, kA, kBMN) \
    TEST(WgmmaGemm, name) {                   \
        SKIP_UNLESS_HOPPER();                 \
        run_gemm<N, K, kA, kBMN>();           \
    }
WGMMA_GEMM_TEST(SS_BK_N64_K64, 64, 64, AKind::kSmemK, false)
WGMMA_GEMM_TEST(SS_BK_N64_K128, 64, 128, AKind::kSmemK, false)
WGMMA_GEMM_TEST(SS_BK_N128_K64, 128, 64, AKind::kSmemK, false)
WGMMA_GEMM_TEST(SS_BK_N128_K128, 128, 128, AKind::kSmemK, false)
WGMMA_GEMM_TEST(SS_BMN_N64_K64, 64, 64, AKind::kSmemK, true)
WGMMA_GEMM_TEST(SS_BMN_N64_K128, 64, 128, AKind::kSmemK, true)
WGMMA_GEMM_TEST(SS_BMN_N128_K64, 128, 64, AKind::kSmemK, true)
WGMMA_GEMM_TEST(SS_BMN_N128_K128, 128, 128, AKind::kSmemK, true)
WGMMA_GEMM_TEST(RS_BMN_N64_K64, 64, 64, AKind::kRegs, true)
WGMMA_GEMM_TEST(RS_BMN_N64_K128, 64, 128, AKind::kRegs, true)
WGMMA_GEMM_TEST(RS_BMN_N128_K64, 128, 64, AKind::kRegs, true)
WGMMA_GEMM_TEST(RS_BMN_N128_K128, 128, 128, AKind::kRegs, true)
WGMMA_GEMM_TEST(RS_BK_N64_K64, 64, 64, AKind::kRegs, false)
WGMMA_GEMM_TEST(RS_BK_N128_K128, 128, 128, AKind::kRegs, false)
WGMMA_GEMM_TEST(SS_AMN_N64_K64, 64, 64, AKind::kSmemMN, true)
WGMMA_GEMM_TEST(SS_AMN_N128_K128, 128, 128, AKind::kSmemMN, true)
#undef WGMMA_GEMM_TEST

TEST(WgmmaChain, D64_Keys64) {
    SKIP_UNLESS_HOPPER();
    run_chain<64, 64, 64>();
}
TEST(WgmmaChain, D128_Keys128) {
    SKIP_UNLESS_HOPPER();
    run_chain<128, 128, 128>();
}
TEST(WgmmaChain, D64_Keys128) {
    SKIP_UNLESS_HOPPER();
    run_chain<64, 128, 64>();
}
TEST(WgmmaChain, D128_Keys64) {
    SKIP_UNLESS_HOPPER();
    run_chain<128, 64, 128>();
}

// ================================================================ CPU-only layout checks
// The tile is a permutation of its 16-byte chunks: chunk c of row r of column block b sits in
// swizzle atom b·(R/8) + r/8, row r % 8 of it, chunk slot c ^ (r % 8).
template <int R, int C>
void check_tile_layout() {
    using Tile = SwizzledTile<R, C>;
    std::vector<int> hits(Tile::kBytes / 16, 0);
    for (int row = 0; row < R; row++)
        for (int chunk = 0; chunk < C / 8; chunk++) {
            const int off = Tile::chunk_byte(row, chunk);
            ASSERT_TRUE(off >= 0 && off < Tile::kBytes && off % 16 == 0) << off;
            EXPECT_EQ(off / 1024, (chunk / 8) * (R / 8) + row / 8) << row << "," << chunk;
            EXPECT_EQ(off % 1024 / 128, row % 8) << row << "," << chunk;
            EXPECT_EQ(off % 128 / 16, (chunk % 8) ^ (row % 8)) << row << "," << chunk;
            hits[off / 16]++;
            for (int e = 0; e < 8; e++) EXPECT_EQ(Tile::elem(row, chunk * 8 + e) * 2, off + 2 * e);
        }
    for (size_t i = 0; i < hits.size(); i++) EXPECT_EQ(hits[i], 1) << "chunk slot " << i;
}
TEST(WgmmaLayout, TileIsASwizzledPermutationOfChunks) {
    check_tile_layout<64, 64>();
    check_tile_layout<64, 128>();
    check_tile_layout<128, 64>();
    check_tile_layout<128, 128>();
    check_tile_layout<8, 64>();
}

// Descriptor fields, decoded with the PTX ISA bit positions written out independently here.
struct Decoded {
    uint32_t start, lbo, sbo, base_offset, swizzle;
    uint64_t other_bits;  // must be 0
};
Decoded decode(uint64_t d) {
    const uint64_t fields =
        0x3FFFull | 0x3FFFull << 16 | 0x3FFFull << 32 | 0x7ull << 49 | 0x3ull << 62;
    return Decoded{(uint32_t)(d & 0x3FFF) << 4,
                   (uint32_t)((d >> 16) & 0x3FFF) << 4,
                   (uint32_t)((d >> 32) & 0x3FFF) << 4,
                   (uint32_t)((d >> 49) & 0x7),
                   (uint32_t)(d >> 62),
                   d & ~fields};
}
TEST(WgmmaLayout, DescriptorFields) {
    const uint32_t starts[] = {0, 1024, 9 * 1024 + 32, 0x3FFF0};
    for (uint32_t start : starts) {
        const Decoded d = decode(wgmma::make_desc(start, 128 * 128, 1024));
        EXPECT_EQ(d.start, start);
        EXPECT_EQ(d.lbo, 128u * 128u);
        EXPECT_EQ(d.sbo, 1024u);
        EXPECT_EQ(d.base_offset, 0u);
        EXPECT_EQ(d.swizzle, 1u) << "1 = 128-byte swizzle";
        EXPECT_EQ(d.other_bits, 0u);
    }
    // the raw value of one descriptor, worked out by hand: start 0x2400 (>> 4 = 0x240),
    // LBO 16 (1), SBO 1024 (0x40), swizzle 1 at bit 62
    EXPECT_EQ(wgmma::make_desc(0x2400, 16, 1024), 0x4000004000010240ull);
    const Decoded moved =
        decode(wgmma::desc_advance(wgmma::make_desc(0x2400, 16, 1024), 2048 + 96));
    EXPECT_EQ(moved.start, 0x2400u + 2048u + 96u);
    EXPECT_EQ(moved.lbo, 16u);
    EXPECT_EQ(moved.sbo, 1024u);
}

// Where the hardware reads element (mn, k) (k < 16) of the k16 slice a descriptor points at, per
// the canonical 128B-swizzle layouts (PTX ISA "Shared Memory Matrix Layout"; CUTLASS
// make_gmma_desc), in bytes: K-major start + (mn / 8)·SBO + (mn % 8)·128 + 2k; MN-major start +
// (mn / 64)·LBO + (k / 8)·SBO + (k % 8)·128 + 2·(mn % 64); then address bits [4,7) ^= bits [7,10).
uint32_t model_address(uint64_t desc, bool mn_major, int mn, int k) {
    const Decoded d = decode(desc);
    const uint32_t addr =
        mn_major ? d.start + (mn / 64) * d.lbo + (k / 8) * d.sbo + (k % 8) * 128 + 2 * (mn % 64)
                 : d.start + (mn / 8) * d.sbo + (mn % 8) * 128 + 2 * k;
    return addr ^ (((addr >> 7) & 7) << 4);
}

constexpr uint32_t kBase = 9 * 1024;  // some 1024-aligned shared address

// K-major operand: rows row0 .. row0 + extent of a tile with R rows and K columns.
template <int R, int K>
void check_k_major(int row0, int extent) {
    using Tile = SwizzledTile<R, K>;
    const uint64_t desc0 = wgmma::desc_k_major(kBase, row0);
    for (int kk = 0; kk < K / 16; kk++) {
        const uint64_t desc = wgmma::desc_advance(desc0, wgmma::k_major_slice_bytes<Tile>(kk));
        ASSERT_EQ(decode(desc).swizzle, 1u);
        for (int mn = 0; mn < extent; mn++)
            for (int k = 0; k < 16; k++)
                ASSERT_EQ(model_address(desc, false, mn, k),
                          kBase + 2 * Tile::elem(row0 + mn, 16 * kk + k))
                    << "K-major R=" << R << " K=" << K << " row0=" << row0 << " kk=" << kk
                    << " mn=" << mn << " k=" << k;
    }
}
// MN-major operand: columns col0 .. col0 + extent of a tile with K rows and C columns.
template <int K, int C>
void check_mn_major(int col0, int extent) {
    using Tile = SwizzledTile<K, C>;
    const uint64_t desc0 = wgmma::desc_mn_major<Tile>(kBase, col0);
    for (int kk = 0; kk < K / 16; kk++) {
        const uint64_t desc = wgmma::desc_advance(desc0, wgmma::mn_major_slice_bytes(kk));
        ASSERT_EQ(decode(desc).swizzle, 1u);
        for (int mn = 0; mn < extent; mn++)
            for (int k = 0; k < 16; k++)
                ASSERT_EQ(model_address(desc, true, mn, k),
                          kBase + 2 * Tile::elem(16 * kk + k, col0 + mn))
                    << "MN-major K=" << K << " C=" << C << " col0=" << col0 << " kk=" << kk
                    << " mn=" << mn << " k=" << k;
    }
}
TEST(WgmmaLayout, DescriptorsFindTheTileElements) {
    check_k_major<64, 64>(0, 64);
    check_k_major<64, 128>(0, 64);
    check_k_major<128, 64>(0, 128);
    check_k_major<128, 128>(0, 128);
    check_k_major<128, 128>(64, 64);  // second warpgroup's 64 rows of a 128-row Q tile
    check_mn_major<64, 64>(0, 64);
    check_mn_major<64, 128>(0, 128);
    check_mn_major<128, 64>(0, 64);
    check_mn_major<128, 128>(0, 128);
    check_mn_major<128, 128>(64, 64);  // the upper half of d = 128 as an N = 64 operand
}

}  // namespace
