// Hopper (sm_90a) warpgroup MMA building blocks for the flash attention kernels: bf16 tiles in
// shared memory in the 128-byte-swizzled layout that wgmma reads through matrix descriptors, the
// descriptors (K-major and MN-major operands, advanced along K in k16 slices), and inline-asm
// wrappers of wgmma.mma_async m64n64k16 / m64n128k16 .f32.bf16.bf16 (A from shared memory: SS,
// or from registers: RS) with the fences and commit/wait groups around them.
// Only files built with -gencode=arch=compute_90a,code=sm_90a may include it (Makefile:
// WGMMA_OBJ); tests/gpu/test_wgmma_gpu.cu proves every piece on the H100 (tests/gpu/WGMMA.md).
//
// Shared-memory tile, SwizzledTile<R, C>: a logical row-major R x C bf16 matrix (R % 8 == 0,
// C % 64 == 0) stored as C/64 column blocks of R x 64, one after the other (block b: columns
// 64b..64b+63, R·128 bytes). In a block, row r takes the 128 bytes at r·128 and its 16-byte chunk
// c (columns 64b+8c .. 64b+8c+7) sits in chunk slot c ^ (r % 8). Eight rows (1024 bytes) form
// one swizzle atom. This is the hardware's 128-byte swizzle (byte-address bits [4,7) XOR bits
// [7,10)), applied to the absolute shared-memory address: a tile must start on a 1024-byte
// boundary (descriptor base offset 0). R·128 is a multiple of 1024, so every block does too.
//
// Matrix descriptor (PTX ISA "Matrix Descriptor Format" for wgmma; CUTLASS cute::GmmaDescriptor):
//   bits  0-13  start address >> 4         bits 32-45  stride-dimension byte offset (SBO) >> 4
//   bits 16-29  leading-dim byte offset (LBO) >> 4
//   bits 49-51  base offset (0: 1024-aligned atoms)   bits 62-63  swizzle: 1 = 128B, 2 = 64B, 3 = 32B
// Operand orientation ("major" = the index that is contiguous in a 128-byte row):
//   K-major  (imm-trans 0): tile rows = the M (A) or N (B) index, tile columns = K. A of S = Q·Kᵀ
//            (Q: queries x d) and B = K (keys x d). SBO = 1024 (from 8 rows to the next 8); LBO
//            is unused with swizzling (set to 16, i.e. 1, as CUTLASS does). The k16 slice kk
//            starts (kk % 4)·32 bytes into the rows of column block kk / 4: the hardware adds
//            that offset before the XOR, so it lands on the right swizzled chunks.
//   MN-major (imm-trans 1, .f16/.bf16 only): tile rows = K, tile columns = the M or N index. B = V
//            of O = P·V (V: keys x d, row-major, d contiguous). SBO = 1024 (from 8 K-rows to the
//            next 8); LBO = R·128 (from one 64-column block of N to the next; used when N > 64).
//            The k16 slice kk starts 16 rows down: + kk·2048 bytes.
//
// Register layouts (warpgroup thread t: warp w = t / 32 within the warpgroup, lane l, g = l / 4,
// c = l % 4; the same per-warp pattern as mma.sync m16n8k16, warp w owning rows 16w..16w+15):
//   accumulator D (64 x N fp32): N/2 floats; d[4j + e], j = 0..N/8-1 (n8 block), e = 0..3, is
//       row 16w + g + 8·(e / 2), column 8j + 2c + (e % 2).
//   A fragment of one k16 slice (RS form): 4 registers of two bf16 (low half = lower column):
//       a[0] = (16w+g, 2c..2c+1)   a[1] = (16w+g+8, 2c..2c+1)
//       a[2] = (16w+g, 2c+8..2c+9) a[3] = (16w+g+8, 2c+8..2c+9)
//   So accumulator columns 16kk..16kk+15 are A slice kk: a[i] = pack_bf16(d[8kk+2i], d[8kk+2i+1])
//   (acc_to_a below): the scores S = Q·Kᵀ become P of P·V without leaving registers.
//
// Synchronisation recipe (every step by all 128 threads of the warpgroup, uniform control flow;
// a warpgroup is 4 consecutive warps starting at a warp index divisible by 4):
//   1. fill shared memory (cp.async + cp_async_wait, or plain stores), then fence_proxy_async()
//      in every writing thread, then a barrier: wgmma reads through the async proxy.
//   2. fence_operand() on the accumulators (and A registers), then warpgroup_fence()
//      (wgmma.fence): required before the first wgmma after registers it uses were touched by
//      ordinary instructions.
//   3. mma_ss / mma_rs for each k16 slice (accumulate = 0 on the first one: D = A·B).
//   4. commit_group(); wait_group<0>(); fence_operand() on the accumulators before reading them
//      or before overwriting the shared memory the mmas read (wait_group<1> keeps one batch in
//      flight). fence_operand() ties the registers to the volatile asm so the compiler cannot
//      move their ordinary uses across the fence / wait. Between 2 and 4, touch no accumulator.
// Index accumulator and fragment arrays with compile-time constants only (unrolled loops).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/attention/flash_traits.cuh"  // cp_async_16 / commit / wait, smem_addr, pack_bf16
#include "cuda/common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "cuda/attention/wgmma.cuh needs sm_90a: build this file with -gencode=arch=compute_90a,code=sm_90a (Makefile: WGMMA_OBJ)"
#endif

namespace wgmma {

constexpr int kWarpgroupThreads = 128;
constexpr int kSwizzleBytes = 128;                  // one row of a swizzle atom
constexpr int kAtomBytes = 8 * kSwizzleBytes;       // 8 rows: the SBO of both orientations
constexpr int kTileAlign = kAtomBytes;              // tiles start on a 1024-byte boundary

// ---------------------------------------------------------------- shared-memory tile layout
template <int R, int C>
struct SwizzledTile {
    static_assert(R > 0 && R % 8 == 0, "SwizzledTile: rows a multiple of 8 (one swizzle atom)");
    static_assert(C > 0 && C % 64 == 0, "SwizzledTile: columns a multiple of 64 (128 bytes)");
    static constexpr int kRows = R;
    static constexpr int kCols = C;
    static constexpr int kBlockBytes = R * kSwizzleBytes;  // one 64-column block
    static constexpr int kBytes = R * C * 2;

    // byte offset of 16-byte chunk `chunk` (columns 8·chunk .. 8·chunk+7) of row `row`
    __host__ __device__ static constexpr int chunk_byte(int row, int chunk) {
        return (chunk / 8) * kBlockBytes + row * kSwizzleBytes + (((chunk % 8) ^ (row % 8)) << 4);
    }
    // element offset of (row, col)
    __host__ __device__ static constexpr int elem(int row, int col) {
        return chunk_byte(row, col / 8) / 2 + col % 8;
    }
};

// Rows [0, R) of a row-major global matrix (row stride `ld` elements, rows 16-byte aligned) ->
// tile, with cp.async 16-byte chunks (consecutive threads take consecutive chunks of a row);
// rows >= rows_valid are zero-filled (src not read). The caller commits and waits (cp_async_*),
// then fence_proxy_async() and a barrier before wgmma reads the tile.
template <class Tile, int kThreads>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* src, int64_t ld,
                                                int rows_valid, int tid) {
    constexpr int kRowChunks = Tile::kCols / 8, kChunks = Tile::kRows * kRowChunks;
    char* base = reinterpret_cast<char*>(tile);
#pragma unroll
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
        const int q = tid + i * kThreads;
        if (kChunks % kThreads != 0 && q >= kChunks) break;
        const int row = q / kRowChunks, chunk = q % kRowChunks;
        const bool valid = row < rows_valid;
        cp_async_16(base + Tile::chunk_byte(row, chunk), src + (valid ? row * ld + chunk * 8 : 0),
                    valid);
    }
}

// Same with ordinary 16-byte loads and shared-memory stores (synchronous; for data computed in
// registers, e.g. dS in the backward, write chunks with store_chunk). Needs fence_proxy_async()
// in every writing thread, then a barrier, before wgmma reads the tile.
__device__ __forceinline__ void store_chunk(bf16* tile, int byte_offset, uint4 v) {
    *reinterpret_cast<uint4*>(reinterpret_cast<char*>(tile) + byte_offset) = v;
}
template <class Tile, int kThreads>
__device__ __forceinline__ void load_tile_sync(bf16* tile, const bf16* src, int64_t ld,
                                               int rows_valid, int tid) {
    constexpr int kRowChunks = Tile::kCols / 8, kChunks = Tile::kRows * kRowChunks;
#pragma unroll
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
        const int q = tid + i * kThreads;
        if (kChunks % kThreads != 0 && q >= kChunks) break;
        const int row = q / kRowChunks, chunk = q % kRowChunks;
        const uint4 v = row < rows_valid
                            ? *reinterpret_cast<const uint4*>(src + row * ld + chunk * 8)
                            : make_uint4(0, 0, 0, 0);
        store_chunk(tile, Tile::chunk_byte(row, chunk), v);
    }
}

// ---------------------------------------------------------------- matrix descriptors
// (x & 0x3FFFF) >> 4: shared addresses and offsets are below 256 KB, in 16-byte units (14 bits)
__host__ __device__ constexpr uint64_t desc_field(uint32_t bytes) {
    return (uint64_t)((bytes & 0x3FFFFu) >> 4);
}
// 128-byte-swizzle descriptor; base offset 0 (the operand's swizzle atoms are 1024-aligned)
__host__ __device__ constexpr uint64_t make_desc(uint32_t start, uint32_t lbo, uint32_t sbo) {
    return desc_field(start) | desc_field(lbo) << 16 | desc_field(sbo) << 32 | (uint64_t)1 << 62;
}
// Moves the start address by `bytes` (a multiple of 16). The start field cannot carry into the
// bits above it: shared addresses stay below 2^18 bytes.
__host__ __device__ constexpr uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
    return desc + (bytes >> 4);
}

// K-major operand whose M or N index starts at tile row `row0` (a multiple of 8) of a tile at
// shared address `tile_addr` (1024-aligned): descriptor of k16 slice 0, then of slice kk with
// desc_advance(desc, k_major_slice_bytes<Tile>(kk)).
__host__ __device__ constexpr uint64_t desc_k_major(uint32_t tile_addr, int row0 = 0) {
    return make_desc(tile_addr + row0 * kSwizzleBytes, 16, kAtomBytes);
}
template <class Tile>
__host__ __device__ constexpr uint32_t k_major_slice_bytes(int kk) {
    return (kk / 4) * Tile::kBlockBytes + (kk % 4) * 32;
}
// MN-major operand whose M or N index starts at tile column `col0` (a multiple of 64); slice kk
// with desc_advance(desc, mn_major_slice_bytes(kk)).
template <class Tile>
__host__ __device__ constexpr uint64_t desc_mn_major(uint32_t tile_addr, int col0 = 0) {
    return make_desc(tile_addr + (col0 / 64) * Tile::kBlockBytes, Tile::kBlockBytes, kAtomBytes);
}
__host__ __device__ constexpr uint32_t mn_major_slice_bytes(int kk) {
    return kk * 16 * kSwizzleBytes;
}

// ---------------------------------------------------------------- fences and groups
// orders this thread's ordinary shared-memory writes (st.shared, cp.async) before later reads
// by the async proxy (wgmma, TMA); a barrier must follow for other threads' wgmma
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void warpgroup_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit_group() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// waits until at most kPending committed groups are still running
template <int kPending>
__device__ __forceinline__ void wait_group() {
    static_assert(kPending >= 0 && kPending <= 7, "wgmma.wait_group: 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// pins registers in place relative to the surrounding volatile asm (fences, waits)
template <int n>
__device__ __forceinline__ void fence_operand(float (&r)[n]) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int n>
__device__ __forceinline__ void fence_operand(uint32_t (&r)[n]) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// accumulator columns 16kk..16kk+15 (fp32) -> A fragment of k16 slice kk (bf16, round to nearest)
template <int n>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&d)[n], int kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = pack_bf16(d[8 * kk + 2 * i], d[8 * kk + 2 * i + 1]);
}

// ---------------------------------------------------------------- wgmma.mma_async
#define WGMMA_ACC8(d, i)                                                                        \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define WGMMA_D32                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGMMA_D64                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

// d (64 x N fp32) = A (64 x 16) · B (16 x N) + (accumulate ? d : 0), A and B in shared memory.
// kTransA / kTransB: 0 = K-major operand (desc_k_major), 1 = MN-major (desc_mn_major).
template <int N, int kTransA, int kTransB>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                       int accumulate) {
    static_assert(N == 64 || N == 128, "mma_ss: N = 64 or 128");
    static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "trans: 0/1");
    if constexpr (N == 64) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32
            ", %32, %33, p, 1, 1, %35, %36;\n}\n"
            : WGMMA_ACC8(d, 0), WGMMA_ACC8(d, 8), WGMMA_ACC8(d, 16), WGMMA_ACC8(d, 24)
            : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB)
            : "memory");
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_D64
            ", %64, %65, p, 1, 1, %67, %68;\n}\n"
            : WGMMA_ACC8(d, 0), WGMMA_ACC8(d, 8), WGMMA_ACC8(d, 16), WGMMA_ACC8(d, 24),
              WGMMA_ACC8(d, 32), WGMMA_ACC8(d, 40), WGMMA_ACC8(d, 48), WGMMA_ACC8(d, 56)
            : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB)
            : "memory");
    }
}

// Same with A (64 x 16, bf16) from registers: `a` is this thread's fragment (layout above).
template <int N, int kTransB>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                       int accumulate) {
    static_assert(N == 64 || N == 128, "mma_rs: N = 64 or 128");
    static_assert(kTransB == 0 || kTransB == 1, "trans: 0/1");
    if constexpr (N == 64) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32
            ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
            : WGMMA_ACC8(d, 0), WGMMA_ACC8(d, 8), WGMMA_ACC8(d, 16), WGMMA_ACC8(d, 24)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),
              "n"(kTransB)
            : "memory");
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_D64
            ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
            : WGMMA_ACC8(d, 0), WGMMA_ACC8(d, 8), WGMMA_ACC8(d, 16), WGMMA_ACC8(d, 24),
              WGMMA_ACC8(d, 32), WGMMA_ACC8(d, 40), WGMMA_ACC8(d, 48), WGMMA_ACC8(d, 56)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),
              "n"(kTransB)
            : "memory");
    }
}
#undef WGMMA_ACC8
#undef WGMMA_D32
#undef WGMMA_D64

}  // namespace wgmma
