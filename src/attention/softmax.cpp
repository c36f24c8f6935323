// The CPU `softmax` attention variant: exact causal softmax attention in fp32, the reference the
// CUDA flash kernels are tested against. The math is in softmax_ref.h (templates shared with the
// tests and the `local` variant); this file checks the tensors and saves the LSE (B·H·T floats).
#include "attention/cpu_variants.h"
#include "attention/softmax_ref.h"
#include "check.h"

namespace {
class CpuSoftmaxAttention : public Attention {
public:
    std::string name() const override { return "softmax"; }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // LSE (B,H,T)

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q, HeadTensor k,
                 HeadTensor v, float* saved, Tensor params, void* workspace) override {
        check_f32({o, q, k, v});
        softmax_attention_forward_ref<float>(s, 0, head_view_f32(o), head_view_cf32(q), head_view_cf32(k),
                                             head_view_cf32(v), saved);
    }
    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk, HeadTensor dv,
                  Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k, HeadTensor v, HeadTensor o,
                  const float* saved, Tensor params, void* workspace) override {
        check_f32({dq, dk, dv, dout, q, k, v, o});
        softmax_attention_backward_ref<float>(s, 0, head_view_f32(dq), head_view_f32(dk), head_view_f32(dv),
                                              head_view_cf32(dout), head_view_cf32(q), head_view_cf32(k),
                                              head_view_cf32(v), head_view_cf32(o), saved);
    }

private:
    static void check_f32(std::initializer_list<HeadTensor> ts) {
        for (const HeadTensor& t : ts)
            CHECK(t.dtype == DType::F32, "cpu softmax attention: got a %s tensor, the CPU backend works in fp32",
                  dtype_name(t.dtype));
    }
};
}  // namespace

std::unique_ptr<Attention> make_cpu_softmax_attention(const AttnConfig& cfg) {
    return std::make_unique<CpuSoftmaxAttention>();
}
