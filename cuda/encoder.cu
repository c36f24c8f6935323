// Token + position embedding: forward gathers rows of wte and wpe; backward scatters dout back.
// The backward is deterministic without atomics: the host groups the rows of the batch by token
// (it has the tokens anyway), so one thread owns each (token, channel) and sums that token's rows
// in row order; dwpe is owned per (t, channel) and sums over the batch in order.
#include <vector>

#include "kernels.cuh"

namespace gpu {
namespace {

// out (B,T,C) = wte[tokens[row]] + wpe[row % T] (wpe null: RoPE model, no position table)
template <typename T>
__global__ void encoder_forward_kernel(T* out, const int* tokens, const T* wte, const T* wpe,
                                       int T_, int C, size_t total) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t row = idx / C;
        const int c = (int)(idx % C);
        const int t = (int)(row % T_);
        const float v = to_f32(wte[(size_t)tokens[row] * C + c]) + (wpe ? to_f32(wpe[(size_t)t * C + c]) : 0.0f);
        out[idx] = from_f32<T>(v);
    }
}

// dwte[bucket_token[k]] += Σ_{j in bucket k} dout[rows[j]], rows in ascending order.
// grid (num_buckets, ceil(C / blockDim.x))
template <typename T>
__global__ void encoder_backward_wte_kernel(float* dwte, const T* dout, const int* bucket_token,
                                            const int* bucket_start, const int* rows, int C) {
    const int k = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int j = bucket_start[k]; j < bucket_start[k + 1]; j++) acc += to_f32(dout[(size_t)rows[j] * C + c]);
    dwte[(size_t)bucket_token[k] * C + c] += acc;
}

// dwpe[t, c] += Σ_b dout[b, t, c]
template <typename T>
__global__ void encoder_backward_wpe_kernel(float* dwpe, const T* dout, int B, int T_, int C) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)T_ * C) return;
    float acc = 0.0f;
    for (int b = 0; b < B; b++) acc += to_f32(dout[(size_t)b * T_ * C + idx]);
    dwpe[idx] += acc;
}

}  // namespace

template <typename T>
void encoder_forward(T* out, const int* tokens, const T* wte, const T* wpe, int B, int T_, int C,
                     cudaStream_t stream) {
    const size_t total = (size_t)B * T_ * C;
    if (total == 0) return;
    const int threads = 256;
    const int blocks = (int)std::min<size_t>((total + threads - 1) / threads, 65536);
    encoder_forward_kernel<<<blocks, threads, 0, stream>>>(out, tokens, wte, wpe, T_, C, total);
    CUDA_LAUNCH_CHECK();
}

template <typename T>
void encoder_backward(float* dwte, float* dwpe, const T* dout, const int* tokens_host, int B,
                      int T_, int C, int vocab, DeviceScratch& scratch, cudaStream_t stream) {
    const int N = B * T_;
    if (N == 0 || C == 0) return;
    // Counting sort of the rows by token: buckets in ascending token order, rows ascending.
    std::vector<int> count(vocab, 0);
    for (int r = 0; r < N; r++) {
        const int tok = tokens_host[r];
        CHECK(tok >= 0 && tok < vocab, "token id %d at position %d is outside the vocabulary [0, %d)",
              tok, r, vocab);
        count[tok]++;
    }
    int num_buckets = 0;
    for (int tok = 0; tok < vocab; tok++) num_buckets += count[tok] > 0;
    // packed: bucket_token (num_buckets) | bucket_start (num_buckets + 1) | rows (N)
    std::vector<int> packed(2 * (size_t)num_buckets + 1 + N);
    int* bucket_token = packed.data();
    int* bucket_start = bucket_token + num_buckets;
    int* rows = bucket_start + num_buckets + 1;
    std::vector<int> first_row_of_token(vocab, 0);
    int k = 0, offset = 0;
    for (int tok = 0; tok < vocab; tok++) {
        if (count[tok] == 0) continue;
        bucket_token[k] = tok;
        bucket_start[k] = offset;
        first_row_of_token[tok] = offset;
        offset += count[tok];
        k++;
    }
    bucket_start[num_buckets] = offset;
    for (int r = 0; r < N; r++) rows[first_row_of_token[tokens_host[r]]++] = r;

    int* dev = static_cast<int*>(scratch.get(packed.size() * sizeof(int)));
    CUDA_CHECK(cudaMemcpyAsync(dev, packed.data(), packed.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));  // `packed` is freed on return
    const int threads = 256;
    dim3 grid(num_buckets, ceil_div(C, threads));
    encoder_backward_wte_kernel<<<grid, threads, 0, stream>>>(dwte, dout, dev, dev + num_buckets,
                                                              dev + 2 * num_buckets + 1, C);
    CUDA_LAUNCH_CHECK();
    if (dwpe) {
        encoder_backward_wpe_kernel<<<ceil_div((long long)T_ * C, threads), threads, 0, stream>>>(dwpe, dout, B, T_, C);
        CUDA_LAUNCH_CHECK();
    }
}

template void encoder_forward<float>(float*, const int*, const float*, const float*, int, int, int, cudaStream_t);
template void encoder_forward<bf16>(bf16*, const int*, const bf16*, const bf16*, int, int, int, cudaStream_t);
template void encoder_backward<float>(float*, float*, const float*, const int*, int, int, int, int, DeviceScratch&, cudaStream_t);
template void encoder_backward<bf16>(float*, float*, const bf16*, const int*, int, int, int, int, DeviceScratch&, cudaStream_t);

}  // namespace gpu
