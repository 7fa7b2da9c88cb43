#pragma once
// Independent naive reference for the tests, in double precision. Nothing here calls kvsparse: storage
// rounding searches the format's values, RoPE and attention are the textbook formulas, and each
// policy's set S_t is derived twice from REFERENCE.md (a token-by-token simulation and the closed form).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <set>
#include <type_traits>
#include <vector>

#include <kvsparse/dtype.hpp>  // only the names of the storage types

namespace ref {

// ---- deterministic data -----------------------------------------------------------------------------

inline std::uint64_t mix(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/// Uniform in [-1, 1), a pure function of its coordinates: any token can be regenerated without storing it.
inline float uniform(std::uint64_t seed, std::uint64_t a, std::uint64_t b = 0, std::uint64_t c = 0,
                     std::uint64_t d = 0) {
    const std::uint64_t h = mix(seed ^ mix(a ^ mix(b ^ mix(c ^ mix(d)))));
    return static_cast<float>(static_cast<double>(h >> 40) * 0x1p-23 - 1.0);  // 24 bits: exact in float
}

/// Queries, keys and values of one synthetic sequence, per (layer, position, head, dim).
struct Tokens {
    std::uint64_t seed = 1;
    int q_heads = 1;
    int kv_heads = 1;
    int dim = 1;

    float q(int layer, int pos, int head, int d) const { return uniform(seed, 1, layer, pos, static_cast<std::uint64_t>(head) * 4096 + d); }
    float k(int layer, int pos, int head, int d) const { return uniform(seed, 2, layer, pos, static_cast<std::uint64_t>(head) * 4096 + d); }
    float v(int layer, int pos, int head, int d) const { return uniform(seed, 3, layer, pos, static_cast<std::uint64_t>(head) * 4096 + d); }

    /// Rows [n][heads][dim] for positions first..first+n-1, as the cache takes them.
    std::vector<float> queries(int layer, int first, int n) const { return rows(1, layer, first, n, q_heads); }
    std::vector<float> keys(int layer, int first, int n) const { return rows(2, layer, first, n, kv_heads); }
    std::vector<float> values(int layer, int first, int n) const { return rows(3, layer, first, n, kv_heads); }

private:
    std::vector<float> rows(int what, int layer, int first, int n, int heads) const {
        std::vector<float> out;
        out.reserve(static_cast<std::size_t>(n) * static_cast<std::size_t>(heads * dim));
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < heads; ++h)
                for (int d = 0; d < dim; ++d)
                    out.push_back(uniform(seed, static_cast<std::uint64_t>(what), layer, first + i,
                                          static_cast<std::uint64_t>(h) * 4096 + d));
        return out;
    }
};

// ---- storage formats --------------------------------------------------------------------------------

/// A binary floating-point format with `exponent_bits` and `mantissa_bits` (sign bit on top).
struct Format {
    int exponent_bits;
    int mantissa_bits;

    std::uint32_t sign_bit() const { return 1u << (exponent_bits + mantissa_bits); }
    std::uint32_t inf_bits() const { return ((1u << exponent_bits) - 1u) << mantissa_bits; }
    int bias() const { return (1 << (exponent_bits - 1)) - 1; }

    /// Magnitude of a non-negative pattern straight from the IEEE definition. The +inf pattern yields
    /// the value one ulp above the largest finite number, which is what rounding compares against.
    double magnitude(std::uint32_t bits) const {
        const std::uint32_t e = bits >> mantissa_bits;
        const std::uint32_t m = bits & ((1u << mantissa_bits) - 1u);
        if (e == 0) return std::ldexp(static_cast<double>(m), 1 - bias() - mantissa_bits);
        return std::ldexp(static_cast<double>((1u << mantissa_bits) + m), static_cast<int>(e) - bias() - mantissa_bits);
    }

    /// Value of any pattern: signed, inf and NaN included.
    double decode(std::uint32_t bits) const {
        const bool negative = (bits & sign_bit()) != 0;
        const std::uint32_t mag = bits & (sign_bit() - 1u);
        double value;
        if (mag > inf_bits()) {
            value = std::numeric_limits<double>::quiet_NaN();
        } else if (mag == inf_bits()) {
            value = std::numeric_limits<double>::infinity();
        } else {
            value = magnitude(mag);
        }
        return negative ? -value : value;
    }

    /// magnitude() of every non-negative pattern up to +inf, ascending; built once per format (the two
    /// formats differ in exponent_bits).
    const std::vector<double>& magnitudes() const {
        static std::vector<double> tables[2];
        std::vector<double>& table = tables[exponent_bits == 5 ? 0 : 1];
        if (table.empty()) {
            for (std::uint32_t b = 0; b <= inf_bits(); ++b) table.push_back(magnitude(b));
        }
        return table;
    }

    bool is_nan(std::uint32_t bits) const { return (bits & (sign_bit() - 1u)) > inf_bits(); }

    /// Nearest representable pattern to `x` (finite or inf), ties to the even pattern; found by a
    /// binary search over the monotone non-negative patterns and a comparison of distances.
    std::uint32_t round(double x) const {
        if (std::isnan(x)) return inf_bits() | (1u << (mantissa_bits - 1));
        const std::uint32_t sign = std::signbit(x) ? sign_bit() : 0u;
        const double a = std::fabs(x);
        const std::vector<double>& values = magnitudes();
        if (a >= values.back()) return sign | inf_bits();
        // lo: the last pattern whose magnitude is <= a; hi = lo + 1 lies above a.
        const auto lo = static_cast<std::uint32_t>(std::upper_bound(values.begin(), values.end(), a) - values.begin() - 1);
        const std::uint32_t hi = lo + 1;
        const double below = a - values[lo];
        const double above = values[hi] - a;
        if (below < above) return sign | lo;
        if (above < below) return sign | hi;
        return sign | ((lo & 1u) == 0 ? lo : hi);
    }
};

inline constexpr Format half_format{5, 10};
inline constexpr Format bfloat16_format{8, 7};

/// What a stored element of type T reads back as: x itself for float, else x rounded by the reference.
template <class T>
double stored(float x) {
    if constexpr (std::is_same_v<T, kvsparse::half>) {
        return half_format.decode(half_format.round(x));
    } else if constexpr (std::is_same_v<T, kvsparse::bfloat16>) {
        return bfloat16_format.decode(bfloat16_format.round(x));
    } else {
        static_assert(std::is_same_v<T, float>);
        return x;
    }
}

// ---- RoPE -------------------------------------------------------------------------------------------

/// Rotates x[dim] by `position`: pair i turns by position * theta^(-2i/dim). The frequency is formed as
/// exp(log) rather than pow, so the reference does not share the library's arithmetic.
inline void rope(double* x, int dim, double position, bool interleaved, double theta) {
    const int pairs = dim / 2;
    for (int i = 0; i < pairs; ++i) {
        const double frequency = std::exp(-(2.0 * i / dim) * std::log(theta));
        const double angle = position * frequency;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + pairs;
        const double xa = x[a], xb = x[b];
        x[a] = xa * std::cos(angle) - xb * std::sin(angle);
        x[b] = xa * std::sin(angle) + xb * std::cos(angle);
    }
}

// ---- attention --------------------------------------------------------------------------------------

/// softmax(q·k / sqrt(D)) over the rows of `keys`, then the weighted sum of `values`; rows are [n][D].
inline std::vector<double> attention(const std::vector<double>& q, const std::vector<std::vector<double>>& keys,
                                     const std::vector<std::vector<double>>& values) {
    const std::size_t dim = q.size();
    std::vector<double> scores(keys.size());
    double top = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < keys.size(); ++j) {
        double dot = 0;
        for (std::size_t d = 0; d < dim; ++d) dot += q[d] * keys[j][d];
        scores[j] = dot / std::sqrt(static_cast<double>(dim));
        top = std::max(top, scores[j]);
    }
    double sum = 0;
    for (double& s : scores) sum += (s = std::exp(s - top));
    std::vector<double> out(dim, 0.0);
    for (std::size_t j = 0; j < keys.size(); ++j)
        for (std::size_t d = 0; d < dim; ++d) out[d] += scores[j] / sum * values[j][d];
    return out;
}

// ---- policies ---------------------------------------------------------------------------------------

struct PolicySpec {
    enum Kind { dense, sliding_window, attention_sink } kind = dense;
    int sinks = 0;
    int window = 0;

    int budget() const { return kind == dense ? std::numeric_limits<int>::max() : sinks + window; }
    int protected_below() const { return kind == attention_sink ? sinks : 0; }
};

/// The tokens one (layer, KV head) holds, simulated token by token as REFERENCE.md words it.
class Held {
public:
    explicit Held(PolicySpec spec) : spec_(spec) {}

    /// Decode append: the new token enters; beyond the budget the oldest non-sink token leaves.
    void decode(int position) {
        held_.insert(position);
        newest_ = position;
        if (static_cast<long long>(held_.size()) > spec_.budget()) {
            held_.erase(held_.lower_bound(spec_.protected_below()));
        }
    }

    /// Prefill of positions first..first+n-1: after its attention, keep the sinks and the last W.
    void prefill(int first, int n) {
        for (int p = first; p < first + n; ++p) held_.insert(p);
        newest_ = first + n - 1;
        if (spec_.kind == PolicySpec::dense) return;
        for (auto it = held_.begin(); it != held_.end();) {
            const bool keep = *it < spec_.protected_below() || *it > newest_ - spec_.window;
            it = keep ? std::next(it) : held_.erase(it);
        }
    }

    void clear() { held_.clear(); newest_ = -1; }
    std::vector<int> positions() const { return {held_.begin(), held_.end()}; }
    int newest() const { return newest_; }
    std::size_t size() const { return held_.size(); }

private:
    PolicySpec spec_;
    std::set<int> held_;
    int newest_ = -1;
};

/// S_t in closed form: Dense {0..t}; SlidingWindow {max(0,t-W+1)..t};
/// AttentionSink [0, min(S,t+1)) ∪ [max(S,t-W+1), t].
inline std::vector<int> closed_form_set(PolicySpec spec, int t) {
    std::vector<int> s;
    switch (spec.kind) {
        case PolicySpec::dense:
            for (int p = 0; p <= t; ++p) s.push_back(p);
            break;
        case PolicySpec::sliding_window:
            for (int p = std::max(0, t - spec.window + 1); p <= t; ++p) s.push_back(p);
            break;
        case PolicySpec::attention_sink:
            for (int p = 0; p < std::min(spec.sinks, t + 1); ++p) s.push_back(p);
            for (int p = std::max(spec.sinks, t - spec.window + 1); p <= t; ++p) s.push_back(p);
            break;
    }
    return s;
}

/// Queries for KVCache::select where the policy ignores them (it selects by position only): zeros of the
/// right size.
template <class Cache>
std::vector<float> unused_queries(const Cache& cache) {
    return std::vector<float>(static_cast<std::size_t>(cache.shape().q_heads * cache.shape().head_dim), 0.0f);
}

}  // namespace ref
