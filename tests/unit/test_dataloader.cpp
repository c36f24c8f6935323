// Tests of data/dataloader: rows are windows of T+1 tokens at multiples of T with targets the
// inputs shifted by one; each window once per epoch; seeded, reproducible shuffles that differ
// between epochs; the rank split; exact resume from state(); sequential order without shuffle;
// and the errors for missing or insufficient data and out-of-vocab tokens.
// gtest's FAIL() would clash with check.h's FAIL; tests here use ADD_FAILURE/GTEST_FAIL.
#define GTEST_DONT_DEFINE_FAIL 1
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "check.h"
#include "data/dataloader.h"
#include "data/shard.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace {

constexpr int kVocab = 50257;

// Shards of the given sizes whose tokens are distinct random ids, so a row's first token tells
// which shard and position it came from.
struct Corpus {
    TempDir dir;
    std::vector<std::vector<uint16_t>> shards;
    std::map<int, std::pair<int, size_t>> where;  // token -> (shard, position)
    std::string pattern;

    explicit Corpus(const std::vector<size_t>& sizes, uint32_t seed) {
        std::vector<uint16_t> ids(kVocab);
        std::iota(ids.begin(), ids.end(), 0);
        std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
        size_t next = 0;
        for (size_t s = 0; s < sizes.size(); s++) {
            std::vector<uint16_t> tokens(ids.begin() + next, ids.begin() + next + sizes[s]);
            next += sizes[s];
            for (size_t i = 0; i < tokens.size(); i++) where[tokens[i]] = {(int)s, i};
            write_shard(dir / ("corpus_train_" + std::to_string(100000 + s) + ".bin"), tokens);
            shards.push_back(tokens);
        }
        write_shard(dir / "corpus_val_000000.bin", {1, 2, 3});  // must not match the pattern
        pattern = dir / "corpus_train_*.bin";
    }
    size_t windows(int T) const {
        size_t n = 0;
        for (auto& s : shards) n += s.size() > (size_t)T ? (s.size() - 1) / T : 0;
        return n;
    }
};

// One batch of a rank as window ids (shard * 1e6 + window index), after checking every row
// against the corpus: starts at a multiple of T, inputs are the window, targets shifted by one.
std::vector<int64_t> take_batch(DataLoader& loader, const Corpus& corpus, int B, int T) {
    std::vector<int> inputs(B * T, -1), targets(B * T, -1);
    loader.next_batch(inputs.data(), targets.data());
    std::vector<int64_t> ids;
    for (int b = 0; b < B; b++) {
        auto found = corpus.where.find(inputs[b * T]);
        if (found == corpus.where.end()) {
            ADD_FAILURE() << "row " << b << " starts with an unknown token " << inputs[b * T];
            return ids;
        }
        auto [shard, pos] = found->second;
        const auto& tokens = corpus.shards[shard];
        EXPECT_EQ(pos % T, 0u) << "window does not start at a multiple of T";
        EXPECT_LE(pos + T + 1, tokens.size()) << "window runs past its shard";
        for (int t = 0; t < T && pos + t + 1 < tokens.size(); t++) {
            EXPECT_EQ(inputs[b * T + t], tokens[pos + t]);
            EXPECT_EQ(targets[b * T + t], tokens[pos + t + 1]);
        }
        ids.push_back((int64_t)shard * 1000000 + (int64_t)(pos / T));
    }
    return ids;
}

std::vector<int64_t> take_batches(DataLoader& loader, const Corpus& corpus, int B, int T, size_t count) {
    std::vector<int64_t> ids;
    for (size_t i = 0; i < count; i++) {
        auto batch = take_batch(loader, corpus, B, T);
        ids.insert(ids.end(), batch.begin(), batch.end());
    }
    return ids;
}

}  // namespace

TEST(DataLoader, EveryWindowOncePerEpochWithShiftedTargets) {
    const int T = 8, B = 3;
    // 12 + 9 + 0 + 15 = 36 windows = 12 batches of 3; the 5-token shard has no whole window and
    // the leftover tokens after the last window of each shard are unused.
    Corpus corpus({97 + 3, 73, 5, 121 + 7}, std::random_device{}());
    DataLoader loader(corpus.pattern, B, T, 0, 1, std::random_device{}(), true, kVocab);
    ASSERT_EQ(loader.num_windows(), 36u);
    ASSERT_EQ(loader.batches_per_epoch(), 12u);
    EXPECT_EQ(loader.num_shards(), 4u);
    for (int epoch = 0; epoch < 2; epoch++) {
        auto ids = take_batches(loader, corpus, B, T, loader.batches_per_epoch());
        std::set<int64_t> unique(ids.begin(), ids.end());
        EXPECT_EQ(ids.size(), 36u);
        EXPECT_EQ(unique.size(), 36u) << "a window repeated within epoch " << epoch;
    }
}

TEST(DataLoader, PartialLastBatchIsSkipped) {
    const int T = 4, B = 5;
    Corpus corpus({4 * 23 + 1}, std::random_device{}());  // 23 windows: 4 batches of 5, 3 left
    DataLoader loader(corpus.pattern, B, T, 0, 1, std::random_device{}(), true, kVocab);
    ASSERT_EQ(loader.batches_per_epoch(), 4u);
    auto epoch0 = take_batches(loader, corpus, B, T, 4);
    EXPECT_EQ(std::set<int64_t>(epoch0.begin(), epoch0.end()).size(), 20u);
    EXPECT_EQ(loader.state(), (DataLoaderState{1, 0}));
    auto epoch1 = take_batches(loader, corpus, B, T, 4);
    EXPECT_EQ(std::set<int64_t>(epoch1.begin(), epoch1.end()).size(), 20u);
}

TEST(DataLoader, SeededShuffleIsReproducibleAndDiffersByEpochAndSeed) {
    const int T = 16, B = 4;
    Corpus corpus({16 * 40 + 1, 16 * 24 + 9}, std::random_device{}());  // 64 windows: 16 batches
    uint64_t seed = std::random_device{}();
    DataLoader a(corpus.pattern, B, T, 0, 1, seed, true, kVocab), b(corpus.pattern, B, T, 0, 1, seed, true, kVocab);
    DataLoader other(corpus.pattern, B, T, 0, 1, seed + 1, true, kVocab);
    size_t n = a.batches_per_epoch();
    auto a0 = take_batches(a, corpus, B, T, n), a1 = take_batches(a, corpus, B, T, n);
    auto b0 = take_batches(b, corpus, B, T, n), b1 = take_batches(b, corpus, B, T, n);
    auto other0 = take_batches(other, corpus, B, T, n);
    EXPECT_EQ(a0, b0);
    EXPECT_EQ(a1, b1);
    EXPECT_NE(a0, a1) << "two epochs in the same order";
    EXPECT_NE(a0, other0) << "two seeds in the same order";
    auto sorted0 = a0, sorted1 = a1;
    std::sort(sorted0.begin(), sorted0.end());
    std::sort(sorted1.begin(), sorted1.end());
    EXPECT_EQ(sorted0, sorted1) << "epochs hold different windows";
    // reset() goes back to the start of epoch 0.
    a.reset();
    EXPECT_EQ(a.state(), (DataLoaderState{0, 0}));
    EXPECT_EQ(take_batches(a, corpus, B, T, 3), std::vector<int64_t>(a0.begin(), a0.begin() + 3 * B));
}

TEST(DataLoader, NoShuffleIsSequential) {
    const int T = 8, B = 2;
    Corpus corpus({8 * 5 + 3, 8 * 7 + 1}, std::random_device{}());  // 5 + 7 = 12 windows
    DataLoader loader(corpus.pattern, B, T, 0, 1, 1234, false, kVocab);
    auto ids = take_batches(loader, corpus, B, T, loader.batches_per_epoch());
    std::vector<int64_t> expected;
    for (int k = 0; k < 5; k++) expected.push_back(k);
    for (int k = 0; k < 7; k++) expected.push_back(1000000 + k);
    EXPECT_EQ(ids, expected);
}

TEST(DataLoader, RanksSplitEachGlobalBatchDisjointly) {
    const int T = 8, B = 2, world = 3;
    Corpus corpus({8 * 31 + 1, 8 * 20 + 5}, std::random_device{}());  // 51 windows: 8 batches of 6
    uint64_t seed = std::random_device{}();
    // One loader with B*world rows and world 1 sees the global batches whole.
    DataLoader global(corpus.pattern, B * world, T, 0, 1, seed, true, kVocab);
    std::vector<std::unique_ptr<DataLoader>> ranks;
    for (int r = 0; r < world; r++)
        ranks.push_back(std::make_unique<DataLoader>(corpus.pattern, B, T, r, world, seed, true, kVocab));
    ASSERT_EQ(ranks[0]->batches_per_epoch(), 8u);
    ASSERT_EQ(global.batches_per_epoch(), 8u);
    std::set<int64_t> seen_this_epoch;
    for (int step = 0; step < 12; step++) {  // crosses an epoch boundary
        if (step == 8) seen_this_epoch.clear();
        auto whole = take_batch(global, corpus, B * world, T);
        std::vector<int64_t> joined;
        for (int r = 0; r < world; r++) {
            auto part = take_batch(*ranks[r], corpus, B, T);
            joined.insert(joined.end(), part.begin(), part.end());
        }
        EXPECT_EQ(joined, whole) << "step " << step;  // rank r has rows [r*B, (r+1)*B)
        for (int64_t id : joined) EXPECT_TRUE(seen_this_epoch.insert(id).second) << "window given twice, step " << step;
    }
}

TEST(DataLoader, RestoreReproducesFollowingBatches) {
    const int T = 4, B = 3, world = 2;
    Corpus corpus({4 * 30 + 2}, std::random_device{}());  // 30 windows: 5 batches of 6
    uint64_t seed = std::random_device{}();
    for (int rank = 0; rank < world; rank++) {
        // Save after 3, after 5 (exactly at the end of epoch 0) and after 7 batches; the next 8
        // batches of a resumed loader must equal those of the uninterrupted one.
        for (size_t saved_after : {3, 5, 7}) {
            DataLoader run(corpus.pattern, B, T, rank, world, seed, true, kVocab);
            ASSERT_EQ(run.batches_per_epoch(), 5u);
            take_batches(run, corpus, B, T, saved_after);
            DataLoaderState state = run.state();
            EXPECT_EQ(state, (DataLoaderState{saved_after / 5, saved_after % 5}));
            nlohmann::json j = state;  // as stored in a checkpoint
            DataLoaderState loaded = j.get<DataLoaderState>();
            EXPECT_EQ(loaded, state);
            DataLoader resumed(corpus.pattern, B, T, rank, world, seed, true, kVocab);
            take_batches(resumed, corpus, B, T, 1);  // a position other than the saved one
            resumed.restore(loaded);
            auto expected = take_batches(run, corpus, B, T, 8);
            EXPECT_EQ(take_batches(resumed, corpus, B, T, 8), expected) << "saved after " << saved_after;
        }
    }
    EXPECT_EQ(DataLoaderState({1, 0}), (nlohmann::json{{"epoch", 1}, {"batch_in_epoch", 0}}.get<DataLoaderState>()));
    EXPECT_THROW((nlohmann::json{{"epoch", 1}}.get<DataLoaderState>()), Error);
}

// Resume on another number of ranks: the rescaled state starts at the same window of the epoch.
TEST(DataLoader, RescaledStateResumesAtTheSameWindowOnAnotherWorld) {
    const int T = 4, B = 2;
    Corpus corpus({4 * 48 + 1}, std::random_device{}());  // 48 windows
    const uint64_t seed = std::random_device{}();
    DataLoader one(corpus.pattern, B, T, 0, 1, seed, true, kVocab);  // the epoch's window order, B at a time
    const std::vector<int64_t> order = take_batches(one, corpus, B, T, 20);
    // 4 ranks take 3 global batches (24 windows)
    std::vector<std::unique_ptr<DataLoader>> four;
    for (int r = 0; r < 4; r++) {
        four.push_back(std::make_unique<DataLoader>(corpus.pattern, B, T, r, 4, seed, true, kVocab));
        take_batches(*four.back(), corpus, B, T, 3);
    }
    const DataLoaderState saved = four[0]->state();
    ASSERT_EQ(saved, (DataLoaderState{0, 3}));
    // ... then 2 ranks continue at window 24, and 1 rank too
    const DataLoaderState on_two = rescale_loader_state(saved, B, 4, 2);
    EXPECT_EQ(on_two, (DataLoaderState{0, 6}));
    std::vector<std::unique_ptr<DataLoader>> two;
    for (int r = 0; r < 2; r++) {
        two.push_back(std::make_unique<DataLoader>(corpus.pattern, B, T, r, 2, seed, true, kVocab));
        two.back()->restore(on_two);
    }
    for (int step = 0; step < 2; step++) {
        std::vector<int64_t> joined;
        for (auto& loader : two) {
            auto part = take_batch(*loader, corpus, B, T);
            joined.insert(joined.end(), part.begin(), part.end());
        }
        const auto first = order.begin() + 24 + 4 * step;
        EXPECT_EQ(joined, std::vector<int64_t>(first, first + 4)) << "step " << step;
    }
    DataLoader alone(corpus.pattern, B, T, 0, 1, seed, true, kVocab);
    alone.restore(rescale_loader_state(saved, B, 4, 1));
    EXPECT_EQ(take_batch(alone, corpus, B, T), std::vector<int64_t>(order.begin() + 24, order.begin() + 26));
    // 3 batches of 2 ranks (12 windows) are not a whole number of 4-rank batches (8 windows)
    try {
        rescale_loader_state(DataLoaderState{0, 3}, B, 2, 4);
        ADD_FAILURE() << "no error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("not a whole batch of 4 ranks"), std::string::npos) << e.what();
    }
}

TEST(DataLoader, RestoreRejectsStateBeyondEpoch) {
    Corpus corpus({4 * 10 + 1}, std::random_device{}());
    DataLoader loader(corpus.pattern, 2, 4, 0, 1, 1, true, kVocab);  // 5 batches per epoch
    expect_error_containing([&] { loader.restore({0, 6}); }, {"beyond the 5 batches"});
}

TEST(DataLoader, Errors) {
    Corpus corpus({4 * 10 + 1}, std::random_device{}());
    std::string none = corpus.dir / "nothing_*.bin";
    expect_error_containing([&] { DataLoader(none, 1, 4, 0, 1, 1, true, kVocab); },
                            {"no shards match '" + none + "'", "make data", "--data DIR"});
    // 10 windows of T=4 cannot fill B*world = 4*3 = 12 rows: 12*4+1 = 49 tokens are needed.
    expect_error_containing([&] { DataLoader(corpus.pattern, 4, 4, 0, 3, 1, true, kVocab); },
                            {"49 tokens", corpus.pattern});
    // Tokens >= vocab: the corpus ids go up to 50256, so a small vocab must fail.
    expect_error_containing([&] { DataLoader(corpus.pattern, 1, 4, 0, 1, 1, true, 100); },
                            {"corpus_train_100000.bin", ">= vocab size 100"});
    expect_error_containing([&] { DataLoader(corpus.pattern, 1, 4, 3, 3, 1, true, kVocab); }, {"rank 3"});
    // A malformed shard among the matches is reported by name.
    std::string bad = corpus.dir / "corpus_train_999999.bin";
    write_shard(bad, {1, 2, 3});
    fs::resize_file(bad, 1024 + 3);
    expect_error_containing([&] { DataLoader(corpus.pattern, 1, 4, 0, 1, 1, true, kVocab); }, {bad, "truncated"});
}
