#pragma once
// What an append does to each stored element: float32 rows narrowed to the storage type (CpuBackend::write)
// and stored keys folded into their page's bounds (update_key_bounds). For float16, F16C does eight
// elements at a time where the CPU has it (asked once, as for the attention); elsewhere, and for bfloat16
// and float32, plain loops over dtype.hpp's conversions. Both give those conversions' bits exactly:
// F16C rounds to nearest even as half::from_float does, and where it would keep a NaN's payload the lane
// is set to the one quiet NaN of its sign that half::from_float makes of every NaN. The bounds compare
// widened values and keep the stored bits, so the fold is fold_key_bound's, NaN and signed zeros included.

#include <cstddef>
#include <cstring>
#include <type_traits>

#include "kvsparse/detail/cpu_attention.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::detail::cpu {

#if KVSPARSE_CPU_X86

/// The eight 32-bit lane masks of `mask` (all ones or zero) as eight 16-bit ones.
KVSPARSE_AVX2 inline __m128i mask16(__m256 mask) {
    const __m256i m = _mm256_castps_si256(mask);
    return _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
}

KVSPARSE_AVX2 inline void narrow_f16c(const float* src, half* dst, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m128i quiet_nan = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))), _mm_set1_epi16(0x7e00));
        const __m128i out = _mm_blendv_epi8(h, quiet_nan, mask16(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), out);
    }
    for (; i < n; ++i) dst[i] = from_float<half>(src[i]);
}

KVSPARSE_AVX2 inline void fold_f16c(half* lo, half* hi, const half* stored, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(stored + i));
        const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + i));
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + i));
        const __m256 x = _mm256_cvtph_ps(s);
        const __m128i below = mask16(_mm256_cmp_ps(x, _mm256_cvtph_ps(l), _CMP_LT_OQ));  // false for NaN, as <
        const __m128i above = mask16(_mm256_cmp_ps(x, _mm256_cvtph_ps(h), _CMP_GT_OQ));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i), _mm_blendv_epi8(l, s, below));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i), _mm_blendv_epi8(h, s, above));
    }
    for (; i < n; ++i) fold_key_bound(lo[i], hi[i], stored[i], false);
}

#endif  // KVSPARSE_CPU_X86

/// dst[i] = from_float<T>(src[i]) for i < n, bit for bit.
template <storage_type T>
void narrow(const float* src, T* dst, std::size_t n) {
#if KVSPARSE_CPU_X86
    if constexpr (std::is_same_v<T, half>) {
        if (has_avx2_fma_f16c()) {
            narrow_f16c(src, dst, n);
            return;
        }
    }
#endif
    for (std::size_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

/// fold_key_bound(lo[i], hi[i], stored[i], first) for i < n, bit for bit.
template <storage_type T>
void fold_bounds(T* lo, T* hi, const T* stored, std::size_t n, bool first) {
    if (first) {
        std::memcpy(lo, stored, n * sizeof(T));
        std::memcpy(hi, stored, n * sizeof(T));
        return;
    }
#if KVSPARSE_CPU_X86
    if constexpr (std::is_same_v<T, half>) {
        if (has_avx2_fma_f16c()) {
            fold_f16c(lo, hi, stored, n);
            return;
        }
    }
#endif
    for (std::size_t i = 0; i < n; ++i) fold_key_bound(lo[i], hi[i], stored[i], false);
}

}  // namespace kvsparse::detail::cpu
