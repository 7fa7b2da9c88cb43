#pragma once
// Quest's upper-bound page scores with AVX-512 or AVX2 (and F16C for float16 bounds): a run of pages scored
// for up to eight query rows, which share each page's widened bounds. The same numbers bit for bit as
// detail::pages::page_rows_portable, which defines the order: element d is added to lane d % 16 in order
// of d by page_score_add (a select by q_d's sign bit and a fused multiply-add); then lane j and j + 8
// are added, and the eight sums are combined as ((h0 + h1) + (h2 + h3)) + ((h4 + h5) + (h6 + h7)), which
// is what the hadd tree of sum8x8 computes.
//
// page_rows_simd gives the kernels for this CPU and head dimension, or nullptr where none applies: not
// x86, no AVX2/F16C, or a head dimension that is not a multiple of 8 (AVX-512: of 16, and at most 512).

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kvsparse/detail/cpu_attention.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::detail::cpu {

/// Scores of pages [first, first + count) of `bounds` for the query rows [Rows][head_dim] at q, into
/// u[(page - first) * Rows + r]; kernels come as a table indexed by Rows - 1.
template <storage_type T>
using PageRows = void (*)(const KeyBounds<const T>& bounds, std::int32_t first, std::int32_t count, const float* q, float* u);
constexpr std::size_t page_rows_batch = 8;

/// How far ahead of the page being scored its stream's bounds are asked for.
inline constexpr std::size_t bounds_ahead_bytes = 8192;

/// Asks for the bounds of the page bounds_ahead_bytes after `page`, if the stream has one: non-temporally,
/// as each step reads them once. The bounds are one sequential run, but the hardware prefetchers alone
/// keep too few of its lines in flight: with this, the two-core Quest step at 32K runs 3-9% faster (4 to
/// 16 KiB ahead) and one core scores a head's 2048 pages in 33-36 us instead of 43-48. (A day earlier, on
/// the same virtual machine, it had made the two-core step 5% slower: docs/benchmarks.md.) Always inlined
/// (see prefetch_row).
template <storage_type T>
[[gnu::always_inline]] inline void prefetch_bounds(const KeyBounds<const T>& bounds, std::int32_t page) {
    const std::size_t page_bytes = static_cast<std::size_t>(bounds.page_stride) * sizeof(T);
    const auto ahead = static_cast<std::int32_t>(std::max<std::size_t>(1, bounds_ahead_bytes / page_bytes));
    if (page + ahead < bounds.pages) prefetch_row<0>(bounds.kmin(page + ahead), 2 * static_cast<std::size_t>(bounds.head_dim) * sizeof(T));
}

#if KVSPARSE_CPU_X86

// Both kernels score Group consecutive pages for Rows rows at once, so that one sum8x8 reduces their
// Rows * Group sums: up to eight with AVX-512; AVX2, with half the registers and two per sum, groups
// pages only while that makes at most four.

/// page_score_add on eight elements: kmin where q's sign bit is set, else kmax.
KVSPARSE_AVX2 inline __m256 add_terms(__m256 acc, __m256 qv, __m256 lo, __m256 hi) {
    return _mm256_fmadd_ps(qv, _mm256_blendv_ps(hi, lo, qv), acc);
}

template <int Rows, int Group, storage_type T>
KVSPARSE_AVX2 inline void page_group_avx2(const KeyBounds<const T>& bounds, std::int32_t page, const float* q, float* u) {
    constexpr int sums = Rows * Group;
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    __m256 low[8], high[sums];  // lanes 0-7 and 8-15 of each sum
    KVSPARSE_UNROLL
    for (int j = 0; j < 8; ++j) low[j] = _mm256_setzero_ps();
    KVSPARSE_UNROLL
    for (int j = 0; j < sums; ++j) high[j] = _mm256_setzero_ps();
    KVSPARSE_UNROLL
    for (int g = 0; g < Group; ++g) {
        const T* kmin = bounds.kmin(page + g);
        const T* kmax = kmin + dim;
        std::size_t d = 0;
        for (; d + 16 <= dim; d += 16) {
            const __m256 lo0 = load8(kmin + d), hi0 = load8(kmax + d);
            const __m256 lo1 = load8(kmin + d + 8), hi1 = load8(kmax + d + 8);
            KVSPARSE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                const float* qr = q + static_cast<std::size_t>(r) * dim + d;
                low[g * Rows + r] = add_terms(low[g * Rows + r], _mm256_loadu_ps(qr), lo0, hi0);
                high[g * Rows + r] = add_terms(high[g * Rows + r], _mm256_loadu_ps(qr + 8), lo1, hi1);
            }
        }
        if (d < dim) {  // dim % 16 == 8: the last eight elements go to lanes 0-7
            const __m256 lo0 = load8(kmin + d), hi0 = load8(kmax + d);
            KVSPARSE_UNROLL
            for (int r = 0; r < Rows; ++r)
                low[g * Rows + r] = add_terms(low[g * Rows + r], _mm256_loadu_ps(q + static_cast<std::size_t>(r) * dim + d), lo0, hi0);
        }
    }
    KVSPARSE_UNROLL
    for (int j = 0; j < sums; ++j) low[j] = _mm256_add_ps(low[j], high[j]);
    alignas(32) float all[8];
    _mm256_store_ps(all, sum8x8(low));
    KVSPARSE_UNROLL
    for (int j = 0; j < sums; ++j) u[j] = all[j];
}

template <int Rows, storage_type T>
KVSPARSE_AVX2 void page_rows_avx2(const KeyBounds<const T>& bounds, std::int32_t first, std::int32_t count, const float* q, float* u) {
    constexpr int group = Rows > 2 ? 1 : 4 / Rows;
    std::int32_t i = 0;
    for (; i + group <= count; i += group) {
        for (int g = 0; g < group; ++g) prefetch_bounds(bounds, first + i + g);
        page_group_avx2<Rows, group>(bounds, first + i, q, u + i * Rows);
    }
    for (; i < count; ++i) page_group_avx2<Rows, 1>(bounds, first + i, q, u + i * Rows);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 intrinsics, see cpu_attention.hpp
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

/// Head dimensions up to this many elements take the AVX-512 path (the sign masks of the query rows are
/// kept on the stack).
constexpr std::int32_t avx512_page_rows_max_dim = 512;

template <int Rows, int Group, storage_type T>
KVSPARSE_AVX512 inline void page_group_avx512(const KeyBounds<const T>& bounds, std::int32_t page, const float* q,
                                              const __mmask16* negative, float* u) {
    constexpr int sums = Rows * Group;
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    __m512 acc[sums];  // lanes 0-15 of each sum
    KVSPARSE_UNROLL
    for (int j = 0; j < sums; ++j) acc[j] = _mm512_setzero_ps();
    // Chunk by chunk, each query chunk loaded once for the group's pages (every sum still adds its
    // chunks in order of d).
    for (std::size_t d = 0, c = 0; d < dim; d += 16, ++c) {
        __m512 qv[Rows];
        KVSPARSE_UNROLL
        for (int r = 0; r < Rows; ++r) qv[r] = _mm512_loadu_ps(q + static_cast<std::size_t>(r) * dim + d);
        KVSPARSE_UNROLL
        for (int g = 0; g < Group; ++g) {
            const T* kmin = bounds.kmin(page + g);
            const __m512 lo = load16(kmin + d), hi = load16(kmin + dim + d);
            KVSPARSE_UNROLL
            for (int r = 0; r < Rows; ++r) {
                const __m512 bound = _mm512_mask_blend_ps(negative[static_cast<std::size_t>(r) * (dim / 16) + c], hi, lo);
                acc[g * Rows + r] = _mm512_fmadd_ps(qv[r], bound, acc[g * Rows + r]);
            }
        }
    }
    KVSPARSE_UNROLL
    for (int j0 = 0; j0 < sums; j0 += 8) {  // eight sums per tree
        __m256 folded[8];
        KVSPARSE_UNROLL
        for (int j = 0; j < 8; ++j) folded[j] = j0 + j < sums ? fold16(acc[j0 + j]) : _mm256_setzero_ps();
        alignas(32) float all[8];
        _mm256_store_ps(all, sum8x8(folded));
        for (int j = 0; j < 8 && j0 + j < sums; ++j) u[j0 + j] = all[j];
    }
}

template <int Rows, storage_type T>
KVSPARSE_AVX512 void page_rows_avx512(const KeyBounds<const T>& bounds, std::int32_t first, std::int32_t count, const float* q, float* u) {
    // Which elements of each row are negative (their sign bit), once for all pages.
    constexpr std::size_t max_chunks = avx512_page_rows_max_dim / 16;
    const std::size_t chunks = static_cast<std::size_t>(bounds.head_dim) / 16;
    __mmask16 negative[Rows * max_chunks];
    for (std::size_t j = 0; j < Rows * chunks; ++j)
        negative[j] = _mm512_cmplt_epi32_mask(_mm512_castps_si512(_mm512_loadu_ps(q + 16 * j)), _mm512_setzero_si512());
    constexpr int group = Rows > 4 ? 1 : 16 / Rows;  // pages sharing each query chunk: up to 16 sums
    std::int32_t i = 0;
    for (; i + group <= count; i += group) {
        for (int g = 0; g < group; ++g) prefetch_bounds(bounds, first + i + g);
        page_group_avx512<Rows, group>(bounds, first + i, q, negative, u + i * Rows);
    }
    for (; i < count; ++i) page_group_avx512<Rows, 1>(bounds, first + i, q, negative, u + i * Rows);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <storage_type T>
inline constexpr PageRows<T> avx2_page_rows[page_rows_batch] = {
    page_rows_avx2<1, T>, page_rows_avx2<2, T>, page_rows_avx2<3, T>, page_rows_avx2<4, T>,
    page_rows_avx2<5, T>, page_rows_avx2<6, T>, page_rows_avx2<7, T>, page_rows_avx2<8, T>};

template <storage_type T>
inline constexpr PageRows<T> avx512_page_rows[page_rows_batch] = {
    page_rows_avx512<1, T>, page_rows_avx512<2, T>, page_rows_avx512<3, T>, page_rows_avx512<4, T>,
    page_rows_avx512<5, T>, page_rows_avx512<6, T>, page_rows_avx512<7, T>, page_rows_avx512<8, T>};

#endif  // KVSPARSE_CPU_X86

/// The page-score kernels with the widest instruction set this CPU has for head dimension `dim`, up to
/// `widest` (tests ask for each); nullptr when none applies.
template <storage_type T>
const PageRows<T>* page_rows_simd(std::int32_t dim, Isa widest) {
#if KVSPARSE_CPU_X86
    if (widest == Isa::portable || dim % 8 != 0 || !has_avx2_fma_f16c()) return nullptr;
    if (widest == Isa::avx512 && dim % 16 == 0 && dim <= avx512_page_rows_max_dim && has_avx512f()) return avx512_page_rows<T>;
    return avx2_page_rows<T>;
#else
    (void)dim, (void)widest;
    return nullptr;
#endif
}

}  // namespace kvsparse::detail::cpu
