// `local` on the CPU: sliding-window causal softmax attention (../shared/ATTENTION.md §2). Query i
// attends to keys j with i − W + 1 ≤ j ≤ i — exactly W keys including itself (flash-attn's
// window_size = (W−1, 0)); W = cfg.window ≥ 1, and W ≥ T is plain causal `softmax`. The math is the
// windowed softmax reference of softmax_ref.h (templates, run here in float); saved = LSE (B, H, T).
#include "attention/cpu_variants.h"
#include "attention/softmax_ref.h"
#include "check.h"

namespace {

void check_fp32(const HeadTensor& x, const char* what) {
    CHECK(x.dtype == DType::F32, "local (CPU): %s is %s, the CPU reference takes fp32", what,
          dtype_name(x.dtype));
}

class LocalAttention : public Attention {
public:
    explicit LocalAttention(const AttnConfig& cfg) : window_(cfg.window) {
        CHECK(window_ >= 1, "--window %d: local attention needs a window of at least 1 key", window_);
    }
    std::string name() const override { return "local"; }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // LSE

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q,
                 HeadTensor k, HeadTensor v, float* saved, Tensor params, void* workspace) override {
        check_fp32(o, "o"), check_fp32(q, "q"), check_fp32(k, "k"), check_fp32(v, "v");
        softmax_attention_forward_ref<float>(s, window_, head_view_f32(o), head_view_cf32(q),
                                             head_view_cf32(k), head_view_cf32(v), saved);
    }
    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk,
                  HeadTensor dv, Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k,
                  HeadTensor v, HeadTensor o, const float* saved, Tensor params,
                  void* workspace) override {
        check_fp32(dq, "dq"), check_fp32(dk, "dk"), check_fp32(dv, "dv"), check_fp32(dout, "dout");
        softmax_attention_backward_ref<float>(s, window_, head_view_f32(dq), head_view_f32(dk),
                                              head_view_f32(dv), head_view_cf32(dout), head_view_cf32(q),
                                              head_view_cf32(k), head_view_cf32(v), head_view_cf32(o), saved);
    }

private:
    int window_;  // W: keys i−W+1 .. i
};

}  // namespace

std::unique_ptr<Attention> make_cpu_local_attention(const AttnConfig& cfg) {
    return std::make_unique<LocalAttention>(cfg);
}
