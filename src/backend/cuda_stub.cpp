// Linked instead of cuda/ when the program is built without nvcc (and into the CPU unit-test
// binary): asking for the CUDA backend says how to get it.
#include "check.h"
#include "ops.h"

std::unique_ptr<Ops> make_cuda_ops(DType) {
    FAIL("--device cuda: this binary was built without CUDA (nvcc not found at build time); "
         "install the CUDA toolkit and rebuild with 'make clean && make', or use --device cpu");
}
bool cuda_available() { return false; }
