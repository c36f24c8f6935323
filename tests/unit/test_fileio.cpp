// Tests of src/fileio: atomic writes (content replaced, no temporary left, failures clean up),
// readable errors, and the checkpoint-folder protocol (commit, crash leftovers ignored, prune).
// gtest's FAIL() would clash with check.h's FAIL; tests here use ADD_FAILURE/GTEST_FAIL.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include "check.h"
#include "fileio.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

std::string random_bytes(size_t n, uint32_t seed) {
    std::mt19937 gen(seed);
    std::string s(n, '\0');
    for (char& c : s) c = (char)(gen() & 0xFF);
    return s;
}

void write_checkpoint(const std::string& out, int64_t step, const std::string& payload) {
    std::string tmp = begin_checkpoint(out, step);
    write_file_atomic(tmp + "/model.bin", payload);
    commit_checkpoint(out, step);
}

}  // namespace

TEST(FileIO, AtomicWriteReplacesContentAndLeavesNoTemporary) {
    TempDir dir;
    std::random_device rd;
    std::string first = random_bytes(1000 + rd() % 5000, rd()), second = random_bytes(rd() % 3000, rd());
    std::string path = dir / "file.bin";
    write_file_atomic(path, first);
    EXPECT_EQ(read_file(path, "test file"), first);
    write_file_atomic(path, second);
    EXPECT_EQ(read_file(path, "test file"), second);
    EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"file.bin"});
}

TEST(FileIO, FailedWriteNamesPathAndLeavesNothing) {
    TempDir dir;
    std::string path = dir / "missing_folder/file.bin";
    expect_error_containing([&] { write_file_atomic(path, "abc"); }, {path});
    EXPECT_TRUE(names_in(dir.path).empty());
}

TEST(FileIO, ReadMissingFileNamesItAndWhatItIs) {
    TempDir dir;
    std::string path = dir / "nope.json";
    expect_error_containing([&] { read_file(path, "vocab file"); }, {"vocab file " + path});
    expect_error_containing([&] { read_file(dir.path, "vocab file"); }, {"folder"});
}

TEST(FileIO, EnsureWritableDirCreatesNestedFolders) {
    TempDir dir;
    std::string nested = dir / "a/b/c";
    ensure_writable_dir(nested, "output folder");
    EXPECT_TRUE(fs::is_directory(nested));
    EXPECT_TRUE(names_in(nested).empty());  // the probe file is gone
}

TEST(FileIO, UnwritableDirUnderRegularFileErrors) {
    TempDir dir;
    write_file_atomic(dir / "plain", "x");
    std::string bad = dir / "plain/sub";
    expect_error_containing([&] { ensure_writable_dir(bad, "output folder"); }, {"cannot write to output folder " + bad});
    expect_error_containing([&] { ensure_writable_dir(bad, "output folder"); }, {"pass another --out"});
    expect_error_containing([&] { begin_checkpoint(bad, 1); }, {bad});
}

TEST(FileIO, CheckpointCommitListAndLatest) {
    TempDir dir;
    std::string out = dir / "run";
    EXPECT_TRUE(list_complete_checkpoints(out).empty());  // folder absent
    EXPECT_EQ(latest_checkpoint(out), "");
    std::string payload = random_bytes(777, std::random_device{}());
    write_checkpoint(out, 200, payload);
    write_checkpoint(out, 100, "older");
    EXPECT_EQ(list_complete_checkpoints(out), (std::vector<int64_t>{100, 200}));
    EXPECT_EQ(latest_checkpoint(out), checkpoint_dir(out, 200));
    EXPECT_EQ(read_file(latest_checkpoint(out) + "/model.bin", "model"), payload);
    EXPECT_TRUE(fs::exists(checkpoint_dir(out, 200) + "/DONE"));
    EXPECT_EQ(names_in(out), (std::vector<std::string>{"ckpt_00000100", "ckpt_00000200"}));
}

TEST(FileIO, CrashLeftoversAreIgnoredAndPruned) {
    TempDir dir;
    std::string out = dir.path;
    write_checkpoint(out, 100, "complete");
    // A crash while writing step 300: the temporary folder exists, commit never ran.
    std::string tmp = begin_checkpoint(out, 300);
    write_file_atomic(tmp + "/model.bin", "partial");
    // A final-looking folder without DONE (copied by hand, say) does not count either.
    fs::create_directory(out + "/ckpt_00000400");
    EXPECT_EQ(list_complete_checkpoints(out), (std::vector<int64_t>{100}));
    EXPECT_EQ(latest_checkpoint(out), checkpoint_dir(out, 100));
    prune_checkpoints(out, 5);
    EXPECT_FALSE(fs::exists(tmp));
    EXPECT_TRUE(fs::exists(checkpoint_dir(out, 100)));
    // Beginning the same step again starts from an empty folder.
    tmp = begin_checkpoint(out, 100);
    EXPECT_TRUE(names_in(tmp).empty());
}

TEST(FileIO, CommitReplacesSameStep) {
    TempDir dir;
    write_checkpoint(dir.path, 50, "first");
    write_checkpoint(dir.path, 50, "second");
    EXPECT_EQ(list_complete_checkpoints(dir.path), (std::vector<int64_t>{50}));
    EXPECT_EQ(read_file(checkpoint_dir(dir.path, 50) + "/model.bin", "model"), "second");
    EXPECT_EQ(names_in(dir.path), std::vector<std::string>{"ckpt_00000050"});
}

TEST(FileIO, PruneKeepsNewest) {
    TempDir dir;
    std::mt19937 gen(std::random_device{}());
    std::vector<int64_t> steps;
    for (int i = 0; i < 6; i++) steps.push_back((int64_t)(gen() % 100000));
    std::sort(steps.begin(), steps.end());
    steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
    for (size_t i = steps.size(); i-- > 0;) write_checkpoint(dir.path, steps[i], "x");  // any write order
    int keep = 2;
    prune_checkpoints(dir.path, keep);
    std::vector<int64_t> newest(steps.end() - keep, steps.end());
    EXPECT_EQ(list_complete_checkpoints(dir.path), newest);
    EXPECT_EQ(names_in(dir.path).size(), (size_t)keep);  // nothing else left behind
    prune_checkpoints(dir.path, 0);                      // keep <= 0 keeps all
    EXPECT_EQ(list_complete_checkpoints(dir.path), newest);
}
