// Tiling parameters and warp-level tensor-core building blocks of the flash attention kernels
// (cuda/attention/flash.cu). One traits struct per head dimension holds every tile size, so a
// tuning change is one line here. The building blocks are bf16 mma.sync m16n8k16 with fp32
// accumulators, fed by ldmatrix from shared-memory tiles whose 16-byte chunks are XOR-swizzled
// (chunk ^ (row & 7)) so that the eight rows read by one ldmatrix phase hit distinct banks.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A 16x16 (row-major): a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
//   B 16x8:              b0 = (k 2c..2c+1, n g), b1 = (k 2c+8..2c+9, n g)
//   C 16x8 fp32:         c0,c1 = (g, 2c..2c+1), c2,c3 = (g+8, 2c..2c+1)
// The C layout of two adjacent n8 tiles is exactly the A layout of one k16 slice, so a score
// tile P becomes the A operand of P·V in registers, without a trip through shared memory.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/common.cuh"

template <int kHeadDim>
struct FlashTraits {
    static_assert(kHeadDim == 64 || kHeadDim == 128, "flash attention: head dim 64 or 128");
    static constexpr int D = kHeadDim;
    static constexpr int kWarps = 4;
    static constexpr int kThreads = 32 * kWarps;
    // Every warp owns kM consecutive m16 row tiles (16·kM rows) of the block's row tile, so one
    // B fragment read from shared memory feeds 2·kM mma instead of 2: with kM = 2 the
    // shared-memory traffic per mma drops from 256 B to 128 B (B operands) and the kernels are
    // no longer bound by ldmatrix bandwidth. Accumulators then cost kM·D/2 registers per thread.
    // forward: query tile (16·kFwdM rows per warp) x key tile; Q stays in registers at d = 64
    // (at d = 128 its fragments are re-read from shared memory per key tile: no room).
    static constexpr int kFwdM = 2;
    static constexpr int kBrF = 16 * kWarps * kFwdM;
    static constexpr int kBcF = 64;
    static constexpr bool kFwdQInRegs = D == 64;
    // dQ kernel: query tile (16·kDqM rows per warp) x key tile; S and dP tiles and dQ live in
    // registers, so the key tile is halved at d = 128.
    static constexpr int kDqM = 2;
    static constexpr int kBrQ = 16 * kWarps * kDqM;
    static constexpr int kBcQ = D == 64 ? 64 : 32;
    // dK/dV kernel: key tile (16·kKvM keys per warp) x inner query tile. The warp keeps dK and dV
    // (2 x 16·kKvM x D fp32) in registers: 32 keys per warp fit at d = 64 only (with a 32-query
    // inner tile); d = 128 keeps 16 keys per warp and a 64-query inner tile.
    static constexpr int kKvM = D == 64 ? 2 : 1;
    static constexpr int kBcKV = 16 * kWarps * kKvM;
    static constexpr int kBrKV = D == 64 ? 32 : 64;

    // dynamic shared memory (bytes) of each kernel; K/V (or Q/dO) tiles are double-buffered
    static constexpr int kFwdSmem = (kBrF * D + 2 * 2 * kBcF * D) * 2;
    static constexpr int kDqSmem = (2 * kBrQ * D + 2 * 2 * kBcQ * D) * 2 + 2 * kBrQ * 4;
    static constexpr int kDkvSmem = (2 * kBcKV * D + 2 * 2 * kBrKV * D) * 2 + 2 * 2 * kBrKV * 4;
};

// ---------------------------------------------------------------- shared-memory tiles
// Element offset of 16-byte chunk `chunk` (8 bf16) of row `row` in a swizzled tile with D columns.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; `valid` false writes zeros (src is not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
// The wait of a two-stage cp.async pipeline, before the block works on the current stage: when
// there is a next tile, start its copies into the other stage (prefetch_next) and wait until only
// those are in flight; else wait until none is. The caller's barrier follows.
template <typename Prefetch>
__device__ __forceinline__ void cp_async_next_stage(bool has_next, Prefetch prefetch_next) {
    if (has_next) {
        prefetch_next();
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
}

// Rows [t0, t0 + R) of one (b, h) slice (row stride `st` elements) -> swizzled tile (R, D);
// rows >= T are zero-filled, so ragged tiles need no special case in the math.
template <int R, int D, int kThreads>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* slice, int64_t st, int t0,
                                                int T, int tid) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int idx = tid; idx < R * kChunks; idx += kThreads) {
        const int row = idx / kChunks, chunk = idx % kChunks;
        const int t = t0 + row;
        const bool valid = t < T;
        const bf16* src = slice + (int64_t)(valid ? t : 0) * st + chunk * 8;
        cp_async_16(tile + swizzled<D>(row, chunk), src, valid);
    }
}

// ---------------------------------------------------------------- tensor-core fragments
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// acc (16x8) += a (16x16) · b (16x8)
__device__ __forceinline__ void mma_bf16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats -> bf16x2 in one register, `lo` in the low half (the lower column index)
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// A operand: rows r0..r0+15, columns k0..k0+15 of a row-major tile.
// All fragment corners (r0, n0, k0) are multiples of 16, so row & 7 == lane & 7 and the swizzled
// element offset splits into a per-lane part XOR a per-call constant: swizzled(r0 + rl, k0/8 + cl)
// = r0·D + ((rl·D + ((cl ^ (lane & 7)) << 3)) ^ k0). The per-lane part is cheap to recompute, so
// the compiler need not keep one address register per unrolled load.
template <int D>
__device__ __forceinline__ void load_frag_a(uint32_t (&a)[4], const bf16* tile, int r0, int k0,
                                            int lane) {
    const int lane_off = (lane & 15) * D + (((lane >> 4) ^ (lane & 7)) << 3);
    ldmatrix_x4(a, tile + r0 * D + (lane_off ^ k0));
}
// B operands of two n8 tiles (n0.., n0+8..) for the k16 slice k0, where B[k][n] = tile[n][k]
// (the tile's rows are the n index: K in Q·Kᵀ). b[0], b[1]: tile n0; b[2], b[3]: tile n0+8.
template <int D>
__device__ __forceinline__ void load_frag_b_nk(uint32_t (&b)[4], const bf16* tile, int n0, int k0,
                                               int lane) {
    const int lane_off =
        ((lane & 7) + ((lane >> 4) << 3)) * D + ((((lane >> 3) & 1) ^ (lane & 7)) << 3);
    ldmatrix_x4(b, tile + n0 * D + (lane_off ^ k0));
}
// Same, where B[k][n] = tile[k][n] (the tile's rows are the k index: V in P·V), via .trans.
template <int D>
__device__ __forceinline__ void load_frag_b_kn(uint32_t (&b)[4], const bf16* tile, int k0, int n0,
                                               int lane) {
    const int lane_off =
        ((lane & 7) + (((lane >> 3) & 1) << 3)) * D + (((lane >> 4) ^ (lane & 7)) << 3);
    ldmatrix_x4_trans(b, tile + k0 * D + (lane_off ^ n0));
}
// ---------------------------------------------------------------- warp products
// The products of a warp that owns kM m16 row tiles (rows r0 + 16m .. r0 + 16m + 15, m < kM):
// every B fragment is loaded once and used for all kM row tiles (kM = 1: one 16-row tile).

// acc[m] (16 x N) += A[r0+16m : r0+16m+16, 0:D] · Bt[0:N, 0:D]ᵀ   (A and Bt in shared memory)
template <int D, int N, int kM>
__device__ __forceinline__ void warp_gemm_abt_m(float (&acc)[kM][N / 8][4], const bf16* tile_a,
                                                int r0, const bf16* tile_bt, int lane) {
#pragma unroll 1
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[kM][4];
#pragma unroll
        for (int m = 0; m < kM; ++m) load_frag_a<D>(a[m], tile_a, r0 + 16 * m, kk * 16, lane);
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t b[4];
            load_frag_b_nk<D>(b, tile_bt, nn * 16, kk * 16, lane);
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                mma_bf16(acc[m][2 * nn], a[m], b[0], b[1]);
                mma_bf16(acc[m][2 * nn + 1], a[m], b[2], b[3]);
            }
        }
    }
}
// Same with the A fragments already in registers (a[m][kk]: row tile m, k16 slice kk).
template <int D, int N, int kM>
__device__ __forceinline__ void warp_gemm_abt_regs_m(float (&acc)[kM][N / 8][4],
                                                     const uint32_t (&a)[kM][D / 16][4],
                                                     const bf16* tile_bt, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int nn = 0; nn < N / 16; ++nn) {
            uint32_t b[4];
            load_frag_b_nk<D>(b, tile_bt, nn * 16, kk * 16, lane);
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                mma_bf16(acc[m][2 * nn], a[m][kk], b[0], b[1]);
                mma_bf16(acc[m][2 * nn + 1], a[m][kk], b[2], b[3]);
            }
        }
}
// acc[m] (16 x D) += P[m] (16 x K, accumulator layout, rounded to bf16) · tile[0:K, 0:D]
template <int D, int K, int kM>
__device__ __forceinline__ void warp_gemm_pv_m(float (&acc)[kM][D / 8][4],
                                               const float (&p)[kM][K / 8][4], const bf16* tile,
                                               int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t a[kM][4];
#pragma unroll
        for (int m = 0; m < kM; ++m) {
            a[m][0] = pack_bf16(p[m][2 * kk][0], p[m][2 * kk][1]);
            a[m][1] = pack_bf16(p[m][2 * kk][2], p[m][2 * kk][3]);
            a[m][2] = pack_bf16(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
            a[m][3] = pack_bf16(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t b[4];
            load_frag_b_kn<D>(b, tile, kk * 16, dn * 16, lane);
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                mma_bf16(acc[m][2 * dn], a[m], b[0], b[1]);
                mma_bf16(acc[m][2 * dn + 1], a[m], b[2], b[3]);
            }
        }
    }
}

// LSE (natural log, (B,H,T) row t of one head) in log2 units for the backward; -inf (a row without
// keys) and padding rows become +inf so that P = exp2(S - LSE) = 0 there instead of inf·0 = NaN.
__device__ __forceinline__ float lse_log2_or_inf(const float* lse_bh, int t, int T) {
    if (t >= T) return INFINITY;
    const float x = lse_bh[t];
    return x == -INFINITY ? INFINITY : x * 1.4426950408889634f;  // log2(e)
}

// ---------------------------------------------------------------- online softmax
// One key tile's step of the online softmax (log2 units) for a warp's kM row tiles: s (16·kM × Bc,
// accumulator layout) holds scores, scaled by scale_log2 here (pass 1 for scores already scaled
// and in log2 units); masked entries are -inf. New running max; the old running sums and O
// rescaled by exp2(m_old − m_new); s replaced by p = exp2(s·scale_log2 − m_new) (one FFMA and one
// exp2), whose row sums (this thread's part) join l_run. Used by flash_forward_bf16 and hyper's
// tile forward.
template <int D, int Bc, int kM>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kM][Bc / 8][4], float (&m_run)[kM][2],
                                                    float (&l_run)[kM][2], float (&o_acc)[kM][D / 8][4],
                                                    float scale_log2) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
        float mx0 = -INFINITY, mx1 = -INFINITY;  // raw (unscaled) row maxima of the tile
#pragma unroll
        for (int nt = 0; nt < Bc / 8; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(s[m][nt][0], s[m][nt][1]));
            mx1 = fmaxf(mx1, fmaxf(s[m][nt][2], s[m][nt][3]));
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {  // the 4 threads of a row
            mx0 = fmaxf(mx0, __shfl_xor_sync(kFullMask, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(kFullMask, mx1, off));
        }
        mx0 = fmaxf(m_run[m][0], mx0 * scale_log2);  // scale > 0 commutes with max
        mx1 = fmaxf(m_run[m][1], mx1 * scale_log2);
        // a row with no key so far keeps max -inf; subtract 0 instead so exp2 gives 0
        const float base0 = mx0 == -INFINITY ? 0.f : mx0;
        const float base1 = mx1 == -INFINITY ? 0.f : mx1;
        const float alpha0 = exp2f(m_run[m][0] - base0), alpha1 = exp2f(m_run[m][1] - base1);
        m_run[m][0] = mx0;
        m_run[m][1] = mx1;
        float l0 = l_run[m][0] * alpha0, l1 = l_run[m][1] * alpha1;
#pragma unroll
        for (int nt = 0; nt < Bc / 8; ++nt) {
            s[m][nt][0] = exp2f(fmaf(s[m][nt][0], scale_log2, -base0));
            s[m][nt][1] = exp2f(fmaf(s[m][nt][1], scale_log2, -base0));
            s[m][nt][2] = exp2f(fmaf(s[m][nt][2], scale_log2, -base1));
            s[m][nt][3] = exp2f(fmaf(s[m][nt][3], scale_log2, -base1));
            l0 += s[m][nt][0] + s[m][nt][1];
            l1 += s[m][nt][2] + s[m][nt][3];
        }
        l_run[m][0] = l0;
        l_run[m][1] = l1;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            o_acc[m][dn][0] *= alpha0;
            o_acc[m][dn][1] *= alpha0;
            o_acc[m][dn][2] *= alpha1;
            o_acc[m][dn][3] *= alpha1;
        }
    }
}
