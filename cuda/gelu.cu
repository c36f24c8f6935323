// GELU with the tanh approximation (GPT-2's), forward and backward, elementwise in fp32:
//   gelu(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
#include "kernels.cuh"

namespace gpu {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

template <typename T>
__global__ void gelu_forward_kernel(T* out, const T* inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float x = to_f32(inp[i]);
        out[i] = from_f32<T>(0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x))));
    }
}

// dinp may alias dout: each element is read before it is written by the same thread.
template <typename T>
__global__ void gelu_backward_kernel(T* dinp, const T* inp, const T* dout, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float x = to_f32(inp[i]);
        const float th = tanhf(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
        const float sech2 = 1.0f - th * th;
        const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
        dinp[i] = from_f32<T>(grad * to_f32(dout[i]));
    }
}

int elementwise_blocks(size_t n) { return (int)std::min<size_t>((n + 255) / 256, 65536); }

}  // namespace

template <typename T>
void gelu_forward(T* out, const T* inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(out, inp, n);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_backward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dinp, inp, dout, n);
    CUDA_LAUNCH_CHECK();
}

template void gelu_forward<float>(float*, const float*, size_t, cudaStream_t);
template void gelu_forward<bf16>(bf16*, const bf16*, size_t, cudaStream_t);
template void gelu_backward<float>(float*, const float*, const float*, size_t, cudaStream_t);
template void gelu_backward<bf16>(bf16*, const bf16*, const bf16*, size_t, cudaStream_t);

}  // namespace gpu
