#pragma once
// Reproducible test data for kvsparse-bench: uniform floats in [-1, 1) from splitmix64.
//
//   kvsparse::bench::Random random{seed};
//   random.fill(values);                      // successive values of the stream
//   float x = kvsparse::bench::Random{i}.next();  // or one value as a pure function of `i`

#include <cstdint>
#include <vector>

namespace kvsparse::bench {

/// Uniform floats in [-1, 1) (splitmix64): fast and reproducible.
struct Random {
    std::uint64_t state;
    float next() {
        std::uint64_t x = (state += 0x9e3779b97f4a7c15ull);
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        x ^= x >> 31;
        return static_cast<float>(static_cast<double>(x >> 40) * 0x1p-23 - 1.0);
    }
    void fill(std::vector<float>& v) {
        for (float& x : v) x = next();
    }
};

}  // namespace kvsparse::bench
