#pragma once
// The page-selection primitives behind CpuBackend::update_key_bounds / page_scores / top_pages
// (QuestPageSelector and other page-level policies): per-page key bounds, upper-bound page scores for
// the query heads of a KV head in one pass over the bounds, and top-k with the tie rule.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <type_traits>

#include "kvsparse/detail/cpu_page_scores_simd.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::detail::pages {

/// Folds one key into page `page` of `bounds`; see CpuBackend::update_key_bounds.
template <storage_type T, storage_type K>
void update_key_bounds(const KeyBounds<T>& bounds, std::int32_t page, const K* key, bool first) {
    T* lo = bounds.kmin(page);
    T* hi = bounds.kmax(page);
    for (std::int32_t d = 0; d < bounds.head_dim; ++d) {
        T stored;
        if constexpr (std::is_same_v<K, T>) {
            stored = key[d];
        } else {
            stored = from_float<T>(to_float(key[d]));  // exactly as CpuBackend::write narrows it
        }
        if (first) {
            lo[d] = stored;
            hi[d] = stored;
            continue;
        }
        const float x = to_float(stored);
        if (x < to_float(lo[d])) lo[d] = stored;
        if (x > to_float(hi[d])) hi[d] = stored;
    }
}

/// Adds max(q_d * hi_d, q_d * lo_d) for d in [0, len) to lanes[d % 8]. Eight named accumulators: both
/// compilers turn them into vector registers (an array indexed in an inner loop is not always).
inline void add_page_row(const float* q, const float* lo, const float* hi, std::size_t len, float* lanes) {
    const auto term = [&](std::size_t d) {
        const float a = q[d] * hi[d];
        const float b = q[d] * lo[d];
        return a > b ? a : b;
    };
    float a0 = lanes[0], a1 = lanes[1], a2 = lanes[2], a3 = lanes[3];
    float a4 = lanes[4], a5 = lanes[5], a6 = lanes[6], a7 = lanes[7];
    std::size_t d = 0;
    for (; d + 8 <= len; d += 8) {
        a0 += term(d);
        a1 += term(d + 1);
        a2 += term(d + 2);
        a3 += term(d + 3);
        a4 += term(d + 4);
        a5 += term(d + 5);
        a6 += term(d + 6);
        a7 += term(d + 7);
    }
    lanes[0] = a0;
    lanes[1] = a1;
    lanes[2] = a2;
    lanes[3] = a3;
    lanes[4] = a4;
    lanes[5] = a5;
    lanes[6] = a6;
    lanes[7] = a7;
    for (; d < len; ++d) lanes[d % 8] += term(d);
}

/// Upper-bound page scores; see CpuBackend::page_scores.
///
/// Summation order (a CUDA port must follow it to select the same pages on exact ties): element d goes
/// to lane d % 8, lanes add in order of d, and U = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
/// The fixed lanes let the compiler vectorize the loop without reassociating anything. Each page's
/// bounds are widened to float once per batch of up to 64 query rows, in chunks of 128 elements.
template <class T>
void page_scores_portable(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries,
                          std::int32_t rows, GqaAggregation mode, std::span<float> scores) {
    using Stored = std::remove_const_t<T>;
    constexpr std::size_t lanes = 8, chunk = 128, batch = 64;
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    const std::size_t n_rows = static_cast<std::size_t>(rows);
    float lo_chunk[chunk], hi_chunk[chunk];
    float partial[batch][lanes];
    for (std::int32_t i = 0; i < pages; ++i) {
        const Stored* lo_page = bounds.kmin(i);
        const Stored* hi_page = bounds.kmax(i);
        float aggregate = mode == GqaAggregation::sum ? 0.0f : -std::numeric_limits<float>::infinity();
        for (std::size_t r0 = 0; r0 < n_rows; r0 += batch) {
            const std::size_t nb = std::min(batch, n_rows - r0);
            for (std::size_t r = 0; r < nb; ++r)
                for (std::size_t j = 0; j < lanes; ++j) partial[r][j] = 0.0f;
            for (std::size_t c = 0; c < dim; c += chunk) {
                const std::size_t len = std::min(chunk, dim - c);
                const float* lo = lo_chunk;
                const float* hi = hi_chunk;
                if constexpr (std::is_same_v<Stored, float>) {
                    lo = lo_page + c;
                    hi = hi_page + c;
                } else {
                    for (std::size_t d = 0; d < len; ++d) {
                        lo_chunk[d] = to_float(lo_page[c + d]);
                        hi_chunk[d] = to_float(hi_page[c + d]);
                    }
                }
                for (std::size_t r = 0; r < nb; ++r) add_page_row(queries.data() + (r0 + r) * dim + c, lo, hi, len, partial[r]);
            }
            for (std::size_t r = 0; r < nb; ++r) {
                const float* p = partial[r];
                const float u = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
                if (mode == GqaAggregation::per_query_head) {
                    scores[(r0 + r) * static_cast<std::size_t>(pages) + static_cast<std::size_t>(i)] = u;
                } else if (mode == GqaAggregation::sum) {
                    aggregate += u;
                } else {
                    aggregate = u > aggregate ? u : aggregate;
                }
            }
        }
        if (mode != GqaAggregation::per_query_head) scores[static_cast<std::size_t>(i)] = aggregate;
    }
}

/// The same, with AVX-512 or AVX2 where the CPU has them (detail/cpu_page_scores_simd.hpp: the same
/// numbers bit for bit), else the loop above.
template <class T>
void page_scores(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries, std::int32_t rows,
                 GqaAggregation mode, std::span<float> scores) {
    if (!cpu::page_scores_simd(bounds, pages, queries, rows, mode, scores)) page_scores_portable(bounds, pages, queries, rows, mode, scores);
}

/// Top-k with the tie rule; see CpuBackend::top_pages.
inline std::int32_t top_pages(std::span<const float> scores, std::int32_t n, std::int32_t k, std::span<std::int32_t> order) {
    std::iota(order.begin(), order.begin() + n, 0);
    if (k >= n) return n;
    if (k <= 0) return 0;
    const auto key = [&](std::int32_t i) {
        const float s = scores[static_cast<std::size_t>(i)];
        return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
    };
    const auto better = [&](std::int32_t a, std::int32_t b) {
        const float x = key(a), y = key(b);
        return x > y || (x == y && a < b);
    };
    std::nth_element(order.begin(), order.begin() + (k - 1), order.begin() + n, better);
    std::sort(order.begin(), order.begin() + k);
    return k;
}

}  // namespace kvsparse::detail::pages
