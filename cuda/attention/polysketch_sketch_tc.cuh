// The learned sketch network of `polysketch` (cuda/attention/polysketch.cu) on bf16 tensor cores,
// the path of bf16 storage: one sketch block g = LayerNorm(N, affine) → Linear(N → H = 8R) → GELU →
// Linear(H → R) (src/attention/polysketch_sketch.h) as two fused kernels shaped like flash
// attention, with the hidden units in the place of the keys:
//   forward  y = GELU(u W_inᵀ) W_outᵀ, u = LN(x): per warp 32 rows, u in registers, the hidden
//            units 64 at a time (pre = u W_inᵀ, GELU in registers, y += act W_outᵀ), the weights in
//            shared memory for kFwdTilesPerBlock row tiles;
//   backward per (64 hidden units, slice of rows), like flash's dK/dV kernel: each warp owns 16
//            hidden units and keeps its dW_in and dW_out rows in registers over the slice; per tile
//            of 64 rows it recomputes preᵀ = W_in uᵀ, forms dactᵀ = W_outᵀ dyᵀ, actᵀ = GELU(preᵀ),
//            dhᵀ = dactᵀ ∘ GELU′(preᵀ), then dW_outᵀ += actᵀ dy and dW_in += dhᵀ u (the score tiles
//            are the A operands in registers), and the block's dn = dh W_in[tile] through a dhᵀ
//            tile in shared memory. Outputs are the same partial buffers as the TF32 block_gemm
//            kernels of polysketch.cu (dW per slice, dn per hidden tile), reduced in order there.
// Products: bf16 mma.sync m16n8k16 with fp32 accumulators. The weights are bf16 already in this
// mode; u, act, dh and dy are rounded to bf16 (2^-9 relative) — the TF32 block_gemm path keeps
// them at 2^-11. Shared tiles are row-major with rows padded by 8 bf16 (16 bytes): every row
// stride is an odd number of 16-byte units, so the 8 rows of one ldmatrix phase hit distinct banks.
// Shapes: N (input width: d or R) and R (sketch size) multiples of 16, instantiated for
// R ∈ {16, 32}, N ∈ {16, 32, 64, 128} (d ∈ {64, 128}); other sketch sizes use the TF32 kernels.
// Fragment layouts: cuda/attention/flash_traits.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/attention/flash_traits.cuh"
#include "cuda/common.cuh"

namespace ps_tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPad = 8;           // bf16 of padding per shared row
constexpr int kFwdM = 2;          // m16 row tiles per warp in the forward
constexpr int kFwdRows = 16 * kFwdM * kWarps;  // rows per tile of the forward (128)
constexpr int kFwdTilesPerBlock = 4;  // row tiles per block of the forward: the weights are loaded once per 512 rows
constexpr int kBwdRows = 64;      // rows per tile of the backward
constexpr int kBwdHid = 16 * kWarps;  // hidden units per block of the backward (64)
constexpr float kLnEps = 1e-5f;

__device__ __forceinline__ float gelu(float x) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    return 0.5f * x * (1.f + tanhf(c * (x + a * x * x * x)));
}
__device__ __forceinline__ float gelu_grad(float x) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    const float t = tanhf(c * (x + a * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * a * x * x);
}

// The same with the hardware tanh (tanh.approx.f32, max relative error 2^-10.99): for the tensor-core
// kernels, whose activations are rounded to bf16 (2^-9) right after. One tanh for both GELU and
// GELU′ in the backward. (The accurate tanhf was most of these kernels' time: see RESULTS.md.)
__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float gelu_fast(float x) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    return 0.5f * x * (1.f + tanh_approx(c * (x + a * x * x * x)));
}
__device__ __forceinline__ void gelu_and_grad_fast(float x, float& act, float& grad) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    const float t = tanh_approx(c * (x + a * x * x * x));
    act = 0.5f * x * (1.f + t);
    grad = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * a * x * x);
}

template <int N, int R>
struct Shape {
    static_assert(N % 16 == 0 && R % 16 == 0, "sketch tensor-core kernels: N and R multiples of 16");
    static constexpr int HID = 8 * R;
    static constexpr int LDX = N + kPad;   // rows of width N (W_in, u)
    static constexpr int LDH = HID + kPad; // rows of width HID (W_out in the forward)
    static constexpr int LDT = kBwdHid + kPad;  // rows of 64 hidden units (W_out tile, dhᵀ tile)
    static constexpr int LDR = R + kPad;   // rows of width R (dy)
    static constexpr int kFwdSmem = (HID * LDX + R * LDH + kFwdRows * LDX) * 2;
    static constexpr int kBwdSmem = (kBwdHid * LDX + R * LDT + kBwdRows * LDX + kBwdRows * LDR + kBwdHid * LDT) * 2;
};

// ---------------------------------------------------------------- fragments of padded tiles (row stride LD)
// A (16x16) at rows r0.., columns k0.. of a row-major tile
template <int LD>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16* t, int r0, int k0, int lane) {
    ldmatrix_x4(a, t + (r0 + (lane & 15)) * LD + k0 + ((lane >> 4) << 3));
}
// A (16x16) with A[m][k] = t[k][m]: m0.., k0..
template <int LD>
__device__ __forceinline__ void frag_a_t(uint32_t (&a)[4], const bf16* t, int m0, int k0, int lane) {
    const int mi = lane >> 3;
    ldmatrix_x4_trans(a, t + (k0 + (lane & 7) + ((mi >> 1) << 3)) * LD + m0 + ((mi & 1) << 3));
}
// B of two n8 tiles (n0.., n0+8..) for the k16 slice k0.., B[k][n] = t[n][k]
template <int LD>
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const bf16* t, int n0, int k0, int lane) {
    ldmatrix_x4(b, t + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + k0 + (((lane >> 3) & 1) << 3));
}
// Same with B[k][n] = t[k][n]
template <int LD>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const bf16* t, int k0, int n0, int lane) {
    ldmatrix_x4_trans(b, t + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * LD + n0 + ((lane >> 4) << 3));
}
// A (16x16) = k16 slice kk of a 16 × K accumulator tile p (K/8 n8 tiles), rounded to bf16
template <int NT>
__device__ __forceinline__ void frag_a_acc(uint32_t (&a)[4], const float (&p)[NT][4], int kk) {
    a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// Rows [0, rows) of a (rows_total, W) bf16 global matrix (W % 8 == 0, 16-byte aligned) -> padded
// tile, by all threads of the block (cp.async; the caller commits and waits).
template <int W>
__device__ __forceinline__ void copy_rows_async(bf16* tile, const bf16* src, int64_t src_ld, int rows, int tid) {
    constexpr int kChunks = W / 8;
    for (int i = tid; i < rows * kChunks; i += kThreads) {
        const int row = i / kChunks, ch = i % kChunks;
        cp_async_16(tile + row * (W + kPad) + ch * 8, src + row * src_ld + ch * 8, true);
    }
}

// u = LN(x)·w + b (bf16) of `rows` rows from global row row0 (x (nc, N) fp32) into tile rows
// t0.. of s_u, by one warp: four lanes per row, each N/4 columns as float4 (columns 4q + 16j).
// Mean and variance in two passes as the CPU reference. Rows ≥ nc are written as zeros.
template <int N>
__device__ __forceinline__ void ln_rows_warp(bf16* s_u, int t0, const float* __restrict__ x, int64_t row0, int rows,
                                             int64_t nc, const float* __restrict__ ln_w,
                                             const float* __restrict__ ln_b, int lane) {
    constexpr int LDX = N + kPad, J = N / 16;
    const int q = lane & 3;
    for (int i = lane >> 2; i < rows; i += 8) {
        const int64_t row = row0 + i;
        bf16* dst = s_u + (t0 + i) * LDX;
        const bool valid = row < nc;  // uniform within the quad
        float4 v[J];
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            v[j] = valid ? *reinterpret_cast<const float4*>(x + row * N + 4 * q + 16 * j) : make_float4(0, 0, 0, 0);
            sum += (v[j].x + v[j].y) + (v[j].z + v[j].w);
        }
        sum += __shfl_xor_sync(kFullMask, sum, 1);
        sum += __shfl_xor_sync(kFullMask, sum, 2);
        const float mean = sum / N;
        float var = 0.f;
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
            var += (a * a + b * b) + (c * c + d * d);
        }
        var += __shfl_xor_sync(kFullMask, var, 1);
        var += __shfl_xor_sync(kFullMask, var, 2);
        const float rs = 1.f / sqrtf(var / N + kLnEps);
#pragma unroll
        for (int j = 0; j < J; ++j) {
            const int c = 4 * q + 16 * j;
            uint2 packed = make_uint2(0u, 0u);
            if (valid) {
                packed.x = pack_bf16((v[j].x - mean) * rs * ln_w[c] + ln_b[c], (v[j].y - mean) * rs * ln_w[c + 1] + ln_b[c + 1]);
                packed.y = pack_bf16((v[j].z - mean) * rs * ln_w[c + 2] + ln_b[c + 2], (v[j].w - mean) * rs * ln_w[c + 3] + ln_b[c + 3]);
            }
            *reinterpret_cast<uint2*>(dst + c) = packed;
        }
    }
}

// ---------------------------------------------------------------- forward
// out (nc, R) = GELU(LN(in) W_inᵀ) W_outᵀ; in (nc, N) fp32; w_in (HID, N), w_out (R, HID) bf16.
// Grid: ceil(row tiles / kFwdTilesPerBlock); kFwdSmem bytes of dynamic shared memory.
template <int N, int R>
__global__ void __launch_bounds__(kThreads)
    sketch_block_fwd(float* out, const float* __restrict__ in, const float* __restrict__ ln_w,
                     const float* __restrict__ ln_b, const bf16* __restrict__ w_in, const bf16* __restrict__ w_out,
                     int64_t nc) {
    using S = Shape<N, R>;
    constexpr int HID = S::HID, LDX = S::LDX, LDH = S::LDH, kM = kFwdM;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* s_win = reinterpret_cast<bf16*>(smem_raw);  // (HID, N)
    bf16* s_wout = s_win + HID * LDX;                 // (R, HID)
    bf16* s_u = s_wout + R * LDH;                     // (kFwdRows, N): u of the row tile
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
    copy_rows_async<N>(s_win, w_in, N, HID, tid);
    copy_rows_async<HID>(s_wout, w_out, HID, R, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const int wr = 16 * kM * warp;  // this warp's first row in the tile
    const int64_t tiles = (nc + kFwdRows - 1) / kFwdRows;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int64_t row0 = tile * kFwdRows;
        ln_rows_warp<N>(s_u, wr, in, row0 + wr, 16 * kM, nc, ln_w, ln_b, lane);
        __syncwarp();
        uint32_t a[kM][N / 16][4];
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
            for (int kk = 0; kk < N / 16; ++kk) frag_a<LDX>(a[m][kk], s_u, wr + 16 * m, 16 * kk, lane);
        float y[kM][R / 8][4] = {};
#pragma unroll 1
        for (int h0 = 0; h0 < HID; h0 += 64) {
            float s[kM][8][4] = {};
#pragma unroll
            for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
                for (int nn = 0; nn < 4; ++nn) {
                    uint32_t b[4];
                    frag_b_nk<LDX>(b, s_win, h0 + 16 * nn, 16 * kk, lane);
#pragma unroll
                    for (int m = 0; m < kM; ++m) {
                        mma_bf16(s[m][2 * nn], a[m][kk], b[0], b[1]);
                        mma_bf16(s[m][2 * nn + 1], a[m][kk], b[2], b[3]);
                    }
                }
#pragma unroll
            for (int m = 0; m < kM; ++m)
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[m][nt][e] = gelu_fast(s[m][nt][e]);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t p[kM][4];
#pragma unroll
                for (int m = 0; m < kM; ++m) frag_a_acc(p[m], s[m], kk);
#pragma unroll
                for (int nn = 0; nn < R / 16; ++nn) {
                    uint32_t b[4];
                    frag_b_nk<LDH>(b, s_wout, 16 * nn, h0 + 16 * kk, lane);
#pragma unroll
                    for (int m = 0; m < kM; ++m) {
                        mma_bf16(y[m][2 * nn], p[m], b[0], b[1]);
                        mma_bf16(y[m][2 * nn + 1], p[m], b[2], b[3]);
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < kM; ++m) {
            const int64_t r_lo = row0 + wr + 16 * m + g, r_hi = r_lo + 8;
#pragma unroll
            for (int nt = 0; nt < R / 8; ++nt) {
                const int col = 8 * nt + 2 * c;
                if (r_lo < nc) *reinterpret_cast<float2*>(out + r_lo * R + col) = make_float2(y[m][nt][0], y[m][nt][1]);
                if (r_hi < nc) *reinterpret_cast<float2*>(out + r_hi * R + col) = make_float2(y[m][nt][2], y[m][nt][3]);
            }
        }
        __syncwarp();  // this warp's u rows are rewritten by the next tile
    }
}

// ---------------------------------------------------------------- backward
// One block per (64 hidden units h0.. = blockIdx.x·64, slice blockIdx.y of slice_rows rows), given
// the block's input in (nc, N), its LayerNorm statistics mean, rstd (nc) and dout (nc, R):
//   part_wo (slices, R, HID)  [slice, :, h0..] = Σ_{slice rows} doutᵀ act   (dW_out partial)
//   part_wi (slices, HID, N)  [slice, h0.., :] = Σ_{slice rows} dhᵀ u       (dW_in partial)
//   dn_part (HID/64, nc, N)   [h0 / 64]        = dh W_in[h0.., :]           (dn partial)
// the layouts of the TF32 ps_sk_block_bwd. kBwdSmem bytes of dynamic shared memory.
template <int N, int R>
__global__ void __launch_bounds__(kThreads)
    sketch_block_bwd(float* part_wo, float* part_wi, float* dn_part, const float* __restrict__ in,
                     const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ dout,
                     const float* __restrict__ ln_w, const float* __restrict__ ln_b, const bf16* __restrict__ w_in,
                     const bf16* __restrict__ w_out, int64_t nc, int slice_rows) {
    using S = Shape<N, R>;
    constexpr int HID = S::HID, LDX = S::LDX, LDT = S::LDT, LDR = S::LDR;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* s_win = reinterpret_cast<bf16*>(smem_raw);  // (64, N): W_in rows h0..
    bf16* s_wout = s_win + kBwdHid * LDX;             // (R, 64): W_out[:, h0..]
    bf16* s_u = s_wout + R * LDT;                     // (64 rows, N): u of the row tile
    bf16* s_dy = s_u + kBwdRows * LDX;                // (64 rows, R): dout of the row tile
    bf16* s_dh = s_dy + kBwdRows * LDR;               // (64 hidden, 64 rows): dhᵀ of the row tile
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, c = lane % 4;
    const int h0 = blockIdx.x * kBwdHid, hw = 16 * warp;  // the warp's hidden units: h0 + hw ..
    const int64_t s0 = (int64_t)blockIdx.y * slice_rows, s1 = min(nc, s0 + slice_rows);
    copy_rows_async<N>(s_win, w_in + (int64_t)h0 * N, N, kBwdHid, tid);
    copy_rows_async<kBwdHid>(s_wout, w_out + h0, HID, R, tid);
    cp_async_commit();
    float wo[R / 8][4] = {};  // dW_outᵀ rows h0 + hw .. (16 × R)
    float wi[N / 8][4] = {};  // dW_in rows h0 + hw .. (16 × N)
    for (int64_t row0 = s0; row0 < s1; row0 += kBwdRows) {
        __syncthreads();  // the previous tile's reads of s_u, s_dy, s_dh are done
        // u = LN(in)·w + b and dy, rows ≥ s1 zero (so they add nothing to the sums)
        for (int i = tid; i < kBwdRows * (N / 8); i += kThreads) {
            const int rr = i / (N / 8), col = (i % (N / 8)) * 8;
            const int64_t row = row0 + rr;
            uint4 packed = make_uint4(0u, 0u, 0u, 0u);
            if (row < s1) {
                const float4 x0 = *reinterpret_cast<const float4*>(in + row * N + col);
                const float4 x1 = *reinterpret_cast<const float4*>(in + row * N + col + 4);
                const float mu = mean[row], rs = rstd[row];
                auto ln = [&](float x, int k) { return (x - mu) * rs * ln_w[col + k] + ln_b[col + k]; };
                packed.x = pack_bf16(ln(x0.x, 0), ln(x0.y, 1));
                packed.y = pack_bf16(ln(x0.z, 2), ln(x0.w, 3));
                packed.z = pack_bf16(ln(x1.x, 4), ln(x1.y, 5));
                packed.w = pack_bf16(ln(x1.z, 6), ln(x1.w, 7));
            }
            *reinterpret_cast<uint4*>(s_u + rr * LDX + col) = packed;
        }
        for (int i = tid; i < kBwdRows * (R / 8); i += kThreads) {
            const int rr = i / (R / 8), col = (i % (R / 8)) * 8;
            const int64_t row = row0 + rr;
            uint4 packed = make_uint4(0u, 0u, 0u, 0u);
            if (row < s1) {
                const float4 y0 = *reinterpret_cast<const float4*>(dout + row * R + col);
                const float4 y1 = *reinterpret_cast<const float4*>(dout + row * R + col + 4);
                packed = make_uint4(pack_bf16(y0.x, y0.y), pack_bf16(y0.z, y0.w), pack_bf16(y1.x, y1.y),
                                    pack_bf16(y1.z, y1.w));
            }
            *reinterpret_cast<uint4*>(s_dy + rr * LDR + col) = packed;
        }
        cp_async_wait<0>();  // the weights (first tile only; no-op after)
        __syncthreads();
        // preᵀ = W_in[hw..] uᵀ and dactᵀ = W_out[:, hw..]ᵀ dyᵀ (16 hidden × 64 rows each)
        float p[8][4] = {}, q[8][4] = {};
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk) {
            uint32_t a[4];
            frag_a<LDX>(a, s_win, hw, 16 * kk, lane);
#pragma unroll
            for (int nn = 0; nn < 4; ++nn) {
                uint32_t b[4];
                frag_b_nk<LDX>(b, s_u, 16 * nn, 16 * kk, lane);
                mma_bf16(p[2 * nn], a, b[0], b[1]);
                mma_bf16(p[2 * nn + 1], a, b[2], b[3]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < R / 16; ++kk) {
            uint32_t a[4];
            frag_a_t<LDT>(a, s_wout, hw, 16 * kk, lane);
#pragma unroll
            for (int nn = 0; nn < 4; ++nn) {
                uint32_t b[4];
                frag_b_nk<LDR>(b, s_dy, 16 * nn, 16 * kk, lane);
                mma_bf16(q[2 * nn], a, b[0], b[1]);
                mma_bf16(q[2 * nn + 1], a, b[2], b[3]);
            }
        }
        // actᵀ = GELU(preᵀ) in p, dhᵀ = dactᵀ ∘ GELU′(preᵀ) in q
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float act, grad;
                gelu_and_grad_fast(p[nt][e], act, grad);
                p[nt][e] = act;
                q[nt][e] *= grad;
            }
        // dW_outᵀ += actᵀ dy, dW_in += dhᵀ u (k = the 64 rows)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            frag_a_acc(a, p, kk);
#pragma unroll
            for (int nn = 0; nn < R / 16; ++nn) {
                uint32_t b[4];
                frag_b_kn<LDR>(b, s_dy, 16 * kk, 16 * nn, lane);
                mma_bf16(wo[2 * nn], a, b[0], b[1]);
                mma_bf16(wo[2 * nn + 1], a, b[2], b[3]);
            }
            frag_a_acc(a, q, kk);
#pragma unroll
            for (int nn = 0; nn < N / 16; ++nn) {
                uint32_t b[4];
                frag_b_kn<LDX>(b, s_u, 16 * kk, 16 * nn, lane);
                mma_bf16(wi[2 * nn], a, b[0], b[1]);
                mma_bf16(wi[2 * nn + 1], a, b[2], b[3]);
            }
        }
        // dhᵀ (bf16) into s_dh: rows hw + g (+8), columns 8nt + 2c
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            *reinterpret_cast<uint32_t*>(s_dh + (hw + g) * LDT + 8 * nt + 2 * c) = pack_bf16(q[nt][0], q[nt][1]);
            *reinterpret_cast<uint32_t*>(s_dh + (hw + g + 8) * LDT + 8 * nt + 2 * c) = pack_bf16(q[nt][2], q[nt][3]);
        }
        __syncthreads();
        // dn rows 16·warp .. of the tile = dh W_in[h0..h0+64, :] (A[m = row][k = hidden] = s_dh[k][m])
        float dn[N / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            uint32_t a[4];
            frag_a_t<LDT>(a, s_dh, 16 * warp, 16 * kk, lane);
#pragma unroll
            for (int nn = 0; nn < N / 16; ++nn) {
                uint32_t b[4];
                frag_b_kn<LDX>(b, s_win, 16 * kk, 16 * nn, lane);
                mma_bf16(dn[2 * nn], a, b[0], b[1]);
                mma_bf16(dn[2 * nn + 1], a, b[2], b[3]);
            }
        }
        float* dst = dn_part + ((int64_t)blockIdx.x * nc) * N;
        const int64_t r_lo = row0 + 16 * warp + g, r_hi = r_lo + 8;
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) {
            const int col = 8 * nt + 2 * c;
            if (r_lo < s1) *reinterpret_cast<float2*>(dst + r_lo * N + col) = make_float2(dn[nt][0], dn[nt][1]);
            if (r_hi < s1) *reinterpret_cast<float2*>(dst + r_hi * N + col) = make_float2(dn[nt][2], dn[nt][3]);
        }
    }
    cp_async_wait<0>();  // an empty slice never waited
    const int64_t slice = blockIdx.y;
    float* pwo = part_wo + slice * R * HID;
    float* pwi = part_wi + slice * HID * N;
    const int hl = h0 + hw + g, hh = hl + 8;
#pragma unroll
    for (int nt = 0; nt < R / 8; ++nt) {
        const int o = 8 * nt + 2 * c;
        pwo[(int64_t)o * HID + hl] = wo[nt][0];
        pwo[(int64_t)(o + 1) * HID + hl] = wo[nt][1];
        pwo[(int64_t)o * HID + hh] = wo[nt][2];
        pwo[(int64_t)(o + 1) * HID + hh] = wo[nt][3];
    }
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
        const int col = 8 * nt + 2 * c;
        *reinterpret_cast<float2*>(pwi + (int64_t)hl * N + col) = make_float2(wi[nt][0], wi[nt][1]);
        *reinterpret_cast<float2*>(pwi + (int64_t)hh * N + col) = make_float2(wi[nt][2], wi[nt][3]);
    }
}

// fn(std::integral_constant<int, N>{}, std::integral_constant<int, R>{}) for the instantiated
// shapes; false (fn not called) for the others.
template <typename Fn>
bool by_shape(int n, int r, Fn&& fn) {
    using std::integral_constant;
    auto with_r = [&](auto rc) {
        constexpr int R = decltype(rc)::value;
        if (n == R) {  // the second blocks: input width r
            fn(integral_constant<int, R>{}, rc);
            return true;
        }
        if (n == 64) fn(integral_constant<int, 64>{}, rc);
        else if (n == 128) fn(integral_constant<int, 128>{}, rc);
        else return false;
        return true;
    };
    if (r == 16) return with_r(integral_constant<int, 16>{});
    if (r == 32) return with_r(integral_constant<int, 32>{});
    return false;
}

}  // namespace ps_tc
