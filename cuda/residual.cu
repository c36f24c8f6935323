// Elementwise ops of the residual stream: out = a + b, acc += x (summing the gradients that flow
// into one residual), and the dtype-converting copy behind Ops::copy. All add in fp32.
#include "kernels.cuh"

namespace gpu {
namespace {

template <typename T>
__global__ void residual_forward_kernel(T* out, const T* a, const T* b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename TAcc, typename TX>
__global__ void add_inplace_kernel(TAcc* acc, const TX* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc[i] = from_f32<TAcc>(to_f32(acc[i]) + to_f32(x[i]));
}

template <typename TDst, typename TSrc>
__global__ void convert_kernel(TDst* dst, const TSrc* src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_f32<TDst>(to_f32(src[i]));
}

int elementwise_blocks(size_t n) { return (int)std::min<size_t>((n + 255) / 256, 65536); }

}  // namespace

template <typename T>
void residual_forward(T* out, const T* a, const T* b, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    residual_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(out, a, b, n);
    CUDA_LAUNCH_CHECK();
}

template <typename TAcc, typename TX>
void add_inplace(TAcc* acc, const TX* x, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    add_inplace_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(acc, x, n);
    CUDA_LAUNCH_CHECK();
}

template <typename TDst, typename TSrc>
void convert(TDst* dst, const TSrc* src, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    convert_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dst, src, n);
    CUDA_LAUNCH_CHECK();
}

template void residual_forward<float>(float*, const float*, const float*, size_t, cudaStream_t);
template void residual_forward<bf16>(bf16*, const bf16*, const bf16*, size_t, cudaStream_t);
template void add_inplace<float, float>(float*, const float*, size_t, cudaStream_t);
template void add_inplace<float, bf16>(float*, const bf16*, size_t, cudaStream_t);
template void add_inplace<bf16, float>(bf16*, const float*, size_t, cudaStream_t);
template void add_inplace<bf16, bf16>(bf16*, const bf16*, size_t, cudaStream_t);
template void convert<float, float>(float*, const float*, size_t, cudaStream_t);
template void convert<float, bf16>(float*, const bf16*, size_t, cudaStream_t);
template void convert<bf16, float>(bf16*, const float*, size_t, cudaStream_t);
template void convert<bf16, bf16>(bf16*, const bf16*, size_t, cudaStream_t);

}  // namespace gpu
