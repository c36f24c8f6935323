// build/train end to end on the CPU with small random shards: resume is bit-exact (20 steps
// straight = 10 steps, stop, resume to 20: same losses, same weights), and every kind of bad
// input exits non-zero with one line naming the problem. Runs the real binary (built by
// `make test` before the suite; TRAIN_BIN overrides its path).
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <random>
#include <string>

#include "data/shard.h"
#include "fileio.h"
#include "test_util.h"

namespace {

// Random token shards: train (2 shards) and val, drawn from 100 ids so a model learns quickly.
std::string make_data(const std::string& root, std::mt19937& gen) {
    std::string data = root + "/data";
    ensure_writable_dir(data, "test data");
    std::uniform_int_distribution<int> tok(0, 99);
    for (const char* name : {"train_000000.bin", "train_000001.bin", "val_000000.bin"}) {
        std::vector<uint16_t> t(3000 + gen() % 500);
        for (auto& x : t) x = (uint16_t)tok(gen);
        write_shard(data + "/" + name, t);
    }
    return data;
}

const char* kSmall = "--device cpu --model tiny --layers 1 --channels 32 --heads 2 --batch 2 --seq 16 "
                     "--total-batch 64 --lr 1e-2 --sample-every 0 --eval-every 5 --eval-batches 2 --ckpt-every 5 --keep 2";

}  // namespace

TEST(TrainProgram, ResumeIsBitExact) {
    std::mt19937 gen(std::random_device{}());
    const TempDir temp("gpt_train_test");
    const std::string root = temp.path, data = make_data(root, gen);
    std::string common = std::string(kSmall) + " --steps 20 --data " + data + " --seed " + std::to_string(gen() % 100000);
    CommandResult a = run_train(common + " --out " + root + "/a");
    ASSERT_EQ(a.exit_code, 0) << a.out << a.err;
    CommandResult b1 = run_train(common + " --stop-at 10 --out " + root + "/b");
    ASSERT_EQ(b1.exit_code, 0) << b1.out << b1.err;
    // a crash in the middle of writing a later checkpoint leaves a tmp folder: it must be ignored
    ensure_writable_dir(root + "/b/.ckpt_00000015.tmp", "fake partial checkpoint");
    CommandResult b2 = run_train(common + " --resume --out " + root + "/b");
    ASSERT_EQ(b2.exit_code, 0) << b2.out << b2.err;
    EXPECT_NE(b2.out.find("resuming"), std::string::npos) << b2.out;

    auto la = logged_losses(root + "/a/log.jsonl"), lb = logged_losses(root + "/b/log.jsonl");
    ASSERT_EQ(la.size(), 20u);
    EXPECT_EQ(la, lb);
    std::string wa = read_file(checkpoint_dir(root + "/a", 20) + "/model.bin", "model");
    std::string wb = read_file(checkpoint_dir(root + "/b", 20) + "/model.bin", "model");
    EXPECT_TRUE(wa == wb) << "final weights differ after resume";
    EXPECT_TRUE(read_file(checkpoint_dir(root + "/a", 20) + "/optim.bin", "optim") ==
                read_file(checkpoint_dir(root + "/b", 20) + "/optim.bin", "optim"));
    EXPECT_EQ(list_complete_checkpoints(root + "/b").size(), 2u) << "--keep 2";
    // the loss fell from ln(50257) towards ln(100)
    EXPECT_LT(std::stod(la[20]), std::stod(la[1]) - 0.5);
}

TEST(TrainProgram, BadInputsFailWithOneClearLine) {
    std::mt19937 gen(std::random_device{}());
    const TempDir temp("gpt_train_test");
    const std::string root = temp.path, data = make_data(root, gen);
    std::string base = std::string(kSmall) + " --steps 2 --data " + data + " --out " + root + "/out";
    auto expect_error = [&](const std::string& args, const std::string& words) {
        CommandResult r = run_train(args);
        EXPECT_NE(r.exit_code, 0) << args;
        EXPECT_NE(r.err.find("error: "), std::string::npos) << args << "\n" << r.err;
        EXPECT_NE(r.err.find(words), std::string::npos) << args << "\nstderr: " << r.err;
        // one line: the error line (a leading blank line ends a status line)
        size_t lines = 0;
        for (char c : r.err) lines += c == '\n';
        EXPECT_LE(lines, 2u) << r.err;
    };
    expect_error(base + " --bogus 3", "bogus");
    expect_error(base + " --seq 300 --total-batch 600", "context");
    expect_error(base + " --total-batch 100", "multiple");
    expect_error(base + " --attention nope", "nope");
    expect_error(base + " --model nosuchmodel", "nosuchmodel");
    expect_error(base + " --data " + root + "/nowhere", "no shards match");
    write_file_atomic(root + "/file", "x", 1);
    expect_error(std::string(kSmall) + " --data " + data + " --out " + root + "/file/sub", "output folder");
    expect_error(base + " --resume", "no complete checkpoint");

    // a shard with a token id beyond the vocabulary, and a truncated one
    std::string bad = root + "/bad";
    ensure_writable_dir(bad, "test data");
    std::vector<uint16_t> t(2000, 5);
    t[777] = 60000;
    write_shard(bad + "/train_000000.bin", t);
    write_shard(bad + "/val_000000.bin", std::vector<uint16_t>(2000, 7));
    expect_error(std::string(kSmall) + " --data " + bad + " --out " + root + "/o2", "60000");
    std::string good = read_file(data + "/train_000000.bin", "shard");
    write_file_atomic(bad + "/train_000000.bin", good.substr(0, good.size() - 10));
    expect_error(std::string(kSmall) + " --data " + bad + " --out " + root + "/o2", "train_000000.bin");

    // resuming with options that contradict the checkpoint; a truncated checkpoint
    CommandResult ok = run_train(base);
    ASSERT_EQ(ok.exit_code, 0) << ok.err;
    expect_error(base + " --resume --attention local", "contradicts");
    expect_error(base + " --resume --lr 0.5", "contradicts");
    std::string model = checkpoint_dir(root + "/out", 2) + "/model.bin";
    std::string bytes = read_file(model, "model");
    write_file_atomic(model, bytes.substr(0, bytes.size() / 2));
    expect_error(base + " --resume --steps 4", "truncated");
}
