// Rank discovery, the --nproc launcher, the file rendezvous and the choice of communicator
// (see launch.h). MPI lives in src/launch_mpi.cpp, linked only when MPI is there: its
// mpi_launcher() replaces the weak one here that says "no MPI".
#include "launch.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <thread>
#include <vector>

#include "check.h"
#include "fileio.h"

__attribute__((weak)) MpiLauncher* mpi_launcher() { return nullptr; }

namespace {

const char* env(const char* name) {
    const char* v = std::getenv(name);
    return v && *v ? v : nullptr;
}

int env_int(const char* name, int fallback) {
    const char* v = env(name);
    if (!v) return fallback;
    char* end = nullptr;
    long x = std::strtol(v, &end, 10);
    CHECK(end && *end == '\0' && x >= 0 && x < (1 << 24), "environment variable %s=%s is not a rank number", name, v);
    return (int)x;
}

// Letters, digits, '-', '_', '.' only (it becomes part of a file name).
std::string sanitize(const std::string& s) {
    std::string o;
    for (char c : s) o += (std::isalnum((unsigned char)c) || c == '-' || c == '_' || c == '.') ? c : '_';
    return o.substr(0, 120);
}

std::string env_run_id() {
    if (const char* v = env("GPT_RUN_ID")) return sanitize(v);
    if (const char* v = env("PMIX_NAMESPACE")) return sanitize(v);
    if (const char* v = env("SLURM_JOB_ID")) return sanitize(std::string(v) + "." + (env("SLURM_STEP_ID") ? env("SLURM_STEP_ID") : "0"));
    if (const char* v = env("TORCHELASTIC_RUN_ID"))
        return sanitize(std::string(v) + "-" + (env("MASTER_ADDR") ? env("MASTER_ADDR") : "") + "-" + (env("MASTER_PORT") ? env("MASTER_PORT") : ""));
    return "default";
}

void check_launch(const Launch& l, const char* source) {
    CHECK(l.world >= 1 && l.rank >= 0 && l.rank < l.world, "%s: rank %d outside the world of %d", source, l.rank, l.world);
    CHECK(l.local_world >= 1 && l.local_rank >= 0 && l.local_rank < l.local_world,
          "%s: local rank %d outside the %d ranks of this node", source, l.local_rank, l.local_world);
}

// ---- the --nproc launcher
std::vector<pid_t> g_children;
void forward_signal(int sig) {
    for (pid_t p : g_children)
        if (p > 0) kill(p, SIGTERM);
    signal(sig, SIG_DFL);
    raise(sig);
}

}  // namespace

Launch discover_launch() {
    Launch l;
    if (MpiLauncher* mpi = mpi_launcher(); mpi && mpi->discover(l)) {
        check_launch(l, "MPI");
        return l;
    }
    if (env("RANK") || env("WORLD_SIZE")) {
        CHECK(env("RANK") && env("WORLD_SIZE"), "environment: RANK and WORLD_SIZE must be set together (as torchrun does)");
        l.method = "env";
        l.rank = env_int("RANK", 0);
        l.world = env_int("WORLD_SIZE", 1);
        l.local_rank = env_int("LOCAL_RANK", l.rank);
        l.local_world = env_int("LOCAL_WORLD_SIZE", l.world);  // torchrun sets it; otherwise one node is assumed
        l.run_id = env_run_id();
        check_launch(l, "environment RANK/WORLD_SIZE/LOCAL_RANK");
        return l;
    }
    if (env("OMPI_COMM_WORLD_SIZE")) {  // mpirun started a binary built without MPI
        l.method = "env";
        l.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
        l.world = env_int("OMPI_COMM_WORLD_SIZE", 1);
        l.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
        l.local_world = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
        l.run_id = env_run_id();
        check_launch(l, "environment OMPI_COMM_WORLD_*");
        return l;
    }
    return l;
}

int spawn_ranks(int nproc, int argc, char** argv) {
    CHECK(nproc >= 1 && nproc <= 1024, "--nproc %d must be in [1, 1024]", nproc);
    const std::string run_id = env("GPT_RUN_ID") ? env("GPT_RUN_ID")
                                                 : strformat("nproc-%d-%lld", (int)getpid(), (long long)std::time(nullptr));
    std::vector<char*> args(argv, argv + argc);
    args.push_back(nullptr);
    std::fflush(stdout);
    std::fflush(stderr);
    g_children.assign(nproc, 0);
    signal(SIGINT, forward_signal);
    signal(SIGTERM, forward_signal);
    for (int r = 0; r < nproc; r++) {
        pid_t pid = fork();
        CHECK(pid >= 0, "--nproc: cannot start rank %d: %s", r, std::strerror(errno));
        if (pid == 0) {
            setenv("RANK", std::to_string(r).c_str(), 1);
            setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
            setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
            setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
            setenv("GPT_RUN_ID", run_id.c_str(), 1);
            execv("/proc/self/exe", args.data());
            std::fprintf(stderr, "error: --nproc: cannot run %s: %s\n", argv[0], std::strerror(errno));
            _exit(127);
        }
        g_children[r] = pid;
    }
    int first_failed = -1, first_status = 0, running = nproc;
    auto stop_deadline = std::chrono::steady_clock::time_point::max();
    while (running > 0) {
        int status = 0;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid == 0) {
            if (std::chrono::steady_clock::now() > stop_deadline) {
                for (pid_t p : g_children) if (p > 0) kill(p, SIGKILL);
                stop_deadline = std::chrono::steady_clock::time_point::max();
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            continue;
        }
        if (pid < 0) {
            if (errno == EINTR) continue;
            break;
        }
        int r = 0;
        while (r < nproc && g_children[r] != pid) r++;
        if (r == nproc) continue;
        g_children[r] = 0;
        running--;
        const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok && first_failed < 0) {
            first_failed = r;
            first_status = status;
            for (pid_t p : g_children) if (p > 0) kill(p, SIGTERM);
            stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        }
    }
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    if (first_failed < 0) return 0;
    if (WIFSIGNALED(first_status))
        std::fprintf(stderr, "error: rank %d of %d was killed by signal %d (%s); stopped the other ranks\n", first_failed, nproc,
                     WTERMSIG(first_status), strsignal(WTERMSIG(first_status)));
    else
        std::fprintf(stderr, "error: rank %d of %d exited with status %d; stopped the other ranks\n", first_failed, nproc,
                     WEXITSTATUS(first_status));
    return 1;
}

namespace {
std::string rendezvous_path(const Launch& l, const std::string& dir, const std::string& name) {
    return dir + "/.rendezvous_" + sanitize(name) + "_" + sanitize(l.run_id);
}
}  // namespace

std::string share_from_rank0(const Launch& l, const std::string& dir, const std::string& name, const std::string& bytes,
                             double timeout_s) {
    if (l.world == 1) return bytes;
    if (l.method == "mpi") return mpi_launcher()->broadcast(l.rank == 0 ? bytes : std::string());
    const std::string path = rendezvous_path(l, dir, name);
    if (l.rank == 0) {
        write_file_atomic(path, bytes);
        return bytes;
    }
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
        struct stat st;
        if (stat(path.c_str(), &st) == 0) return read_file(path, "rendezvous file");
        CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < timeout_s,
              "rank %d: no rendezvous file %s from rank 0 within %.0f s: rank 0 is dead or not started, or the ranks do not "
              "share that folder (--out must be on a file system every node sees) or the run id (GPT_RUN_ID=%s)",
              l.rank, path.c_str(), timeout_s, l.run_id.c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

void end_rendezvous(const Launch& l, const std::string& dir, const std::string& name) {
    if (l.world > 1 && l.method != "mpi" && l.rank == 0) unlink(rendezvous_path(l, dir, name).c_str());
}

void end_launch(const Launch& l) {
    if (l.method == "mpi") mpi_launcher()->finalize();
}

std::unique_ptr<Communicator> make_communicator(const std::string& kind_in, const Launch& l, bool cuda, const std::string& dir,
                                                double timeout_s) {
    std::string kind = kind_in;
    if (kind == "auto") kind = l.world == 1 ? "single" : cuda ? "nccl" : "shm";
    if (kind == "single") {
        CHECK(l.world == 1, "--comm single: this launch has %d ranks; use --comm auto", l.world);
        return make_single_communicator();
    }
    if (kind == "shm") {
        CHECK(!cuda, "--comm shm is for --device cpu; GPUs talk through nccl (--comm auto)");
        CHECK(l.local_world == l.world, "--comm shm: the %d ranks are not all on this node (%d here); CPU training spans one node",
              l.world, l.local_world);
        struct stat st;
        const std::string folder = stat("/dev/shm", &st) == 0 ? "/dev/shm" : dir;
        return make_shm_communicator(strformat("%s/gpt_comm_%d_%s", folder.c_str(), (int)getuid(), sanitize(l.run_id).c_str()), l.rank,
                                     l.world, timeout_s);
    }
    if (kind == "nccl") {
        CHECK(cuda, "--comm nccl needs --device cuda");
        auto exchange = [&](const std::string& id) { return share_from_rank0(l, dir, "nccl", id, timeout_s); };
        std::unique_ptr<Communicator> comm = make_nccl_communicator(l.rank, l.world, l.local_rank, timeout_s, exchange);
        end_rendezvous(l, dir, "nccl");  // every rank has joined the communicator, so has read the id
        return comm;
    }
    FAIL("--comm %s: expected auto, single, shm or nccl", kind.c_str());
}
