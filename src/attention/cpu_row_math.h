// Small row helpers shared by the CPU attention references (performer, polynomial, polysketch,
// hyper): a row of a strided (B, H, T, d) HeadTensor, a dot product, an integer power.
#pragma once
#include <cstdint>

#include "attention.h"

// Row t of head (b, h) of x: element (b, h, t, i) at ptr + b·sb + h·sh + t·st + i.
template <typename T>
T* row_ptr(const HeadTensor& x, int b, int h, int t) {
    return static_cast<T*>(x.ptr) + b * x.sb + h * x.sh + (int64_t)t * x.st;
}

// Σ_i a_i·b_i in order (deterministic).
template <typename T>
T dot(const T* a, const T* b, int n) {
    T s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// x^p for p >= 0 by repeated multiplication (the polynomial weights' even degrees).
template <typename T>
T int_pow(T x, int p) {
    T r = 1;
    for (int i = 0; i < p; i++) r *= x;
    return r;
}
