// Performer (FAVOR+, ../shared/ATTENTION.md §3): the random feature matrix Ω and the CPU
// reference math, shared by the CPU variant (src/attention/performer.cpp), the CUDA variant (which
// draws Ω on the host with the same function), the tests and the `attn` tool (which dumps Ω).
//
// The forward computed here, per (b, h), with x̃ = d^(-1/4)·x and a_f(x) = ω_fᵀx̃ − ‖x̃‖²/2:
//   φq_i,f = m^(-1/2)·(exp(a_f(q_i) − cq_i) + ε),   cq_i = max_f a_f(q_i)   (the query's own max)
//   φk_j,f = m^(-1/2)·(exp(a_f(k_j) − ck_j) + ε),   ck_j = max_{j'≤j} max_f a_f(k_j')
//   w_ij   = (φq_i·φk_j)·exp(ck_j − ck_i)  for j ≤ i   (all exponents ≤ 0: nothing overflows)
//   out_i  = Σ_{j≤i} w_ij·[v_j | 1],  R_i = out_i[d],  o_i = out_i[:d] / R_i  (o_i = 0 if R_i ≤ 1e-30)
// The key stabiliser ck is the running max over positions: it depends on keys ≤ j only, so the
// output is strictly causal, also through ε (a max over a whole chunk, or over all positions as in
// the paper's code, lets a later key change earlier outputs via the ε term). With ε = 0 the
// stabilisers cancel exactly. The sum over j is computed in chunks of kPerformerChunk keys: within
// a chunk the small tril(Φq·Φkᵀ) product, across chunks a prefix state S (m × (d+1)) carried in the
// frame of the last key of the previous chunk and rescaled by exp(ck_old − ck_new) as ck grows.
// The backward is the exact gradient of this forward with the stabilisers held constant (they
// carry no gradient): a forward scan for dφq, a reverse scan with the suffix state G for dφk and
// d[v|1], then the normaliser and the feature map.
#pragma once
#include <cstdint>
#include <vector>

#include "attention.h"

constexpr int kPerformerChunk = 64;           // keys per chunk of the causal scan
constexpr double kPerformerEpsilon = 1e-6;    // ε added to every feature

// Ω (m × d, row-major, fp32) for one layer at one optimizer step: m = cfg.features rows in
// ceil(m/d) blocks of d mutually orthogonal rows (modified Gram-Schmidt, in double, of a Gaussian
// d × d matrix), each row scaled to the norm of a fresh Gaussian d-vector. Drawn from
// Rng(Rng::derive(cfg.seed, layer, draw)) with draw = step / cfg.redraw (0 when cfg.redraw = 0):
// a pure function of (seed, layer, draw), so resuming reproduces it. Draw order per block: the
// d × d Gaussian matrix row by row, then one Gaussian d-vector per row kept (its norm).
std::vector<float> performer_features(const AttnConfig& cfg, int layer, int64_t step, int d);

// saved (T*) layout: three (B, H, T) arrays: R (denominator, 0 where guarded), cq, ck.
inline size_t performer_saved_size(const AttnShape& s) { return 3 * s.rows(); }

// The reference math on the scalar T (float for the Attention class, double in tests); the
// HeadTensor pointers point at T. omega: m × d. Instantiated for float and double.
template <typename T>
void performer_forward(const AttnShape& s, const float* omega, int m, T epsilon, HeadTensor o,
                       HeadTensor q, HeadTensor k, HeadTensor v, T* saved);
// dq, dk, dv overwritten.
template <typename T>
void performer_backward(const AttnShape& s, const float* omega, int m, T epsilon, HeadTensor dq,
                        HeadTensor dk, HeadTensor dv, HeadTensor dout, HeadTensor q, HeadTensor k,
                        HeadTensor v, HeadTensor o, const T* saved);
