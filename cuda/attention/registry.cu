// The CUDA attention registry: `--attention NAME` -> the CUDA implementation of that variant.
// Adding a variant: its factory in cuda/attention/cuda_variants.cuh, its kernels in one .cu file
// of this folder, and one line in the table below (the CPU twin goes in src/attention_registry.cpp).
#include "attention.h"
#include "check.h"
#include "cuda/attention/cuda_variants.cuh"
#include "cuda/kernels.cuh"

namespace {
using Factory = std::unique_ptr<Attention> (*)(const AttnConfig&);
struct Entry { const char* name; Factory make; };
const Entry kCudaVariants[] = {
    {"softmax", make_cuda_softmax_attention},
    {"local", make_cuda_local_attention},
    {"performer", make_cuda_performer_attention},
    {"polynomial", make_cuda_polynomial_attention},
    {"polysketch", make_cuda_polysketch_attention},
    {"hyper", make_cuda_hyper_attention},
};
}  // namespace

std::unique_ptr<Attention> make_cuda_attention(const AttnConfig& cfg) {
    for (const Entry& e : kCudaVariants)
        if (cfg.name == e.name) return e.make(cfg);
    std::string known;
    for (const Entry& e : kCudaVariants) known += std::string(known.empty() ? "" : ", ") + e.name;
    FAIL("--attention %s: unknown attention variant on CUDA (known: %s)", cfg.name.c_str(), known.c_str());
}

std::vector<std::string> cuda_attention_names() {
    std::vector<std::string> names;
    for (const Entry& e : kCudaVariants) names.push_back(e.name);
    return names;
}
