// Factories of the CUDA attention variants (one .cu each in cuda/attention/), used by the CUDA
// registry in cuda/attention/registry.cu.
#pragma once
#include "attention.h"

std::unique_ptr<Attention> make_cuda_softmax_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cuda_local_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cuda_performer_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cuda_polynomial_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cuda_polysketch_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cuda_hyper_attention(const AttnConfig& cfg);
