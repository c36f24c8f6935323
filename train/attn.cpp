// build/attn: runs one attention variant alone, forward and backward, on --device cpu|cuda, with
// the same --attention / --attn-* options as build/train and the shape --batch B --heads H --seq T
// --head-dim d. Inputs q, k, v and the output gradient do (B, H, T, d) are drawn from --seed or
// read from --in DIR (q.bin, k.bin, v.bin, do.bin: raw little-endian float32, row-major); learned
// parameters come from init_params (seeded as in the model) or DIR/params.bin when present.
// With --out DIR it writes o, dq, dk, dv (and dparams), the inputs, every random or learned
// quantity the variant used (params, Performer's Ω, HyperAttention's LSH projections and sampled
// keys per level, PolySketch's random S1/S2) and meta.json describing each file (name, dtype,
// shape, bytes, meaning) and every option, so that another implementation can reproduce the run.
// With --bench it times forward and forward+backward (median of --repeats after --warmup runs),
// and prints ms, TFLOP/s by ATTENTION.md's convention (causal forward = 4·B·H·T²·d/2, f+b = 3.5×
// that; "effective" for variants that do not compute every causal pair) and peak memory; --csv
// adds one CSV line (columns: --csv-header).
//
// Memory: every tensor is allocated through the Ops backend (contiguous (B, H, T, d) HeadTensors)
// and moved with ops.upload / ops.download, so the same code runs on both backends.
// Timing: host steady_clock around ops.synchronize() on both devices (this file is compiled by the
// host compiler, without the CUDA headers; the synchronize makes the interval cover the kernels).
// Peak memory: the sum of the tool's allocations, or on CUDA the growth of device memory in use
// (Ops::device_memory_used, cudaMemGetInfo) over the run when that is larger (library scratch).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "attention.h"
#include "attention/hyper_plan.h"
#include "attention/performer_features.h"
#include "attention/polysketch_sketch.h"
#include "check.h"
#include "fileio.h"
#include "ops.h"
#include "options.h"
#include "rng.h"

using nlohmann::json;

namespace {

// Options of the tool beyond the attention table of src/options.h.
struct ToolOptions {
    int batch = 1, heads = 4, seq = 256, head_dim = 64;  // (B, H, T, d)
    int layer = 0;                                       // AttnContext::layer
    int64_t step = 0;                                    // AttnContext::step
    std::string in;                                      // folder with q.bin, k.bin, v.bin, do.bin [, params.bin]
    std::string out;                                     // folder for the results ("" = none written)
    bool bench = false;
    int repeats = 20, warmup = 3;
    bool csv = false, csv_header = false;
};

const char* kCsvHeader = "variant,device,precision,B,H,T,d,fwd_ms,fwdbwd_ms,fwd_tflops,fwdbwd_tflops,peak_mib";

// Random inputs: input i (0 = q, 1 = k, 2 = v, 3 = do) is Rng(Rng::derive(seed, kInputStream, i))
// .normal() in row-major (B, H, T, d) order. Learned parameters: init_params(Rng::derive(seed, 7,
// layer)), the seed the model (models/gpt.cpp) gives layer `layer`.
constexpr uint64_t kInputStream = 41086;
const char* kInputNames[4] = {"q", "k", "v", "do"};

// Backend allocations of the tool: zero-filled, released at the end, their bytes summed.
class Allocations {
public:
    explicit Allocations(Ops& ops) : ops_(ops) {}
    ~Allocations() {
        for (void* p : ptrs_) ops_.release(p);
    }
    Tensor tensor(DType dtype, size_t n, const std::string& what) {
        if (n == 0) return Tensor{nullptr, dtype, 0};
        void* p = ops_.alloc(n * dtype_size(dtype), what);
        ptrs_.push_back(p);
        bytes_ += n * dtype_size(dtype);
        return Tensor{p, dtype, n};
    }
    void* raw(size_t bytes, const std::string& what) {
        if (bytes == 0) return nullptr;
        void* p = ops_.alloc(bytes, what);
        ptrs_.push_back(p);
        bytes_ += bytes;
        return p;
    }
    size_t bytes() const { return bytes_; }

private:
    Ops& ops_;
    std::vector<void*> ptrs_;
    size_t bytes_ = 0;
};

// One output file: its bytes and its description in meta.json.
struct OutFile {
    std::string name, dtype;        // dtype: "float32" or "int32"
    std::vector<int64_t> shape;
    std::string meaning;
    std::string bytes;
    json extra;                     // optional further description (layouts, node lists)
};

template <typename T>
OutFile out_file(const std::string& name, const char* dtype, std::vector<int64_t> shape, const std::string& meaning,
                 const std::vector<T>& values) {
    size_t count = 1;
    for (int64_t s : shape) count *= (size_t)s;
    CHECK(count == values.size(), "attn: %s has %zu values for its shape of %zu (internal error)", name.c_str(),
          values.size(), count);
    OutFile f{name, dtype, std::move(shape), meaning, std::string(), json()};
    f.bytes.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
    return f;
}

// Raw float32 (B, H, T, d) from dir/name, size checked.
std::vector<float> read_heads(const std::string& dir, const std::string& name, const AttnShape& s) {
    const std::string path = dir + "/" + name;
    const std::string bytes = read_file(path, "attention input");
    const size_t expected = s.rows() * (size_t)s.d * sizeof(float);
    CHECK(bytes.size() == expected,
          "%s: %s holds %zu bytes; expected %zu = 4 * B*H*T*d for float32 (B, H, T, d) = (%d, %d, %d, %d); "
          "pass the --batch, --heads, --seq and --head-dim it was written with",
          name.c_str(), path.c_str(), bytes.size(), expected, s.B, s.H, s.T, s.d);
    std::vector<float> v(s.rows() * s.d);
    std::memcpy(v.data(), bytes.data(), expected);
    return v;
}

bool file_exists(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (f) std::fclose(f);
    return f != nullptr;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double rms(const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += (double)x * x;
    return v.empty() ? 0.0 : std::sqrt(s / v.size());
}

// What the variant's saved state (fp32, saved_size floats) holds, for meta.json.
std::string saved_meaning(const std::string& name) {
    if (name == "softmax" || name == "local" || name == "hyper")
        return "state saved by the forward for the backward: LSE per row (B, H, T), natural log";
    if (name == "performer") return "state saved by the forward for the backward: R (denominator), cq, ck; 3 x (B, H, T)";
    if (name == "polynomial")
        return "state saved by the forward for the backward: D, mean_q, rstd_q, mean_k, rstd_k; 5 x (B, H, T)";
    if (name == "polysketch") return "state saved by the forward for the backward: 1 + delta per row (B, H, T)";
    return "state saved by the forward for the backward (layout of the variant)";
}

// The variant's random / learned state (besides params.bin), as output files.
void dump_variant_state(const AttnConfig& cfg, const AttnContext& ctx, const AttnShape& s, std::vector<OutFile>& files,
                        json& meta_state) {
    if (cfg.name == "performer") {
        std::vector<float> omega = performer_features(cfg, ctx.layer, ctx.step, s.d);
        const int64_t draw = cfg.redraw > 0 ? ctx.step / cfg.redraw : 0;
        OutFile f = out_file("performer_omega.bin", "float32", {cfg.features, s.d},
                             "Performer random feature matrix Omega (m, d), row-major; feature f of a row x is "
                             "m^-1/2 (exp(omega_f . x~ - |x~|^2/2 - c) + 1e-6) with x~ = d^-1/4 x "
                             "(src/attention/performer_features.h)",
                             omega);
        f.extra = {{"draw", draw}, {"epsilon", kPerformerEpsilon}, {"chunk", kPerformerChunk}};
        files.push_back(std::move(f));
        meta_state["performer"] = {{"features", cfg.features}, {"redraw", cfg.redraw}, {"draw", draw}};
    } else if (cfg.name == "polysketch" && !cfg.sketch_learned) {
        std::vector<float> S = polysketch_random_sketch(s.d, cfg.sketch_size, cfg.seed, ctx.layer);
        const size_t half = (size_t)s.d * cfg.sketch_size;
        std::vector<float> S1(S.begin(), S.begin() + half), S2(S.begin() + half, S.end());
        const char* how = "PolySketch random sketch (d, r), row-major: M(x) = (x S1) o (x S2) / sqrt(r), drawn from "
                          "Rng(Rng::derive(seed, layer)) (S1 first)";
        files.push_back(out_file("polysketch_S1.bin", "float32", {s.d, cfg.sketch_size}, std::string(how) + "; S1", S1));
        files.push_back(out_file("polysketch_S2.bin", "float32", {s.d, cfg.sketch_size}, std::string(how) + "; S2", S2));
    } else if (cfg.name == "hyper") {
        HyperPlan plan = make_hyper_plan(cfg, ctx, s);
        json nodes = json::array();
        for (const HyperNode& n : plan.nodes)
            nodes.push_back({{"level", n.level}, {"index", n.index}, {"start", n.start}, {"n", n.n}, {"split", n.split}});
        meta_state["hyper"] = {{"step_seed", plan.step_seed}, {"levels", plan.projections.size()}, {"nodes", nodes},
                               {"note", "nodes in pre-order; split = 0 marks a leaf (exact causal softmax); an "
                                        "internal node's quadrant is queries [start+split, start+n) x keys "
                                        "[start, start+split) (src/attention/hyper_plan.h)"}};
        for (size_t level = 0; level < plan.projections.size(); level++) {
            files.push_back(out_file("hyper_projections_level" + std::to_string(level) + ".bin", "float32",
                                     {plan.lsh_bits, s.d},
                                     "HyperAttention LSH sign projections of level " + std::to_string(level) +
                                         " (lsh_bits, d): bit j of a code is [x . row_j > 0], bucket = gray_inverse(code)",
                                     plan.projections[level]));
            if (plan.samples == 0) continue;
            std::vector<int32_t> samples;
            json level_nodes = json::array();
            for (const HyperNode& n : plan.nodes) {
                if (n.leaf() || n.level != (int)level) continue;
                level_nodes.push_back({{"index", n.index}, {"start", n.start}, {"n", n.n}, {"split", n.split}});
                for (int bh = 0; bh < s.B * s.H; bh++) {
                    std::vector<int> draws = hyper_samples(plan, n, bh);
                    samples.insert(samples.end(), draws.begin(), draws.end());
                }
            }
            OutFile f = out_file("hyper_samples_level" + std::to_string(level) + ".bin", "int32",
                                 {(int64_t)level_nodes.size(), (int64_t)s.B * s.H, plan.samples},
                                 "HyperAttention sampled key offsets of level " + std::to_string(level) +
                                     " (internal nodes of the level in index order, b*H + h, draw): key position = "
                                     "node start + offset, each draw a term with log-weight ln(split / samples)",
                                 samples);
            f.extra = {{"nodes", level_nodes}};
            files.push_back(std::move(f));
        }
    }
}

json polysketch_layout_json(int d, int r) {
    const PolySketchLayout L = polysketch_layout(d, r);
    json blocks = json::array();
    for (int f = 0; f < 2; f++)
        for (int g = 0; g < 2; g++) {
            const PolySketchLayout::Block& b = L.blk[f][g];
            blocks.push_back({{"f", f + 1}, {"g", g + 1}, {"n_in", b.n_in}, {"ln_w", b.ln_w}, {"ln_b", b.ln_b},
                              {"w_in", b.w_in}, {"w_in_shape", {L.hidden, b.n_in}}, {"w_out", b.w_out},
                              {"w_out_shape", {r, L.hidden}}});
        }
    return {{"d", d}, {"r", r}, {"hidden", L.hidden}, {"total", L.total}, {"blocks", blocks},
            {"formula", "M(x) = sqrt(r) tanh(f1(x) o f2(x) / sqrt(r)), f = g2(g1(x)), g = LayerNorm(eps 1e-5, affine) "
                        "-> Linear(no bias) -> GELU(tanh) -> Linear(no bias); offsets in floats "
                        "(src/attention/polysketch_sketch.h)"}};
}

int run(int argc, char** argv) {
    CLI::App app{"Run one attention variant alone: forward and backward, dump everything it used, benchmark."};
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a repeated option: the last wins
    TrainOptions opts;
    ToolOptions tool;
    add_attention_options(app, opts);
    app.add_option("--batch", tool.batch, "batch B")->capture_default_str();
    app.add_option("--heads", tool.heads, "heads H")->capture_default_str();
    app.add_option("--seq", tool.seq, "sequence length T")->capture_default_str();
    app.add_option("--head-dim", tool.head_dim, "head dimension d")->capture_default_str();
    app.add_option("--layer", tool.layer, "layer index (AttnContext; random features and params derive from it)")->capture_default_str();
    app.add_option("--step", tool.step, "optimizer step (AttnContext; Performer redraws and hyper samples derive from it)")->capture_default_str();
    app.add_option("--in", tool.in, "read q.bin, k.bin, v.bin, do.bin (float32 (B,H,T,d)) and params.bin if present from this folder instead of drawing them from --seed");
    app.add_option("--out", tool.out, "write o, dq, dk, dv, dparams, the inputs, the variant's random/learned state and meta.json here");
    app.add_flag("--bench", tool.bench, "time forward and forward+backward, print ms, TFLOP/s and peak memory");
    app.add_option("--repeats", tool.repeats, "timed runs of --bench (median reported)")->capture_default_str();
    app.add_option("--warmup", tool.warmup, "untimed runs before timing")->capture_default_str();
    app.add_flag("--csv", tool.csv, std::string("with --bench, also print one CSV line: ") + kCsvHeader);
    app.add_flag("--csv-header", tool.csv_header, "print the CSV header line of --csv and exit");
    if (!parse_command_line(app, argc, argv)) return 0;
    if (tool.csv_header) {
        std::printf("%s\n", kCsvHeader);
        return 0;
    }
    CHECK(tool.batch >= 1 && tool.heads >= 1 && tool.seq >= 1 && tool.head_dim >= 1,
          "--batch %d, --heads %d, --seq %d and --head-dim %d must all be >= 1", tool.batch, tool.heads, tool.seq,
          tool.head_dim);
    CHECK(tool.layer >= 0 && tool.step >= 0, "--layer %d and --step %lld must be >= 0", tool.layer, (long long)tool.step);
    CHECK(tool.repeats >= 1 && tool.warmup >= 0, "--repeats %d must be >= 1 and --warmup %d >= 0", tool.repeats, tool.warmup);
    const AttnConfig cfg = attention_config(opts);
    AttnShape shape{tool.batch, tool.heads, tool.seq, tool.head_dim};
    const AttnContext ctx{tool.layer, tool.step};
    const size_t numel = shape.rows() * shape.d;

    // ---- backend, variant (an unknown name fails here, before any file is read or written)
    const bool cuda = opts.device == "cuda" || (opts.device == "auto" && cuda_available());
    std::unique_ptr<Ops> ops = cuda ? make_cuda_ops(opts.precision == "fp32" ? DType::F32 : DType::BF16) : make_cpu_ops();
    std::unique_ptr<Attention> attn = ops->make_attention(cfg);
    const DType act = ops->act_dtype();
    shape.dtype = act;
    const size_t num_params = attn->num_params(shape.d);
    if (!tool.out.empty()) ensure_writable_dir(tool.out, "output folder");

    // ---- inputs and parameters on the host
    std::vector<float> host_in[4];
    for (int i = 0; i < 4; i++) {
        if (!tool.in.empty()) {
            host_in[i] = read_heads(tool.in, std::string(kInputNames[i]) + ".bin", shape);
        } else {
            Rng rng(Rng::derive(opts.seed, kInputStream, (uint64_t)i));
            host_in[i].resize(numel);
            for (float& x : host_in[i]) x = rng.normal();
        }
    }
    std::vector<float> host_params(num_params);
    std::string params_source = "none";
    if (num_params > 0) {
        const std::string path = tool.in + "/params.bin";
        if (!tool.in.empty() && file_exists(path)) {
            const std::string bytes = read_file(path, "attention parameters");
            CHECK(bytes.size() == num_params * sizeof(float),
                  "params.bin: %s holds %zu bytes; expected %zu = 4 * %zu float32 parameters of %s for d=%d "
                  "(check --attn-* and --head-dim)",
                  path.c_str(), bytes.size(), num_params * sizeof(float), num_params, cfg.name.c_str(), shape.d);
            std::memcpy(host_params.data(), bytes.data(), bytes.size());
            params_source = "read from " + path;
        } else {
            attn->init_params(host_params.data(), shape.d, Rng::derive(opts.seed, 7, (uint64_t)tool.layer));
            params_source = "init_params(Rng::derive(seed, 7, layer))";
        }
    }

    // ---- backend memory: contiguous (B, H, T, d) tensors
    const size_t mem_before = ops->device_memory_used();
    Allocations mem(*ops);
    Tensor q = mem.tensor(act, numel, "q"), k = mem.tensor(act, numel, "k"), v = mem.tensor(act, numel, "v");
    Tensor dout = mem.tensor(act, numel, "do"), o = mem.tensor(act, numel, "o");
    Tensor dq = mem.tensor(act, numel, "dq"), dk = mem.tensor(act, numel, "dk"), dv = mem.tensor(act, numel, "dv");
    const size_t saved_n = attn->saved_size(shape);
    Tensor saved = mem.tensor(DType::F32, saved_n, "attention saved state");
    Tensor params = mem.tensor(act, num_params, "attention params");
    Tensor dparams = mem.tensor(DType::F32, num_params, "attention param grads");
    void* workspace = mem.raw(attn->workspace_bytes(shape), "attention workspace");
    Tensor inputs[4] = {q, k, v, dout};
    for (int i = 0; i < 4; i++) ops->upload(inputs[i], host_in[i].data());
    if (num_params) ops->upload(params, host_params.data());

    auto view = [&](const Tensor& t) { return head_tensor_bhtd(t.ptr, t.dtype, shape.H, shape.T, shape.d); };
    auto forward = [&] { attn->forward(shape, ctx, view(o), view(q), view(k), view(v), saved.f32(), params, workspace); };
    auto backward = [&] {
        if (num_params) ops->zero(dparams);  // dparams is accumulated (+=)
        attn->backward(shape, ctx, view(dq), view(dk), view(dv), dparams, view(dout), view(q), view(k), view(v),
                       view(o), saved.f32(), params, workspace);
    };

    // ---- the run
    forward();
    backward();
    ops->synchronize();
    const size_t mem_after = ops->device_memory_used();
    const size_t peak_bytes = std::max(mem.bytes(), mem_after > mem_before ? mem_after - mem_before : (size_t)0);
    std::vector<float> host_o(numel), host_dq(numel), host_dk(numel), host_dv(numel), host_saved(saved_n),
        host_dparams(num_params);
    ops->download(host_o.data(), o);
    ops->download(host_dq.data(), dq);
    ops->download(host_dk.data(), dk);
    ops->download(host_dv.data(), dv);
    if (saved_n) ops->download(host_saved.data(), saved);
    if (num_params) ops->download(host_dparams.data(), dparams);
    std::printf("attention %s on %s (%s), B=%d H=%d T=%d d=%d, layer %d step %lld: rms o %.6g, dq %.6g, dk %.6g, dv %.6g%s\n",
                attn->name().c_str(), ops->name().c_str(), dtype_name(act), shape.B, shape.H, shape.T, shape.d,
                ctx.layer, (long long)ctx.step, rms(host_o), rms(host_dq), rms(host_dk), rms(host_dv),
                num_params ? strformat(", dparams %.6g", rms(host_dparams)).c_str() : "");

    // ---- the files: computed first, written after (nothing half-written on an error)
    if (!tool.out.empty()) {
        const std::vector<int64_t> bhtd = {shape.B, shape.H, shape.T, shape.d};
        const std::string input_how = tool.in.empty()
            ? "drawn from --seed: Rng(Rng::derive(seed, 41086, i)).normal(), i = 0 q, 1 k, 2 v, 3 do, row-major"
            : "read from " + tool.in;
        const std::string rounding = act == DType::F32 ? "" : "; rounded to bf16 (round to nearest even) on upload";
        std::vector<OutFile> files;
        const char* input_meaning[4] = {"queries q", "keys k", "values v", "gradient of the loss w.r.t. o (dout)"};
        for (int i = 0; i < 4; i++)
            files.push_back(out_file(std::string(kInputNames[i]) + ".bin", "float32", bhtd,
                                     std::string("input: ") + input_meaning[i] + " (B, H, T, d), " + input_how + rounding,
                                     host_in[i]));
        files.push_back(out_file("o.bin", "float32", bhtd, "output o (B, H, T, d) of the forward", host_o));
        files.push_back(out_file("dq.bin", "float32", bhtd, "gradient dL/dq (B, H, T, d) of the backward", host_dq));
        files.push_back(out_file("dk.bin", "float32", bhtd, "gradient dL/dk (B, H, T, d) of the backward", host_dk));
        files.push_back(out_file("dv.bin", "float32", bhtd, "gradient dL/dv (B, H, T, d) of the backward", host_dv));
        if (saved_n)
            files.push_back(out_file("saved.bin", "float32", {(int64_t)saved_n}, saved_meaning(cfg.name), host_saved));
        if (num_params) {
            OutFile p = out_file("params.bin", "float32", {(int64_t)num_params},
                                 "learned parameters of the variant (one layer), " + params_source +
                                     (act == DType::F32 ? "" : "; used in bf16"),
                                 host_params);
            OutFile g = out_file("dparams.bin", "float32", {(int64_t)num_params},
                                 "gradient dL/dparams (layout of params.bin), zeroed before the backward", host_dparams);
            if (cfg.name == "polysketch") p.extra = g.extra = {{"layout", polysketch_layout_json(shape.d, cfg.sketch_size)}};
            files.push_back(std::move(p));
            files.push_back(std::move(g));
        }
        json state = json::object();
        dump_variant_state(cfg, ctx, shape, files, state);

        json file_list = json::array();
        for (const OutFile& f : files) {
            json j = {{"name", f.name}, {"dtype", f.dtype}, {"shape", f.shape}, {"bytes", f.bytes.size()},
                      {"byte_order", "little-endian"}, {"meaning", f.meaning}};
            if (!f.extra.is_null()) j["details"] = f.extra;
            file_list.push_back(j);
        }
        std::string command_line;
        for (int i = 0; i < argc; i++) command_line += std::string(i ? " " : "") + argv[i];
        json meta = {
            {"tool", "build/attn"},
            {"command_line", command_line},
            {"variant", attn->name()},
            {"device", ops->name()},
            {"precision", dtype_name(act)},
            {"shape", {{"B", shape.B}, {"H", shape.H}, {"T", shape.T}, {"d", shape.d}}},
            {"context", {{"layer", ctx.layer}, {"step", ctx.step}}},
            {"options",
             {{"attention", opts.attention}, {"attn_window", opts.attn_window}, {"attn_features", opts.attn_features},
              {"attn_redraw", opts.attn_redraw}, {"attn_degree", opts.attn_degree},
              {"attn_sketch_size", opts.attn_sketch_size}, {"attn_sketch", opts.attn_sketch},
              {"attn_block", opts.attn_block}, {"attn_exact_diag", opts.attn_exact_diag},
              {"attn_lsh_bits", opts.attn_lsh_bits}, {"attn_samples", opts.attn_samples},
              {"attn_min_seq", opts.attn_min_seq}, {"seed", opts.seed}, {"device", opts.device},
              {"precision", opts.precision}, {"batch", tool.batch}, {"heads", tool.heads}, {"seq", tool.seq},
              {"head_dim", tool.head_dim}, {"layer", tool.layer}, {"step", tool.step}, {"in", tool.in},
              {"out", tool.out}}},
            {"inputs", input_how},
            {"params", params_source},
            {"conventions",
             "all variants causal; tensors (B, H, T, d) row-major; softmax scale 1/sqrt(d); local: query i sees keys "
             "i-W+1..i; the math of every variant in ATTENTION.md"},
            {"state", state},
            {"files", file_list},
        };
        for (const OutFile& f : files) write_file_atomic(tool.out + "/" + f.name, f.bytes);
        write_file_atomic(tool.out + "/meta.json", meta.dump(2) + "\n");
        std::printf("wrote %zu files and meta.json to %s\n", files.size(), tool.out.c_str());
    }

    // ---- benchmark
    if (tool.bench) {
        auto time_ms = [&](const auto& fn) {
            ops->synchronize();
            const auto t0 = std::chrono::steady_clock::now();
            fn();
            ops->synchronize();
            return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        };
        auto fwd_bwd = [&] { forward(); backward(); };
        for (int i = 0; i < tool.warmup; i++) fwd_bwd();
        std::vector<double> fwd_ms, fb_ms;
        for (int i = 0; i < tool.repeats; i++) fwd_ms.push_back(time_ms(forward));
        for (int i = 0; i < tool.repeats; i++) fb_ms.push_back(time_ms(fwd_bwd));
        const double fwd = median(fwd_ms), fb = median(fb_ms);
        const double fwd_flops = 4.0 * shape.B * shape.H * (double)shape.T * shape.T * shape.d / 2;
        const double fwd_tflops = fwd_flops / (fwd * 1e-3) / 1e12, fb_tflops = 3.5 * fwd_flops / (fb * 1e-3) / 1e12;
        const bool dense = cfg.name == "softmax" || cfg.name == "polynomial";
        const char* unit = dense ? "TFLOP/s" : "effective TFLOP/s";
        const size_t mem_bench = ops->device_memory_used();
        const size_t peak = std::max(peak_bytes, mem_bench > mem_before ? mem_bench - mem_before : (size_t)0);
        std::printf("bench %s on %s (%s), B=%d H=%d T=%d d=%d, median of %d after %d warmup: forward %.4f ms (%.3f %s), "
                    "forward+backward %.4f ms (%.3f %s), peak memory %.2f MiB (allocations %.2f MiB)\n",
                    attn->name().c_str(), ops->name().c_str(), dtype_name(act), shape.B, shape.H, shape.T, shape.d,
                    tool.repeats, tool.warmup, fwd, fwd_tflops, unit, fb, fb_tflops, unit, peak / 1048576.0,
                    mem.bytes() / 1048576.0);
        if (tool.csv)
            std::printf("%s,%s,%s,%d,%d,%d,%d,%.6f,%.6f,%.6f,%.6f,%.3f\n", attn->name().c_str(), ops->name().c_str(),
                        dtype_name(act), shape.B, shape.H, shape.T, shape.d, fwd, fb, fwd_tflops, fb_tflops,
                        peak / 1048576.0);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
