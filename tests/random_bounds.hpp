#pragma once
// Random page-score inputs shared by the CPU and CUDA page-score tests: per-page key bounds (every fifth
// page a single key, kmin == kmax) and query rows that start with +0 and -0, so the sign-bit select of
// page_score_add meets both zeros.

#include <cstddef>
#include <random>
#include <utility>
#include <vector>

#include <kvsparse/dtype.hpp>
#include <kvsparse/key_bounds.hpp>

namespace test_inputs {

/// Packed bounds of `pages` pages over `data` (resized), values in [-2, 2).
template <class T>
kvsparse::KeyBounds<T> random_bounds(std::vector<T>& data, int pages, int dim, std::mt19937& rng) {
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    data.assign(kvsparse::KeyBounds<T>::elements(pages, dim), T{});
    const auto bounds = kvsparse::KeyBounds<T>::packed(data.data(), pages, 16, dim);
    for (int p = 0; p < pages; ++p) {
        for (int d = 0; d < dim; ++d) {
            float a = u(rng), b = u(rng);
            if (p % 5 == 0) b = a;  // pages of one key
            if (a > b) std::swap(a, b);
            bounds.kmin(p)[d] = kvsparse::from_float<T>(a);
            bounds.kmax(p)[d] = kvsparse::from_float<T>(b);
        }
    }
    return bounds;
}

/// `rows` query rows of `dim` in [-2, 2), the first two elements +0 and -0.
inline std::vector<float> random_queries(int rows, int dim, std::mt19937& rng) {
    std::uniform_real_distribution<float> u(-2.0f, 2.0f);
    std::vector<float> q(static_cast<std::size_t>(rows * dim));
    for (float& x : q) x = u(rng);
    q[0] = 0.0f;
    q[1] = -0.0f;
    return q;
}

}  // namespace test_inputs
