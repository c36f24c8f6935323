// Strided head tensors on the device, shared by the attention kernels: a HeadTensor's pointer and
// strides passed by value to kernels (element (b, h, t, i) at ptr + b*sb + h*sh + t*st + i), and
// the check every CUDA attention module runs on the tensors of a call.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "attention.h"
#include "check.h"

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

// The dtype shared by the tensors of one attention call (named for errors: "o", "q", ...): each
// must be non-null and of the first one's dtype. rows_16b: the kernels copy bf16 rows 16 bytes at
// a time, so bf16 tensors must be 16-byte aligned with strides that are multiples of 8 elements.
// Errors name the variant (`variant attention: ...`) and the tensor.
inline DType attention_dtype(const char* variant, std::initializer_list<std::pair<const char*, HeadTensor>> ts,
                             bool rows_16b) {
    const DType dt = ts.begin()->second.dtype;
    for (const auto& [what, t] : ts) {
        CHECK(t.ptr != nullptr, "%s attention: tensor %s is null", variant, what);
        CHECK(t.dtype == dt, "%s attention: tensor %s is %s but %s is %s", variant, what, dtype_name(t.dtype),
              ts.begin()->first, dtype_name(dt));
        if (rows_16b && dt == DType::BF16)
            CHECK(reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.sb % 8 == 0 && t.sh % 8 == 0 && t.st % 8 == 0,
                  "%s attention: bf16 tensor %s must be 16-byte aligned with strides that are multiples of 8 "
                  "elements (got sb=%lld sh=%lld st=%lld)",
                  variant, what, (long long)t.sb, (long long)t.sh, (long long)t.st);
    }
    return dt;
}
