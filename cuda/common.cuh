// Shared device-side helpers of the CUDA backend: the error macros that turn a failed CUDA or
// cuBLAS call into an Error naming file:line and the library's message, the conversions between
// the activation types (float, __nv_bfloat16) and fp32, and warp/block reductions.
// Every kernel in cuda/ accumulates in fp32 whatever its storage type.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "check.h"
#include "ops.h"

// ---------------------------------------------------------------- error checking
#define CUDA_CHECK(call)                                                                   \
    do {                                                                                   \
        cudaError_t err_ = (call);                                                         \
        if (err_ != cudaSuccess)                                                           \
            FAIL("CUDA error at %s:%d: %s (%s)", __FILE__, __LINE__, cudaGetErrorString(err_), \
                 #call);                                                                   \
    } while (0)

#define CUBLAS_CHECK(call)                                                                 \
    do {                                                                                   \
        cublasStatus_t st_ = (call);                                                       \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                  \
            FAIL("cuBLAS error at %s:%d: %s (%s)", __FILE__, __LINE__,                     \
                 cublasGetStatusString(st_), #call);                                       \
    } while (0)

// After every kernel launch: a bad launch configuration shows here, at the launch site.
#define CUDA_LAUNCH_CHECK()                                                                \
    do {                                                                                   \
        cudaError_t err_ = cudaGetLastError();                                             \
        if (err_ != cudaSuccess)                                                           \
            FAIL("CUDA kernel launch failed at %s:%d: %s", __FILE__, __LINE__,             \
                 cudaGetErrorString(err_));                                                \
    } while (0)

// ---------------------------------------------------------------- types
using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

// ---------------------------------------------------------------- reductions
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. The order is fixed by the block shape, so the result is deterministic.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
    __shared__ Acc warp_partials[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // warp_partials may still be read by a previous call
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    v = lane < warps ? warp_partials[lane] : Acc(0);
    return warp_sum(v);
}
