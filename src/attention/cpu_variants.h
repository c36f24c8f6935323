// Factories of the CPU attention variants (one .cpp each in src/attention/), used by the CPU
// registry in src/attention_registry.cpp.
#pragma once
#include "attention.h"

std::unique_ptr<Attention> make_cpu_softmax_attention(const AttnConfig& cfg);
