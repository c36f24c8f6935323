// Strided head tensors on the device, shared by the attention kernels: a HeadTensor's pointer and
// strides passed by value to kernels (element (b, h, t, i) at ptr + b*sb + h*sh + t*st + i).
#pragma once
#include <cstdint>

#include "attention.h"

struct Strided {
    void* ptr;
    int64_t sb, sh, st;
};
inline Strided strided(const HeadTensor& t) { return Strided{t.ptr, t.sb, t.sh, t.st}; }

// Start of head (b, h): rows t follow at stride st.
template <typename T>
__device__ __forceinline__ T* head_slice(const Strided& s, int b, int h) {
    return static_cast<T*>(s.ptr) + b * s.sb + h * s.sh;
}
