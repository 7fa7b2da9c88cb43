#pragma once
// A deterministic synthetic trace with the structure real attention has: a few sink positions that
// draw much attention, local attention that decays with distance, and sparse long-range "needle" keys
// that some queries align with. docs/eval.md explains the construction; in short:
//
// Vectors are built before RoPE from three kinds of coordinates (RoPE pairs, interleaved, theta 500000):
// the fast-turning first half of the pairs carries a "local" direction u shared by every key and query
// of a KV head, so that after rotation q_t . k_j follows the kernel sum_i cos(theta_i (t - j)) and
// decays with the distance; the slowest quarter of the pairs hardly turns over the trace and carries
// content: the sink direction s (keys 0..3) and the needles' random directions. The pairs between
// carry only noise. Then queries and keys are rotated at their absolute positions, as engines cache them.
//
//   key  k_j = u + [j < 4] s + [j is a needle] c_j + noise
//   query q_t(h) = a_h u + b_h s + [q_t(h) aligned with needle m] g c_m + noise
//
// with per-head strengths a_h (local) and b_h (sinks), needles at about 1 in 64 positions per KV head,
// and one query in 8 (per query head) aligned with a uniformly chosen earlier needle.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <kvsparse/error.hpp>
#include <kvsparse/rope.hpp>

#include "eval/gates.hpp"
#include "eval/trace.hpp"

namespace kvsparse::tools {

struct SyntheticConfig {
    std::int32_t tokens = 4096;
    std::int32_t layers = 2;
    std::int32_t q_heads = 8;
    std::int32_t kv_heads = 4;
    std::int32_t dim = 64;
    std::int32_t prefill = -1;  ///< -1: tokens / 4
    std::uint64_t seed = 20240607;

    std::int32_t prefill_tokens() const { return prefill >= 0 ? prefill : tokens / 4; }

    /// "tokens=4096,layers=2,q_heads=8,kv_heads=4,dim=64,prefill=1024,seed=20240607"
    std::string text() const {
        return "tokens=" + std::to_string(tokens) + ",layers=" + std::to_string(layers) +
               ",q_heads=" + std::to_string(q_heads) + ",kv_heads=" + std::to_string(kv_heads) +
               ",dim=" + std::to_string(dim) + ",prefill=" + std::to_string(prefill_tokens()) +
               ",seed=" + std::to_string(seed);
    }
};

/// Parses `key=value,...` over the defaults; keys tokens, layers, q_heads, kv_heads, dim, prefill, seed.
inline SyntheticConfig parse_synthetic(std::string_view text) {
    SyntheticConfig config;
    const std::string context = "--synthetic '" + std::string(text) + "'";
    std::size_t start = 0;
    while (start < text.size()) {
        std::size_t comma = text.find(',', start);
        if (comma == std::string_view::npos) comma = text.size();
        const std::string_view item = text.substr(start, comma - start);
        start = comma + 1;
        if (item.empty()) continue;
        const std::size_t equals = item.find('=');
        if (equals == std::string_view::npos)
            throw invalid_argument(context + ": expected key=value, got '" + std::string(item) + "'");
        const std::string_view key = item.substr(0, equals);
        const std::string value(item.substr(equals + 1));
        std::uint64_t number = 0;
        std::size_t used = 0;
        try {
            if (value.empty() || value[0] == '-' || value[0] == '+') throw std::invalid_argument("sign");
            number = std::stoull(value, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used != value.size() || value.empty()) {
            throw invalid_argument(context + ": key '" + std::string(key) + "' = '" + value +
                                   "': expected a non-negative integer");
        }
        const auto small = [&](std::int32_t lo) {
            if (number < static_cast<std::uint64_t>(lo) || number > (1u << 30)) {
                throw invalid_argument(context + ": key '" + std::string(key) + "' = '" + value +
                                       "': expected an integer in [" + std::to_string(lo) + ", 2^30]");
            }
            return static_cast<std::int32_t>(number);
        };
        if (key == "tokens") {
            config.tokens = small(2);
        } else if (key == "layers") {
            config.layers = small(1);
        } else if (key == "q_heads") {
            config.q_heads = small(1);
        } else if (key == "kv_heads") {
            config.kv_heads = small(1);
        } else if (key == "dim") {
            config.dim = small(4);
        } else if (key == "prefill") {
            config.prefill = small(0);
        } else if (key == "seed") {
            config.seed = number;
        } else {
            throw invalid_argument(context + ": unknown key '" + std::string(key) +
                                   "' (keys: tokens, layers, q_heads, kv_heads, dim, prefill, seed)");
        }
    }
    if (config.q_heads % config.kv_heads != 0) {
        throw invalid_argument(context + ": q_heads = " + std::to_string(config.q_heads) +
                               " must be a multiple of kv_heads = " + std::to_string(config.kv_heads));
    }
    if (config.dim % 2 != 0)
        throw invalid_argument(context + ": dim = " + std::to_string(config.dim) + " must be even (RoPE pairs)");
    if (config.prefill_tokens() >= config.tokens) {
        throw invalid_argument(context + ": prefill = " + std::to_string(config.prefill_tokens()) +
                               " must be less than tokens = " + std::to_string(config.tokens));
    }
    return config;
}

namespace detail {

/// xoshiro256** seeded through splitmix64: the same numbers on every platform.
class Random {
public:
    explicit Random(std::uint64_t seed) {
        for (auto& s : state_) s = splitmix(seed);
    }
    std::uint64_t next() {
        const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
        const std::uint64_t t = state_[1] << 17;
        state_[2] ^= state_[0];
        state_[3] ^= state_[1];
        state_[1] ^= state_[2];
        state_[0] ^= state_[3];
        state_[2] ^= t;
        state_[3] = rotl(state_[3], 45);
        return result;
    }
    /// Uniform in [0, 1).
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
    double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
    /// Uniform integer in [0, n).
    std::uint64_t below(std::uint64_t n) { return static_cast<std::uint64_t>(uniform() * static_cast<double>(n)); }
    /// Standard normal (Box-Muller).
    double normal() {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        const double u = 1.0 - uniform();  // (0, 1]
        const double angle = 2.0 * std::numbers::pi * uniform();
        const double radius = std::sqrt(-2.0 * std::log(u));
        spare_ = radius * std::sin(angle);
        has_spare_ = true;
        return radius * std::cos(angle);
    }

    static std::uint64_t splitmix(std::uint64_t& x) {
        std::uint64_t z = (x += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }

private:
    static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    std::uint64_t state_[4]{};
    double spare_ = 0;
    bool has_spare_ = false;
};

/// A seed for one part of the trace, mixed from the run's seed and the part's coordinates.
inline std::uint64_t sub_seed(std::uint64_t seed, std::uint64_t a, std::uint64_t b, std::uint64_t c) {
    std::uint64_t x = seed;
    std::uint64_t h = Random::splitmix(x);
    for (const std::uint64_t part : {a, b, c}) {
        x = h ^ (part + 0x632be59bd9b4e019ull);
        h = Random::splitmix(x);
    }
    return h;
}

}  // namespace detail

/// The synthetic trace's constants (docs/eval.md gives the reasons).
struct SyntheticShape {
    static constexpr std::int32_t sinks = 4;
    static constexpr float theta = 500000.0f;
    static constexpr double needle_rate = 1.0 / 64;                ///< per position and KV head
    static constexpr double align_rate = 1.0 / 8;                  ///< per query and query head
    static constexpr double local_min = 8.0, local_max = 12.0;     ///< a_h: logit of a key at distance 0
    static constexpr double sink_min = 7.0, sink_max = 11.0;       ///< b_h: logit of a sink
    static constexpr double needle_min = 11.0, needle_max = 15.0;  ///< g: logit of an aligned needle
    static constexpr double key_noise = 0.3, query_noise = 0.3;    ///< per coordinate, before scaling
    static constexpr double sink_value_scale = 0.1;                ///< sinks carry small values
};

/// DuoAttention-style gate values alpha[L][Hkv] measured on a trace: for each KV head, the mean dense
/// attention mass that its query heads put outside the first `sinks` positions and the last `window`
/// (the part a streaming head would lose), over up to 64 decode queries spread evenly over [prefill, T).
/// A head that really is local (its attention stays on sinks and recent tokens) gets a low alpha, one
/// that retrieves far tokens a high alpha; LServe's static sparsity then streams the lowest first.
inline std::vector<std::vector<float>> measured_gates(const Trace& trace, std::int32_t sinks, std::int32_t window) {
    const std::int32_t T = trace.tokens, first = std::min(trace.prefill, T - 1);
    const std::int32_t samples = std::min<std::int32_t>(64, T - first);
    std::vector<std::int32_t> positions;
    for (std::int32_t i = 0; i < samples; ++i) {
        positions.push_back(first + static_cast<std::int32_t>(static_cast<std::int64_t>(i) * (T - first) / samples));
    }
    return gate_values(trace, sinks, window, positions);
}

/// Generates the trace described at the top of this file.
inline Trace make_synthetic(const SyntheticConfig& config) {
    using S = SyntheticShape;
    Trace trace;
    trace.source = "synthetic " + config.text();
    trace.shape = ModelShape{config.layers, config.q_heads, config.kv_heads, config.dim};
    trace.tokens = config.tokens;
    trace.prefill = config.prefill_tokens();
    trace.rope = Rope{RopeStyle::interleaved, S::theta};
    trace.shape.validate();
    kvsparse::detail::require(config.dim % 2 == 0 && config.dim >= 4, "dim", config.dim, "must be even and at least 4");

    const std::int32_t L = config.layers, T = config.tokens, Hq = config.q_heads, Hkv = config.kv_heads, D = config.dim;
    const std::int32_t G = Hq / Hkv;
    const std::size_t Du = static_cast<std::size_t>(D);
    trace.q.assign(static_cast<std::size_t>(L) * static_cast<std::size_t>(T) * static_cast<std::size_t>(Hq) * Du, 0.0f);
    trace.k.assign(static_cast<std::size_t>(L) * static_cast<std::size_t>(T) * static_cast<std::size_t>(Hkv) * Du,
                   0.0f);
    trace.v.assign(trace.k.size(), 0.0f);
    trace.needle_queries.assign(static_cast<std::size_t>(L) * static_cast<std::size_t>(T) * static_cast<std::size_t>(Hq), 0);

    // Coordinate groups by RoPE pair (interleaved: pair i is coordinates 2i, 2i+1; it turns by theta^(-2i/D)).
    const std::int32_t pairs = D / 2;
    const std::int32_t local_pairs = std::max(1, pairs / 2);            // [0, local_pairs)
    const std::int32_t content_first = pairs - std::max(1, pairs / 4);  // [content_first, pairs)
    const double root_d = std::sqrt(static_cast<double>(D));

    // Scores are q.k / sqrt(D). Directions are scaled so that |u|^2 = |s|^2 = |c|^2 = sqrt(D): a query
    // part x u meets a key part u with logit x (times the RoPE kernel).
    const auto normalize = [&](std::vector<double>& x) {
        double n2 = 0;
        for (const double e : x) n2 += e * e;
        const double f = n2 > 0 ? std::sqrt(root_d / n2) : 0;
        for (double& e : x) e *= f;
    };
    const auto random_content = [&](detail::Random& rng) {
        std::vector<double> x(Du, 0.0);
        for (std::int32_t p = content_first; p < pairs; ++p) {
            x[static_cast<std::size_t>(2 * p)] = rng.normal();
            x[static_cast<std::size_t>(2 * p + 1)] = rng.normal();
        }
        return x;
    };
    const Rope rope = *trace.rope;

    for (std::int32_t l = 0; l < L; ++l) {
        for (std::int32_t g = 0; g < Hkv; ++g) {
            detail::Random rng(
                detail::sub_seed(config.seed, static_cast<std::uint64_t>(l), static_cast<std::uint64_t>(g), 0));
            // Directions of this KV head.
            std::vector<double> u(Du, 0.0);
            for (std::int32_t p = 0; p < local_pairs; ++p) {
                const double angle = 2.0 * std::numbers::pi * rng.uniform();
                u[static_cast<std::size_t>(2 * p)] = std::cos(angle);
                u[static_cast<std::size_t>(2 * p + 1)] = std::sin(angle);
            }
            normalize(u);
            std::vector<double> s = random_content(rng);
            normalize(s);

            // Needles: positions and their content directions (orthogonal to s).
            std::vector<std::int32_t> needles;
            std::vector<std::vector<double>> contents;
            for (std::int32_t j = S::sinks; j < T; ++j) {
                if (rng.uniform() >= S::needle_rate) continue;
                std::vector<double> c = random_content(rng);
                double cs = 0;
                for (std::size_t d = 0; d < Du; ++d) cs += c[d] * s[d];
                for (std::size_t d = 0; d < Du; ++d) c[d] -= cs / root_d * s[d];
                normalize(c);
                needles.push_back(j);
                contents.push_back(std::move(c));
            }

            // Keys and values.
            std::size_t next_needle = 0;
            for (std::int32_t j = 0; j < T; ++j) {
                float* key =
                    trace.k.data() +
                    ((static_cast<std::size_t>(l) * static_cast<std::size_t>(T) + static_cast<std::size_t>(j)) *
                         static_cast<std::size_t>(Hkv) +
                     static_cast<std::size_t>(g)) *
                        Du;
                float* value = trace.v.data() + (key - trace.k.data());
                const bool needle = next_needle < needles.size() && needles[next_needle] == j;
                for (std::size_t d = 0; d < Du; ++d) {
                    double x = u[d] + S::key_noise * rng.normal();
                    if (j < S::sinks) x += s[d];
                    if (needle) x += contents[next_needle][d];
                    key[d] = static_cast<float>(x);
                    value[d] = static_cast<float>(rng.normal() * (j < S::sinks ? S::sink_value_scale : 1.0));
                }
                if (needle) ++next_needle;
                rope_rotate(key, D, j, rope);
            }

            // Queries of the heads in this group.
            for (std::int32_t r = 0; r < G; ++r) {
                const std::int32_t h = g * G + r;
                detail::Random qrng(
                    detail::sub_seed(config.seed, static_cast<std::uint64_t>(l), static_cast<std::uint64_t>(h), 1));
                const double a = qrng.uniform(S::local_min, S::local_max);
                const double b = qrng.uniform(S::sink_min, S::sink_max);
                std::size_t needles_before = 0;
                for (std::int32_t t = 0; t < T; ++t) {
                    while (needles_before < needles.size() && needles[needles_before] < t) ++needles_before;
                    float* query =
                        trace.q.data() +
                        ((static_cast<std::size_t>(l) * static_cast<std::size_t>(T) + static_cast<std::size_t>(t)) *
                             static_cast<std::size_t>(Hq) +
                         static_cast<std::size_t>(h)) *
                            Du;
                    const std::vector<double>* aligned = nullptr;
                    double strength = 0;
                    if (needles_before > 0 && qrng.uniform() < S::align_rate) {
                        aligned = &contents[qrng.below(needles_before)];
                        strength = qrng.uniform(S::needle_min, S::needle_max);
                        trace.needle_queries[(static_cast<std::size_t>(l) * static_cast<std::size_t>(T) +
                                              static_cast<std::size_t>(t)) *
                                                 static_cast<std::size_t>(Hq) +
                                             static_cast<std::size_t>(h)] = 1;
                    }
                    for (std::size_t d = 0; d < Du; ++d) {
                        double x = a * u[d] + b * s[d] + S::query_noise * qrng.normal();
                        if (aligned) x += strength * (*aligned)[d];
                        query[d] = static_cast<float>(x);
                    }
                    rope_rotate(query, D, t, rope);
                }
            }
        }
    }
    // Gate values for LServe: attention mass beyond 4 sinks and the last 256 positions (docs/eval.md).
    trace.alpha = measured_gates(trace, S::sinks, 256);
    return trace;
}

}  // namespace kvsparse::tools
