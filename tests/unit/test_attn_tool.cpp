// build/attn end to end on the CPU (the real binary; ATTN_BIN overrides its path, default
// build/attn, built by `make test` before the suite). For every variant on a small odd shape:
// a run from --seed writes the outputs, the inputs and the variant's random / learned state; a
// second run reading those inputs (--in) gives byte-identical o, dq, dk, dv; meta.json lists
// exactly the files written, with their byte sizes. Bad input (a truncated or missing input, a
// params.bin of the wrong size, an unknown variant) exits non-zero with one line naming it.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fileio.h"
#include "test_util.h"

namespace {

std::string attn_binary() { return program_path("ATTN_BIN", "build/attn"); }

CommandResult run_attn(const std::string& args) { return run_command(attn_binary() + " " + args); }

// Whether dir holds an entry `name` (false when dir does not exist).
bool has_file(const std::string& dir, const std::string& name) { return std::filesystem::exists(dir + "/" + name); }

struct Variant {
    const char* label;
    const char* args;
    bool seed_free;                       // nothing but the inputs (and params.bin) derives from --seed
    std::vector<const char*> state_files; // random / learned state that must be dumped
};

const char* kShape = "--device cpu --batch 2 --heads 3 --seq 37 --head-dim 12";

const std::vector<Variant>& variants() {
    static const std::vector<Variant> v = {
        {"softmax", "--attention softmax", true, {}},
        {"local", "--attention local --attn-window 5", true, {}},
        {"performer", "--attention performer --attn-features 16", false, {"performer_omega.bin"}},
        {"polynomial", "--attention polynomial", true, {}},
        {"polysketch_learned", "--attention polysketch --attn-sketch-size 4 --attn-block 8", true,
         {"params.bin", "dparams.bin"}},
        {"polysketch_random", "--attention polysketch --attn-sketch random --attn-sketch-size 4 --attn-block 8", false,
         {"polysketch_S1.bin", "polysketch_S2.bin"}},
        {"hyper", "--attention hyper --attn-min-seq 8 --attn-block 4 --attn-samples 5 --attn-lsh-bits 3", false,
         {"hyper_projections_level0.bin", "hyper_samples_level0.bin", "hyper_projections_level2.bin",
          "hyper_samples_level2.bin"}},
    };
    return v;
}

// meta.json of dir lists exactly the files in dir (besides itself), each with its byte size
// = 4 * prod(shape).
void expect_meta_matches(const std::string& dir, const std::string& label) {
    nlohmann::json meta = nlohmann::json::parse(read_whole_file(dir + "/meta.json"));
    std::set<std::string> listed;
    for (const auto& f : meta.at("files")) {
        const std::string name = f.at("name");
        listed.insert(name);
        size_t count = 1;
        for (const auto& s : f.at("shape")) count *= s.get<size_t>();
        const std::string dtype = f.at("dtype");
        EXPECT_TRUE(dtype == "float32" || dtype == "int32") << label << " " << name;
        EXPECT_EQ(f.at("bytes").get<size_t>(), 4 * count) << label << " " << name;
        EXPECT_EQ(read_whole_file(dir + "/" + name).size(), 4 * count) << label << " " << name;
        EXPECT_FALSE(f.at("meaning").get<std::string>().empty()) << label << " " << name;
    }
    std::set<std::string> present;  // visible entries besides meta.json
    for (const std::string& name : names_in(dir))
        if (name[0] != '.' && name != "meta.json") present.insert(name);
    EXPECT_EQ(listed, present) << label;
    EXPECT_EQ(meta.at("shape").at("T").get<int>(), 37) << label;
    EXPECT_TRUE(meta.at("options").contains("attn_min_seq")) << label;
}

void expect_one_line_error(const CommandResult& r, const std::string& words, const std::string& what) {
    EXPECT_NE(r.exit_code, 0) << what;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << what << "\nstderr: " << r.err;
    EXPECT_NE(r.err.find(words), std::string::npos) << what << "\nstderr: " << r.err;
    size_t lines = 0;
    for (char c : r.err) lines += c == '\n';
    EXPECT_EQ(lines, 1u) << what << "\nstderr: " << r.err;
}

}  // namespace

TEST(AttnTool, EveryVariantDumpsAndReproducesFromItsDump) {
    std::mt19937 gen(std::random_device{}());
    const unsigned seed = gen() % 100000;
    std::printf("seed %u\n", seed);
    const TempDir temp("attn_tool_test");
    const std::string& root = temp.path;
    for (const Variant& var : variants()) {
        SCOPED_TRACE(var.label);
        const std::string a = root + "/" + var.label + "_a", b = root + "/" + var.label + "_b";
        const std::string common = std::string(kShape) + " " + var.args;
        CommandResult ra = run_attn(common + " --seed " + std::to_string(seed) + " --out " + a);
        ASSERT_EQ(ra.exit_code, 0) << ra.out << ra.err;
        for (const char* f : {"q.bin", "k.bin", "v.bin", "do.bin", "o.bin", "dq.bin", "dk.bin", "dv.bin", "meta.json"})
            EXPECT_TRUE(has_file(a, f)) << f;
        for (const char* f : var.state_files) EXPECT_TRUE(has_file(a, f)) << f;
        expect_meta_matches(a, var.label);

        // Re-run from the dump. Where nothing but the inputs derives from the seed, another seed
        // proves the inputs (and params.bin) were read from --in.
        const unsigned seed_b = var.seed_free ? seed + 1 : seed;
        CommandResult rb = run_attn(common + " --seed " + std::to_string(seed_b) + " --in " + a + " --out " + b);
        ASSERT_EQ(rb.exit_code, 0) << rb.out << rb.err;
        for (const char* f : {"q.bin", "k.bin", "v.bin", "do.bin", "o.bin", "dq.bin", "dk.bin", "dv.bin"})
            EXPECT_TRUE(read_whole_file(a + "/" + f) == read_whole_file(b + "/" + f)) << f << " differs after --in";
        for (const char* f : var.state_files)
            EXPECT_TRUE(read_whole_file(a + "/" + f) == read_whole_file(b + "/" + f)) << f << " differs after --in";
        expect_meta_matches(b, var.label);
    }
    // the softmax output differs for other inputs (the comparison above is not vacuous)
    CommandResult rc =
        run_attn(std::string(kShape) + " --attention softmax --seed " + std::to_string(seed + 7) + " --out " + root + "/other");
    ASSERT_EQ(rc.exit_code, 0) << rc.err;
    EXPECT_FALSE(read_whole_file(root + "/other/o.bin") == read_whole_file(root + "/softmax_a/o.bin"));
}

TEST(AttnTool, BadInputsFailWithOneClearLine) {
    const TempDir temp("attn_tool_test");
    const std::string root = temp.path, good = root + "/good", bad = root + "/bad";
    const std::string learned = std::string(kShape) + " --attention polysketch --attn-sketch-size 4 --attn-block 8";
    CommandResult r = run_attn(learned + " --out " + good);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ensure_writable_dir(bad, "test input");
    for (const char* f : {"q.bin", "k.bin", "v.bin", "do.bin", "params.bin"})
        write_file_atomic(bad + "/" + f, read_whole_file(good + "/" + f));

    // truncated q.bin: names the file and the expected size; no outputs written
    std::string q = read_whole_file(good + "/q.bin");
    write_file_atomic(bad + "/q.bin", q.data(), q.size() - 4);
    r = run_attn(learned + " --in " + bad + " --out " + root + "/out1");
    expect_one_line_error(r, "q.bin", "truncated q.bin");
    EXPECT_NE(r.err.find(std::to_string(q.size())), std::string::npos) << r.err;
    EXPECT_FALSE(has_file(root + "/out1", "o.bin"));
    write_file_atomic(bad + "/q.bin", q);

    // a shape that does not match the files
    r = run_attn(learned + " --seq 36 --in " + bad);
    expect_one_line_error(r, "q.bin", "wrong --seq");

    // params.bin of the wrong size
    std::string p = read_whole_file(good + "/params.bin");
    write_file_atomic(bad + "/params.bin", p.data(), p.size() / 2);
    r = run_attn(learned + " --in " + bad);
    expect_one_line_error(r, "params.bin", "short params.bin");

    // a missing input
    std::filesystem::remove(bad + "/do.bin");
    r = run_attn(learned + " --in " + bad);
    expect_one_line_error(r, "do.bin", "missing do.bin");

    // unknown variant and unknown option
    r = run_attn(std::string(kShape) + " --attention nosuchvariant");
    expect_one_line_error(r, "nosuchvariant", "unknown variant");
    r = run_attn(std::string(kShape) + " --bogus-option 3");
    expect_one_line_error(r, "bogus", "unknown option");
    r = run_attn(std::string(kShape) + " --head-dim 0");
    expect_one_line_error(r, "--head-dim", "zero head dim");
}

TEST(AttnTool, BenchPrintsTimesAndOneCsvLine) {
    CommandResult r = run_attn(std::string(kShape) + " --attention local --attn-window 5 --bench --repeats 3 --warmup 1 --csv");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("effective TFLOP/s"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("peak memory"), std::string::npos) << r.out;
    CommandResult h = run_attn("--csv-header");
    ASSERT_EQ(h.exit_code, 0) << h.err;
    const size_t columns = std::count(h.out.begin(), h.out.end(), ',');
    const size_t at = r.out.find("local,cpu,fp32,2,3,37,12,");
    ASSERT_NE(at, std::string::npos) << r.out;
    const std::string line = r.out.substr(at, r.out.find('\n', at) - at);
    EXPECT_EQ((size_t)std::count(line.begin(), line.end(), ','), columns) << line;
}
