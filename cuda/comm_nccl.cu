// The NCCL communicator (src/comm.h): collectives between GPUs, one rank per GPU, on the
// default stream (the stream CudaOps launches on), so they are ordered after the kernels that
// produced their input and before those that read their output.
//
// The communicator is non-blocking (ncclConfig_t.blocking = 0): no NCCL call can hang the host.
// Every call is followed by a wait that polls ncclCommGetAsyncError (and, for collectives, an
// event recorded after them) with the timeout of --comm-timeout. An error or a timeout (a peer
// died, hangs, or cannot be reached) aborts the communicator (ncclCommAbort) and throws Error
// naming the rank and the operation, so every live rank exits within a bounded time.
// Summation order inside NCCL is fixed for a fixed world and topology (deterministic run to run).
//
// Asynchronous all-reduce (gradient buckets, all_reduce_sum_async): the bucket's tensors are
// reduced as one NCCL group on a second, non-blocking stream (it does not synchronise with the
// legacy default stream), which first waits on an event recorded on the default stream, so the
// reduction starts once the kernels queued before it (the gradients) are done while the backend
// goes on. wait() polls the event recorded after the last bucket (the comm stream runs them in
// order) with the same timeout and error checks, then makes the default stream wait on it. Every
// other collective first waits for the buckets in flight, so the issue order on the
// communicator is the same on every rank.
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "common.cuh"
#include "comm.h"

namespace {

ncclDataType_t nccl_dtype(DType t) { return t == DType::F32 ? ncclFloat32 : ncclBfloat16; }

class NcclCommunicator : public Communicator {
public:
    NcclCommunicator(int rank, int world, int local_rank, double timeout_s,
                     const std::function<std::string(const std::string&)>& exchange)
        : rank_(rank), world_(world), timeout_s_(timeout_s) {
        int devices = 0;
        CUDA_CHECK(cudaGetDeviceCount(&devices));
        CHECK(devices > 0, "rank %d: no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)", rank);
        CHECK(local_rank < devices, "rank %d: local rank %d but only %d GPU(s) visible on this node; start at most %d ranks per node "
              "(one per GPU)", rank, local_rank, devices, devices);
        CUDA_CHECK(cudaSetDevice(local_rank));
        ncclUniqueId id;
        std::memset(&id, 0, sizeof id);
        if (rank == 0) nccl_ok(ncclGetUniqueId(&id), "ncclGetUniqueId");
        std::string bytes = exchange(std::string(reinterpret_cast<const char*>(&id), sizeof id));
        CHECK(bytes.size() == sizeof id, "rank %d: the NCCL unique id from rank 0 has %zu bytes, expected %zu (a stale or foreign "
              "rendezvous file?)", rank, bytes.size(), sizeof id);
        std::memcpy(&id, bytes.data(), sizeof id);
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        const ncclResult_t r = ncclCommInitRankConfig(&comm_, world, id, rank, &config);
        if (r != ncclSuccess && r != ncclInProgress) {
            comm_ = nullptr;
            FAIL("rank %d: ncclCommInitRank of %d ranks failed: %s", rank, world, ncclGetErrorString(r));
        }
        settle("joining the other ranks (ncclCommInitRank)");
        CUDA_CHECK(cudaMalloc(&scratch_, kScratchBytes));
        CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&grads_ready_, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&buckets_done_, cudaEventDisableTiming));
        CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
        barrier();
    }

    ~NcclCommunicator() override {
        if (comm_ && !dead_ && buckets_in_flight_) {
            try { wait(); } catch (const std::exception&) {}  // on failure the communicator is aborted
        }
        close_communicator();
        if (scratch_) cudaFree(scratch_);
        if (done_) cudaEventDestroy(done_);
        if (grads_ready_) cudaEventDestroy(grads_ready_);
        if (buckets_done_) cudaEventDestroy(buckets_done_);
        if (comm_stream_) cudaStreamDestroy(comm_stream_);
    }

    std::string name() const override { return "nccl"; }
    int rank() const override { return rank_; }
    int world() const override { return world_; }

    void all_reduce_sum(Tensor buf) override {
        CHECK(buf.dtype == DType::F32, "nccl: all_reduce_sum needs fp32");
        wait();
        if (buf.n == 0) return;
        enqueue(ncclAllReduce(buf.ptr, buf.ptr, buf.n, ncclFloat32, ncclSum, comm_, stream_), "all_reduce");
    }
    void reduce_scatter_sum(Tensor buf) override {
        CHECK(buf.dtype == DType::F32 && buf.n % world_ == 0, "nccl: reduce_scatter_sum needs fp32 and n %zu a multiple of world %d",
              buf.n, world_);
        wait();
        const size_t chunk = buf.n / world_;
        if (chunk == 0) return;
        float* p = buf.f32();
        enqueue(ncclReduceScatter(p, p + rank_ * chunk, chunk, ncclFloat32, ncclSum, comm_, stream_), "reduce_scatter");
    }
    void all_gather(Tensor buf) override {
        CHECK(buf.n % world_ == 0, "nccl: all_gather needs n %zu a multiple of world %d", buf.n, world_);
        wait();
        const size_t chunk = buf.n / world_;
        if (chunk == 0) return;
        char* p = static_cast<char*>(buf.ptr);
        enqueue(ncclAllGather(p + rank_ * chunk * dtype_size(buf.dtype), p, chunk, nccl_dtype(buf.dtype), comm_, stream_), "all_gather");
    }
    void broadcast(Tensor buf, int root) override {
        wait();
        if (buf.n == 0) return;
        enqueue(ncclBroadcast(buf.ptr, buf.ptr, buf.n * dtype_size(buf.dtype), ncclInt8, root, comm_, stream_), "broadcast");
    }
    void barrier() override {
        wait();
        enqueue(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_), "barrier");
    }

    void all_reduce_sum_host(double* v, int n) override {
        wait();
        const int piece = (int)(kScratchBytes / sizeof(double));
        for (int off = 0; off < n; off += piece) {
            const int len = std::min(piece, n - off);
            CUDA_CHECK(cudaMemcpy(scratch_, v + off, len * sizeof(double), cudaMemcpyHostToDevice));
            enqueue(ncclAllReduce(scratch_, scratch_, len, ncclFloat64, ncclSum, comm_, stream_), "all_reduce (host values)");
            CUDA_CHECK(cudaMemcpy(v + off, scratch_, len * sizeof(double), cudaMemcpyDeviceToHost));
        }
    }
    std::vector<uint64_t> all_gather_host(uint64_t value) override {
        wait();
        std::vector<uint64_t> all(world_);
        uint64_t* dev = nullptr;
        CUDA_CHECK(cudaMalloc(&dev, world_ * sizeof(uint64_t)));
        try {
            CUDA_CHECK(cudaMemcpy(dev + rank_, &value, sizeof value, cudaMemcpyHostToDevice));
            enqueue(ncclAllGather(dev + rank_, dev, 1, ncclUint64, comm_, stream_), "all_gather (host values)");
            CUDA_CHECK(cudaMemcpy(all.data(), dev, world_ * sizeof(uint64_t), cudaMemcpyDeviceToHost));
        } catch (...) {
            cudaFree(dev);
            throw;
        }
        CUDA_CHECK(cudaFree(dev));
        return all;
    }
    void broadcast_host(std::string& bytes, int root) override {
        wait();
        uint64_t size = bytes.size();
        CUDA_CHECK(cudaMemcpy(scratch_, &size, sizeof size, cudaMemcpyHostToDevice));
        enqueue(ncclBroadcast(scratch_, scratch_, 1, ncclUint64, root, comm_, stream_), "broadcast (host values)");
        CUDA_CHECK(cudaMemcpy(&size, scratch_, sizeof size, cudaMemcpyDeviceToHost));
        bytes.resize(size);
        for (uint64_t off = 0; off < size; off += kScratchBytes) {
            const size_t len = std::min<uint64_t>(kScratchBytes, size - off);
            if (rank_ == root) CUDA_CHECK(cudaMemcpy(scratch_, bytes.data() + off, len, cudaMemcpyHostToDevice));
            enqueue(ncclBroadcast(scratch_, scratch_, len, ncclInt8, root, comm_, stream_), "broadcast (host values)");
            if (rank_ != root) CUDA_CHECK(cudaMemcpy(&bytes[off], scratch_, len, cudaMemcpyDeviceToHost));
        }
    }

    void all_reduce_sum_async(const std::vector<Tensor>& bucket) override {
        CHECK(!dead_ && comm_, "rank %d: the NCCL communicator was aborted; no further collectives", rank_);
        size_t count = 0;
        for (const Tensor& t : bucket) {
            CHECK(t.dtype == DType::F32, "nccl: all_reduce_sum_async needs fp32");
            count += t.n;
        }
        if (count == 0) return;
        // the comm stream starts after everything queued so far on the default stream
        CUDA_CHECK(cudaEventRecord(grads_ready_, stream_));
        CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, grads_ready_, 0));
        nccl_call(ncclGroupStart(), "group start (gradient bucket)");
        for (const Tensor& t : bucket)
            if (t.n) nccl_call(ncclAllReduce(t.ptr, t.ptr, t.n, ncclFloat32, ncclSum, comm_, comm_stream_), "all_reduce (gradient bucket)");
        nccl_call(ncclGroupEnd(), "group end (gradient bucket)");
        settle("all_reduce (gradient bucket)");
        CUDA_CHECK(cudaEventRecord(buckets_done_, comm_stream_));  // covers every earlier bucket (one stream, in order)
        buckets_in_flight_++;
    }

    void wait() override {
        if (buckets_in_flight_ == 0) return;
        const int n = buckets_in_flight_;
        buckets_in_flight_ = 0;
        CHECK(!dead_ && comm_, "rank %d: the NCCL communicator was aborted; no further collectives", rank_);
        wait_event(buckets_done_, strformat("all_reduce of %d gradient bucket(s)", n).c_str());
        CUDA_CHECK(cudaStreamWaitEvent(stream_, buckets_done_, 0));  // (already complete; keeps the order explicit)
    }

    void abort(const std::string&) noexcept override {
        if (dead_ || !comm_) return;
        dead_ = true;
        ncclCommAbort(comm_);
        comm_ = nullptr;
    }

private:
    static constexpr size_t kScratchBytes = 1 << 16;

    // Flushes and destroys the communicator; gives up (aborts) if the peers do not answer in time.
    void close_communicator() noexcept {
        if (!comm_) return;
        if (!dead_) {
            ncclResult_t r = ncclCommFinalize(comm_);
            const auto start = std::chrono::steady_clock::now();
            while (r == ncclInProgress && seconds_since(start) < timeout_s_) {
                std::this_thread::sleep_for(std::chrono::milliseconds(1));
                if (ncclCommGetAsyncError(comm_, &r) != ncclSuccess) break;
            }
            if (r == ncclSuccess) {
                ncclCommDestroy(comm_);
                comm_ = nullptr;
                return;
            }
        }
        ncclCommAbort(comm_);
        comm_ = nullptr;
    }

    static double seconds_since(std::chrono::steady_clock::time_point t) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    }

    void nccl_ok(ncclResult_t r, const char* what) {
        if (r == ncclSuccess) return;
        FAIL("rank %d: NCCL %s failed: %s", rank_, what, ncclGetErrorString(r));
    }

    // Gives up: aborts the communicator and throws the message.
    [[noreturn]] void fail(const std::string& msg) {
        std::string last = comm_ ? ncclGetLastError(comm_) : "";
        abort(msg);
        FAIL("%s%s%s", msg.c_str(), last.empty() ? "" : ": ", last.c_str());
    }

    // Waits until the last NCCL call on the communicator has left ncclInProgress.
    void settle(const char* what) {
        const auto start = std::chrono::steady_clock::now();
        for (;;) {
            ncclResult_t state = ncclSuccess;
            const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
            if (q != ncclSuccess) fail(strformat("rank %d: NCCL %s: ncclCommGetAsyncError: %s", rank_, what, ncclGetErrorString(q)));
            if (state == ncclSuccess) return;
            if (state != ncclInProgress) fail(strformat("rank %d: NCCL %s failed: %s", rank_, what, ncclGetErrorString(state)));
            if (seconds_since(start) > timeout_s_)
                fail(strformat("rank %d: NCCL %s did not finish within %.0f s (a rank died, hangs, or cannot be reached; "
                               "raise --comm-timeout if it is only slow)", rank_, what, timeout_s_));
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
    }

    // The result of an NCCL call: success or in progress (non-blocking), else give up.
    void nccl_call(ncclResult_t r, const char* what) {
        if (r != ncclSuccess && r != ncclInProgress) fail(strformat("rank %d: NCCL %s failed: %s", rank_, what, ncclGetErrorString(r)));
    }

    // After enqueueing a collective: settle the call, then wait for it to complete on the GPU,
    // polling the communicator for errors, up to the timeout.
    void enqueue(ncclResult_t r, const char* what) {
        CHECK(!dead_ && comm_, "rank %d: the NCCL communicator was aborted; no further collectives", rank_);
        nccl_call(r, what);
        settle(what);
        CUDA_CHECK(cudaEventRecord(done_, stream_));
        wait_event(done_, what);
    }

    // Waits for `event` to complete on the GPU, polling the communicator for errors, up to the
    // timeout.
    void wait_event(cudaEvent_t event, const char* what) {
        const auto start = std::chrono::steady_clock::now();
        for (long spin = 0;; spin++) {
            const cudaError_t e = cudaEventQuery(event);
            if (e == cudaSuccess) break;
            if (e != cudaErrorNotReady) CUDA_CHECK(e);
            ncclResult_t state = ncclSuccess;
            ncclCommGetAsyncError(comm_, &state);
            if (state != ncclSuccess && state != ncclInProgress)
                fail(strformat("rank %d: NCCL %s failed: %s", rank_, what, ncclGetErrorString(state)));
            if (seconds_since(start) > timeout_s_)
                fail(strformat("rank %d: NCCL %s did not complete within %.0f s (a rank died, hangs, or is far behind; "
                               "raise --comm-timeout if a step is that slow)", rank_, what, timeout_s_));
            if (spin > 100) std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }

    ncclComm_t comm_ = nullptr;
    int rank_, world_;
    double timeout_s_;
    cudaStream_t stream_ = 0;  // CudaOps' stream
    void* scratch_ = nullptr;  // kScratchBytes of device memory for host values
    cudaEvent_t done_ = nullptr;
    cudaStream_t comm_stream_ = nullptr;   // non-blocking stream of the gradient buckets
    cudaEvent_t grads_ready_ = nullptr;    // default stream -> comm stream, per bucket
    cudaEvent_t buckets_done_ = nullptr;   // after the last bucket on the comm stream
    int buckets_in_flight_ = 0;
    bool dead_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(int rank, int world, int local_rank, double timeout_s,
                                                     const std::function<std::string(const std::string&)>& exchange) {
    return std::make_unique<NcclCommunicator>(rank, world, local_rank, timeout_s, exchange);
}
