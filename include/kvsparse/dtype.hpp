#pragma once
// Storage types for cached keys and values. Arithmetic always happens in float32;
// float16 and bfloat16 are only storage, converted with round-to-nearest-even.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvsparse/detail/macros.hpp"

namespace kvsparse {

namespace detail {
KVSPARSE_HD inline std::uint32_t float_bits(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
KVSPARSE_HD inline float bits_float(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
}  // namespace detail

/// IEEE 754 binary16, stored as its bit pattern.
struct half {
    std::uint16_t bits = 0;

    half() = default;
    KVSPARSE_HD explicit half(float f) : bits(from_float(f)) {}
    KVSPARSE_HD explicit operator float() const { return to_float(bits); }

    KVSPARSE_HD static std::uint16_t from_float(float f) {
        const std::uint32_t u = detail::float_bits(f);
        const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
        const std::uint32_t magnitude = u & 0x7fffffffu;
        if (magnitude >= 0x7f800000u) {  // inf or NaN (NaN stays quiet NaN)
            return static_cast<std::uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
        }
        if (magnitude >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
            return static_cast<std::uint16_t>(sign | 0x7c00u);
        }
        if (magnitude < 0x38800000u) {  // below the smallest normal half: subnormal or zero
            if (magnitude < 0x33000000u) return sign;  // < 2^-25 rounds to zero
            const std::uint32_t exponent = magnitude >> 23;
            const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
            const std::uint32_t shift = 126u - exponent;  // 14..24
            std::uint32_t result = mantissa >> shift;
            const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
            const std::uint32_t halfway = 1u << (shift - 1u);
            if (rest > halfway || (rest == halfway && (result & 1u))) ++result;
            return static_cast<std::uint16_t>(sign | result);
        }
        // Normal: rebias the exponent, round 13 dropped mantissa bits to nearest even.
        std::uint32_t result = ((magnitude >> 13) - (112u << 10));
        const std::uint32_t rest = magnitude & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) ++result;
        return static_cast<std::uint16_t>(sign | result);
    }

    /// Exact, without branches: subnormals are normalized by a float subtraction (whose result is used
    /// only for them, so NaN payloads pass untouched), and the cases are picked with all-ones masks, so
    /// that compilers vectorize a loop of these (a ?: form was taken for control flow by GCC 12).
    KVSPARSE_HD static float to_float(std::uint16_t h) {
        const std::uint32_t magnitude = static_cast<std::uint32_t>(h & 0x7fffu) << 13;
        const std::uint32_t exponent = magnitude & 0x0f800000u;
        const std::uint32_t special = 0u - static_cast<std::uint32_t>(exponent == 0x0f800000u);  // inf / NaN
        const std::uint32_t small = 0u - static_cast<std::uint32_t>(exponent == 0);             // zero / subnormal
        // Rebias 15 -> 127, and for inf / NaN on to exponent 255.
        const std::uint32_t normal = magnitude + 0x38000000u + (special & 0x38000000u);
        // Zero or subnormal m * 2^-24: 2^-14 * (1 + m / 2^10) - 2^-14, exact in float.
        const std::uint32_t tiny = detail::float_bits(detail::bits_float(magnitude + 0x38800000u) - 6.103515625e-05f);
        return detail::bits_float((tiny & small) | (normal & ~small) | (static_cast<std::uint32_t>(h & 0x8000u) << 16));
    }
};

/// bfloat16: the upper half of a float32, rounded to nearest even.
struct bfloat16 {
    std::uint16_t bits = 0;

    bfloat16() = default;
    KVSPARSE_HD explicit bfloat16(float f) : bits(from_float(f)) {}
    KVSPARSE_HD explicit operator float() const { return to_float(bits); }

    KVSPARSE_HD static std::uint16_t from_float(float f) {
        const std::uint32_t u = detail::float_bits(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
        const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
        return static_cast<std::uint16_t>((u + rounding) >> 16);
    }
    KVSPARSE_HD static float to_float(std::uint16_t b) { return detail::bits_float(static_cast<std::uint32_t>(b) << 16); }
};

/// The element types a cache can store.
template <class T>
concept storage_type = std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

enum class dtype : std::uint8_t { float32, float16, bfloat16 };

template <storage_type T>
inline constexpr dtype dtype_of = std::is_same_v<T, float> ? dtype::float32
                                  : std::is_same_v<T, half> ? dtype::float16
                                                            : dtype::bfloat16;

/// Widen a stored element to float32.
template <storage_type T>
KVSPARSE_HD inline float to_float(T x) {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        return static_cast<float>(x);
    }
}

/// Narrow a float32 to storage, round to nearest even.
template <storage_type T>
KVSPARSE_HD inline T from_float(float x) {
    if constexpr (std::is_same_v<T, float>) {
        return x;
    } else {
        return T(x);
    }
}

}  // namespace kvsparse
