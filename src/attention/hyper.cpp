// CPU reference of causal HyperAttention (ATTENTION.md §5) with its exact backward. The plan
// (recursion tree, LSH projections, Gray-order buckets, samples) and the split of each head into
// pieces live in hyper_plan.h; this file evaluates the pieces.
//
// Forward: every row keeps an online-softmax state (max, sum, unnormalised output); each piece
// (base-case causal block, sorted diagonal block of a quadrant, sampled columns with log-weight
// ln(n/m)) is reduced per row to its own (max, sum, output) and merged into the row's state by
// LSE. That is the spec's "merge the core parts by LSE, merge the quadrant into the second half
// by LSE" with the merges reordered (they are associative), so O and LSE are those of the
// recursion. Saved for the backward: only the final LSE (B, H, T); the pieces are recomputed
// from q and k (hashing is deterministic) and the plan (a pure function of seed, layer, step).
// All arithmetic is in double whatever the tensor type (float in the model, double in tests).
//
// Backward: the forward is a softmax over each row's multiset of terms, so with the final O and
// LSE every term's probability is P = exp(s - LSE_final) and the flash backward formulas apply
// piece by piece; the contributions add (sampled columns scatter-add into dK, dV). Hashing and
// sorting are piecewise constant and carry no gradient.
#include <cmath>
#include <limits>

#include "attention.h"
#include "attention/cpu_variants.h"
#include "attention/hyper_plan.h"
#include "attention/cpu_row_math.h"
#include "check.h"

namespace {

// One head's rows of x (any (B,H,T,d) input) gathered contiguous in double: (T, d).
template <typename T>
std::vector<double> gather_head(HeadView<const T> x, int b, int h, int num_rows, int d) {
    std::vector<double> out((size_t)num_rows * d);
    for (int t = 0; t < num_rows; t++) {
        const T* src = x.row(b, h, t);
        for (int c = 0; c < d; c++) out[(size_t)t * d + c] = src[c];
    }
    return out;
}

const double kNegInf = -std::numeric_limits<double>::infinity();

// Heads run in parallel only when there is enough work: waking threads costs more than a tiny
// call (the finite-difference tests make thousands of them).
bool worth_threads(const HyperPlan& plan) { return (int64_t)plan.B * plan.H * plan.T * plan.d >= 65536; }

}  // namespace

template <typename T>
void hyper_forward(const HyperPlan& plan, HeadView<T> o, T* lse, HeadView<const T> q, HeadView<const T> k,
                   HeadView<const T> v) {
    const int H = plan.H, n = plan.T, d = plan.d;
    const double scale = 1.0 / std::sqrt((double)d);
#pragma omp parallel for schedule(dynamic, 1) if (worth_threads(plan))
    for (int bh = 0; bh < plan.B * H; bh++) {
        const int b = bh / H, h = bh % H;
        std::vector<double> qh = gather_head(q, b, h, n, d), kh = gather_head(k, b, h, n, d);  // (T, d)
        std::vector<double> vh = gather_head(v, b, h, n, d);                                 // (T, d)
        HyperLayout layout = build_hyper_layout(plan, bh, qh.data(), kh.data(), d);
        std::vector<double> row_max(n, kNegInf), row_sum(n, 0.0), row_acc((size_t)n * d, 0.0);  // (T), (T), (T, d)
        std::vector<double> scores, piece_acc(d);
        for (const HyperPiece& piece : layout.pieces) {
            const int* rows = layout.idx.data() + piece.rows_at;
            const int* cols = layout.idx.data() + piece.cols_at;
            scores.resize(piece.num_cols);
            for (int r = 0; r < piece.num_rows; r++) {
                const int i = rows[r];
                double piece_max = kNegInf;
                for (int c = 0; c < piece.num_cols; c++) {
                    const int j = cols[c];
                    scores[c] = (piece.causal && j > i) ? kNegInf
                                : dot(&qh[(size_t)i * d], &kh[(size_t)j * d], d) * scale + piece.log_weight;
                    piece_max = std::max(piece_max, scores[c]);
                }
                if (piece_max == kNegInf) continue;  // every column masked for this row
                double piece_sum = 0;
                std::fill(piece_acc.begin(), piece_acc.end(), 0.0);
                for (int c = 0; c < piece.num_cols; c++) {
                    if (scores[c] == kNegInf) continue;
                    const double p = std::exp(scores[c] - piece_max);
                    piece_sum += p;
                    const double* vj = &vh[(size_t)cols[c] * d];
                    for (int e = 0; e < d; e++) piece_acc[e] += p * vj[e];
                }
                // Merge by LSE: rescale the row's state and the piece to their common max.
                const double new_max = std::max(row_max[i], piece_max);
                const double old_factor = std::exp(row_max[i] - new_max), piece_factor = std::exp(piece_max - new_max);
                row_sum[i] = row_sum[i] * old_factor + piece_sum * piece_factor;
                double* acc = &row_acc[(size_t)i * d];
                for (int e = 0; e < d; e++) acc[e] = acc[e] * old_factor + piece_acc[e] * piece_factor;
                row_max[i] = new_max;
            }
        }
        for (int i = 0; i < n; i++) {  // every row has its diagonal term, so row_sum > 0
            T* out = o.row(b, h, i);
            for (int e = 0; e < d; e++) out[e] = (T)(row_acc[(size_t)i * d + e] / row_sum[i]);
            lse[(size_t)bh * n + i] = (T)(row_max[i] + std::log(row_sum[i]));
        }
    }
}

template <typename T>
void hyper_backward(const HyperPlan& plan, HeadView<T> dq, HeadView<T> dk, HeadView<T> dv,
                    HeadView<const T> dout, HeadView<const T> q, HeadView<const T> k, HeadView<const T> v,
                    HeadView<const T> o, const T* lse) {
    const int H = plan.H, n = plan.T, d = plan.d;
    const double scale = 1.0 / std::sqrt((double)d);
#pragma omp parallel for schedule(dynamic, 1) if (worth_threads(plan))
    for (int bh = 0; bh < plan.B * H; bh++) {
        const int b = bh / H, h = bh % H;
        std::vector<double> qh = gather_head(q, b, h, n, d), kh = gather_head(k, b, h, n, d);  // (T, d)
        std::vector<double> vh = gather_head(v, b, h, n, d), doh = gather_head(dout, b, h, n, d);
        std::vector<double> oh = gather_head(o, b, h, n, d);
        const T* lse_h = lse + (size_t)bh * n;
        HyperLayout layout = build_hyper_layout(plan, bh, qh.data(), kh.data(), d);
        std::vector<double> delta(n);  // (T): rowsum(dO * O_final)
        for (int i = 0; i < n; i++) delta[i] = dot(&doh[(size_t)i * d], &oh[(size_t)i * d], d);
        std::vector<double> dqh((size_t)n * d, 0.0), dkh((size_t)n * d, 0.0), dvh((size_t)n * d, 0.0);  // (T, d)
        for (const HyperPiece& piece : layout.pieces) {
            const int* rows = layout.idx.data() + piece.rows_at;
            const int* cols = layout.idx.data() + piece.cols_at;
            for (int r = 0; r < piece.num_rows; r++) {
                const int i = rows[r];
                const double* qi = &qh[(size_t)i * d];
                const double* doi = &doh[(size_t)i * d];
                double* dqi = &dqh[(size_t)i * d];
                for (int c = 0; c < piece.num_cols; c++) {
                    const int j = cols[c];
                    if (piece.causal && j > i) continue;
                    const double* kj = &kh[(size_t)j * d];
                    const double* vj = &vh[(size_t)j * d];
                    const double p = std::exp(dot(qi, kj, d) * scale + piece.log_weight - (double)lse_h[i]);
                    const double ds = p * (dot(doi, vj, d) - delta[i]);
                    double* dkj = &dkh[(size_t)j * d];
                    double* dvj = &dvh[(size_t)j * d];
                    for (int e = 0; e < d; e++) {
                        dvj[e] += p * doi[e];
                        dqi[e] += scale * ds * kj[e];
                        dkj[e] += scale * ds * qi[e];
                    }
                }
            }
        }
        for (int t = 0; t < n; t++)
            for (int e = 0; e < d; e++) {
                dq.row(b, h, t)[e] = (T)dqh[(size_t)t * d + e];
                dk.row(b, h, t)[e] = (T)dkh[(size_t)t * d + e];
                dv.row(b, h, t)[e] = (T)dvh[(size_t)t * d + e];
            }
    }
}

template void hyper_forward<float>(const HyperPlan&, HeadView<float>, float*, HeadView<const float>,
                                   HeadView<const float>, HeadView<const float>);
template void hyper_forward<double>(const HyperPlan&, HeadView<double>, double*, HeadView<const double>,
                                    HeadView<const double>, HeadView<const double>);
template void hyper_backward<float>(const HyperPlan&, HeadView<float>, HeadView<float>, HeadView<float>,
                                    HeadView<const float>, HeadView<const float>, HeadView<const float>,
                                    HeadView<const float>, HeadView<const float>, const float*);
template void hyper_backward<double>(const HyperPlan&, HeadView<double>, HeadView<double>, HeadView<double>,
                                     HeadView<const double>, HeadView<const double>, HeadView<const double>,
                                     HeadView<const double>, HeadView<const double>, const double*);

namespace {

template <typename T>
HeadView<T> view_of(const HeadTensor& x, const char* what) {
    CHECK(x.dtype == DType::F32, "hyper (CPU): %s is %s; the CPU reference takes fp32 tensors", what, dtype_name(x.dtype));
    return HeadView<T>{static_cast<T*>(x.ptr), x.sb, x.sh, x.st};
}

class CpuHyperAttention : public Attention {
public:
    explicit CpuHyperAttention(const AttnConfig& cfg) : cfg_(cfg) { hyper_check_config(cfg); }
    std::string name() const override { return "hyper"; }
    size_t saved_size(const AttnShape& s) const override { return s.rows(); }  // LSE (B, H, T)

    void forward(const AttnShape& s, const AttnContext& ctx, HeadTensor o, HeadTensor q, HeadTensor k,
                 HeadTensor v, float* saved, Tensor params, void* workspace) override {
        HyperPlan plan = make_hyper_plan(cfg_, ctx, s);
        hyper_forward<float>(plan, view_of<float>(o, "o"), saved, view_of<const float>(q, "q"),
                             view_of<const float>(k, "k"), view_of<const float>(v, "v"));
    }

    void backward(const AttnShape& s, const AttnContext& ctx, HeadTensor dq, HeadTensor dk, HeadTensor dv,
                  Tensor dparams, HeadTensor dout, HeadTensor q, HeadTensor k, HeadTensor v, HeadTensor o,
                  const float* saved, Tensor params, void* workspace) override {
        HyperPlan plan = make_hyper_plan(cfg_, ctx, s);
        hyper_backward<float>(plan, view_of<float>(dq, "dq"), view_of<float>(dk, "dk"), view_of<float>(dv, "dv"),
                              view_of<const float>(dout, "dout"), view_of<const float>(q, "q"),
                              view_of<const float>(k, "k"), view_of<const float>(v, "v"),
                              view_of<const float>(o, "o"), saved);
    }

private:
    AttnConfig cfg_;
};

}  // namespace

std::unique_ptr<Attention> make_cpu_hyper_attention(const AttnConfig& cfg) {
    return std::make_unique<CpuHyperAttention>(cfg);
}
