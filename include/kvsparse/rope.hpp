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

/// cos and sin of one pair's rotation angle, rounded to float.
struct RopeTurn {
    float c = 1.0f;
    float s = 0.0f;
};

/// The turn of pair `pair` of a `dim`-vector at `position`: angle position * theta^(-2*pair/dim), formed
/// in double so that positions in the millions keep full float precision. The CUDA kernels call this per
/// pair, so CPU and GPU share the same math.

KVSPARSE_HD inline RopeTurn rope_turn(std::int32_t pair, std::int32_t dim, double position, float theta) {
    const double inv_freq = pow(static_cast<double>(theta), -2.0 * pair / dim);
    const double angle = position * inv_freq;
    return {static_cast<float>(cos(angle)), static_cast<float>(sin(angle))};
}

/// Coordinates of pair `pair`: (2p, 2p+1) interleaved, (p, p + dim/2) half-split.
KVSPARSE_HD inline std::int32_t rope_first(RopeStyle style, std::int32_t pair) {
    return style == RopeStyle::interleaved ? 2 * pair : pair;
}
KVSPARSE_HD inline std::int32_t rope_second(RopeStyle style, std::int32_t pair, std::int32_t dim) {
    return style == RopeStyle::interleaved ? 2 * pair + 1 : pair + dim / 2;
}

/// Turn the pair (xa, xb). On the device the products and sums are rounded one by one (no FMA
/// contraction, which nvcc would otherwise apply), so the GPU rounds exactly like the CPU.
KVSPARSE_HD inline void rope_apply(float& xa, float& xb, RopeTurn turn) {
#if defined(__CUDA_ARCH__)
    const float a = __fsub_rn(__fmul_rn(xa, turn.c), __fmul_rn(xb, turn.s));
    const float b = __fadd_rn(__fmul_rn(xa, turn.s), __fmul_rn(xb, turn.c));
#else
    const float a = xa * turn.c - xb * turn.s;
    const float b = xa * turn.s + xb * turn.c;
#endif
    xa = a;
    xb = b;
}

/// Rotate one head vector `x[dim]` by `position` (which may be negative: a K-shift by a negative delta).
/// The rotation itself is float32, stored back as T.
template <storage_type T>
KVSPARSE_HD inline void rope_rotate(T* x, std::int32_t dim, double position, Rope rope) {
    const std::int32_t pairs = dim / 2;
    for (std::int32_t i = 0; i < pairs; ++i) {
        const RopeTurn turn = rope_turn(i, dim, position, rope.theta);
        const std::int32_t a = rope_first(rope.style, i);
        const std::int32_t b = rope_second(rope.style, i, dim);
        float xa = to_float(x[a]);
        float xb = to_float(x[b]);
        rope_apply(xa, xb, turn);
        x[a] = from_float<T>(xa);
        x[b] = from_float<T>(xb);
    }
}

}  // namespace kvsparse
