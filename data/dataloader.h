// DataLoader: batches of (inputs, targets) from token shards (data/shard.h), deterministic,
// split across ranks, and resumable from a two-number state.
//
// Semantics:
//   - Shards are the files matching a glob pattern, in sorted order. Each is memory-mapped once
//     (the OS pages in what is read, so GBs of data cost address space, not RAM) and every token
//     is checked against the vocab size at construction.
//   - Each shard is cut into windows of T+1 tokens starting at multiples of T: the last token of
//     one window is the first of the next, as in llm.c. A window gives one row of inputs
//     (tokens 0..T-1) and targets (tokens 1..T, the inputs shifted by one). Tokens after the
//     last whole window of a shard are not used.
//   - An epoch is the list of all (shard, window) pairs, shard by shard in order. With shuffle
//     the list is permuted (Fisher-Yates) by an Rng seeded with Rng::derive(seed, epoch): the
//     order is a pure function of (seed, epoch, data), so it is reproducible.
//   - A global batch is B*world consecutive windows of that list; rank r takes windows
//     [r*B, (r+1)*B) of it. When fewer than B*world windows remain, the epoch ends (those windows
//     are skipped this epoch) and the next begins. All ranks thus see one global batch per step,
//     disjoint, and together they cover it exactly once.
//   - state() = (epoch, index of the next batch in that epoch); restore(state) makes the next
//     batches exactly those that followed when the state was taken (resume).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

struct DataLoaderState {
    uint64_t epoch = 0;           // epochs completed before the next batch
    uint64_t batch_in_epoch = 0;  // index of the next global batch within that epoch
    bool operator==(const DataLoaderState& o) const { return epoch == o.epoch && batch_in_epoch == o.batch_in_epoch; }
};
// For checkpoints: {"epoch": E, "batch_in_epoch": K}. from_json fails with Error on missing fields.
void to_json(nlohmann::json& j, const DataLoaderState& s);
void from_json(const nlohmann::json& j, DataLoaderState& s);

// The same position in the epoch's window order for another number of ranks (resume on another
// world size, B rows per rank unchanged): batch k of B*old_world windows is batch
// k*old_world/new_world of B*new_world windows. Fails with one line when that is not a whole
// batch (a checkpoint taken after an epoch ended inside an optimizer step).
DataLoaderState rescale_loader_state(const DataLoaderState& s, int B, int old_world, int new_world);

class DataLoader {
public:
    // pattern: glob(3) pattern of shard files, e.g. "DIR/*_train_*.bin". B: rows per rank,
    // T: tokens per row, rank in [0, world). Fails with one line if nothing matches, a shard is
    // malformed, a token is >= vocab_size, or the data holds fewer than B*world windows.
    DataLoader(const std::string& pattern, int B, int T, int rank, int world, uint64_t seed, bool shuffle,
               int vocab_size);
    ~DataLoader();
    DataLoader(const DataLoader&) = delete;
    DataLoader& operator=(const DataLoader&) = delete;

    // Fills this rank's rows of the next global batch; moves to the next epoch when needed.
    void next_batch(int* inputs /* (B, T) */, int* targets /* (B, T) */);
    // Back to the start of epoch 0 (validation passes start from the same batches every time).
    void reset();
    // Global batches per epoch: windows / (B*world), rounded down.
    size_t batches_per_epoch() const { return batches_per_epoch_; }
    DataLoaderState state() const;
    void restore(const DataLoaderState& state);

    size_t num_shards() const { return shards_.size(); }
    size_t num_tokens() const;   // in all shards
    size_t num_windows() const { return windows_.size(); }

private:
    struct Shard {
        std::string path;
        void* map = nullptr;              // the whole file, read-only
        size_t map_bytes = 0;
        const uint16_t* tokens = nullptr;  // (num_tokens,) just past the header
        size_t num_tokens = 0;
        size_t first_window = 0;           // global id of its window 0
    };
    void load(const std::string& pattern, int vocab_size);  // maps and checks the shards
    void unmap_all();
    void start_epoch(uint64_t epoch);      // builds windows_ for that epoch
    size_t shard_of_window(uint32_t window) const;

    int B_, T_, rank_, world_;
    uint64_t seed_;
    bool shuffle_;
    std::vector<Shard> shards_;
    std::vector<uint32_t> windows_;        // (num_windows,) global window ids in this epoch's order
    size_t batches_per_epoch_ = 0;
    uint64_t epoch_ = 0, batch_in_epoch_ = 0;
};
