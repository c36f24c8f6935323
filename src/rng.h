// Deterministic, checkpointable random numbers: the whole state is one uint64 (splitmix64), so
// a generator is saved and restored by copying `state`. Derived streams (per layer, per step)
// come from `Rng::derive(seed, a, b)` so random state is a pure function of its indices.
#pragma once
#include <cmath>
#include <cstdint>

struct Rng {
    uint64_t state;
    explicit Rng(uint64_t seed = 1337) : state(seed) {}
    uint64_t next_u64() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint32_t next_u32() { return (uint32_t)(next_u64() >> 32); }
    // uniform in [0, 1) with 24 random bits
    float uniform() { return (next_u64() >> 40) * (1.0f / 16777216.0f); }
    // integer in [0, n)
    uint64_t below(uint64_t n) { return next_u64() % n; }
    // standard normal (Box-Muller, one value per call, deterministic)
    float normal() {
        double u1 = ((next_u64() >> 11) + 1.0) * (1.0 / 9007199254740993.0);  // (0, 1]
        double u2 = (next_u64() >> 11) * (1.0 / 9007199254740992.0);
        return (float)(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
    static uint64_t derive(uint64_t seed, uint64_t a, uint64_t b = 0) {
        Rng r(seed ^ (a * 0xD1B54A32D192ED03ull) ^ (b * 0x8CB92BA72F3D8DD7ull));
        r.next_u64();
        return r.next_u64();
    }
};
