#pragma once
// The CPU attention kernel behind CpuBackend::attend: the query heads of one KV head over a gathered set
// of slots, in two passes over memory (keys, then values), each K/V row widened once and shared by the
// whole group.
//
// Two implementations of the same plan, the widest the CPU runs taken (cpuid, asked once):
//  - vector code (detail/cpu_attention_simd.inc), written once over vector traits and compiled for
//    AVX-512F (head_dim % 16 == 0) and for AVX2 + FMA + F16C (head_dim % 8 == 0): float16 and bfloat16
//    rows are widened in registers (vcvtph2ps, or a 16-bit shift), dot products run eight accumulators
//    wide (two keys times four query heads; sixteen, four keys, with AVX-512 and groups of four), the
//    exponentials are a vectorized polynomial, and the value pass keeps a block of rows in L1 while it
//    walks the head dimension with the strips of four heads in registers. Key rows 4 KiB ahead are
//    prefetched; value rows two blocks ahead, one row asked for with each row used (a burst of a whole
//    block's prefetches stalled the value pass). A header cannot choose the compiler's -march, so these
//    functions carry their own target attributes and are only entered when the CPU has the features.
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

    /// Where a slot's row is: its page-table entry and its token within that page.
    struct Place {
        std::int32_t page_index;
        std::int32_t token;
    };
    Place locate(std::int32_t slot) const {
        if (shift >= 0) return {slot >> shift, slot & (page_size - 1)};
        return {slot / page_size, slot % page_size};
    }

    /// The first row of page-table entry `page_index`.
    const T* page_start(std::int32_t page_index) const {
        return data + std::int64_t{pages[page_index]} * page_stride + head_offset;
    }

    const T* operator()(std::int32_t slot) const {
        const Place at = locate(slot);
        return page_start(at.page_index) + std::int64_t{at.token} * token_stride;
    }
};

/// Requests the cache lines of `bytes` bytes at `row`: into every level (Locality 3), L2 and below (2), or
/// non-temporally (0: data read once, kept from displacing what the caches hold).
/// Always inlined, as any helper that does nothing but prefetch must be: GCC 12 takes such a function for
/// one without side effects and drops the calls to it that it has not inlined yet (a bounds prefetch in
/// the page scorers was lost so, unnoticed, until their disassembly showed no prefetch at all).
template <int Locality = 3, class T>
[[gnu::always_inline]] inline void prefetch_row(const T* row, std::size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    const char* p = reinterpret_cast<const char*>(row);
    for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, Locality);
#else
    (void)row;
    (void)bytes;
#endif
}

/// Keys per chunk of the vector paths, at most: scores, then weights, then values, a chunk at a time.
/// While the score pass reads a chunk's keys it also asks for the chunk's value rows (into L2), so the two
/// streams of scattered pages overlap and the value pass finds its rows there.
inline constexpr std::size_t kAttendChunk = 1024;

/// Bytes of a chunk's value rows, at most: they wait in L2 (commonly 1-2 MiB) from one pass to the next.
inline constexpr std::size_t kChunkValueBytes = 256 * 1024;

/// Keys per chunk for rows of `row_bytes`: as many as kChunkValueBytes holds, 64 to kAttendChunk. Each
/// chunk costs a switch of passes and the addresses of the rows asked for ahead again; with float16
/// rows of 128 (1024 keys a chunk rather than 256) a dense step at 32K takes 8-9% less time.
inline std::size_t chunk_rows(std::size_t row_bytes) {
    return std::clamp<std::size_t>(kChunkValueBytes / row_bytes, 64, kAttendChunk);
}

/// Rows requested ahead of use, at most.
inline constexpr std::size_t kMaxAhead = 64;

/// Rows requested ahead of use: about 4 KiB (4 to kMaxAhead rows). The hardware prefetchers stop at 4 KiB
/// memory pages, and cache pages need not be adjacent; with shuffled pages this doubles the rate, with
/// adjacent ones it costs nothing measurable.
inline std::size_t prefetch_rows(std::size_t row_bytes) { return std::clamp<std::size_t>(4096 / row_bytes, 4, kMaxAhead); }

/// The key and value row addresses of a chunk's slots and of the rows after it that the passes ask for
/// ahead (up to kMaxAhead past a step of four keys), computed once per chunk: an address costs a
/// page-table lookup and two multiplications, and computed at each use (once to ask, once to read) they
/// took a third of the score pass. Past the last slot the last row is repeated, so asking ahead needs no
/// bounds check. 17 KiB with chunks of 1024, on the stack of attend.
template <class T>
struct ChunkRows {
    static constexpr std::size_t size = kAttendChunk + kMaxAhead + 4;
    const T* keys[size];
    const T* values[size];

    /// Fills the addresses of the chunk slots[begin, begin + count) and of the rows asked for after it
    /// (keys and values of one stream, which share its page table). Slots ascend, mostly in runs within a
    /// page, so a page's first rows are looked up once per run: 1.35x faster than a lookup per slot, which
    /// had taken 7% of a dense step.
    void fill(const Rows<T>& key_rows, const Rows<T>& value_rows, std::span<const std::int32_t> slots, std::size_t begin,
              std::size_t count) {
        const std::size_t used = std::min(size, count + kMaxAhead + 4);
        const std::size_t valid = std::min(used, slots.size() - begin);
        const std::int32_t* slot = slots.data() + begin;
        std::int32_t page = -1;
        const T* key_page = nullptr;
        const T* value_page = nullptr;
        const auto put = [&](std::size_t i, typename Rows<T>::Place at) {
            if (at.page_index != page) {
                page = at.page_index;
                key_page = key_rows.page_start(page);
                value_page = value_rows.page_start(page);
            }
            keys[i] = key_page + std::int64_t{at.token} * key_rows.token_stride;
            values[i] = value_page + std::int64_t{at.token} * value_rows.token_stride;
        };
        if (key_rows.shift >= 0) {  // the loop without a division
            const std::int32_t shift = key_rows.shift, last = key_rows.page_size - 1;
            for (std::size_t i = 0; i < valid; ++i) put(i, {slot[i] >> shift, slot[i] & last});
        } else {
            for (std::size_t i = 0; i < valid; ++i) put(i, key_rows.locate(slot[i]));
        }
        std::fill(keys + valid, keys + used, keys[valid - 1]);
        std::fill(values + valid, values + used, values[valid - 1]);
    }
};


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

/// Floats of scratch one call needs (CpuBackend::workspace_bytes).
inline std::size_t scratch_floats(std::size_t group, std::size_t n, std::size_t dim) {
    return group * (n + kAttendChunk + 2) + 2 * dim;
}

/// The scratch of one call, carved from the caller's workspace (scratch_floats floats).
struct Scratch {
    float* scores;   // [group][n]: scaled scores; the probabilities, where the call asks for them
    float* weights;  // [group][kAttendChunk]: a chunk's exponentials (vector paths)
    float* top;      // [group]: running maximum of the scores (vector paths)
    float* sum;      // [group]: running sum of the exponentials, relative to top (vector paths)
    float* key;      // [dim]
    Turns turns;
};

inline Scratch carve(std::span<std::byte> workspace, std::size_t group, std::size_t n, std::size_t dim) {
    float* scores = reinterpret_cast<float*>(workspace.data());
    float* weights = scores + group * n;
    float* top = weights + group * kAttendChunk;
    float* sum = top + group;
    float* key = sum + group;
    return Scratch{scores, weights, top, sum, key, Turns{key + dim, key + dim + dim / 2}};
}

/// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)): the fixed tree every eight-lane sum of the portable
/// code uses (the vector code's sum8x8 adds in the same order).
inline float sum_tree8(const float (&x)[8]) {
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
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
        for (std::size_t d = 0; d < dim; ++d) key[d] = to_float(k[d]);
        if (!a.key_rotation.empty()) s.turns.rotate(key, static_cast<std::int32_t>(dim), a.key_rotation[j], a.rope);
        for (std::size_t g = 0; g < group; ++g) {
            const float* q = a.queries.data() + g * dim;
            float partial[8] = {};
            std::size_t d = 0;
            for (; d + 8 <= dim; d += 8) {
                for (std::size_t l = 0; l < 8; ++l) partial[l] += q[d + l] * key[d + l];
            }
            for (std::size_t l = 0; l < dim % 8; ++l) partial[l] += q[d + l] * key[d + l];  // d % 8 == 0 here
            const float dot = sum_tree8(partial);
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
        for (std::size_t l = 0; l < n % 8; ++l) partial[l] += row[j + l];  // j % 8 == 0 here
        const float sum = sum_tree8(partial);
        const float inverse = 1.0f / sum;
        for (std::size_t i = 0; i < n; ++i) row[i] *= inverse;
    }
    // Pass 2: weighted values.
    for (std::size_t j = 0; j < n; ++j) {
        const T* v = values(a.slots[j]);
        for (std::size_t d = 0; d < dim; ++d) key[d] = to_float(v[d]);
        for (std::size_t g = 0; g < group; ++g) {
            const float p = s.scores[g * n + j];
            float* o = a.out.data() + g * dim;
            for (std::size_t d = 0; d < dim; ++d) o[d] += p * key[d];
        }
    }
}

// ---- x86: vector traits ------------------------------------------------------------------------------
// The vector paths are written once (detail/cpu_attention_simd.inc) over a traits type V: its register
// type, width and the operations they need. A header cannot choose the compiler's -march, so every
// function carries a target attribute and is entered only when the CPU has the features; an attribute
// cannot depend on a template argument, so the shared code is included once per instruction set, each
// time in its own namespace with its own V and KVSPARSE_SIMD (the attribute).

#if KVSPARSE_CPU_X86

// Function attributes of the vectorized paths (also used by detail/cpu_page_scores_simd.hpp).
#define KVSPARSE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVSPARSE_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
// Before each loop over an array of registers (accumulators, widened rows): unrolled at any optimization
// level. Without it, GCC 12 at -O2 (RelWithDebInfo's level) keeps such arrays in memory and the attention
// runs three times slower; even at -O3 it kept the value pass's accumulators in memory (dead stores of all
// sixteen every row: 51 instead of 17 cycles a row).
#define KVSPARSE_UNROLL _Pragma("GCC unroll 16")

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused merge source, which its
// -Wmaybe-uninitialized (or -Wuninitialized) reports once they are inlined here (GCC bug 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

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

/// Lower plus upper eight lanes.
KVSPARSE_AVX512 inline __m256 fold16(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/// Lane m of the result is the sum of the lanes of v[m]: registers are interleaved and added in pairs,
/// then pairs of those, then their 128-bit quarters; 15 additions and 30 shuffles (folding each register
/// to eight lanes for two sum8x8 took about twice as many operations).
KVSPARSE_AVX512 inline __m512 sum16x16(const __m512 (&v)[16]) {
    __m512 pairs[8];  // per 128-bit quarter: partial sums of v[2k] in lanes 0 and 2, of v[2k + 1] in 1 and 3
    KVSPARSE_UNROLL
    for (int k = 0; k < 8; ++k) pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    __m512 quads[4];  // per 128-bit quarter: that quarter's sums of v[4k .. 4k + 3]
    KVSPARSE_UNROLL
    for (int k = 0; k < 4; ++k) {
        const __m512d a = _mm512_castps_pd(pairs[2 * k]), b = _mm512_castps_pd(pairs[2 * k + 1]);
        quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Quarters 0 + 1 and 2 + 3 of two registers side by side, then the same again.
    const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
    const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xdd));
}

/// The dot products of four query heads (rows of q) with four keys, each key widened once and each query
/// chunk loaded once, in sixteen independent accumulators: lane 4h + i is head h's dot with k[i].
template <storage_type T>
KVSPARSE_AVX512 inline __m512 dots4x4(const float* q, std::size_t dim, const T* const (&k)[4]) {
    __m512 acc[16];
    KVSPARSE_UNROLL
    for (__m512& x : acc) x = _mm512_setzero_ps();
    for (std::size_t d = 0; d < dim; d += 16) {
        __m512 x[4];
        KVSPARSE_UNROLL
        for (int i = 0; i < 4; ++i) x[i] = load16(k[i] + d);
        KVSPARSE_UNROLL
        for (int h = 0; h < 4; ++h) {
            const __m512 qv = _mm512_loadu_ps(q + static_cast<std::size_t>(h) * dim + d);
            KVSPARSE_UNROLL
            for (int i = 0; i < 4; ++i) acc[4 * h + i] = _mm512_fmadd_ps(qv, x[i], acc[4 * h + i]);
        }
    }
    return sum16x16(acc);
}

/// AVX2 + FMA + F16C: eight lanes (head dimensions that are a multiple of 8).
struct Avx2 {
    using vec = __m256;
    static constexpr std::size_t lanes = 8;
    static constexpr int strips = 2;  // value pass: 4 heads x 2 strips of accumulators in 16 registers

    template <storage_type T>
    KVSPARSE_AVX2 static vec load(const T* p) { return load8(p); }
    KVSPARSE_AVX2 static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
    KVSPARSE_AVX2 static vec zero() { return _mm256_setzero_ps(); }
    KVSPARSE_AVX2 static vec set1(float x) { return _mm256_set1_ps(x); }
    KVSPARSE_AVX2 static vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    KVSPARSE_AVX2 static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
    KVSPARSE_AVX2 static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
    KVSPARSE_AVX2 static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
    KVSPARSE_AVX2 static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
    KVSPARSE_AVX2 static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
    KVSPARSE_AVX2 static vec fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
    KVSPARSE_AVX2 static vec round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    /// 2^n for the integral lanes of fn.
    KVSPARSE_AVX2 static vec pow2(vec fn) {
        const __m256i n = _mm256_cvtps_epi32(fn);
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    }
    /// v, with 0 in the lanes where x < limit.
    KVSPARSE_AVX2 static vec zero_below(vec x, vec limit, vec v) { return _mm256_andnot_ps(_mm256_cmp_ps(x, limit, _CMP_LT_OQ), v); }
    KVSPARSE_AVX2 static float reduce_add(vec v) { return sum8(v); }
    KVSPARSE_AVX2 static float reduce_max(vec v) {
        alignas(32) float x[8];
        _mm256_store_ps(x, v);
        return *std::max_element(x, x + 8);
    }
    /// The eight lanes of sum8x8's input.
    KVSPARSE_AVX2 static __m256 fold8(vec v) { return v; }
};

/// AVX-512F: sixteen lanes (head dimensions that are a multiple of 16).
struct Avx512 {
    using vec = __m512;
    static constexpr std::size_t lanes = 16;
    static constexpr int strips = 4;  // value pass: 4 heads x 4 strips of accumulators in 32 registers

    template <storage_type T>
    KVSPARSE_AVX512 static vec load(const T* p) { return load16(p); }
    KVSPARSE_AVX512 static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
    KVSPARSE_AVX512 static vec zero() { return _mm512_setzero_ps(); }
    KVSPARSE_AVX512 static vec set1(float x) { return _mm512_set1_ps(x); }
    KVSPARSE_AVX512 static vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
    KVSPARSE_AVX512 static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
    KVSPARSE_AVX512 static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
    KVSPARSE_AVX512 static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
    KVSPARSE_AVX512 static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
    KVSPARSE_AVX512 static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
    KVSPARSE_AVX512 static vec fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
    KVSPARSE_AVX512 static vec round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    KVSPARSE_AVX512 static vec pow2(vec fn) {
        const __m512i n = _mm512_cvtps_epi32(fn);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    }
    KVSPARSE_AVX512 static vec zero_below(vec x, vec limit, vec v) {
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_GE_OQ), v);
    }
    KVSPARSE_AVX512 static float reduce_add(vec v) { return sum8(fold16(v)); }
    KVSPARSE_AVX512 static float reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
    KVSPARSE_AVX512 static __m256 fold8(vec v) { return fold16(v); }
};

namespace avx2 {
using V = Avx2;
#define KVSPARSE_SIMD KVSPARSE_AVX2
#include "kvsparse/detail/cpu_attention_simd.inc"
#undef KVSPARSE_SIMD
}  // namespace avx2

namespace avx512 {
using V = Avx512;
#define KVSPARSE_SIMD KVSPARSE_AVX512
#include "kvsparse/detail/cpu_attention_simd.inc"
#undef KVSPARSE_SIMD
}  // namespace avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // KVSPARSE_CPU_X86

// ---- entry -------------------------------------------------------------------------------------------

/// The kernels, widest first. attend takes the widest this CPU runs for the call's shape; tests ask each.
enum class Isa : std::uint8_t { avx512, avx2, portable };

/// Runs one call (scores, softmax, values into a zeroed a.out; the probabilities left in scratch.scores
/// where a.probabilities asks for them) with `isa`; false, doing nothing, where this CPU or the call's
/// shape cannot (AVX2: head_dim % 8 == 0; AVX-512: head_dim % 16 == 0).
template <storage_type T>
bool attend_with(Isa isa, const AttendArgs<T>& a, Scratch s) {
    [[maybe_unused]] const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
    switch (isa) {
#if KVSPARSE_CPU_X86
        case Isa::avx512:
            if (dim % 16 != 0 || !has_avx512f()) return false;
            avx512::attend(a, s);
            return true;
        case Isa::avx2:
            if (dim % 8 != 0 || !has_avx2_fma_f16c()) return false;
            avx2::attend(a, s);
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
