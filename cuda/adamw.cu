// AdamW step, elementwise, the same formula as the CPU reference (src/cpu_kernels.h):
//   g = grad·grad_scale; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
//   p -= lr·( m̂/(√v̂ + eps) + wd·p ),  m̂ = m/(1-β1^step), v̂ = v/(1-β2^step).
// With master weights p is the fp32 master, and the bf16 params are its round-to-nearest copy
// (deterministic, no stochastic rounding); without, p is the fp32 params themselves.
#include <cmath>

#include "kernels.cuh"

namespace gpu {
namespace {

template <typename T>
__global__ void adamw_kernel(T* params, float* master, const float* grads, float* m, float* v,
                             size_t n, float lr, float beta1, float beta2, float eps, float wd,
                             float bias_correction1, float bias_correction2, float grad_scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grads[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float p = master ? master[i] : to_f32(params[i]);
        const float mhat = mi / bias_correction1, vhat = vi / bias_correction2;
        p -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p);
        if (master) master[i] = p;
        params[i] = from_f32<T>(p);
    }
}

}  // namespace

template <typename T>
void adamw(T* params, float* master, const float* grads, float* m, float* v, size_t n,
           const AdamWStep& s, cudaStream_t stream) {
    if (n == 0) return;
    const float bc1 = (float)(1.0 - std::pow((double)s.beta1, s.step));
    const float bc2 = (float)(1.0 - std::pow((double)s.beta2, s.step));
    const int blocks = (int)std::min<size_t>((n + 255) / 256, 65536);
    adamw_kernel<<<blocks, 256, 0, stream>>>(params, master, grads, m, v, n, s.lr, s.beta1, s.beta2, s.eps,
                                             s.weight_decay, bc1, bc2, s.grad_scale);
    CUDA_LAUNCH_CHECK();
}

template void adamw<float>(float*, float*, const float*, float*, float*, size_t, const AdamWStep&, cudaStream_t);
template void adamw<bf16>(bf16*, float*, const float*, float*, float*, size_t, const AdamWStep&, cudaStream_t);

}  // namespace gpu
