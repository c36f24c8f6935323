// DataLoader: memory-mapped token shards cut into overlapping windows of T+1 tokens, an epoch
// order (optionally shuffled by a seeded Rng), and the rank's slice of each global batch. See
// dataloader.h for the exact semantics.
#include "data/dataloader.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "check.h"
#include "data/shard.h"
#include "rng.h"

// The mapped tokens are read as native uint16; the format is little endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "DataLoader maps little-endian shards directly");

void to_json(nlohmann::json& j, const DataLoaderState& s) {
    j = nlohmann::json{{"epoch", s.epoch}, {"batch_in_epoch", s.batch_in_epoch}};
}

void from_json(const nlohmann::json& j, DataLoaderState& s) {
    for (const char* key : {"epoch", "batch_in_epoch"})
        CHECK(j.is_object() && j.contains(key) && j[key].is_number_integer() && j[key].get<int64_t>() >= 0,
              "dataloader state %s lacks a non-negative integer '%s': the checkpoint is damaged", j.dump().c_str(), key);
    s.epoch = j["epoch"].get<uint64_t>();
    s.batch_in_epoch = j["batch_in_epoch"].get<uint64_t>();
}

static std::vector<std::string> glob_paths(const std::string& pattern) {
    glob_t g;
    int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
    std::vector<std::string> paths;
    if (rc == 0)
        for (size_t i = 0; i < g.gl_pathc; i++) paths.push_back(g.gl_pathv[i]);
    ::globfree(&g);
    if (rc == GLOB_NOMATCH || (rc == 0 && paths.empty()))
        FAIL("no shards match '%s': run make data or pass --data DIR", pattern.c_str());
    CHECK(rc == 0, "cannot list shards matching '%s': %s", pattern.c_str(),
          rc == GLOB_NOSPACE ? "out of memory" : "read error");
    return paths;  // glob sorts them
}

DataLoader::DataLoader(const std::string& pattern, int B, int T, int rank, int world, uint64_t seed, bool shuffle,
                       int vocab_size)
    : B_(B), T_(T), rank_(rank), world_(world), seed_(seed), shuffle_(shuffle) {
    CHECK(B >= 1 && T >= 1, "dataloader: batch size %d and sequence length %d must be >= 1", B, T);
    CHECK(world >= 1 && rank >= 0 && rank < world, "dataloader: rank %d is not in [0, %d)", rank, world);
    CHECK(vocab_size >= 1, "dataloader: vocab size %d must be >= 1", vocab_size);
    try {
        load(pattern, vocab_size);
    } catch (...) {
        unmap_all();  // a throwing constructor runs no destructor
        throw;
    }
}

void DataLoader::load(const std::string& pattern, int vocab_size) {
    const int B = B_, T = T_, world = world_;
    size_t total_windows = 0;
    for (const std::string& path : glob_paths(pattern)) {
        ShardInfo info = peek_shard(path);  // header and size checks, with their messages
        Shard shard;
        shard.path = path;
        shard.num_tokens = info.num_tokens;
        shard.first_window = total_windows;
        shard.map_bytes = kShardHeaderBytes + 2 * info.num_tokens;
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        struct stat st;
        bool same_size = fd >= 0 && ::fstat(fd, &st) == 0 && (size_t)st.st_size == shard.map_bytes;
        if (same_size) shard.map = ::mmap(nullptr, shard.map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
        int map_errno = errno;
        if (fd >= 0) ::close(fd);  // the mapping stays valid
        CHECK(same_size, "token shard %s changed while loading: is another program writing it?", path.c_str());
        if (shard.map == MAP_FAILED) FAIL("cannot map token shard %s: %s", path.c_str(), std::strerror(map_errno));
        shard.tokens = reinterpret_cast<const uint16_t*>(static_cast<const char*>(shard.map) + kShardHeaderBytes);
        shards_.push_back(shard);  // owned from here: unmapped by unmap_all
        check_tokens(path, shard.tokens, shard.num_tokens, vocab_size);
        if (shard.num_tokens >= (size_t)T + 1) total_windows += (shard.num_tokens - 1) / (size_t)T;
    }
    size_t per_batch = (size_t)B * world;
    if (total_windows < per_batch)
        FAIL("not enough data in '%s': %zu tokens in %zu shards give %zu windows of T+1 = %d tokens, but one batch of "
             "B*world = %d*%d rows needs %zu windows, i.e. at least %zu tokens in one shard; use smaller B or T, or more data",
             pattern.c_str(), num_tokens(), shards_.size(), total_windows, T + 1, B, world, per_batch, per_batch * T + 1);
    CHECK(total_windows <= UINT32_MAX, "dataloader: %zu windows exceed 2^32: use a longer sequence length T than %d",
          total_windows, T);
    windows_.resize(total_windows);
    batches_per_epoch_ = total_windows / per_batch;
    start_epoch(0);
}

DataLoader::~DataLoader() { unmap_all(); }

void DataLoader::unmap_all() {
    for (Shard& shard : shards_)
        if (shard.map && shard.map != MAP_FAILED) ::munmap(shard.map, shard.map_bytes);
    shards_.clear();
}

size_t DataLoader::num_tokens() const {
    size_t n = 0;
    for (const Shard& shard : shards_) n += shard.num_tokens;
    return n;
}

void DataLoader::start_epoch(uint64_t epoch) {
    epoch_ = epoch;
    batch_in_epoch_ = 0;
    for (size_t i = 0; i < windows_.size(); i++) windows_[i] = (uint32_t)i;
    if (!shuffle_) return;
    Rng rng(Rng::derive(seed_, epoch));
    for (size_t i = windows_.size() - 1; i > 0; i--) std::swap(windows_[i], windows_[rng.below(i + 1)]);
}

size_t DataLoader::shard_of_window(uint32_t window) const {
    // The last shard whose first window is <= window; shards without windows are skipped
    // because the next shard starts at the same id.
    auto it = std::upper_bound(shards_.begin(), shards_.end(), (size_t)window,
                               [](size_t w, const Shard& s) { return w < s.first_window; });
    return (size_t)(it - shards_.begin()) - 1;
}

void DataLoader::next_batch(int* inputs, int* targets) {
    if (batch_in_epoch_ >= batches_per_epoch_) start_epoch(epoch_ + 1);
    size_t first = (size_t)batch_in_epoch_ * B_ * world_ + (size_t)rank_ * B_;
    for (int b = 0; b < B_; b++) {
        uint32_t window = windows_[first + b];
        const Shard& shard = shards_[shard_of_window(window)];
        const uint16_t* tok = shard.tokens + (window - shard.first_window) * (size_t)T_;  // (T+1,)
        int* in_row = inputs + (size_t)b * T_;   // (T,)
        int* tgt_row = targets + (size_t)b * T_;  // (T,)
        for (int t = 0; t < T_; t++) {
            in_row[t] = tok[t];
            tgt_row[t] = tok[t + 1];
        }
    }
    batch_in_epoch_++;
}

void DataLoader::reset() { start_epoch(0); }

DataLoaderState DataLoader::state() const {
    // The batch after the last of an epoch is the first of the next: report it that way so
    // equal positions have equal states.
    if (batch_in_epoch_ >= batches_per_epoch_) return {epoch_ + 1, 0};
    return {epoch_, batch_in_epoch_};
}

DataLoaderState rescale_loader_state(const DataLoaderState& s, int B, int old_world, int new_world) {
    CHECK(B >= 1 && old_world >= 1 && new_world >= 1, "rescale_loader_state: bad B=%d or world sizes %d, %d", B,
          old_world, new_world);
    const uint64_t windows = s.batch_in_epoch * (uint64_t)old_world;  // in units of B windows
    CHECK(windows % (uint64_t)new_world == 0,
          "the checkpoint stopped %llu windows into epoch %llu, not a whole batch of %d ranks x %d rows: resume with "
          "%d ranks, or from another checkpoint",
          (unsigned long long)(windows * B), (unsigned long long)s.epoch, new_world, B, old_world);
    return {s.epoch, windows / (uint64_t)new_world};
}

void DataLoader::restore(const DataLoaderState& state) {
    CHECK(state.batch_in_epoch <= batches_per_epoch_,
          "dataloader state: batch %llu of epoch %llu is beyond the %zu batches of an epoch: the data, B, T or the "
          "number of GPUs changed since the checkpoint",
          (unsigned long long)state.batch_in_epoch, (unsigned long long)state.epoch, batches_per_epoch_);
    if (state.epoch != epoch_) start_epoch(state.epoch);
    batch_in_epoch_ = state.batch_in_epoch;
}
