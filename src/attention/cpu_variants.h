// Factories of the CPU attention variants (one .cpp each in src/attention/), used by the CPU
// registry in src/attention_registry.cpp.
#pragma once
#include "attention.h"

std::unique_ptr<Attention> make_cpu_softmax_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cpu_local_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cpu_polynomial_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cpu_performer_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cpu_hyper_attention(const AttnConfig& cfg);
std::unique_ptr<Attention> make_cpu_polysketch_attention(const AttnConfig& cfg);

// Exact polynomial attention (polynomial.cpp) as templates on the scalar T, instantiated for float
// and double (tests); HeadTensor pointers point at T. saved: 5 × (B, H, T) = D, mean_q, rstd_q,
// mean_k, rstd_k. Backward overwrites dq, dk, dv.
inline size_t polynomial_saved_size(const AttnShape& s) { return 5 * s.rows(); }
template <typename T>
void polynomial_attention_forward(const AttnShape& s, int degree, HeadTensor o, HeadTensor q,
                                  HeadTensor k, HeadTensor v, T* saved);
template <typename T>
void polynomial_attention_backward(const AttnShape& s, int degree, HeadTensor dq, HeadTensor dk,
                                   HeadTensor dv, HeadTensor dout, HeadTensor q, HeadTensor k,
                                   HeadTensor v, HeadTensor o, const T* saved);
