// llm.c's model file: a 256 × int32 header then every parameter tensor in llm.c's order
// (models/gpt.h ParamId). Header: [0] magic 20240326, [1] version (3 = fp32, 5 = bf16),
// [2] max_seq, [3] vocab, [4] layers, [5] heads, [6] channels, [7] padded vocab. We also use
// two slots llm.c leaves at zero, so plain GPT-2 files read unchanged: [8] positions
// (0 learned, 1 RoPE, which has no position table), [9] attention-module parameters per layer
// (appended after lnfb). Files are written atomically.
#pragma once
#include <string>
#include <vector>

#include "gpt.h"

struct ModelFile {
    GPTConfig cfg;                     // shape fields (attention options are not in the file)
    size_t attn_params_per_layer = 0;
    std::vector<float> params;         // fp32, param_specs order
};

void write_model_file(const std::string& path, const GPTConfig& cfg, size_t attn_params_per_layer,
                      const std::vector<float>& params, bool bf16 = false);
ModelFile read_model_file(const std::string& path);
