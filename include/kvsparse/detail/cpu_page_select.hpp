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

#include "kvsparse/detail/cpu_convert.hpp"
#include "kvsparse/detail/cpu_page_scores_simd.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::detail::pages {

/// Folds one key into page `page` of `bounds`; see CpuBackend::update_key_bounds.
template <storage_type T, storage_type K>
void update_key_bounds(const KeyBounds<T>& bounds, std::int32_t page, const K* key, bool first) {
    T* lo = bounds.kmin(page);
    T* hi = bounds.kmax(page);
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    if constexpr (std::is_same_v<K, T>) {
        cpu::fold_bounds(lo, hi, key, dim, first);
    } else {
        // Narrowed exactly as CpuBackend::write stores it, a chunk at a time.
        constexpr std::size_t chunk = 128;
        float wide[chunk];
        T stored[chunk];
        for (std::size_t c = 0; c < dim; c += chunk) {
            const std::size_t len = std::min(chunk, dim - c);
            const float* x = wide;
            if constexpr (std::is_same_v<K, float>) {
                x = key + c;
            } else {
                for (std::size_t d = 0; d < len; ++d) wide[d] = to_float(key[c + d]);
            }
            cpu::narrow(x, stored, len);
            cpu::fold_bounds(lo + c, hi + c, stored, len, first);
        }
    }
}

/// Adds q_d's term (page_score_add) for d in [0, len) to lanes[d % 16], each lane in order of d.
inline void add_page_row(const float* q, const float* lo, const float* hi, std::size_t len, float (&lanes)[16]) {
    float acc[16];
    for (std::size_t j = 0; j < 16; ++j) acc[j] = lanes[j];
    std::size_t d = 0;
    for (; d + 16 <= len; d += 16)
        for (std::size_t j = 0; j < 16; ++j) acc[j] = page_score_add(acc[j], q[d + j], lo[d + j], hi[d + j]);
    for (; d < len; ++d) acc[d % 16] = page_score_add(acc[d % 16], q[d], lo[d], hi[d]);
    for (std::size_t j = 0; j < 16; ++j) lanes[j] = acc[j];
}

/// Quest's page scores of pages [first, first + count) for the query rows [Rows][head_dim] at q, into
/// u[(page - first) * Rows + r]; see CpuBackend::page_scores. This loop defines the summation order,
/// which the vectorized kernels (detail/cpu_page_scores_simd.hpp) and a CUDA port must follow for every
/// backend to select the same pages on exact ties: element d goes to lane d % 16 and lanes add in order
/// of d; then h_j = l_j + l_(j+8) and U = ((h0 + h1) + (h2 + h3)) + ((h4 + h5) + (h6 + h7)). A page's
/// bounds are widened to float once for all rows, in chunks of 128 elements.
template <int Rows, storage_type T>
void page_rows_portable(const KeyBounds<const T>& bounds, std::int32_t first, std::int32_t count, const float* q, float* u) {
    constexpr std::size_t chunk = 128;  // a multiple of 16: lanes carry over between chunks
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    float lo_chunk[chunk], hi_chunk[chunk];
    for (std::int32_t i = 0; i < count; ++i) {
        cpu::prefetch_bounds(bounds, first + i);
        const T* kmin = bounds.kmin(first + i);
        const T* kmax = bounds.kmax(first + i);
        float lanes[Rows][16] = {};
        for (std::size_t c = 0; c < dim; c += chunk) {
            const std::size_t len = std::min(chunk, dim - c);
            const float* lo = lo_chunk;
            const float* hi = hi_chunk;
            if constexpr (std::is_same_v<T, float>) {
                lo = kmin + c;
                hi = kmax + c;
            } else {
                for (std::size_t d = 0; d < len; ++d) {
                    lo_chunk[d] = to_float(kmin[c + d]);
                    hi_chunk[d] = to_float(kmax[c + d]);
                }
            }
            for (int r = 0; r < Rows; ++r) add_page_row(q + static_cast<std::size_t>(r) * dim + c, lo, hi, len, lanes[r]);
        }
        for (int r = 0; r < Rows; ++r) {
            float h[8];
            for (std::size_t j = 0; j < 8; ++j) h[j] = lanes[r][j] + lanes[r][j + 8];
            u[i * Rows + r] = cpu::sum_tree8(h);
        }
    }
}

template <storage_type T>
inline constexpr cpu::PageRows<T> portable_page_rows[cpu::page_rows_batch] = {
    page_rows_portable<1, T>, page_rows_portable<2, T>, page_rows_portable<3, T>, page_rows_portable<4, T>,
    page_rows_portable<5, T>, page_rows_portable<6, T>, page_rows_portable<7, T>, page_rows_portable<8, T>};

/// Upper-bound page scores; see CpuBackend::page_scores. Pages are scored a run of 64 at a time for up
/// to eight query rows (more rows: the run again for the next eight, from the caches) by the widest
/// kernel this CPU has (up to `widest`; tests ask for each), all of which give the same numbers bit for
/// bit; rows aggregate in row order.
template <class T>
void page_scores(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries, std::int32_t rows,
                 GqaAggregation mode, std::span<float> scores, cpu::Isa widest = cpu::Isa::avx512) {
    using Stored = std::remove_const_t<T>;
    const cpu::PageRows<Stored>* kernels = cpu::page_rows_simd<Stored>(bounds.head_dim, widest);
    if (kernels == nullptr) kernels = portable_page_rows<Stored>;
    const KeyBounds<const Stored> view = bounds.read_only();
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    const std::size_t n_rows = static_cast<std::size_t>(std::max(rows, 0));
    constexpr std::int32_t run = 64;
    float u[run * cpu::page_rows_batch];
    for (std::int32_t first = 0; first < pages; first += run) {
        const std::int32_t count = std::min(run, pages - first);
        for (std::size_t r0 = 0; r0 < n_rows; r0 += cpu::page_rows_batch) {
            const std::size_t nb = std::min(cpu::page_rows_batch, n_rows - r0);
            kernels[nb - 1](view, first, count, queries.data() + r0 * dim, u);
            for (std::int32_t i = 0; i < count; ++i) {
                const float* page_u = u + static_cast<std::size_t>(i) * nb;
                const auto page = static_cast<std::size_t>(first + i);
                if (mode == GqaAggregation::per_query_head) {
                    for (std::size_t r = 0; r < nb; ++r) scores[(r0 + r) * static_cast<std::size_t>(pages) + page] = page_u[r];
                    continue;
                }
                float aggregate = r0 > 0                        ? scores[page]
                                  : mode == GqaAggregation::sum ? 0.0f
                                                                : -std::numeric_limits<float>::infinity();
                for (std::size_t r = 0; r < nb; ++r) {
                    if (mode == GqaAggregation::sum) {
                        aggregate += page_u[r];
                    } else {
                        aggregate = page_u[r] > aggregate ? page_u[r] : aggregate;
                    }
                }
                scores[page] = aggregate;
            }
        }
    }
}

/// Top-k with the tie rule; see CpuBackend::top_pages. A radix select finds the k-th largest key, and
/// how many of the keys equal to it still get a place; one pass in index order then takes every larger
/// key and the first of the equal ones, which is the tie rule and leaves the result ascending without a
/// sort: O(n). Every key shares the bits above the highest one where the smallest and the largest key
/// differ, so the select starts there, up to eleven bits a pass: scores in a narrow range (the usual
/// case) spread over the buckets from the first pass on, and one pass mostly settles it (once the
/// bucket of the k-th key is to be taken whole, the lower bits need not be decided). The keys live in
/// `order` until the last pass overwrites them behind itself.
inline std::int32_t top_pages(std::span<const float> scores, std::int32_t n, std::int32_t k, std::span<std::int32_t> order) {
    if (k >= n) {
        std::iota(order.begin(), order.begin() + std::max(n, 0), 0);
        return std::max(n, 0);
    }
    if (k <= 0) return 0;
    auto* keys = reinterpret_cast<std::uint32_t*>(order.data());
    std::uint32_t low = ~0u, high = 0;
    for (std::int32_t i = 0; i < n; ++i) {
        const std::uint32_t key = page_score_key(scores[static_cast<std::size_t>(i)]);
        keys[i] = key;
        low = std::min(low, key);
        high = std::max(high, key);
    }
    int top = std::bit_width(low ^ high) - 1;  // the highest bit still to decide; -1: all keys are equal
    std::uint32_t mask = top == 31 ? 0u : ~0u << (top + 1);  // the bits decided so far
    std::uint32_t threshold = high & mask;                      // their values in the k-th largest key
    std::int32_t wanted = k;                                    // keys that share them still to take
    while (top >= 0) {
        const int shift = std::max(0, top - 10);
        const std::uint32_t digits = (2u << (top - shift)) - 1;
        std::int32_t count[2048] = {};
        for (std::int32_t i = 0; i < n; ++i) count[(keys[i] >> shift) & digits] += (keys[i] & mask) == threshold;
        std::uint32_t digit = digits;
        while (count[digit] < wanted) wanted -= count[digit--];
        threshold |= digit << shift;
        mask |= digits << shift;
        top = shift - 1;
        if (count[digit] == wanted) break;  // every key with these bits gets a place: the rest need not be decided
    }
    std::int32_t taken = 0;
    for (std::int32_t i = 0; i < n; ++i) {
        const std::uint32_t bits = keys[i] & mask;
        if (bits > threshold || (bits == threshold && wanted-- > 0)) order[static_cast<std::size_t>(taken++)] = i;
    }
    return taken;
}

}  // namespace kvsparse::detail::pages
