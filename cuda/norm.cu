// Deterministic reductions: column sums of an (N, C) matrix over its rows (matmul's dbias, and
// the second stage of layernorm's dw/db) and the sum of squares of the gradients (for clipping).
// Both use a grid fixed by the problem size and sum partials in a fixed order, so the same input
// gives the same bits on every run.
#include "kernels.cuh"

namespace gpu {
namespace {

// dst[c] += Σ_k partials[k, c], k ascending
__global__ void add_column_partials_kernel(float* dst, const float* partials, int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int k = 0; k < chunks; k++) acc += partials[(size_t)k * C + c];
    dst[c] += acc;
}

// partials[chunk, c] = Σ_{rows of chunk} x[r, c]; block (32 channels, 8 row lanes)
template <typename T>
__global__ void column_sum_partials_kernel(float* partials, const T* x, int N, int C, int chunk_rows) {
    __shared__ float lanes[8][32];
    const int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    const int r0 = chunk * chunk_rows, r1 = min(N, r0 + chunk_rows);
    float acc = 0.0f;
    if (c < C)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += to_f32(x[(size_t)r * C + c]);
    lanes[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
        for (int y = 0; y < 8; y++) total += lanes[y][threadIdx.x];
        partials[(size_t)chunk * C + c] = total;
    }
}

constexpr int kSquaresThreads = 512;
constexpr int kSquaresMaxBlocks = 1024;

// partial[block] = Σ x² over a grid-stride slice, in double
__global__ void sum_squares_partials_kernel(double* partial, const float* x, size_t n) {
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const double v = x[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// partial[blocks] = Σ partial[0..blocks), one block of kSquaresMaxBlocks threads
__global__ void sum_squares_final_kernel(double* partial, int blocks) {
    double v = threadIdx.x < blocks ? partial[threadIdx.x] : 0.0;
    v = block_sum(v);
    if (threadIdx.x == 0) partial[blocks] = v;
}

}  // namespace

void add_column_partials(float* dst, const float* partials, int chunks, int C, cudaStream_t stream) {
    if (C == 0) return;
    add_column_partials_kernel<<<ceil_div(C, 256), 256, 0, stream>>>(dst, partials, chunks, C);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
void column_sum_partials(float* partials, const T* x, int N, int C, cudaStream_t stream) {
    if (N == 0 || C == 0) return;
    column_sum_partials_kernel<<<dim3(ceil_div(C, 32), column_chunks(N)), dim3(32, 8), 0, stream>>>(
        partials, x, N, C, column_chunk_rows(N));
    CUDA_LAUNCH_CHECK();
}

double sum_squares(const float* x, size_t n, DeviceScratch& scratch, cudaStream_t stream) {
    if (n == 0) return 0.0;
    const int blocks = (int)std::min<size_t>((n + kSquaresThreads - 1) / kSquaresThreads, kSquaresMaxBlocks);
    double* partial = static_cast<double*>(scratch.get((kSquaresMaxBlocks + 1) * sizeof(double)));
    sum_squares_partials_kernel<<<blocks, kSquaresThreads, 0, stream>>>(partial, x, n);
    CUDA_LAUNCH_CHECK();
    sum_squares_final_kernel<<<1, kSquaresMaxBlocks, 0, stream>>>(partial, blocks);
    CUDA_LAUNCH_CHECK();
    double total = 0.0;
    CUDA_CHECK(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    return total;
}

template void column_sum_partials<float>(float*, const float*, int, int, cudaStream_t);
template void column_sum_partials<bf16>(float*, const bf16*, int, int, cudaStream_t);

}  // namespace gpu
