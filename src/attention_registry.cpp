// The CPU attention registry: `--attention NAME` -> the CPU implementation of that variant.
// Adding a variant: its factory in src/attention/cpu_variants.h and one line in the table below.
#include <functional>

#include "attention.h"
#include "attention/cpu_variants.h"
#include "check.h"

namespace {
using Factory = std::unique_ptr<Attention> (*)(const AttnConfig&);
struct Entry { const char* name; Factory make; };
const Entry kCpuVariants[] = {
    {"softmax", make_cpu_softmax_attention},
    {"local", make_cpu_local_attention},
    {"polynomial", make_cpu_polynomial_attention},
    {"performer", make_cpu_performer_attention},
    {"polysketch", make_cpu_polysketch_attention},
    {"hyper", make_cpu_hyper_attention},
};
}  // namespace

std::unique_ptr<Attention> make_cpu_attention(const AttnConfig& cfg) {
    for (const Entry& e : kCpuVariants)
        if (cfg.name == e.name) return e.make(cfg);
    std::string known;
    for (const Entry& e : kCpuVariants) known += std::string(known.empty() ? "" : ", ") + e.name;
    FAIL("--attention %s: unknown attention variant on the CPU (known: %s)", cfg.name.c_str(), known.c_str());
}

std::vector<std::string> attention_names() {
    std::vector<std::string> names;
    for (const Entry& e : kCpuVariants) names.push_back(e.name);
    return names;
}
