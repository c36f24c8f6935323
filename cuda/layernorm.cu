// LayerNorm forward and backward, one warp per row (C may be any size; lanes stride over it).
// The backward writes dinp per row, and reduces dw, db over rows deterministically: each block
// sums a fixed chunk of rows for 32 channels into a partial (chunks, C) in scratch, then the
// partials are added in chunk order (add_column_partials). No float atomics anywhere.
#include "kernels.cuh"

namespace gpu {
namespace {

constexpr float kLayerNormEps = 1e-5f;
constexpr int kRowsPerBlock = 8;  // warps per block in the per-row kernels

// out (N,C) = (inp - mean) * rstd * w + b; two passes over the row (mean, then variance)
template <typename T>
__global__ void layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* inp,
                                         const T* w, const T* b, int N, int C) {
    const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;  // the whole warp leaves together
    const T* x = inp + (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += to_f32(x[c]);
    const float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = to_f32(x[c]) - m;
        var += d * d;
    }
    const float s = 1.0f / sqrtf(warp_sum(var) / C + kLayerNormEps);
    T* o = out + (size_t)row * C;
    for (int c = lane; c < C; c += 32) o[c] = from_f32<T>((to_f32(x[c]) - m) * s * to_f32(w[c]) + to_f32(b[c]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// residual (N,C) = a + b (fp32 sum rounded to T, as residual_forward), then out = LayerNorm of it
// exactly as layernorm_forward_kernel: the same rounded values summed in the same order, so the
// outputs are bitwise those of the two kernels. Each lane rereads only the residual values it
// wrote itself. Saves one pass over the residual stream per LayerNorm (and a launch).
template <typename T>
__global__ void residual_layernorm_forward_kernel(T* residual, T* out, float* mean, float* rstd, const T* a,
                                                  const T* b, const T* w, const T* bias, int N, int C) {
    const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;  // the whole warp leaves together
    const size_t off = (size_t)row * C;
    T* x = residual + off;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const T v = from_f32<T>(to_f32(a[off + c]) + to_f32(b[off + c]));
        x[c] = v;
        sum += to_f32(v);
    }
    const float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float d = to_f32(x[c]) - m;
        var += d * d;
    }
    const float s = 1.0f / sqrtf(warp_sum(var) / C + kLayerNormEps);
    T* o = out + off;
    for (int c = lane; c < C; c += 32) o[c] = from_f32<T>((to_f32(x[c]) - m) * s * to_f32(w[c]) + to_f32(bias[c]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// dinp (N,C) += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = w * dout
template <typename T>
__global__ void layernorm_backward_dinp_kernel(T* dinp, const T* dout, const T* inp, const T* w,
                                               const float* mean, const float* rstd, int N, int C) {
    const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const T* x = inp + (size_t)row * C;
    const T* dy = dout + (size_t)row * C;
    const float m = mean[row], s = rstd[row];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float norm = (to_f32(x[c]) - m) * s, dnorm = to_f32(w[c]) * to_f32(dy[c]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    const float dnorm_mean = warp_sum(dnorm_sum) / C, dnorm_norm_mean = warp_sum(dnorm_norm_sum) / C;
    T* dx = dinp + (size_t)row * C;
    for (int c = lane; c < C; c += 32) {
        const float norm = (to_f32(x[c]) - m) * s, dnorm = to_f32(w[c]) * to_f32(dy[c]);
        const float g = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        dx[c] = from_f32<T>(to_f32(dx[c]) + g);
    }
}

// Partials of dw = Σ_rows norm * dout and db = Σ_rows dout over one chunk of rows.
// block (32 channels, 8 row lanes), grid (ceil(C/32), chunks); the 8 lanes are added in order.
template <typename T>
__global__ void layernorm_param_partials_kernel(float* partial_dw, float* partial_db, const T* dout,
                                                const T* inp, const float* mean, const float* rstd,
                                                int N, int C, int chunk_rows) {
    __shared__ float sw[8][32], sb[8][32];
    const int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    const int r0 = chunk * chunk_rows, r1 = min(N, r0 + chunk_rows);
    float acc_w = 0.0f, acc_b = 0.0f;
    if (c < C) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            const float dy = to_f32(dout[(size_t)r * C + c]);
            const float norm = (to_f32(inp[(size_t)r * C + c]) - mean[r]) * rstd[r];
            acc_w += norm * dy;
            acc_b += dy;
        }
    }
    sw[threadIdx.y][threadIdx.x] = acc_w;
    sb[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
        for (int y = 0; y < 8; y++) {
            tw += sw[y][threadIdx.x];
            tb += sb[y][threadIdx.x];
        }
        partial_dw[(size_t)chunk * C + c] = tw;
        partial_db[(size_t)chunk * C + c] = tb;
    }
}

}  // namespace

template <typename T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b,
                       int N, int C, cudaStream_t stream) {
    if (N == 0) return;
    layernorm_forward_kernel<<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        out, mean, rstd, inp, w, b, N, C);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b, const T* w,
                                const T* bias, int N, int C, cudaStream_t stream) {
    if (N == 0) return;
    residual_layernorm_forward_kernel<<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        residual, out, mean, rstd, a, b, w, bias, N, C);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
void layernorm_backward(T* dinp, float* dw, float* db, const T* dout, const T* inp, const T* w,
                        const float* mean, const float* rstd, int N, int C,
                        DeviceScratch& scratch, cudaStream_t stream) {
    if (N == 0) return;
    layernorm_backward_dinp_kernel<<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32, 0, stream>>>(
        dinp, dout, inp, w, mean, rstd, N, C);
    CUDA_LAUNCH_CHECK();
    const int chunks = column_chunks(N), chunk_rows = column_chunk_rows(N);
    float* partials = static_cast<float*>(scratch.get(2 * (size_t)chunks * C * sizeof(float)));
    float* partial_dw = partials;                       // (chunks, C)
    float* partial_db = partials + (size_t)chunks * C;  // (chunks, C)
    layernorm_param_partials_kernel<<<dim3(ceil_div(C, 32), chunks), dim3(32, 8), 0, stream>>>(
        partial_dw, partial_db, dout, inp, mean, rstd, N, C, chunk_rows);
    CUDA_LAUNCH_CHECK();
    add_column_partials(dw, partial_dw, chunks, C, stream);
    add_column_partials(db, partial_db, chunks, C, stream);
}

template void layernorm_forward<float>(float*, float*, float*, const float*, const float*, const float*, int, int, cudaStream_t);
template void layernorm_forward<bf16>(bf16*, float*, float*, const bf16*, const bf16*, const bf16*, int, int, cudaStream_t);
template void residual_layernorm_forward<float>(float*, float*, float*, float*, const float*, const float*,
                                                const float*, const float*, int, int, cudaStream_t);
template void residual_layernorm_forward<bf16>(bf16*, bf16*, float*, float*, const bf16*, const bf16*, const bf16*,
                                               const bf16*, int, int, cudaStream_t);
template void layernorm_backward<float>(float*, float*, float*, const float*, const float*, const float*, const float*, const float*, int, int, DeviceScratch&, cudaStream_t);
template void layernorm_backward<bf16>(bf16*, float*, float*, const bf16*, const bf16*, const bf16*, const float*, const float*, int, int, DeviceScratch&, cudaStream_t);

}  // namespace gpu
