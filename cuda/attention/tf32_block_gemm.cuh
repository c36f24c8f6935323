// The block GEMM on the tensor cores of polysketch.cu's fp32 path and TF32 fallbacks (performer.cu
// used it too until its products moved to batched cuBLAS GEMMs over materialised operands, 46.7 ->
// 23.8 ms f+b at B=2 H=12 T=32k on the H100): one 256-thread block computes a 64×64 fp32 output tile, acc += A·B over a k range,
// with the operands read through loader functors (so an operand may be computed on the fly:
// features, normalised inputs, activations) and staged in shared memory 16 k at a time; the
// products run as mma.sync m16n8k8 TF32 with 1, 2 or 3 TF32 products per fp32 product (Tf32
// below). Deterministic: a fixed sequence of mma per output element. Moved verbatim from
// performer.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace {

constexpr int kTile = 64;      // block_gemm output tile: kTile × kTile
constexpr int kBK = 16;        // block_gemm reduction slab
constexpr int kThreads = 256;  // threads of a block_gemm block

// acc (this thread's 16 entries of the block's 64 × 64 tile) += Σ_{k in [k_begin, k_end)} A(i,k)·B(k,j).
// load_a(i, k) and load_b(k, j) return the operands (0 outside the matrices); they are called
// with k < k_end only. kAKFast / kBKFast: consecutive threads load consecutive k (operand stored
// with k contiguous) rather than consecutive i / j. Ends with __syncthreads. The operands of a
// 16-deep k slab are staged in shared memory (the next slab is loaded into registers while the
// current one is multiplied) and multiplied on the tensor cores with fp32 accuracy ("3xTF32"):
// every operand x is split into x_hi = tf32(x) and x_lo = tf32(x − x_hi) (x − x_hi is exact in
// fp32, so x_hi + x_lo carries 22 of fp32's 24 significant bits), and A·B = A_lo·B_hi + A_hi·B_lo
// + A_hi·B_hi, each term an mma.sync m16n8k8 with fp32 accumulation (the dropped A_lo·B_lo is
// ~2^-22 relative). Deterministic: a fixed sequence of mma per output element.
// Warp w (of 8) owns rows 16·(w%4) + [0, 16) and columns 32·(w/4) + [0, 32) as four m16n8 tiles;
// with g = lane/4, t = lane%4, acc.v[nt][q] is element (16·(w%4) + g + 8·(q/2), 32·(w/4) + 8·nt + 2t + q%2)
// (the PTX m16n8k8 accumulator layout: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8).
// Shared rows are padded by 8 floats: the fragment reads (lane 4g + t reads k = t, i = g) hit 32
// distinct banks.
enum class Tf32 { Split, SplitA, Single };  // see block_gemm

struct GemmSmem {
    float a[kBK][kTile + 8];  // a[k][i] = A(i, k0 + k)
    float b[kBK][kTile + 8];  // b[k][j] = B(k0 + k, j)
};

struct TcAcc {
    float v[4][4];
};

__device__ __forceinline__ void zero(TcAcc& acc) {
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) acc.v[nt][q] = 0.f;
}

// Calls fn(i, j, value) for this thread's 16 entries of the tile.
template <typename Fn>
__device__ __forceinline__ void for_tile(const TcAcc& acc, Fn fn) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row = 16 * (warp % 4) + g, col = 32 * (warp / 4) + 2 * t;
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int q = 0; q < 4; q++) fn(row + 8 * (q / 2), col + 8 * nt + q % 2, acc.v[nt][q]);
}

// x rounded to tf32 (10 mantissa bits, ties away from zero): fp32 bits with the low 13 bits zero.
__device__ __forceinline__ uint32_t round_tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }

// x = hi + lo (+ ~2^-22·|x|), both tf32.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
    hi = round_tf32(x);
    lo = round_tf32(x - __uint_as_float(hi));
}

// d += a·b for one m16n8k8 tile (PTX fragment layouts, g = lane/4, t = lane%4: a0 (g, t),
// a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (k = t, n = g), b1 (k = t+4, n = g)).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// How many TF32 products make one fp32 product (the `kTf32` template argument):
//   Tf32::Split   3 products (above): fp32 accuracy.
//   Tf32::SplitA  2 products, A_lo·B_hi + A_hi·B_hi: exact when B is exactly TF32 (bf16 values,
//                 ones), as in M = g·[v|1]ᵀ, whose entries cancel (dO·v_j − dO·o_i) and must keep
//                 fp32 accuracy (at T = 1 they are 0 by math).
//   Tf32::Single  1 product (operands rounded to 2^-11 relative, fp32 accumulation), 3× fewer mma.
// The bf16 path uses Single for the products of features, values and gradients (Tf32Of<bf16>:
// below the bf16 rounding of its outputs); the logits x̃·Ωᵀ and the feature-map gradient Ωᵀ·da
// stay Split in both paths, since an absolute logit error δ becomes a relative feature error δ and
// |a| reaches hundreds for large inputs.
template <Tf32 kTf32, bool kAKFast, bool kBKFast, typename LoadA, typename LoadB>
__device__ __forceinline__ void block_gemm(TcAcc& acc, GemmSmem& sm, int k_begin, int k_end, LoadA load_a,
                                           LoadB load_b) {
    constexpr int kPerThread = kBK * kTile / kThreads;  // operand elements each thread stages per slab
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int row = 16 * (warp % 4) + g, col = 32 * (warp / 4) + g;
    float next_a[kPerThread], next_b[kPerThread];
    auto fetch = [&](int k0) {  // the slab [k0, k0 + kBK) into registers
#pragma unroll
        for (int it = 0; it < kPerThread; it++) {
            const int e = tid + it * kThreads;
            const int kk = kAKFast ? e % kBK : e / kTile, i = kAKFast ? e / kBK : e % kTile;
            next_a[it] = k0 + kk < k_end ? load_a(i, k0 + kk) : 0.f;
        }
#pragma unroll
        for (int it = 0; it < kPerThread; it++) {
            const int e = tid + it * kThreads;
            const int kk = kBKFast ? e % kBK : e / kTile, j = kBKFast ? e / kBK : e % kTile;
            next_b[it] = k0 + kk < k_end ? load_b(k0 + kk, j) : 0.f;
        }
    };
    if (k_begin < k_end) fetch(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
        for (int it = 0; it < kPerThread; it++) {
            const int e = tid + it * kThreads;
            const int kk = kAKFast ? e % kBK : e / kTile, i = kAKFast ? e / kBK : e % kTile;
            sm.a[kk][i] = next_a[it];
        }
#pragma unroll
        for (int it = 0; it < kPerThread; it++) {
            const int e = tid + it * kThreads;
            const int kk = kBKFast ? e % kBK : e / kTile, j = kBKFast ? e / kBK : e % kTile;
            sm.b[kk][j] = next_b[it];
        }
        __syncthreads();
        if (k0 + kBK < k_end) fetch(k0 + kBK);
#pragma unroll
        for (int k8 = 0; k8 < kBK; k8 += 8) {
            uint32_t a_hi[4], a_lo[4];
            split_tf32(sm.a[k8 + t][row], a_hi[0], a_lo[0]);
            split_tf32(sm.a[k8 + t][row + 8], a_hi[1], a_lo[1]);
            split_tf32(sm.a[k8 + t + 4][row], a_hi[2], a_lo[2]);
            split_tf32(sm.a[k8 + t + 4][row + 8], a_hi[3], a_lo[3]);
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                uint32_t b_hi[2], b_lo[2];
                split_tf32(sm.b[k8 + t][col + 8 * nt], b_hi[0], b_lo[0]);
                split_tf32(sm.b[k8 + t + 4][col + 8 * nt], b_hi[1], b_lo[1]);
                if (kTf32 != Tf32::Single) mma_tf32(acc.v[nt], a_lo, b_hi);
                if (kTf32 == Tf32::Split) mma_tf32(acc.v[nt], a_hi, b_lo);
                mma_tf32(acc.v[nt], a_hi, b_hi);
            }
        }
        __syncthreads();
    }
}

// Products of features, values and gradients: 3xTF32 in the fp32 (checking) path, one TF32
// product in the bf16 path (see block_gemm).
template <typename Tin>
constexpr Tf32 Tf32Of = std::is_same<Tin, float>::value ? Tf32::Split : Tf32::Single;

}  // namespace
