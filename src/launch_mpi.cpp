// The MPI module of the launcher (see launch.h): compiled with mpicxx and linked into the
// programs only when MPI is installed (Makefile: HAVE_MPI). Its mpi_launcher() replaces the
// weak one of launch.cpp. MPI is initialised only when an MPI launcher started the process, so
// the same binary still runs alone, under --nproc or under torchrun.
#define OMPI_SKIP_MPICXX 1  // the C API only
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstdlib>
#include <ctime>
#include <string>
#include <unistd.h>

#include "check.h"
#include "launch.h"

namespace {

class OpenMpiLauncher : public MpiLauncher {
public:
    bool discover(Launch& l) override {
        if (!std::getenv("OMPI_COMM_WORLD_SIZE") && !std::getenv("PMI_SIZE") && !std::getenv("PMIX_RANK")) return false;
        int provided = 0;
        CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) == MPI_SUCCESS, "MPI_Init failed");
        initialized_ = true;
        MPI_Comm_rank(MPI_COMM_WORLD, &l.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &l.world);
        MPI_Comm node;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, l.rank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &l.local_rank);
        MPI_Comm_size(node, &l.local_world);
        MPI_Comm_free(&node);
        l.method = "mpi";
        // one run id for every rank: rank 0's pid and time
        l.run_id = broadcast(l.rank == 0 ? strformat("mpi-%d-%ld", (int)getpid(), (long)time(nullptr)) : std::string());
        return true;
    }
    std::string broadcast(const std::string& bytes) override {
        unsigned long long n = bytes.size();
        MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
        std::string out = bytes;
        out.resize(n);
        if (n) MPI_Bcast(&out[0], (int)n, MPI_CHAR, 0, MPI_COMM_WORLD);
        return out;
    }
    void finalize() override {
        if (initialized_) MPI_Finalize();
        initialized_ = false;
    }

private:
    bool initialized_ = false;
};

}  // namespace

MpiLauncher* mpi_launcher() {
    static OpenMpiLauncher launcher;
    return &launcher;
}
