#pragma once
// The CPU attention kernel behind CpuBackend::attend: the query heads of one KV head over a gathered set
// of slots, in two passes over memory (keys, then values), each K/V row widened once and shared by the
// whole group.
//
// Three implementations of the same plan, the widest the CPU runs taken (cpuid, asked once):
//  - AVX-512F (head_dim % 16 == 0) and AVX2 + FMA + F16C (head_dim % 8 == 0; also the in-cache RoPE
//    path): float16 and bfloat16 rows are widened in registers (vcvtph2ps, or a 16-bit shift), dot
//    products run eight accumulators wide (two keys times four query heads), the exponentials are a
//    vectorized polynomial, and the value pass keeps a block of rows in L1 while it walks the head
//    dimension with the strips of four heads in registers. Rows 4 KiB ahead are prefetched. A header
//    cannot choose the compiler's -march, so these functions carry their own target attributes and are
//    only entered when the CPU has the features.
//  - portable C++ everywhere else (and under nvcc): the same steps as plain loops that GCC and clang
//    vectorize with the baseline instruction set, a branch-free float16 widening included.
// All are deterministic: a call's arithmetic does not depend on threads or timing. They differ from each
// other (and from a naive loop) by float rounding only.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "kvsparse/concepts.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

#if !defined(__CUDACC__) && (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KVSPARSE_CPU_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define KVSPARSE_CPU_X86 0
#endif

namespace kvsparse::detail::cpu {

// ---- addressing --------------------------------------------------------------------------------------

/// Row addresses of one stream's keys or values: slot -> pointer without a division when the page size
/// is a power of two (it always is in KVCache; engine views may differ).
template <class T>
struct Rows {
    const T* data;
    const std::int32_t* pages;
    std::int64_t page_stride;
    std::int64_t token_stride;
    std::int64_t head_offset;
    std::int32_t page_size;
    std::int32_t shift;  // log2(page_size), or -1

    Rows(const PagePoolView<T>& pool, const PageTableView& table, std::int32_t head)
        : data(pool.data),
          pages(table.pages),
          page_stride(pool.page_stride),
          token_stride(pool.token_stride),
          head_offset(std::int64_t{head} * pool.head_stride),
          page_size(pool.page_size),
          shift(std::has_single_bit(static_cast<std::uint32_t>(pool.page_size))
                    ? std::countr_zero(static_cast<std::uint32_t>(pool.page_size))
                    : -1) {}

    const T* operator()(std::int32_t slot) const {
        std::int32_t page_index, token;
        if (shift >= 0) {
            page_index = slot >> shift;
            token = slot & (page_size - 1);
        } else {
            page_index = slot / page_size;
            token = slot % page_size;
        }
        return data + std::int64_t{pages[page_index]} * page_stride + std::int64_t{token} * token_stride + head_offset;
    }
};

template <class T>
inline void prefetch_row(const T* row, std::size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    const char* p = reinterpret_cast<const char*>(row);
    for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
#else
    (void)row;
    (void)bytes;
#endif
}

/// Rows requested ahead of use: about 4 KiB. The hardware prefetchers stop at 4 KiB memory pages, and
/// cache pages need not be adjacent; with shuffled pages this doubles the rate, with adjacent ones it
/// costs nothing measurable.
inline std::size_t prefetch_rows(std::size_t row_bytes) { return std::max<std::size_t>(4, 4096 / row_bytes); }

/// Bytes of this core's L2 cache (sysconf where the C library knows it, else 1 MiB), asked once.
inline std::size_t l2_bytes() {
    static const std::size_t bytes = [] {
        long reported = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
        reported = ::sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        return reported > 0 ? static_cast<std::size_t>(reported) : std::size_t{1} << 20;
    }();
    return bytes;
}

/// Whether the score pass also fetches the value rows (into L2) while it reads the keys: when the set's
/// values fit in half the L2, the value pass then finds them there, and the two streams of scattered
/// pages overlap (Quest's selected pages: 10-15% faster). For larger sets they would be evicted again.
inline bool prefetch_values_early(std::size_t n, std::size_t row_bytes) { return n * row_bytes <= l2_bytes() / 2; }

template <class T>
inline void prefetch_row_l2(const T* row, std::size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    const char* p = reinterpret_cast<const char*>(row);
    for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
#else
    (void)row;
    (void)bytes;
#endif
}

// ---- scalar pieces shared by both paths ----------------------------------------------------------------

/// exp(x) for x <= 0 (softmax arguments): Cody-Waite range reduction around the nearest integer n of
/// x * log2(e) and a degree-6 polynomial (Cephes' coefficients), within 2 ulp of the exact value; 0 below
/// the smallest normal float. No branches, calls or floating-point comparisons (which, as they may trap,
/// keep GCC from vectorizing), so the portable loop vectorizes; fine under -ffast-math too (n is read
/// from the bits of a sum the compiler must form, its float value converted back from the integer).
inline float exp_nonpositive(float x) {
    constexpr std::uint32_t lowest = 0xc2aeac50u;  // -87.33654f: exp(lowest) = 2^-126
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const bool below = bits > lowest;  // x < lowest, as x <= 0 (+0 and -0 are kept)
    bits = below ? lowest : bits;
    std::memcpy(&x, &bits, sizeof x);
    const float shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
    std::int32_t n;
    std::memcpy(&n, &shifted, sizeof n);
    n -= 0x4b400000;
    const float fn = static_cast<float>(n);
    const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const std::uint32_t scale_bits = static_cast<std::uint32_t>(n + 127) << 23;
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    const float result = y * scale;
    std::uint32_t out;
    std::memcpy(&out, &result, sizeof out);
    out &= below ? 0u : ~0u;
    float value;
    std::memcpy(&value, &out, sizeof value);
    return value;
}

/// float16 bits to float, exactly, without branches: subnormals are normalized by a float subtraction
/// (whose result is used only for them, so NaN payloads pass untouched).
inline float half_bits_to_float(std::uint16_t h) {
    const std::uint32_t magnitude = static_cast<std::uint32_t>(h & 0x7fffu) << 13;
    const std::uint32_t exponent = magnitude & 0x0f800000u;
    std::uint32_t bits = magnitude + 0x38000000u;                      // rebias 15 -> 127
    bits += (exponent == 0x0f800000u) ? 0x38000000u : 0u;              // inf / NaN: exponent to 255
    float tiny;                                                        // zero or subnormal: 2^-14 * (1 + m) - 2^-14
    const std::uint32_t tiny_bits_in = magnitude + 0x38800000u;
    std::memcpy(&tiny, &tiny_bits_in, sizeof tiny);
    tiny -= 6.103515625e-05f;
    std::uint32_t tiny_bits;
    std::memcpy(&tiny_bits, &tiny, sizeof tiny_bits);
    const std::uint32_t out = (exponent == 0 ? tiny_bits : bits) | (static_cast<std::uint32_t>(h & 0x8000u) << 16);
    float result;
    std::memcpy(&result, &out, sizeof result);
    return result;
}

template <storage_type T>
inline float widen(T x) {
    if constexpr (std::is_same_v<T, half>) {
        return half_bits_to_float(x.bits);
    } else {
        return to_float(x);
    }
}

/// Turns of the in-cache key rotation, cached per run of equal deltas (see attend).
struct Turns {
    float* cosines;
    float* sines;
    bool have = false;
    std::int32_t delta = 0;

    /// Rotate the widened key `key[dim]` by `delta` positions, bit for bit as rope_rotate does.
    void rotate(float* key, std::int32_t dim, std::int32_t by, Rope rope) {
        const std::int32_t pairs = dim / 2;
        if (!have || by != delta) {
            for (std::int32_t p = 0; p < pairs; ++p) {
                const RopeTurn turn = rope_turn(p, dim, by, rope.theta);
                cosines[p] = turn.c;
                sines[p] = turn.s;
            }
            have = true;
            delta = by;
        }
        for (std::int32_t p = 0; p < pairs; ++p) {
            float& xa = key[rope_first(rope.style, p)];
            float& xb = key[rope_second(rope.style, p, dim)];
            rope_apply(xa, xb, RopeTurn{cosines[p], sines[p]});
        }
    }
};

/// The scratch of one call, carved from the caller's workspace (CpuBackend::workspace_bytes).
struct Scratch {
    float* scores;  // [group][n]
    float* key;     // [dim]
    Turns turns;
};

inline Scratch carve(std::span<std::byte> workspace, std::size_t group, std::size_t n, std::size_t dim) {
    float* scores = reinterpret_cast<float*>(workspace.data());
    float* key = scores + group * n;
    return Scratch{scores, key, Turns{key + dim, key + dim + dim / 2}};
}

// ---- portable path -----------------------------------------------------------------------------------

template <storage_type T>
void attend_portable(const AttendArgs<T>& a, Scratch s) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const Rows<T> keys(a.stream.keys, a.stream.table, a.stream.head);
    const Rows<T> values(a.stream.values, a.stream.table, a.stream.head);
    float* key = s.key;

    // Pass 1: scores; eight partial sums per dot product, added in a fixed order.
    for (std::size_t j = 0; j < n; ++j) {
        const T* k = keys(a.slots[j]);
        for (std::size_t d = 0; d < dim; ++d) key[d] = widen(k[d]);
        if (!a.key_rotation.empty()) s.turns.rotate(key, static_cast<std::int32_t>(dim), a.key_rotation[j], a.rope);
        for (std::size_t g = 0; g < group; ++g) {
            const float* q = a.queries.data() + g * dim;
            float partial[8] = {};
            std::size_t d = 0;
            for (; d + 8 <= dim; d += 8) {
                for (std::size_t l = 0; l < 8; ++l) partial[l] += q[d + l] * key[d + l];
            }
            for (; d < dim; ++d) partial[d % 8] += q[d] * key[d];
            const float dot = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                              ((partial[4] + partial[5]) + (partial[6] + partial[7]));
            s.scores[g * n + j] = dot * a.scale;
        }
    }
    // Softmax per query head.
    for (std::size_t g = 0; g < group; ++g) {
        float* row = s.scores + g * n;
        const float top = *std::max_element(row, row + n);
        for (std::size_t j = 0; j < n; ++j) row[j] = exp_nonpositive(row[j] - top);
        float partial[8] = {};
        std::size_t j = 0;
        for (; j + 8 <= n; j += 8) {
            for (std::size_t l = 0; l < 8; ++l) partial[l] += row[j + l];
        }
        for (; j < n; ++j) partial[j % 8] += row[j];
        const float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                          ((partial[4] + partial[5]) + (partial[6] + partial[7]));
        const float inverse = 1.0f / sum;
        for (std::size_t i = 0; i < n; ++i) row[i] *= inverse;
    }
    // Pass 2: weighted values.
    for (std::size_t j = 0; j < n; ++j) {
        const T* v = values(a.slots[j]);
        for (std::size_t d = 0; d < dim; ++d) key[d] = widen(v[d]);
        for (std::size_t g = 0; g < group; ++g) {
            const float p = s.scores[g * n + j];
            float* o = a.out.data() + g * dim;
            for (std::size_t d = 0; d < dim; ++d) o[d] += p * key[d];
        }
    }
}

// ---- x86: AVX2 + FMA + F16C ---------------------------------------------------------------------------

#if KVSPARSE_CPU_X86

// Function attributes of the vectorized paths (also used by detail/cpu_page_scores_simd.hpp).
#define KVSPARSE_AVX2 __attribute__((target("avx2,fma,f16c")))

/// Whether this CPU (and its OS) runs the AVX2 path: AVX2, FMA and F16C, with YMM state saved by the OS.
/// Asked once, with cpuid (clang's __builtin_cpu_supports does not know "f16c").
inline bool has_avx2_fma_f16c() {
    static const bool yes = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
        const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, f16c = (c >> 29) & 1u;
        if (!(fma && osxsave && avx && f16c)) return false;
        unsigned xcr0 = 0, xcr0_high = 0;
        __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
        if ((xcr0 & 6u) != 6u) return false;  // XMM and YMM state
        if (__get_cpuid_max(0, nullptr) < 7) return false;
        __cpuid_count(7, 0, a, b, c, d);
        return ((b >> 5) & 1u) != 0;  // AVX2
    }();
    return yes;
}

/// Eight stored elements widened to float, in registers.
template <storage_type T>
KVSPARSE_AVX2 inline __m256 load8(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm256_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, half>) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
}

/// Lane i of the result is the sum of the lanes of a[i].
KVSPARSE_AVX2 inline __m256 sum8x8(const __m256 (&a)[8]) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
    const __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
    const __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23);
    const __m256 s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

KVSPARSE_AVX2 inline float sum8(__m256 v) {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

/// exp(x) for x <= 0, eight lanes; the same reduction and polynomial as exp_nonpositive.
KVSPARSE_AVX2 inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33654f);
    const __m256 zero = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lowest);
    const __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i n = _mm256_cvtps_epi32(fn);
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(zero, _mm256_mul_ps(y, scale));
}

/// Scores of up to four query heads (`heads`, from `q`) against keys k0 and k1: eight independent
/// accumulators over the head dimension. Lane 2h+i of the result is head h's dot with key i.
template <int Heads, class K>
KVSPARSE_AVX2 inline __m256 dots(const float* q, std::size_t dim, const K* k0, const K* k1) {
    __m256 acc[8];
    for (__m256& x : acc) x = _mm256_setzero_ps();
    for (std::size_t d = 0; d < dim; d += 8) {
        const __m256 x0 = load8(k0 + d);
        const __m256 x1 = load8(k1 + d);
        for (int h = 0; h < Heads; ++h) {
            const __m256 qv = _mm256_loadu_ps(q + static_cast<std::size_t>(h) * dim + d);
            acc[2 * h] = _mm256_fmadd_ps(qv, x0, acc[2 * h]);
            acc[2 * h + 1] = _mm256_fmadd_ps(qv, x1, acc[2 * h + 1]);
        }
    }
    return sum8x8(acc);
}

template <class K>
KVSPARSE_AVX2 inline __m256 dots_for(std::size_t heads, const float* q, std::size_t dim, const K* k0, const K* k1) {
    switch (heads) {
        case 1: return dots<1>(q, dim, k0, k1);
        case 2: return dots<2>(q, dim, k0, k1);
        case 3: return dots<3>(q, dim, k0, k1);
        default: return dots<4>(q, dim, k0, k1);
    }
}

/// out[h][d0 .. d0 + 8*Width) += sum over the block's rows j of p[h][j] * v_j[...], for `Heads` heads.
template <int Heads, int Width, storage_type T>
KVSPARSE_AVX2 inline void accumulate(float* out, std::size_t dim, std::size_t d0, const T* const* rows,
                                     std::size_t count, const float* p, std::size_t n) {
    __m256 acc[Heads][Width];
    for (int h = 0; h < Heads; ++h)
        for (int w = 0; w < Width; ++w) acc[h][w] = _mm256_loadu_ps(out + static_cast<std::size_t>(h) * dim + d0 + 8 * w);
    for (std::size_t j = 0; j < count; ++j) {
        __m256 v[Width];
        for (int w = 0; w < Width; ++w) v[w] = load8(rows[j] + d0 + 8 * w);
        for (int h = 0; h < Heads; ++h) {
            const __m256 ph = _mm256_broadcast_ss(p + static_cast<std::size_t>(h) * n + j);
            for (int w = 0; w < Width; ++w) acc[h][w] = _mm256_fmadd_ps(ph, v[w], acc[h][w]);
        }
    }
    for (int h = 0; h < Heads; ++h)
        for (int w = 0; w < Width; ++w) _mm256_storeu_ps(out + static_cast<std::size_t>(h) * dim + d0 + 8 * w, acc[h][w]);
}

template <int Heads, storage_type T>
KVSPARSE_AVX2 inline void accumulate_block(float* out, std::size_t dim, const T* const* rows, std::size_t count,
                                           const float* p, std::size_t n) {
    std::size_t d = 0;
    for (; d + 16 <= dim; d += 16) accumulate<Heads, 2>(out, dim, d, rows, count, p, n);
    if (d < dim) accumulate<Heads, 1>(out, dim, d, rows, count, p, n);
}

/// Pass 1: scores, two keys at a time, each widened once for the whole group.
template <storage_type T>
KVSPARSE_AVX2 void score_pass_avx2(const AttendArgs<T>& a, Scratch s) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const Rows<T> keys(a.stream.keys, a.stream.table, a.stream.head);
    const Rows<T> values(a.stream.values, a.stream.table, a.stream.head);
    const std::size_t row_bytes = dim * sizeof(T);
    const std::size_t ahead = prefetch_rows(row_bytes);
    const bool values_early = prefetch_values_early(n, row_bytes);
    const __m256 scale = _mm256_set1_ps(a.scale);
    const bool rotate = !a.key_rotation.empty();
    for (std::size_t j = 0; j < std::min(ahead, n); ++j) {  // the first rows; the loop asks `ahead` rows on
        prefetch_row(keys(a.slots[j]), row_bytes);
        if (values_early) prefetch_row_l2(values(a.slots[j]), row_bytes);
    }
    for (std::size_t j = 0; j < n; j += 2) {
        const bool pair = j + 1 < n;
        const T* k0 = keys(a.slots[j]);
        const T* k1 = pair ? keys(a.slots[j + 1]) : k0;
        if (j + ahead + 1 < n) {
            prefetch_row(keys(a.slots[j + ahead]), row_bytes);
            prefetch_row(keys(a.slots[j + ahead + 1]), row_bytes);
            if (values_early) {
                prefetch_row_l2(values(a.slots[j + ahead]), row_bytes);
                prefetch_row_l2(values(a.slots[j + ahead + 1]), row_bytes);
            }
        }
        for (std::size_t g0 = 0; g0 < group; g0 += 4) {
            const std::size_t heads = std::min<std::size_t>(4, group - g0);
            const float* q = a.queries.data() + g0 * dim;
            alignas(32) float lanes[8];
            if (rotate) {
                // In-cache positions: widen and turn one key at a time (the rare path).
                for (std::size_t i = 0; i < (pair ? 2u : 1u); ++i) {
                    const T* k = i == 0 ? k0 : k1;
                    for (std::size_t d = 0; d < dim; d += 8) _mm256_storeu_ps(s.key + d, load8(k + d));
                    s.turns.rotate(s.key, static_cast<std::int32_t>(dim), a.key_rotation[j + i], a.rope);
                    alignas(32) float one[8];
                    _mm256_store_ps(one, _mm256_mul_ps(dots_for(heads, q, dim, s.key, s.key), scale));
                    for (std::size_t h = 0; h < heads; ++h) lanes[2 * h + i] = one[2 * h];
                }
            } else {
                _mm256_store_ps(lanes, _mm256_mul_ps(dots_for(heads, q, dim, k0, k1), scale));
            }
            for (std::size_t h = 0; h < heads; ++h) {
                float* row = s.scores + (g0 + h) * n + j;
                row[0] = lanes[2 * h];
                if (pair) row[1] = lanes[2 * h + 1];
            }
        }
    }
}

/// Softmax of every query head's scores: max, exponentials and their sum eight lanes at a time.
KVSPARSE_AVX2 inline void softmax_avx2(float* scores, std::size_t group, std::size_t n) {
    for (std::size_t g = 0; g < group; ++g) {
        float* row = scores + g * n;
        std::size_t j = 0;
        __m256 top8 = _mm256_set1_ps(row[0]);
        for (; j + 8 <= n; j += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + j));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, top8);
        float top = *std::max_element(lanes, lanes + 8);
        for (; j < n; ++j) top = std::max(top, row[j]);

        const __m256 shift = _mm256_set1_ps(top);
        __m256 total = _mm256_setzero_ps();
        j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
            _mm256_storeu_ps(row + j, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = sum8(total);
        for (; j < n; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
        }
        const float inverse = 1.0f / sum;
        const __m256 inverse8 = _mm256_set1_ps(inverse);
        j = 0;
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inverse8));
        for (; j < n; ++j) row[j] *= inverse;
    }
}

/// Pass 2: weighted values. A block of rows stays in L1 while the head dimension is walked in 16-float
/// strips, four query heads at a time (their strips live in registers).
template <storage_type T>
KVSPARSE_AVX2 void value_pass_avx2(const AttendArgs<T>& a, Scratch s) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const Rows<T> values(a.stream.values, a.stream.table, a.stream.head);
    const std::size_t row_bytes = dim * sizeof(T);
    constexpr std::size_t block = 32;
    const T* rows[block];
    for (std::size_t j0 = 0; j0 < n; j0 += block) {
        const std::size_t count = std::min(block, n - j0);
        for (std::size_t i = 0; i < count; ++i) rows[i] = values(a.slots[j0 + i]);
        for (std::size_t i = 0; i < count && j0 + block + i < n; ++i) prefetch_row(values(a.slots[j0 + block + i]), row_bytes);
        for (std::size_t g0 = 0; g0 < group; g0 += 4) {
            const std::size_t heads = std::min<std::size_t>(4, group - g0);
            float* out = a.out.data() + g0 * dim;
            const float* p = s.scores + g0 * n + j0;
            switch (heads) {
                case 1: accumulate_block<1>(out, dim, rows, count, p, n); break;
                case 2: accumulate_block<2>(out, dim, rows, count, p, n); break;
                case 3: accumulate_block<3>(out, dim, rows, count, p, n); break;
                default: accumulate_block<4>(out, dim, rows, count, p, n); break;
            }
        }
    }
}

// ---- x86: AVX-512 (sixteen lanes; head dimensions that are a multiple of 16) --------------------------

#define KVSPARSE_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused merge source, which its
// -Wmaybe-uninitialized reports once they are inlined here (GCC bug 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

/// Whether this CPU (and its OS) runs the AVX-512 path: AVX512F on top of the AVX2 path, with ZMM state
/// saved by the OS. Asked once.
inline bool has_avx512f() {
    static const bool yes = [] {
        if (!has_avx2_fma_f16c()) return false;
        unsigned xcr0 = 0, xcr0_high = 0;
        __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
        if ((xcr0 & 0xe6u) != 0xe6u) return false;  // XMM, YMM, opmask and both ZMM halves
        unsigned a = 0, b = 0, c = 0, d = 0;
        __cpuid_count(7, 0, a, b, c, d);
        return ((b >> 16) & 1u) != 0;  // AVX512F
    }();
    return yes;
}

/// Sixteen stored elements widened to float, in registers.
template <storage_type T>
KVSPARSE_AVX512 inline __m512 load16(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, half>) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
}

/// Lower plus upper eight lanes.
KVSPARSE_AVX512 inline __m256 fold16(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/// As dots, sixteen lanes wide: lane 2h+i of the result is head h's dot with key i.
template <int Heads, storage_type K>
KVSPARSE_AVX512 inline __m256 dots16(const float* q, std::size_t dim, const K* k0, const K* k1) {
    __m512 acc[8];
    for (__m512& x : acc) x = _mm512_setzero_ps();
    for (std::size_t d = 0; d < dim; d += 16) {
        const __m512 x0 = load16(k0 + d);
        const __m512 x1 = load16(k1 + d);
        for (int h = 0; h < Heads; ++h) {
            const __m512 qv = _mm512_loadu_ps(q + static_cast<std::size_t>(h) * dim + d);
            acc[2 * h] = _mm512_fmadd_ps(qv, x0, acc[2 * h]);
            acc[2 * h + 1] = _mm512_fmadd_ps(qv, x1, acc[2 * h + 1]);
        }
    }
    __m256 folded[8];
    for (int i = 0; i < 8; ++i) folded[i] = fold16(acc[i]);
    return sum8x8(folded);
}

template <storage_type K>
KVSPARSE_AVX512 inline __m256 dots16_for(std::size_t heads, const float* q, std::size_t dim, const K* k0, const K* k1) {
    switch (heads) {
        case 1: return dots16<1>(q, dim, k0, k1);
        case 2: return dots16<2>(q, dim, k0, k1);
        case 3: return dots16<3>(q, dim, k0, k1);
        default: return dots16<4>(q, dim, k0, k1);
    }
}

/// exp(x) for x <= 0, sixteen lanes; the same reduction and polynomial as exp_nonpositive.
KVSPARSE_AVX512 inline __m512 exp16_nonpositive(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.33654f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lowest);
    const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    const __m512i n = _mm512_cvtps_epi32(fn);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps(keep, y, scale);
}

template <storage_type T>
KVSPARSE_AVX512 void score_pass_avx512(const AttendArgs<T>& a, Scratch s) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const Rows<T> keys(a.stream.keys, a.stream.table, a.stream.head);
    const Rows<T> values(a.stream.values, a.stream.table, a.stream.head);
    const std::size_t row_bytes = dim * sizeof(T);
    const std::size_t ahead = prefetch_rows(row_bytes);
    const bool values_early = prefetch_values_early(n, row_bytes);
    const __m256 scale = _mm256_set1_ps(a.scale);
    for (std::size_t j = 0; j < std::min(ahead, n); ++j) {  // the first rows; the loop asks `ahead` rows on
        prefetch_row(keys(a.slots[j]), row_bytes);
        if (values_early) prefetch_row_l2(values(a.slots[j]), row_bytes);
    }
    for (std::size_t j = 0; j < n; j += 2) {
        const bool pair = j + 1 < n;
        const T* k0 = keys(a.slots[j]);
        const T* k1 = pair ? keys(a.slots[j + 1]) : k0;
        if (j + ahead + 1 < n) {
            prefetch_row(keys(a.slots[j + ahead]), row_bytes);
            prefetch_row(keys(a.slots[j + ahead + 1]), row_bytes);
            if (values_early) {
                prefetch_row_l2(values(a.slots[j + ahead]), row_bytes);
                prefetch_row_l2(values(a.slots[j + ahead + 1]), row_bytes);
            }
        }
        for (std::size_t g0 = 0; g0 < group; g0 += 4) {
            const std::size_t heads = std::min<std::size_t>(4, group - g0);
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, _mm256_mul_ps(dots16_for(heads, a.queries.data() + g0 * dim, dim, k0, k1), scale));
            for (std::size_t h = 0; h < heads; ++h) {
                float* row = s.scores + (g0 + h) * n + j;
                row[0] = lanes[2 * h];
                if (pair) row[1] = lanes[2 * h + 1];
            }
        }
    }
}

KVSPARSE_AVX512 inline void softmax_avx512(float* scores, std::size_t group, std::size_t n) {
    for (std::size_t g = 0; g < group; ++g) {
        float* row = scores + g * n;
        std::size_t j = 0;
        __m512 top16 = _mm512_set1_ps(row[0]);
        for (; j + 16 <= n; j += 16) top16 = _mm512_max_ps(top16, _mm512_loadu_ps(row + j));
        float top = _mm512_reduce_max_ps(top16);
        for (; j < n; ++j) top = std::max(top, row[j]);

        const __m512 shift = _mm512_set1_ps(top);
        __m512 total = _mm512_setzero_ps();
        j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
            _mm512_storeu_ps(row + j, e);
            total = _mm512_add_ps(total, e);
        }
        float sum = sum8(fold16(total));
        for (; j < n; ++j) {
            row[j] = exp_nonpositive(row[j] - top);
            sum += row[j];
        }
        const float inverse = 1.0f / sum;
        const __m512 inverse16 = _mm512_set1_ps(inverse);
        j = 0;
        for (; j + 16 <= n; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inverse16));
        for (; j < n; ++j) row[j] *= inverse;
    }
}

/// out[h][d0 .. d0 + 16*Width) += sum over the block's rows j of p[h][j] * v_j[...], for `Heads` heads.
template <int Heads, int Width, storage_type T>
KVSPARSE_AVX512 inline void accumulate16(float* out, std::size_t dim, std::size_t d0, const T* const* rows,
                                         std::size_t count, const float* p, std::size_t n) {
    __m512 acc[Heads][Width];
    for (int h = 0; h < Heads; ++h)
        for (int w = 0; w < Width; ++w) acc[h][w] = _mm512_loadu_ps(out + static_cast<std::size_t>(h) * dim + d0 + 16 * w);
    for (std::size_t j = 0; j < count; ++j) {
        __m512 v[Width];
        for (int w = 0; w < Width; ++w) v[w] = load16(rows[j] + d0 + 16 * w);
        for (int h = 0; h < Heads; ++h) {
            const __m512 ph = _mm512_set1_ps(p[static_cast<std::size_t>(h) * n + j]);
            for (int w = 0; w < Width; ++w) acc[h][w] = _mm512_fmadd_ps(ph, v[w], acc[h][w]);
        }
    }
    for (int h = 0; h < Heads; ++h)
        for (int w = 0; w < Width; ++w) _mm512_storeu_ps(out + static_cast<std::size_t>(h) * dim + d0 + 16 * w, acc[h][w]);
}

template <int Heads, storage_type T>
KVSPARSE_AVX512 inline void accumulate16_block(float* out, std::size_t dim, const T* const* rows, std::size_t count,
                                               const float* p, std::size_t n) {
    std::size_t d = 0;
    for (; d + 64 <= dim; d += 64) accumulate16<Heads, 4>(out, dim, d, rows, count, p, n);
    for (; d + 32 <= dim; d += 32) accumulate16<Heads, 2>(out, dim, d, rows, count, p, n);
    if (d < dim) accumulate16<Heads, 1>(out, dim, d, rows, count, p, n);
}

template <storage_type T>
KVSPARSE_AVX512 void value_pass_avx512(const AttendArgs<T>& a, Scratch s) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const Rows<T> values(a.stream.values, a.stream.table, a.stream.head);
    const std::size_t row_bytes = dim * sizeof(T);
    constexpr std::size_t block = 32;
    const T* rows[block];
    for (std::size_t j0 = 0; j0 < n; j0 += block) {
        const std::size_t count = std::min(block, n - j0);
        for (std::size_t i = 0; i < count; ++i) rows[i] = values(a.slots[j0 + i]);
        for (std::size_t i = 0; i < count && j0 + block + i < n; ++i) prefetch_row(values(a.slots[j0 + block + i]), row_bytes);
        for (std::size_t g0 = 0; g0 < group; g0 += 4) {
            const std::size_t heads = std::min<std::size_t>(4, group - g0);
            float* out = a.out.data() + g0 * dim;
            const float* p = s.scores + g0 * n + j0;
            switch (heads) {
                case 1: accumulate16_block<1>(out, dim, rows, count, p, n); break;
                case 2: accumulate16_block<2>(out, dim, rows, count, p, n); break;
                case 3: accumulate16_block<3>(out, dim, rows, count, p, n); break;
                default: accumulate16_block<4>(out, dim, rows, count, p, n); break;
            }
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // KVSPARSE_CPU_X86

// ---- entry -------------------------------------------------------------------------------------------

/// The kernels, widest first. attend takes the widest this CPU runs for the call's shape; tests ask each.
enum class Isa : std::uint8_t { avx512, avx2, portable };

/// Runs one call's passes (scores, softmax, values into a zeroed a.out) with `isa`; false, doing nothing,
/// where this CPU or the call's shape cannot (AVX2: head_dim % 8 == 0; AVX-512: head_dim % 16 == 0 and no
/// in-cache key rotation).
template <storage_type T>
bool attend_with(Isa isa, const AttendArgs<T>& a, Scratch s) {
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    const std::size_t n = a.slots.size();
    switch (isa) {
#if KVSPARSE_CPU_X86
        case Isa::avx512:
            if (dim % 16 != 0 || !a.key_rotation.empty() || !has_avx512f()) return false;
            score_pass_avx512(a, s);
            softmax_avx512(s.scores, group, n);
            value_pass_avx512(a, s);
            return true;
        case Isa::avx2:
            if (dim % 8 != 0 || !has_avx2_fma_f16c()) return false;
            score_pass_avx2(a, s);  // also the in-cache rotation path
            softmax_avx2(s.scores, group, n);
            value_pass_avx2(a, s);
            return true;
#else
        case Isa::avx512:
        case Isa::avx2:
            return false;
#endif
        case Isa::portable:
            attend_portable(a, s);
            return true;
    }
    return false;
}

/// Softmax attention of a.group query heads over a.slots (see AttendArgs); `workspace` holds at least
/// CpuBackend::workspace_bytes(group, slots, head_dim) bytes.
template <storage_type T>
void attend(const AttendArgs<T>& a, std::span<std::byte> workspace) {
    const std::size_t n = a.slots.size();
    const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    const std::size_t group = static_cast<std::size_t>(a.group);
    std::fill(a.out.begin(), a.out.end(), 0.0f);
    if (n == 0) return;
    const Scratch scratch = carve(workspace, group, n, dim);
    if (!attend_with(Isa::avx512, a, scratch) && !attend_with(Isa::avx2, a, scratch)) attend_with(Isa::portable, a, scratch);
    // The group's summed probabilities, on request (H2O's accumulated attention).
    if (!a.probabilities.empty()) {
        for (std::size_t j = 0; j < n; ++j) {
            float mass = 0.0f;
            for (std::size_t g = 0; g < group; ++g) mass += scratch.scores[g * n + j];
            a.probabilities[j] += mass;
        }
    }
}

}  // namespace kvsparse::detail::cpu
