// How a training process learns its place among the ranks, and how the ranks meet.
//
// Discovery (discover_launch), first that applies:
//   1. MPI: built with MPI (src/launch_mpi.cpp, compiled when mpicxx exists) and started by an
//      MPI launcher (mpirun/srun: OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK set).
//   2. Environment, as torchrun sets it: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (the last
//      two default to RANK and WORLD_SIZE: one node).
//      `build/train --nproc N` starts N copies of itself with these set (spawn_ranks).
//      Without MPI in the binary, OpenMPI's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} are read too.
//   3. Otherwise a world of one.
// Meeting: rank 0's bytes (the NCCL unique id) reach the others over MPI when there is MPI, else
// through a file in a folder every rank sees (--out; a shared file system across nodes), named
// by the run id so runs never mix: written atomically by rank 0, polled by the others up to the
// timeout, removed by rank 0 once every rank has joined.
// The run id: GPT_RUN_ID, else the launcher's job id (PMIX_NAMESPACE, SLURM_JOB_ID, torchrun's
// TORCHELASTIC_RUN_ID with MASTER_ADDR:MASTER_PORT), else "default" (then start every rank of a
// run after the previous run ended, or set GPT_RUN_ID).
#pragma once
#include <memory>
#include <string>

#include "comm.h"

struct Launch {
    int rank = 0, world = 1;
    int local_rank = 0, local_world = 1;  // within this node
    std::string method = "single";        // single | env | mpi
    std::string run_id = "default";
};

Launch discover_launch();

// --nproc N: runs N copies of this program (same argv) as ranks 0..N-1 of this node (RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GPT_RUN_ID set), waits for them, and returns the exit
// status for main. When one rank fails the others are stopped (SIGTERM, then SIGKILL after 10 s)
// and the status names the rank that failed first.
int spawn_ranks(int nproc, int argc, char** argv);

// Rank 0's `bytes` on every rank (over MPI, or a file `dir`/.rendezvous_<name>_<run id>).
std::string share_from_rank0(const Launch& launch, const std::string& dir, const std::string& name,
                             const std::string& bytes, double timeout_s);
// Rank 0 removes the rendezvous file of `name` (call after every rank has joined).
void end_rendezvous(const Launch& launch, const std::string& dir, const std::string& name);

// At the successful end of the program (finalizes MPI when the launch is MPI's).
void end_launch(const Launch& launch);

// The communicator for this process. kind: auto | single | shm | nccl. auto: single for a world
// of one, nccl on CUDA, shm on the CPU (one node). cuda: the backend is CUDA (nccl then selects
// the GPU, so call this before creating CudaOps). dir: the shared folder for the file rendezvous.
std::unique_ptr<Communicator> make_communicator(const std::string& kind, const Launch& launch, bool cuda,
                                                const std::string& dir, double timeout_s);

// ---- the MPI module (src/launch_mpi.cpp); builds without MPI get one that reports "not here"
struct MpiLauncher {
    virtual ~MpiLauncher() = default;
    // true (and fills launch) when this process was started by an MPI launcher; initialises MPI
    virtual bool discover(Launch& launch) = 0;
    // rank 0's bytes to every rank
    virtual std::string broadcast(const std::string& bytes) = 0;
    // MPI_Finalize (only on success: a rank that exits without it makes mpirun stop the job)
    virtual void finalize() = 0;
};
MpiLauncher* mpi_launcher();  // nullptr without MPI
