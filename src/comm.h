// Communicators: the collectives data-parallel training needs (all-reduce, reduce-scatter,
// all-gather, broadcast, barrier), behind one interface so the model and the training loop are
// written once for every way ranks can talk. Modules, chosen at run time (src/launch.h picks
// one for the program):
//   - `single`: world of one, every collective is a no-op.
//   - `threads`: N ranks as threads of one process over CPU memory (tests, with CpuOps).
//   - `shm`: N ranks as processes of one node over a shared-memory file (CPU training with
//     `--nproc N`); same code as `threads`, the shared region is a mapped file instead.
//   - `nccl`: GPUs through NCCL (cuda/comm_nccl.cu; linked only into CUDA builds).
//
// Tensors given to the collectives live where the backend keeps its tensors: host memory for
// single/threads/shm (CpuOps), device memory for nccl (CudaOps, on its stream). Reductions sum
// in a fixed order, so results are deterministic and identical on every rank.
//
// Failures: every wait has a timeout (seconds, given at creation); a rank that times out, or
// whose peer called abort(), throws Error naming the rank and the cause. Where the module can,
// abort() tells the other ranks, so they stop at once instead of timing out.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ops.h"

class Communicator {
public:
    virtual ~Communicator() = default;
    virtual std::string name() const = 0;  // single | threads | shm | nccl
    virtual int rank() const = 0;
    virtual int world() const = 0;

    // ---- collectives on backend tensors; every rank calls them in the same order
    // buf (n) fp32: every rank gets the sum over ranks
    virtual void all_reduce_sum(Tensor buf) = 0;
    // In place. buf (world, chunk) fp32, n a multiple of world: afterwards chunk r of rank r's
    // buf holds the sum over ranks of chunk r; the other chunks are unspecified.
    virtual void reduce_scatter_sum(Tensor buf) = 0;
    // In place. buf (world, chunk) of any dtype: rank r contributes its chunk r; afterwards
    // every rank holds all chunks.
    virtual void all_gather(Tensor buf) = 0;
    // buf (n) of any dtype: root's values to every rank
    virtual void broadcast(Tensor buf, int root) = 0;
    virtual void barrier() = 0;

    // ---- asynchronous all-reduce (gradient buckets overlapped with the backward)
    // Starts summing every tensor of `bucket` (fp32, in place) over the ranks, ordered after the
    // work the backend has queued so far; every rank starts the same buckets in the same order.
    // Each element is reduced exactly as all_reduce_sum would (host modules: bitwise the same sum).
    // The tensors must not be read or written until wait(). nccl: the reduction runs on a second
    // stream while the backend goes on; the host modules (single, threads, shm): synchronous.
    virtual void all_reduce_sum_async(const std::vector<Tensor>& bucket) {
        for (const Tensor& t : bucket) all_reduce_sum(t);
    }
    // Waits (with the timeout) until every started asynchronous all-reduce has completed; the
    // backend's later work sees the sums. Other collectives wait for them too.
    virtual void wait() {}

    // ---- small host values (status flags, losses, hashes)
    virtual void all_reduce_sum_host(double* values, int n) = 0;
    virtual std::vector<uint64_t> all_gather_host(uint64_t value) = 0;
    virtual void broadcast_host(std::string& bytes, int root) = 0;

    // This rank gives up (it is about to exit with an error): the others are told where the
    // module allows (their next or current wait throws "rank R failed: why"), and this
    // communicator refuses further calls. Never throws.
    virtual void abort(const std::string& why) noexcept = 0;
};

// World of one.
std::unique_ptr<Communicator> make_single_communicator();

// `world` ranks in this process: element r is rank r's communicator, to be used by one thread
// each. timeout_s bounds every wait.
std::vector<std::unique_ptr<Communicator>> make_threads_communicators(int world, double timeout_s);

// Rank `rank` of `world` processes of one node, meeting in the shared-memory file `path`
// (created by rank 0, waited for by the others up to timeout_s, removed once all are attached;
// use a name unique to the run, e.g. /dev/shm/gpt_comm_RUNID).
std::unique_ptr<Communicator> make_shm_communicator(const std::string& path, int rank, int world, double timeout_s);

// NCCL over GPUs (cuda/comm_nccl.cu). Selects GPU local_rank % device count for this process
// (call it before creating CudaOps). unique_id_exchange gets rank 0's ncclUniqueId bytes and
// returns them on every rank (src/launch.h: a shared file or MPI). Builds without CUDA get a
// version that throws, saying how to build.
std::unique_ptr<Communicator> make_nccl_communicator(
    int rank, int world, int local_rank, double timeout_s,
    const std::function<std::string(const std::string&)>& unique_id_exchange);

// Fails on every rank, with one line naming the ranks, unless every rank passes the same text
// (the options JSON, the checkpoint being resumed): compares 64-bit hashes (FNV-1a).
void check_same_on_all_ranks(Communicator& comm, const std::string& what, const std::string& text);
uint64_t fnv1a64(const std::string& text);
