#pragma once
// Quest's upper-bound page scores with AVX-512 or AVX2 (and F16C for float16 bounds), the same numbers bit
// for bit as detail::pages::page_scores_portable: element d goes to lane d % 8, each lane adds in order of d the term
// max(q_d * kmax_d, q_d * kmin_d) (a product, a product, a max, an add: no FMA, no reassociation), and
// U = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), which is exactly what the hadd tree of sum8x8
// computes. Rows aggregate in row order as there. Up to eight query rows share each page's widened bounds.
//
// page_scores_simd returns false (and does nothing) where it does not apply: not x86, no AVX2/F16C, or a
// head dimension that is not a multiple of 8. The caller then runs the portable loop. AVX-512 needs a
// multiple of 16.

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

#include "kvsparse/detail/cpu_attention.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::detail::cpu {

#if KVSPARSE_CPU_X86

/// Scores of page `page` for `Rows` (1..8) query rows at `q`: lane r of the result is row r's U.
template <int Rows, storage_type T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 page_rows(const T* lo_page, const T* hi_page, const float* q,
                                                                 std::size_t dim) {
    __m256 acc[8];
    for (__m256& a : acc) a = _mm256_setzero_ps();
    for (std::size_t d = 0; d < dim; d += 8) {
        const __m256 lo = load8(lo_page + d);
        const __m256 hi = load8(hi_page + d);
        for (int r = 0; r < Rows; ++r) {
            const __m256 qv = _mm256_loadu_ps(q + static_cast<std::size_t>(r) * dim + d);
            acc[r] = _mm256_add_ps(acc[r], _mm256_max_ps(_mm256_mul_ps(qv, hi), _mm256_mul_ps(qv, lo)));
        }
    }
    return sum8x8(acc);
}

template <storage_type T>
__attribute__((target("avx2,fma,f16c"))) void page_scores_avx2(const KeyBounds<const T>& bounds, std::int32_t pages,
                                                               const float* queries, std::size_t rows,
                                                               GqaAggregation mode, float* scores) {
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    const std::size_t page_bytes = 2 * dim * sizeof(T);
    const std::int32_t ahead = static_cast<std::int32_t>(prefetch_rows(page_bytes));  // about 4 KiB ahead
    for (std::int32_t i = 0; i < pages; ++i) {
        const T* lo = bounds.kmin(i);
        const T* hi = bounds.kmax(i);
        if (i + ahead < pages) prefetch_row(bounds.kmin(i + ahead), page_bytes);
        float aggregate = mode == GqaAggregation::sum ? 0.0f : -std::numeric_limits<float>::infinity();
        for (std::size_t r0 = 0; r0 < rows; r0 += 8) {
            const std::size_t nb = rows - r0 < 8 ? rows - r0 : 8;
            const float* q = queries + r0 * dim;
            __m256 u8;
            switch (nb) {
                case 1: u8 = page_rows<1>(lo, hi, q, dim); break;
                case 2: u8 = page_rows<2>(lo, hi, q, dim); break;
                case 3: u8 = page_rows<3>(lo, hi, q, dim); break;
                case 4: u8 = page_rows<4>(lo, hi, q, dim); break;
                case 5: u8 = page_rows<5>(lo, hi, q, dim); break;
                case 6: u8 = page_rows<6>(lo, hi, q, dim); break;
                case 7: u8 = page_rows<7>(lo, hi, q, dim); break;
                default: u8 = page_rows<8>(lo, hi, q, dim); break;
            }
            alignas(32) float u[8];
            _mm256_store_ps(u, u8);
            for (std::size_t r = 0; r < nb; ++r) {
                if (mode == GqaAggregation::per_query_head) {
                    scores[(r0 + r) * static_cast<std::size_t>(pages) + static_cast<std::size_t>(i)] = u[r];
                } else if (mode == GqaAggregation::sum) {
                    aggregate += u[r];
                } else {
                    aggregate = u[r] > aggregate ? u[r] : aggregate;
                }
            }
        }
        if (mode != GqaAggregation::per_query_head) scores[static_cast<std::size_t>(i)] = aggregate;
    }
}

/// AVX-512: the products and maxima sixteen lanes at a time; the sums still eight lanes wide, the lower
/// half of each sixteen elements first, so that lane d % 8 adds in order of d as above.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 intrinsics, see cpu_attention.hpp
#endif

template <int Rows, storage_type T>
__attribute__((target("avx512f,avx2,fma,f16c"))) inline __m256 page_rows16(const T* lo_page, const T* hi_page,
                                                                           const float* q, std::size_t dim) {
    __m256 acc[8];
    for (__m256& a : acc) a = _mm256_setzero_ps();
    for (std::size_t d = 0; d < dim; d += 16) {
        const __m512 lo = load16(lo_page + d);
        const __m512 hi = load16(hi_page + d);
        for (int r = 0; r < Rows; ++r) {
            const __m512 qv = _mm512_loadu_ps(q + static_cast<std::size_t>(r) * dim + d);
            const __m512 term = _mm512_max_ps(_mm512_mul_ps(qv, hi), _mm512_mul_ps(qv, lo));
            acc[r] = _mm256_add_ps(acc[r], _mm512_castps512_ps256(term));
            acc[r] = _mm256_add_ps(acc[r], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(term), 1)));
        }
    }
    return sum8x8(acc);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <storage_type T>
__attribute__((target("avx512f,avx2,fma,f16c"))) void page_scores_avx512(const KeyBounds<const T>& bounds,
                                                                         std::int32_t pages, const float* queries,
                                                                         std::size_t rows, GqaAggregation mode,
                                                                         float* scores) {
    const std::size_t dim = static_cast<std::size_t>(bounds.head_dim);
    const std::size_t page_bytes = 2 * dim * sizeof(T);
    const std::int32_t ahead = static_cast<std::int32_t>(prefetch_rows(page_bytes));  // about 4 KiB ahead
    for (std::int32_t i = 0; i < pages; ++i) {
        const T* lo = bounds.kmin(i);
        const T* hi = bounds.kmax(i);
        if (i + ahead < pages) prefetch_row(bounds.kmin(i + ahead), page_bytes);
        float aggregate = mode == GqaAggregation::sum ? 0.0f : -std::numeric_limits<float>::infinity();
        for (std::size_t r0 = 0; r0 < rows; r0 += 8) {
            const std::size_t nb = rows - r0 < 8 ? rows - r0 : 8;
            const float* q = queries + r0 * dim;
            __m256 u8;
            switch (nb) {
                case 1: u8 = page_rows16<1>(lo, hi, q, dim); break;
                case 2: u8 = page_rows16<2>(lo, hi, q, dim); break;
                case 3: u8 = page_rows16<3>(lo, hi, q, dim); break;
                case 4: u8 = page_rows16<4>(lo, hi, q, dim); break;
                case 5: u8 = page_rows16<5>(lo, hi, q, dim); break;
                case 6: u8 = page_rows16<6>(lo, hi, q, dim); break;
                case 7: u8 = page_rows16<7>(lo, hi, q, dim); break;
                default: u8 = page_rows16<8>(lo, hi, q, dim); break;
            }
            alignas(32) float u[8];
            _mm256_store_ps(u, u8);
            for (std::size_t r = 0; r < nb; ++r) {
                if (mode == GqaAggregation::per_query_head) {
                    scores[(r0 + r) * static_cast<std::size_t>(pages) + static_cast<std::size_t>(i)] = u[r];
                } else if (mode == GqaAggregation::sum) {
                    aggregate += u[r];
                } else {
                    aggregate = u[r] > aggregate ? u[r] : aggregate;
                }
            }
        }
        if (mode != GqaAggregation::per_query_head) scores[static_cast<std::size_t>(i)] = aggregate;
    }
}

#endif  // KVSPARSE_CPU_X86

/// Page scores as detail::pages::page_scores_portable computes them, vectorized with the widest instruction
/// set this CPU has, up to `widest` (tests ask for each); false when there is none for this CPU or shape
/// (nothing is written then).
template <class T>
bool page_scores_simd(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries, std::int32_t rows,
                      GqaAggregation mode, std::span<float> scores, Isa widest = Isa::avx512) {
#if KVSPARSE_CPU_X86
    using Stored = std::remove_const_t<T>;
    if (widest == Isa::portable || bounds.head_dim % 8 != 0 || rows <= 0 || !has_avx2_fma_f16c()) return false;
    const KeyBounds<const Stored> view{bounds.data, bounds.pages, bounds.page_size, bounds.head_dim, bounds.page_stride};
    if (widest == Isa::avx512 && bounds.head_dim % 16 == 0 && has_avx512f()) {
        page_scores_avx512<Stored>(view, pages, queries.data(), static_cast<std::size_t>(rows), mode, scores.data());
    } else {
        page_scores_avx2<Stored>(view, pages, queries.data(), static_cast<std::size_t>(rows), mode, scores.data());
    }
    return true;
#else
    (void)bounds, (void)pages, (void)queries, (void)rows, (void)mode, (void)scores, (void)widest;
    return false;
#endif
}

}  // namespace kvsparse::detail::cpu
