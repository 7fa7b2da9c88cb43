// RoPE and the K-shift against the double-precision rotation in reference.hpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::Rope;
using kvsparse::RopeStyle;

bool interleaved(RopeStyle style) { return style == RopeStyle::interleaved; }

std::vector<float> random_vector(std::uint64_t seed, int dim) {
    std::vector<float> x(static_cast<std::size_t>(dim));
    for (int d = 0; d < dim; ++d) x[static_cast<std::size_t>(d)] = ref::uniform(seed, 77, static_cast<std::uint64_t>(d));
    return x;
}

std::vector<double> reference_rotation(const std::vector<double>& x, double position, Rope rope) {
    std::vector<double> y = x;
    ref::rope(y.data(), static_cast<int>(y.size()), position, interleaved(rope.style), rope.theta);
    return y;
}

template <class T>
std::vector<T> narrow(const std::vector<float>& x) {
    std::vector<T> out;
    for (const float f : x) out.push_back(kvsparse::from_float<T>(f));
    return out;
}

template <class T>
double max_error(const std::vector<T>& got, const std::vector<double>& want) {
    double e = 0;
    for (std::size_t i = 0; i < got.size(); ++i) e = std::max(e, std::fabs(static_cast<double>(kvsparse::to_float(got[i])) - want[i]));
    return e;
}

// Absolute tolerances for vectors with elements in [-1, 1): float32 arithmetic on a rotation, and for the
// 16-bit types half an ulp of results below 2 (the final rounding to storage) plus that.
template <class T>
constexpr double rope_tolerance() {
    if constexpr (std::is_same_v<T, float>) return 2e-6;
    if constexpr (std::is_same_v<T, kvsparse::half>) return 0x1p-10 + 2e-6;
    return 0x1p-7 + 2e-6;
}

const int dims[] = {2, 4, 8, 64, 128};
const double positions[] = {0, 1, 2, 7, 100, 511, 4095, 65535, 1'000'000, 16'000'000, -1, -37};
const Rope ropes[] = {{RopeStyle::interleaved, 10000.0f}, {RopeStyle::half_split, 10000.0f},
                      {RopeStyle::interleaved, 500000.0f}, {RopeStyle::half_split, 1000000.0f}};

}  // namespace

TEMPLATE_TEST_CASE("rope_rotate matches the double-precision rotation / both pairings", "[rope]", float, kvsparse::half,
                   kvsparse::bfloat16) {
    using T = TestType;
    std::uint64_t seed = 1;
    for (const Rope rope : ropes) {
        for (const int dim : dims) {
            for (const double position : positions) {
                CAPTURE(static_cast<int>(rope.style), rope.theta, dim, position);
                const std::vector<float> x = random_vector(seed++, dim);
                std::vector<T> got = narrow<T>(x);
                // The reference rotates what was stored, so only the rotation's own error remains.
                std::vector<double> input;
                for (const float f : x) input.push_back(ref::stored<T>(f));
                kvsparse::rope_rotate(got.data(), dim, position, rope);
                REQUIRE(max_error(got, reference_rotation(input, position, rope)) <= rope_tolerance<T>());
            }
        }
    }
}

TEST_CASE("rope_rotate: the two pairings differ / position 0 is the identity / odd tails stay", "[rope]") {
    // Guards against a reference and an implementation that agree by both ignoring the style.
    const std::vector<float> x = random_vector(5, 8);
    std::vector<float> a = x, b = x, zero = x;
    kvsparse::rope_rotate(a.data(), 8, 3.0, Rope{RopeStyle::interleaved, 10000.0f});
    kvsparse::rope_rotate(b.data(), 8, 3.0, Rope{RopeStyle::half_split, 10000.0f});
    double difference = 0;
    for (std::size_t i = 0; i < 8; ++i) difference = std::max(difference, static_cast<double>(std::fabs(a[i] - b[i])));
    CHECK(difference > 0.1);
    kvsparse::rope_rotate(zero.data(), 8, 0.0, Rope{});
    CHECK(zero == x);
    // An odd dimension rotates dim/2 pairs; the last coordinate is untouched.
    std::vector<float> odd = random_vector(6, 5);
    const float last = odd[4];
    kvsparse::rope_rotate(odd.data(), 5, 11.0, Rope{});
    CHECK(odd[4] == last);
}

TEMPLATE_TEST_CASE("K-shift: rotating at p then by delta equals rotating at p + delta", "[rope]", float,
                   kvsparse::half, kvsparse::bfloat16) {
    using T = TestType;
    // Two roundings to storage instead of one, and two float rotations: twice the one-rotation tolerance.
    const double tolerance = 2 * rope_tolerance<T>();
    const std::pair<double, double> cases[] = {{0, 5},     {10, -10}, {100, -1},       {1000, -999},
                                               {4095, 1},  {5, 4090}, {65535, -30000}, {1'000'000, -1},
                                               {123, -200}};
    std::uint64_t seed = 100;
    for (const Rope rope : ropes) {
        for (const int dim : {8, 64}) {
            for (const auto& [p, delta] : cases) {
                CAPTURE(static_cast<int>(rope.style), dim, p, delta);
                const std::vector<float> x = random_vector(seed++, dim);
                std::vector<T> shifted = narrow<T>(x);
                kvsparse::rope_rotate(shifted.data(), dim, p, rope);
                kvsparse::rope_rotate(shifted.data(), dim, delta, rope);
                std::vector<T> direct = narrow<T>(x);
                kvsparse::rope_rotate(direct.data(), dim, p + delta, rope);
                std::vector<double> want;
                for (const T& v : direct) want.push_back(kvsparse::to_float(v));
                REQUIRE(max_error(shifted, want) <= tolerance);
            }
        }
    }
}

TEST_CASE("CpuBackend::rope rotates token i of [token][head][dim] at positions[i]", "[rope]") {
    const int tokens = 3, heads = 2, dim = 8;
    const Rope rope{RopeStyle::half_split, 10000.0f};
    std::vector<float> x = random_vector(9, tokens * heads * dim);
    const std::vector<float> original = x;
    const std::vector<std::int32_t> at = {5, 0, 900};
    kvsparse::CpuBackend{}.rope(x, heads, dim, at, rope);
    for (int i = 0; i < tokens; ++i) {
        for (int h = 0; h < heads; ++h) {
            const auto begin = static_cast<std::size_t>((i * heads + h) * dim);
            const std::vector<double> input(original.begin() + static_cast<std::ptrdiff_t>(begin),
                                            original.begin() + static_cast<std::ptrdiff_t>(begin + dim));
            const std::vector<double> want = reference_rotation(input, at[static_cast<std::size_t>(i)], rope);
            const std::vector<float> got(x.begin() + static_cast<std::ptrdiff_t>(begin),
                                         x.begin() + static_cast<std::ptrdiff_t>(begin + dim));
            REQUIRE(max_error(got, want) <= 2e-6);
        }
    }
}

TEMPLATE_TEST_CASE("KVCache with rope stores keys rotated at their position / shift_keys re-rotates by delta",
                   "[rope][cache]", float, kvsparse::half, kvsparse::bfloat16) {
    using T = TestType;
    for (const Rope rope : {Rope{RopeStyle::interleaved, 10000.0f}, Rope{RopeStyle::half_split, 10000.0f}}) {
        CAPTURE(static_cast<int>(rope.style));
        const ref::Tokens data{42, 4, 2, 16};
        kvsparse::CacheConfig config{{2, 4, 2, 16}, 4, 64, rope};
        kvsparse::KVCache<kvsparse::Dense, kvsparse::CpuBackend, T> cache(config, kvsparse::Dense{});
        const auto seq = cache.add_sequence();
        const int n = 11;
        for (int layer = 0; layer < 2; ++layer) {
            cache.append(seq, layer, data.keys(layer, 0, 6), data.values(layer, 0, 6));
            cache.append(seq, layer, data.keys(layer, 6, n - 6), data.values(layer, 6, n - 6));
        }

        // Expected stored key of (layer, head, position) after its total rotation: the reference rotates the
        // unrounded key in double; storage rounding is within the one-rotation tolerance.
        const auto expected = [&](int layer, int h, int position, double rotation) {
            std::vector<double> k;
            for (int d = 0; d < data.dim; ++d) k.push_back(data.k(layer, position, h, d));
            return reference_rotation(k, rotation, rope);
        };
        const auto stored = [&](int layer, int h, int slot) {
            const kvsparse::StreamView<T> view = cache.stream_view(seq, layer, h);
            const T* key = view.key(slot);
            return std::vector<T>(key, key + data.dim);
        };
        const auto slot_of = [&](int layer, int h, int position) {
            kvsparse::Selection selection;
            cache.select(seq, layer, ref::unused_queries(cache), selection);
            const auto positions = selection.positions_of(h);
            const auto it = std::find(positions.begin(), positions.end(), position);
            REQUIRE(it != positions.end());
            return selection.slots_of(h)[static_cast<std::size_t>(it - positions.begin())];
        };

        for (int layer = 0; layer < 2; ++layer)
            for (int h = 0; h < 2; ++h)
                for (int p = 0; p < n; ++p)
                    REQUIRE(max_error(stored(layer, h, slot_of(layer, h, p)), expected(layer, h, p, p)) <= rope_tolerance<T>());

        // Shift positions 2, 5 and 9 of (layer 1, head 0) by -3; everything else stays bit for bit.
        std::vector<std::vector<T>> before, before_same_stream;
        for (int p = 0; p < n; ++p) {
            before.push_back(stored(0, 1, slot_of(0, 1, p)));
            before_same_stream.push_back(stored(1, 0, slot_of(1, 0, p)));
        }
        const std::vector<std::int32_t> moved = {slot_of(1, 0, 2), slot_of(1, 0, 5), slot_of(1, 0, 9)};
        cache.shift_keys(seq, 1, 0, moved, -3);
        for (int p = 0; p < n; ++p) {
            const bool shifted = p == 2 || p == 5 || p == 9;
            CAPTURE(p);
            const std::vector<T> mine = stored(1, 0, slot_of(1, 0, p));
            REQUIRE(max_error(mine, expected(1, 0, p, shifted ? p - 3 : p)) <= (shifted ? 2 : 1) * rope_tolerance<T>());
            if (!shifted) {
                REQUIRE(std::memcmp(mine.data(), before_same_stream[static_cast<std::size_t>(p)].data(), mine.size() * sizeof(T)) == 0);
            }
            const std::vector<T> other = stored(0, 1, slot_of(0, 1, p));
            REQUIRE(std::memcmp(other.data(), before[static_cast<std::size_t>(p)].data(), other.size() * sizeof(T)) == 0);
        }
    }
}
