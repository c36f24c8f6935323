// The host-memory communicators (single, threads, shm), the rank-agreement check, and the
// fallback NCCL factory of builds without CUDA.
//
// threads and shm share one implementation over a shared region:
//   header (256 B) | per-rank status (world x 256 B) | per-rank staging slots (world x slot_bytes)
// A rank's status holds the number of barriers it has passed and a failure flag with a message.
// Barrier = "count my arrival, wait until every rank's count reaches mine" (counts only grow,
// so no reset race). A collective is: copy my piece into my slot; barrier; every rank reads
// all slots in rank order 0..world-1 (so sums are identical everywhere); barrier (slots free
// again). Large tensors go through in pieces of slot size. For threads the region is heap
// memory shared by the rank objects; for shm it is a file mapped by every process.
#include "comm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "check.h"

// ---------------------------------------------------------------- single

namespace {

class SingleCommunicator : public Communicator {
public:
    std::string name() const override { return "single"; }
    int rank() const override { return 0; }
    int world() const override { return 1; }
    void all_reduce_sum(Tensor) override {}
    void reduce_scatter_sum(Tensor) override {}
    void all_gather(Tensor) override {}
    void broadcast(Tensor, int) override {}
    void barrier() override {}
    void all_reduce_sum_host(double*, int) override {}
    std::vector<uint64_t> all_gather_host(uint64_t v) override { return {v}; }
    void broadcast_host(std::string&, int) override {}
    void abort(const std::string&) noexcept override {}
};

// ---------------------------------------------------------------- shared region

constexpr uint64_t kHubMagic = 0x6770745f68756231ull;  // "gpt_hub1"
constexpr size_t kHeaderBytes = 256, kStatusBytes = 256;
constexpr size_t kSlotBytes = 1 << 20;  // staging bytes per rank

struct HubHeader {
    std::atomic<uint64_t> magic;  // kHubMagic once the region is initialised
    uint32_t world;
    uint32_t reserved;
    uint64_t slot_bytes;
};
struct RankStatus {
    std::atomic<uint64_t> barriers;  // barriers this rank has arrived at
    std::atomic<int32_t> failed;     // 1 once the rank gave up; message below is then complete
    char message[kStatusBytes - 16];
};
static_assert(sizeof(HubHeader) <= kHeaderBytes && sizeof(RankStatus) <= kStatusBytes, "hub layout");
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<int32_t>::is_always_lock_free,
              "the shm communicator needs lock-free atomics (shared between processes)");

size_t region_bytes(int world) { return kHeaderBytes + (size_t)world * (kStatusBytes + kSlotBytes); }

// Placement-constructs the header and statuses in zeroed memory; magic last.
void init_region(void* base, int world) {
    auto* h = new (base) HubHeader();
    h->world = (uint32_t)world;
    h->slot_bytes = kSlotBytes;
    for (int r = 0; r < world; r++)
        new (static_cast<char*>(base) + kHeaderBytes + r * kStatusBytes) RankStatus();
    h->magic.store(kHubMagic, std::memory_order_release);
}

class HubCommunicator : public Communicator {
public:
    // keepalive owns the region (heap memory shared by the thread ranks, or a mapping)
    HubCommunicator(std::string name, std::shared_ptr<void> keepalive, void* base, int rank, int world, double timeout_s)
        : name_(std::move(name)), keep_(std::move(keepalive)), base_(static_cast<char*>(base)), rank_(rank),
          world_(world), timeout_s_(timeout_s) {}

    std::string name() const override { return name_; }
    int rank() const override { return rank_; }
    int world() const override { return world_; }

    void all_reduce_sum(Tensor buf) override {
        CHECK(buf.dtype == DType::F32, "%s communicator: all_reduce_sum needs fp32", name_.c_str());
        reduce_in_pieces(buf.f32(), buf.n);
    }
    void all_reduce_sum_host(double* v, int n) override { reduce_in_pieces(v, (size_t)n); }

    void reduce_scatter_sum(Tensor buf) override {
        CHECK(buf.dtype == DType::F32 && buf.n % world_ == 0, "%s communicator: reduce_scatter_sum needs fp32 and n %zu a multiple of world %d",
              name_.c_str(), buf.n, world_);
        float* p = buf.f32();
        const size_t chunk = buf.n / world_, piece = kSlotBytes / 4 / world_;
        for (size_t q = 0; q < chunk; q += piece) {
            const size_t len = std::min(piece, chunk - q);
            float* mine = reinterpret_cast<float*>(slot(rank_));
            for (int k = 0; k < world_; k++) std::memcpy(mine + k * len, p + k * chunk + q, len * 4);
            wait_all("reduce_scatter");
            float* dst = p + rank_ * chunk + q;
            std::memcpy(dst, reinterpret_cast<float*>(slot(0)) + rank_ * len, len * 4);
            for (int r = 1; r < world_; r++) {
                const float* src = reinterpret_cast<float*>(slot(r)) + rank_ * len;
                for (size_t i = 0; i < len; i++) dst[i] += src[i];
            }
            wait_all("reduce_scatter");
        }
    }

    void all_gather(Tensor buf) override {
        CHECK(buf.n % world_ == 0, "%s communicator: all_gather needs n %zu a multiple of world %d", name_.c_str(), buf.n, world_);
        const size_t es = dtype_size(buf.dtype), chunk = buf.n / world_, piece = kSlotBytes / es;
        char* p = static_cast<char*>(buf.ptr);
        for (size_t q = 0; q < chunk; q += piece) {
            const size_t len = std::min(piece, chunk - q);
            std::memcpy(slot(rank_), p + (rank_ * chunk + q) * es, len * es);
            wait_all("all_gather");
            for (int k = 0; k < world_; k++)
                if (k != rank_) std::memcpy(p + (k * chunk + q) * es, slot(k), len * es);
            wait_all("all_gather");
        }
    }

    void broadcast(Tensor buf, int root) override {
        broadcast_bytes(static_cast<char*>(buf.ptr), buf.n * dtype_size(buf.dtype), root);
    }
    void broadcast_host(std::string& bytes, int root) override {
        uint64_t size = bytes.size();
        broadcast_bytes(reinterpret_cast<char*>(&size), sizeof size, root);
        bytes.resize(size);
        broadcast_bytes(&bytes[0], size, root);
    }
    std::vector<uint64_t> all_gather_host(uint64_t value) override {
        std::memcpy(slot(rank_), &value, 8);
        wait_all("all_gather_host");
        std::vector<uint64_t> all(world_);
        for (int r = 0; r < world_; r++) std::memcpy(&all[r], slot(r), 8);
        wait_all("all_gather_host");
        return all;
    }
    void barrier() override { wait_all("barrier"); }

    void abort(const std::string& why) noexcept override {
        if (dead_) return;
        dead_ = true;
        RankStatus* s = status(rank_);
        std::snprintf(s->message, sizeof s->message, "%s", why.c_str());
        s->failed.store(1, std::memory_order_release);
    }

private:
    char* slot(int r) const { return base_ + kHeaderBytes + world_ * kStatusBytes + (size_t)r * kSlotBytes; }
    RankStatus* status(int r) const { return reinterpret_cast<RankStatus*>(base_ + kHeaderBytes + r * kStatusBytes); }

    // Sum over ranks in rank order, in place, for float or double.
    template <typename X>
    void reduce_in_pieces(X* p, size_t n) {
        const size_t piece = kSlotBytes / sizeof(X);
        for (size_t off = 0; off < n; off += piece) {
            const size_t len = std::min(piece, n - off);
            std::memcpy(slot(rank_), p + off, len * sizeof(X));
            wait_all("all_reduce");
            std::memcpy(p + off, slot(0), len * sizeof(X));
            for (int r = 1; r < world_; r++) {
                const X* src = reinterpret_cast<const X*>(slot(r));
                for (size_t i = 0; i < len; i++) p[off + i] += src[i];
            }
            wait_all("all_reduce");
        }
    }

    void broadcast_bytes(char* p, size_t n, int root) {
        CHECK(root >= 0 && root < world_, "broadcast: root %d outside the world of %d", root, world_);
        for (size_t off = 0; off < n || off == 0; off += kSlotBytes) {
            const size_t len = std::min(kSlotBytes, n - off);
            if (rank_ == root) std::memcpy(slot(root), p + off, len);
            wait_all("broadcast");
            if (rank_ != root) std::memcpy(p + off, slot(root), len);
            wait_all("broadcast");
            if (n == 0) break;
        }
    }

    // The barrier: count my arrival, then wait until every rank's count reaches mine; a failed
    // peer or the timeout ends the wait with an Error (and tells the others).
    void wait_all(const char* what) {
        CHECK(!dead_, "rank %d: the %s communicator was aborted; no further collectives", rank_, name_.c_str());
        const uint64_t target = ++arrived_;
        status(rank_)->barriers.store(target, std::memory_order_release);
        const auto start = std::chrono::steady_clock::now();
        for (long spin = 0;; spin++) {
            bool all = true;
            for (int r = 0; r < world_; r++) {
                if (status(r)->failed.load(std::memory_order_acquire)) {
                    std::string msg = status(r)->message;
                    dead_ = true;
                    FAIL("rank %d: rank %d failed (%s); stopping too", rank_, r, msg.c_str());
                }
                if (status(r)->barriers.load(std::memory_order_acquire) < target) all = false;
            }
            if (all) return;
            if (spin < 200) { std::this_thread::yield(); continue; }
            std::this_thread::sleep_for(std::chrono::microseconds(50));
            if ((spin & 63) == 0 &&
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s_) {
                std::string missing;
                for (int r = 0; r < world_; r++)
                    if (status(r)->barriers.load(std::memory_order_acquire) < target) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
                std::string msg = strformat("rank %d: rank(s) %s did not reach %s #%llu within %.0f s (dead, hung, or launched with "
                                            "other options); raise --comm-timeout if a step is that slow",
                                            rank_, missing.c_str(), what, (unsigned long long)target, timeout_s_);
                abort(msg);
                throw Error(msg);
            }
        }
    }

    std::string name_;
    std::shared_ptr<void> keep_;
    char* base_;
    int rank_, world_;
    double timeout_s_;
    uint64_t arrived_ = 0;
    bool dead_ = false;
};

struct Mapping {
    void* base = nullptr;
    size_t bytes = 0;
    ~Mapping() { if (base) munmap(base, bytes); }
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

std::vector<std::unique_ptr<Communicator>> make_threads_communicators(int world, double timeout_s) {
    CHECK(world >= 1, "threads communicator: world %d must be >= 1", world);
    const size_t bytes = region_bytes(world);
    void* mem = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    CHECK(mem, "threads communicator: cannot allocate %zu bytes", bytes);
    std::memset(mem, 0, bytes);
    init_region(mem, world);
    std::shared_ptr<void> region(mem, [](void* p) { std::free(p); });
    std::vector<std::unique_ptr<Communicator>> v;
    for (int r = 0; r < world; r++) v.push_back(std::make_unique<HubCommunicator>("threads", region, mem, r, world, timeout_s));
    return v;
}

std::unique_ptr<Communicator> make_shm_communicator(const std::string& path, int rank, int world, double timeout_s) {
    CHECK(world >= 1 && rank >= 0 && rank < world, "shm communicator: rank %d outside the world of %d", rank, world);
    const size_t bytes = region_bytes(world);
    auto map = std::make_shared<Mapping>();
    map->bytes = bytes;
    if (rank == 0) {
        // create under a temporary name, initialise, then rename: the others never see a half-made region
        std::string tmp = path + ".tmp." + std::to_string(getpid());
        int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
        CHECK(fd >= 0, "shm communicator: cannot create %s: %s", tmp.c_str(), std::strerror(errno));
        if (ftruncate(fd, (off_t)bytes) != 0) {
            int e = errno;
            close(fd);
            unlink(tmp.c_str());
            FAIL("shm communicator: cannot size %s to %zu bytes: %s", tmp.c_str(), bytes, std::strerror(e));
        }
        map->base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (map->base == MAP_FAILED) { map->base = nullptr; unlink(tmp.c_str()); FAIL("shm communicator: cannot map %s", tmp.c_str()); }
        init_region(map->base, world);
        CHECK(rename(tmp.c_str(), path.c_str()) == 0, "shm communicator: cannot rename %s to %s: %s", tmp.c_str(), path.c_str(),
              std::strerror(errno));
    } else {
        const auto start = std::chrono::steady_clock::now();
        for (;;) {
            int fd = open(path.c_str(), O_RDWR);
            struct stat st;
            if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size == bytes) {
                map->base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                close(fd);
                if (map->base == MAP_FAILED) { map->base = nullptr; FAIL("shm communicator: cannot map %s", path.c_str()); }
                auto* h = static_cast<HubHeader*>(map->base);
                if (h->magic.load(std::memory_order_acquire) == kHubMagic && (int)h->world == world) break;
                munmap(map->base, bytes);
                map->base = nullptr;
            } else if (fd >= 0) {
                close(fd);
            }
            CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < timeout_s,
                  "rank %d: rank 0 did not create the shared-memory file %s within %.0f s (rank 0 dead or not started; "
                  "every rank needs the same world size and run id)", rank, path.c_str(), timeout_s);
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
    }
    void* base = map->base;
    auto comm = std::make_unique<HubCommunicator>("shm", std::shared_ptr<void>(map, map.get()), base, rank, world, timeout_s);
    try {
        comm->barrier();  // everyone is attached
    } catch (...) {
        if (rank == 0) unlink(path.c_str());
        throw;
    }
    if (rank == 0) unlink(path.c_str());  // the mappings stay valid; nothing is left behind
    return comm;
}

// Builds with CUDA link cuda/comm_nccl.cu, whose definition replaces this one.
__attribute__((weak)) std::unique_ptr<Communicator> make_nccl_communicator(
    int, int, int, double, const std::function<std::string(const std::string&)>&) {
    FAIL("NCCL communicator: this binary was built without CUDA/NCCL (nvcc not found at build time); "
         "rebuild on a machine with the CUDA toolkit, or train on the CPU");
}

// ---------------------------------------------------------------- agreement across ranks

uint64_t fnv1a64(const std::string& text) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : text) { h ^= c; h *= 1099511628211ull; }
    return h;
}

void check_same_on_all_ranks(Communicator& comm, const std::string& what, const std::string& text) {
    std::vector<uint64_t> hashes = comm.all_gather_host(fnv1a64(text));
    std::string differ;
    for (int r = 1; r < comm.world(); r++)
        if (hashes[r] != hashes[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    CHECK(differ.empty(), "rank %d: %s differ across ranks: rank(s) %s disagree with rank 0; launch every rank with the same "
          "command line, binary and files", comm.rank(), what.c_str(), differ.c_str());
}
