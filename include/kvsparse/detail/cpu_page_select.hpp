#pragma once
// The page-selection primitives behind CpuBackend::update_key_bounds / page_scores / top_pages
// (QuestPageSelector and other page-level policies): per-page key bounds, upper-bound page scores for
// the query heads of a KV head in one pass over the bounds, and top-k with the tie rule.

#include <algorithm>
#include <bit>
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

/// An order-preserving image of a score as an unsigned key: a > b exactly when key(a) > key(b), with NaN
/// taken as -inf and -0 as +0 (equal floats, so equal keys).
inline std::uint32_t score_key(float s) {
    if (std::isnan(s)) s = -std::numeric_limits<float>::infinity();
    if (s == 0.0f) s = 0.0f;
    const auto bits = std::bit_cast<std::uint32_t>(s);
    return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

/// Top-k with the tie rule; see CpuBackend::top_pages. A radix select finds the k-th largest key a byte
/// at a time from the top, and how many of the keys equal to it still get a place; one pass in index
/// order then takes every larger key and the first of the equal ones, which is the tie rule and leaves
/// the result ascending without a sort: O(n). Three passes over all n scores, the others over the few
/// that share the leading byte (kept at the front of `order`, which the last pass overwrites behind itself).
inline std::int32_t top_pages(std::span<const float> scores, std::int32_t n, std::int32_t k, std::span<std::int32_t> order) {
    if (k >= n) {
        std::iota(order.begin(), order.begin() + std::max(n, 0), 0);
        return std::max(n, 0);
    }
    if (k <= 0) return 0;
    const auto key = [&](std::int32_t i) { return score_key(scores[static_cast<std::size_t>(i)]); };
    std::uint32_t threshold = 0;  // the bytes of the k-th largest key found so far
    std::int32_t wanted = k;      // how many keys that share them are still to take
    std::int32_t candidates = 0;  // after the first byte: order[0, candidates) share it
    for (int shift = 24; shift >= 0; shift -= 8) {
        std::int32_t count[256] = {};
        if (shift == 24) {
            for (std::int32_t i = 0; i < n; ++i) ++count[key(i) >> 24];
        } else {
            for (std::int32_t c = 0; c < candidates; ++c) ++count[(key(order[static_cast<std::size_t>(c)]) >> shift) & 0xffu];
        }
        std::uint32_t digit = 255;
        while (count[digit] < wanted) wanted -= count[digit--];
        threshold |= digit << shift;
        if (shift == 24) {
            for (std::int32_t i = 0; i < n; ++i)
                if (key(i) >> 24 == digit) order[static_cast<std::size_t>(candidates++)] = i;
        } else {
            std::int32_t kept = 0;
            for (std::int32_t c = 0; c < candidates; ++c) {
                const std::int32_t i = order[static_cast<std::size_t>(c)];
                if (((key(i) >> shift) & 0xffu) == digit) order[static_cast<std::size_t>(kept++)] = i;
            }
            candidates = kept;
        }
    }
    std::int32_t taken = 0;
    for (std::int32_t i = 0; i < n; ++i) {
        const std::uint32_t x = key(i);
        if (x > threshold || (x == threshold && wanted-- > 0)) order[static_cast<std::size_t>(taken++)] = i;
    }
    return taken;
}

}  // namespace kvsparse::detail::pages
