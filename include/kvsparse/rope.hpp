#pragma once
// Rotary position embedding (RoPE) and the K-shift. One inline implementation serves the CPU
// backend, the CUDA kernels and the tests.

#include <cmath>
#include <cstdint>

#include "kvsparse/detail/macros.hpp"
#include "kvsparse/dtype.hpp"

namespace kvsparse {

/// Which coordinates form a rotated pair.
enum class RopeStyle : std::uint8_t {
    interleaved,  ///< (x[2i], x[2i+1]): Meta's Llama, llama2.c
    half_split,   ///< (x[i], x[i + D/2]): GPT-NeoX, Hugging Face
};

struct Rope {
    RopeStyle style = RopeStyle::interleaved;
    float theta = 10000.0f;
};

/// Rotate one head vector `x[dim]` by `position` (which may be negative: a K-shift by a negative delta).
/// Pair i turns by position * theta^(-2i/dim). The angle is formed in double so that positions in the
/// millions keep full float precision; the rotation itself is float32, stored back as T.
template <storage_type T>
KVSPARSE_HD inline void rope_rotate(T* x, std::int32_t dim, double position, Rope rope) {
    const std::int32_t pairs = dim / 2;
    for (std::int32_t i = 0; i < pairs; ++i) {
        const double inv_freq = pow(static_cast<double>(rope.theta), -2.0 * i / dim);
        const double angle = position * inv_freq;
        const float c = static_cast<float>(cos(angle));
        const float s = static_cast<float>(sin(angle));
        const std::int32_t a = rope.style == RopeStyle::interleaved ? 2 * i : i;
        const std::int32_t b = rope.style == RopeStyle::interleaved ? 2 * i + 1 : i + pairs;
        const float xa = to_float(x[a]);
        const float xb = to_float(x[b]);
        x[a] = from_float<T>(xa * c - xb * s);
        x[b] = from_float<T>(xa * s + xb * c);
    }
}

}  // namespace kvsparse
