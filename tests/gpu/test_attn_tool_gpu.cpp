// build/attn --device cuda end to end (the real binary; ATTN_BIN overrides its path, default
// build/attn). For every variant, on a shape every CUDA kernel takes (B=1, H=2, T=150: not a
// multiple of any tile, chunk or block; d=64), in fp32:
//   1. a CUDA run from --seed dumps the inputs, o, dq, dk, dv and the variant's random or learned
//      state (and dparams for the learned sketch);
//   2. a second CUDA run from that dump (--in) gives byte-identical outputs: the dump holds all
//      the run needs and the kernels are deterministic;
//   3. the CPU reference run from the same dump (--device cpu --in) reproduces the CUDA outputs
//      to 1e-3 (‖cuda − cpu‖/‖cpu‖; both fp32, they differ by summation order): another
//      implementation reproduces the result from the dumped state, as issue 4 asks of build/attn.
#include "tests/unit/test_util.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fileio.h"
#include "gpu_test_util.h"

namespace {

std::string attn_binary() { return program_path("ATTN_BIN", "build/attn"); }

const char* kShape = "--batch 1 --heads 2 --seq 150 --head-dim 64 --precision fp32";

struct ToolVariant {
    const char* label;
    const char* args;
    std::vector<const char*> outputs;  // files every run writes that must agree
};

const std::vector<ToolVariant>& tool_variants() {
    static const std::vector<const char*> base = {"o.bin", "dq.bin", "dk.bin", "dv.bin"};
    static const std::vector<ToolVariant> v = {
        {"softmax", "--attention softmax", base},
        {"local", "--attention local --attn-window 37", base},
        {"performer", "--attention performer --attn-features 100", base},  // m not a multiple of 8
        {"polynomial", "--attention polynomial", base},
        {"polysketch_learned", "--attention polysketch --attn-sketch-size 16 --attn-block 32",
         {"o.bin", "dq.bin", "dk.bin", "dv.bin", "dparams.bin"}},
        {"polysketch_random", "--attention polysketch --attn-sketch random --attn-sketch-size 16 --attn-block 32",
         base},
        {"hyper", "--attention hyper --attn-min-seq 32 --attn-block 16 --attn-samples 16 --attn-lsh-bits 3", base},
    };
    return v;
}

std::vector<float> floats_of(const std::string& path) {
    const std::string bytes = read_whole_file(path);
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
    return v;
}

}  // namespace

TEST(AttnToolCuda, EveryVariantReproducesFromItsDumpOnGpuAndCpu) {
    std::mt19937 gen(gpu_test::fresh_seed());
    const std::string seed = std::to_string(gen() % 100000);
    const TempDir temp("attn_tool_gpu_test");
    for (const ToolVariant& var : tool_variants()) {
        SCOPED_TRACE(var.label);
        const std::string a = temp.path + "/" + var.label + "_cuda", b = temp.path + "/" + var.label + "_cuda_again",
                          c = temp.path + "/" + var.label + "_cpu";
        const std::string common = std::string(kShape) + " " + var.args + " --seed " + seed;
        CommandResult ra = run_command(attn_binary() + " --device cuda " + common + " --out " + a);
        ASSERT_EQ(ra.exit_code, 0) << ra.out << ra.err;
        CommandResult rb = run_command(attn_binary() + " --device cuda " + common + " --in " + a + " --out " + b);
        ASSERT_EQ(rb.exit_code, 0) << rb.out << rb.err;
        CommandResult rc = run_command(attn_binary() + " --device cpu " + common + " --in " + a + " --out " + c);
        ASSERT_EQ(rc.exit_code, 0) << rc.out << rc.err;
        for (const char* f : var.outputs) {
            const std::vector<float> cuda = floats_of(a + "/" + f), again = floats_of(b + "/" + f),
                                     cpu = floats_of(c + "/" + f);
            ASSERT_FALSE(cuda.empty()) << f;
            EXPECT_TRUE(read_whole_file(a + "/" + f) == read_whole_file(b + "/" + f)) << f << " differs on a rerun";
            const double err = gpu_test::rel_err(cuda, cpu);
            EXPECT_LE(err, 1e-3) << f << ": CUDA vs the CPU run from the same dump";
            std::printf("  %-20s %-12s cuda vs cpu %.2e\n", var.label, f, err);
        }
    }
}
