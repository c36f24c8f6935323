// Reading and writing llm.c model files (see model_file.h for the layout).
#include "model_file.h"

#include <cstdint>
#include <cstring>

#include "check.h"
#include "fileio.h"

namespace {
constexpr int kMagic = 20240326;

uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;  // NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace

void write_model_file(const std::string& path, const GPTConfig& cfg, size_t attn_params_per_layer,
                      const std::vector<float>& params, bool bf16) {
    size_t expected = 0;
    for (const ParamSpec& s : param_specs(cfg, attn_params_per_layer)) expected += s.size;
    CHECK(params.size() == expected, "%s: %zu parameters given, the model has %zu", path.c_str(), params.size(), expected);
    std::string bytes(256 * 4, '\0');
    int32_t* h = reinterpret_cast<int32_t*>(&bytes[0]);
    h[0] = kMagic; h[1] = bf16 ? 5 : 3;
    h[2] = cfg.max_seq; h[3] = cfg.vocab; h[4] = cfg.L; h[5] = cfg.H; h[6] = cfg.C; h[7] = cfg.padded_vocab;
    h[8] = cfg.pos == "rope" ? 1 : 0;
    h[9] = (int32_t)attn_params_per_layer;
    if (bf16) {
        std::vector<uint16_t> b(params.size());
        for (size_t i = 0; i < params.size(); i++) b[i] = to_bf16(params[i]);
        bytes.append(reinterpret_cast<const char*>(b.data()), b.size() * 2);
    } else {
        bytes.append(reinterpret_cast<const char*>(params.data()), params.size() * 4);
    }
    write_file_atomic(path, bytes.data(), bytes.size());
}

ModelFile read_model_file(const std::string& path) {
    std::string bytes = read_file(path, "model file");
    CHECK(bytes.size() >= 256 * 4, "%s: truncated model file (%zu bytes, shorter than the 1024-byte header)", path.c_str(), bytes.size());
    const int32_t* h = reinterpret_cast<const int32_t*>(bytes.data());
    CHECK(h[0] == kMagic, "%s: not a model file (magic %d, expected %d)", path.c_str(), h[0], kMagic);
    CHECK(h[1] == 3 || h[1] == 5, "%s: model file version %d is not supported (3 = fp32, 5 = bf16)", path.c_str(), h[1]);
    ModelFile m;
    m.cfg.max_seq = h[2]; m.cfg.vocab = h[3]; m.cfg.L = h[4]; m.cfg.H = h[5]; m.cfg.C = h[6];
    m.cfg.padded_vocab = h[7] ? h[7] : h[3];
    m.cfg.pos = h[8] == 1 ? "rope" : "learned";
    CHECK(h[9] >= 0, "%s: corrupt header (attention parameters %d)", path.c_str(), h[9]);
    m.attn_params_per_layer = (size_t)h[9];
    validate_config(m.cfg);
    size_t n = 0;
    for (const ParamSpec& s : param_specs(m.cfg, m.attn_params_per_layer)) n += s.size;
    const size_t esize = h[1] == 3 ? 4 : 2;
    CHECK(bytes.size() == 1024 + n * esize, "%s: truncated or oversized model file: %zu bytes, expected %zu for L=%d C=%d",
          path.c_str(), bytes.size(), 1024 + n * esize, m.cfg.L, m.cfg.C);
    m.params.resize(n);
    const char* data = bytes.data() + 1024;
    if (esize == 4) {
        std::memcpy(m.params.data(), data, n * 4);
    } else {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(data);
        for (size_t i = 0; i < n; i++) m.params[i] = from_bf16(b[i]);
    }
    return m;
}
