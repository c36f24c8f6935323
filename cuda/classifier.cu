// Fused softmax cross-entropy over the logits (N, Vp), one block per row. Each thread keeps an
// online (max, sum of exp) over its strided columns < V, so the row is read once for the
// normalizer; the block combines the pairs in a fixed order. With backward the row is overwritten
// in place by dloss·(softmax − onehot(target)) and the padding columns [V, Vp) by 0.
#include "kernels.cuh"

namespace gpu {
namespace {

constexpr int kThreads = 512;

// (m, s) ⊕ (m2, s2): the running max and the sum of exp(x - max) of the union
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

template <typename T>
__global__ void crossentropy_kernel(T* logits, float* losses, const int* targets, int V, int Vp,
                                    float dloss, bool backward) {
    __shared__ float warp_m[kThreads / 32], warp_s[kThreads / 32];
    const int row = blockIdx.x;
    T* x = logits + (size_t)row * Vp;
    // -FLT_MAX rather than -inf as the empty max keeps exp(m - mx) finite (no inf - inf)
    float m = -FLT_MAX, s = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float v = to_f32(x[c]);
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(kFullMask, m, off), s2 = __shfl_xor_sync(kFullMask, s, off);
        combine(m, s, m2, s2);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        warp_m[warp] = m;
        warp_s[warp] = s;
    }
    __syncthreads();
    m = warp_m[0];
    s = warp_s[0];
    for (int w = 1; w < (int)blockDim.x / 32; w++) combine(m, s, warp_m[w], warp_s[w]);  // fixed order

    // a target outside [0, V) gives a NaN loss (the trainer's NaN check names the step)
    const int target = targets[row];
    const bool valid = target >= 0 && target < V;
    if (threadIdx.x == 0) losses[row] = valid ? logf(s) + m - to_f32(x[target]) : NAN;
    if (!backward) return;
    __syncthreads();  // x[target] was read above before it is overwritten below
    const float inv_s = 1.0f / s;
    for (int c = threadIdx.x; c < Vp; c += blockDim.x) {
        float g = 0.0f;
        if (c < V) {
            const float p = expf(to_f32(x[c]) - m) * inv_s;
            g = dloss * (p - (c == target ? 1.0f : 0.0f));
        }
        x[c] = from_f32<T>(g);
    }
}

}  // namespace

template <typename T>
void crossentropy(T* logits, float* losses, const int* targets, int N, int V, int Vp, float dloss,
                  bool backward, cudaStream_t stream) {
    if (N == 0) return;
    crossentropy_kernel<<<N, kThreads, 0, stream>>>(logits, losses, targets, V, Vp, dloss, backward);
    CUDA_LAUNCH_CHECK();
}

template void crossentropy<float>(float*, float*, const int*, int, int, int, float, bool, cudaStream_t);
template void crossentropy<bf16>(bf16*, float*, const int*, int, int, int, float, bool, cudaStream_t);

}  // namespace gpu
