// Rotary position embedding on the q and k parts of the fused qkv buffer (B, T, 3, H, d), in
// place: within each head the interleaved pair (x[2i], x[2i+1]) at position t is rotated by
// t·theta^(-2i/d); the inverse (the backward, since the map is orthogonal) rotates by the
// negative angle. v is left alone. The angle is computed in double so long contexts stay exact.
#include "kernels.cuh"

namespace gpu {
namespace {

// one thread per (row, q|k, head, pair)
template <typename T>
__global__ void rope_kernel(T* qkv, int T_, int H, int d, double theta, double sign, size_t total) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int half = d / 2;
    const int i = (int)(idx % half);
    size_t rest = idx / half;
    const int h = (int)(rest % H);
    rest /= H;
    const int qk = (int)(rest % 2);
    const size_t row = rest / 2;
    const int t = (int)(row % T_);
    const double angle = sign * t * pow(theta, -2.0 * i / d);
    double sn, cs;
    sincos(angle, &sn, &cs);
    const float c = (float)cs, s = (float)sn;
    T* p = qkv + row * 3 * H * d + ((size_t)qk * H + h) * d + 2 * i;
    const float x0 = to_f32(p[0]), x1 = to_f32(p[1]);
    p[0] = from_f32<T>(x0 * c - x1 * s);
    p[1] = from_f32<T>(x0 * s + x1 * c);
}

}  // namespace

template <typename T>
void rope(T* qkv, int B, int T_, int H, int d, float theta, bool inverse, cudaStream_t stream) {
    const size_t total = (size_t)B * T_ * 2 * H * (d / 2);
    if (total == 0) return;
    rope_kernel<<<ceil_div(total, 256), 256, 0, stream>>>(qkv, T_, H, d, (double)theta, inverse ? -1.0 : 1.0, total);
    CUDA_LAUNCH_CHECK();
}

template void rope<float>(float*, int, int, int, int, float, bool, cudaStream_t);
template void rope<bf16>(bf16*, int, int, int, int, float, bool, cudaStream_t);

}  // namespace gpu
