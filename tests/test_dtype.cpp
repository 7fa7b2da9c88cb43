// Storage types: float16 and bfloat16 conversions against the reference formats in reference.hpp,
// exhaustively where the space allows (all 65536 patterns, every halfway point between neighbours).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/dtype.hpp>

namespace {

std::uint32_t bits_of(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
float float_of(std::uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

struct HalfCase {
    using type = kvsparse::half;
    static const ref::Format& format() { return ref::half_format; }
};
struct Bfloat16Case {
    using type = kvsparse::bfloat16;
    static const ref::Format& format() { return ref::bfloat16_format; }
};

/// Counts disagreements and remembers the first, so one REQUIRE covers a large sweep.
struct Tally {
    std::size_t checked = 0;
    std::size_t failures = 0;
    std::string first;
    void fail(const std::string& what) {
        if (failures++ == 0) first = what;
    }
};

template <class Case>
void check_narrowing(float x, Tally& tally) {
    using T = typename Case::type;
    const ref::Format& format = Case::format();
    ++tally.checked;
    const std::uint16_t got = T::from_float(x);
    const bool ok = std::isnan(x) ? format.is_nan(got) : got == format.round(static_cast<double>(x));
    if (!ok) {
        std::ostringstream s;
        s << "x = " << x << " (0x" << std::hex << bits_of(x) << "): got 0x" << got << ", want 0x"
          << format.round(static_cast<double>(x));
        tally.fail(s.str());
    }
}

}  // namespace

TEST_CASE("reference formats agree with hand-computed anchors", "[dtype]") {
    // The reference itself must be right before it judges anything: a few values worked out by hand.
    const ref::Format& h = ref::half_format;
    CHECK(h.decode(0x3c00) == 1.0);
    CHECK(h.decode(0x7bff) == 65504.0);
    CHECK(h.decode(0x0001) == std::ldexp(1.0, -24));
    CHECK(h.decode(0x0400) == std::ldexp(1.0, -14));
    CHECK(h.decode(0xc000) == -2.0);
    CHECK(std::isinf(h.decode(0x7c00)));
    CHECK(std::isnan(h.decode(0x7e00)));
    CHECK(h.round(1.0 + std::ldexp(1.0, -11)) == 0x3c00);      // tie, 1.0 is even
    CHECK(h.round(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3c02);  // tie, up to even
    CHECK(h.round(65519.0) == 0x7bff);
    CHECK(h.round(65520.0) == 0x7c00);              // tie between 65504 (odd) and overflow: inf
    CHECK(h.round(std::ldexp(1.0, -25)) == 0x0000);  // tie between 0 and the smallest subnormal
    CHECK(h.round(3 * std::ldexp(1.0, -25)) == 0x0002);
    CHECK(h.round(-std::ldexp(1.0, -30)) == 0x8000);  // tiny negatives keep their sign
    const ref::Format& b = ref::bfloat16_format;
    CHECK(b.decode(0x3f80) == 1.0);
    CHECK(b.decode(0x7f7f) == std::ldexp(255.0, 120));
    CHECK(b.round(1.0 + std::ldexp(1.0, -8)) == 0x3f80);
    CHECK(b.round(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3f82);
    CHECK(b.round(std::numeric_limits<float>::max()) == 0x7f80);
    CHECK(b.round(std::ldexp(1.0, -149)) == 0x0000);  // float's smallest subnormal: below half a bf16 ulp
}

TEMPLATE_TEST_CASE("widening: every one of the 65536 patterns reads back as its IEEE value", "[dtype]", HalfCase,
                   Bfloat16Case) {
    using T = typename TestType::type;
    const ref::Format& format = TestType::format();
    Tally tally;
    for (std::uint32_t b = 0; b <= 0xffff; ++b) {
        const float f = T::to_float(static_cast<std::uint16_t>(b));
        const double want = format.decode(b);
        const bool ok = std::isnan(want) ? std::isnan(f)
                                         : static_cast<double>(f) == want && std::signbit(f) == std::signbit(want);
        if (!ok) tally.fail("pattern " + std::to_string(b));
        // The value API gives the same answer as the static one.
        T t;
        t.bits = static_cast<std::uint16_t>(b);
        if (bits_of(static_cast<float>(t)) != bits_of(f) || bits_of(kvsparse::to_float(t)) != bits_of(f)) {
            tally.fail("value API, pattern " + std::to_string(b));
        }
    }
    INFO(tally.first);
    REQUIRE(tally.failures == 0);
}

TEMPLATE_TEST_CASE("round trip: pattern -> float -> pattern is the identity / NaN stays NaN", "[dtype]", HalfCase,
                   Bfloat16Case) {
    using T = typename TestType::type;
    const ref::Format& format = TestType::format();
    Tally tally;
    std::size_t nans = 0;
    for (std::uint32_t b = 0; b <= 0xffff; ++b) {
        const std::uint16_t back = T::from_float(T::to_float(static_cast<std::uint16_t>(b)));
        if (format.is_nan(b)) {
            ++nans;
            if (!format.is_nan(back)) tally.fail("NaN pattern " + std::to_string(b) + " came back as " + std::to_string(back));
        } else if (back != b) {
            tally.fail("pattern " + std::to_string(b) + " came back as " + std::to_string(back));
        }
    }
    INFO(tally.first);
    REQUIRE(tally.failures == 0);
    CHECK(nans == 2 * (format.sign_bit() - 1u - format.inf_bits()));
}

TEMPLATE_TEST_CASE("narrowing rounds to nearest / ties to even / like the distance-comparing reference", "[dtype]",
                   HalfCase, Bfloat16Case) {
    const ref::Format& format = TestType::format();
    Tally tally;

    SECTION("every representable value, every halfway point between neighbours, and their float neighbours") {
        // Midpoints of adjacent patterns need at most mantissa_bits + 2 significant bits: exact in float.
        // The last one lies between the largest finite value and the overflow threshold.
        for (std::uint32_t b = 0; b < format.inf_bits(); ++b) {
            const double lo = format.magnitude(b);
            const double hi = format.magnitude(b + 1);
            const double mid = (lo + hi) / 2;
            const auto fmid = static_cast<float>(mid);
            if (static_cast<double>(fmid) != mid) continue;  // bf16 subnormal midpoints below float's range
            for (const float sign : {1.0f, -1.0f}) {
                for (const float x : {static_cast<float>(lo), fmid, std::nextafter(fmid, 0.0f),
                                      std::nextafter(fmid, std::numeric_limits<float>::infinity())}) {
                    check_narrowing<TestType>(sign * x, tally);
                }
            }
        }
        CHECK(tally.checked > 200000);
    }

    SECTION("random float bit patterns (all exponents, subnormals, inf and NaN included)") {
        std::mt19937 rng(12345);
        for (int i = 0; i < 1'000'000; ++i) check_narrowing<TestType>(float_of(static_cast<std::uint32_t>(rng())), tally);
        // Uniform over the range where the format is finite or subnormal, which raw patterns sample thinly.
        std::uniform_real_distribution<double> exponent(-30.0, 17.0);
        for (int i = 0; i < 500'000; ++i) {
            const auto x = static_cast<float>(std::exp2(exponent(rng)));
            check_narrowing<TestType>(i % 2 ? x : -x, tally);
        }
        // Float subnormals.
        for (int i = 0; i < 100'000; ++i) check_narrowing<TestType>(float_of(static_cast<std::uint32_t>(rng()) & 0x807fffffu), tally);
    }

    SECTION("edge values") {
        const float inf = std::numeric_limits<float>::infinity();
        for (const float x :
             {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
              std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), inf, -inf,
              std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
              std::numeric_limits<float>::signaling_NaN(), float_of(0x7f800001u), float_of(0xff800001u),
              float_of(0x7f80ffffu), float_of(0x7f810000u), 65504.0f, 65519.0f, 65519.996f, 65520.0f, 65520.004f,
              65535.0f, 65536.0f, 1e5f, 1e30f, 0x1p-14f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f, 0x1p-26f, 0x1.ffcp-15f,
              0x1.ffep-15f, 0x1p-126f, 0x1p-127f, 0x1p-133f, 0x1p-134f, 0x1.8p-134f, 3.3895314e38f, 3.3961775e38f}) {
            check_narrowing<TestType>(x, tally);
        }
    }

    INFO(tally.first);
    REQUIRE(tally.failures == 0);
}

TEMPLATE_TEST_CASE("the value API narrows like the static one", "[dtype]", HalfCase, Bfloat16Case) {
    using T = typename TestType::type;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 100.0f);
    for (int i = 0; i < 1000; ++i) {
        const float x = normal(rng);
        const std::uint16_t want = T::from_float(x);
        REQUIRE(T(x).bits == want);
        REQUIRE(kvsparse::from_float<T>(x).bits == want);
    }
    REQUIRE(kvsparse::from_float<float>(0.1f) == 0.1f);
    REQUIRE(kvsparse::to_float(0.1f) == 0.1f);
}

TEST_CASE("dtype tags", "[dtype]") {
    STATIC_REQUIRE(kvsparse::dtype_of<float> == kvsparse::dtype::float32);
    STATIC_REQUIRE(kvsparse::dtype_of<kvsparse::half> == kvsparse::dtype::float16);
    STATIC_REQUIRE(kvsparse::dtype_of<kvsparse::bfloat16> == kvsparse::dtype::bfloat16);
    STATIC_REQUIRE(sizeof(kvsparse::half) == 2);
    STATIC_REQUIRE(sizeof(kvsparse::bfloat16) == 2);
}
