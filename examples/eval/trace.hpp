#pragma once
// Attention traces: the queries, keys and values one sequence produced in every layer of a model.
//
// A trace directory holds q.npy [L, T, Hq, D], k.npy and v.npy [L, T, Hkv, D] (float32 or float16,
// little-endian, C order) and optionally meta.json:
//   {"prefill": N,                                        positions [0, N) are one prefill call (default 1)
//    "rope": {"style": "interleaved"|"half_split",        the RoPE the keys were rotated with; only
//             "theta": x},                                in-cache positions use it (default interleaved, 10000)
//    "alpha": [[...], ...]}                               LServe gate values [L][Hkv]
// and optionally needles.npy, uint8 [L, T, Hq]: 1 where the query is aligned with an earlier "needle" key
// (the synthetic trace writes it; recall is then also reported over those queries).
// Keys are as an engine caches them: already rotated at their absolute positions. Other members of
// meta.json are ignored.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <kvsparse/error.hpp>
#include <kvsparse/rope.hpp>
#include <kvsparse/shape.hpp>

#include "common/npy.hpp"

namespace kvsparse::tools {

struct Trace {
    std::string source;             ///< the directory, or "synthetic ..." with its parameters
    std::string dtype = "float32";  ///< of the files it was read from
    ModelShape shape;
    std::int32_t tokens = 0;                ///< T
    std::int32_t prefill = 1;               ///< positions [0, prefill) are one prefill call
    std::optional<Rope> rope;               ///< the RoPE the trace declares, if any
    std::vector<std::vector<float>> alpha;  ///< [L][Hkv] LServe gate values, or empty
    /// [L][T][Hq]: 1 where the query is aligned with an earlier needle key (synthetic traces), or empty.
    std::vector<std::uint8_t> needle_queries;
    std::vector<float> q, k, v;             ///< [L][T][H][D]

    /// The RoPE in-cache positions use: the declared one, else interleaved with theta 10000.
    Rope effective_rope() const { return rope.value_or(Rope{}); }

    std::int32_t decode_steps() const { return tokens - prefill; }

    /// Whether query head `h` of `layer` at position `t` is marked as aligned with a needle.
    bool needle_query(std::int32_t layer, std::int32_t t, std::int32_t h) const {
        if (needle_queries.empty()) return false;
        const std::size_t i = (static_cast<std::size_t>(layer) * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t)) *
                                  static_cast<std::size_t>(shape.q_heads) +
                              static_cast<std::size_t>(h);
        return needle_queries[i] != 0;
    }

    /// Rows [t, t + n) of layer `layer`: [n][H][D].
    std::span<const float> queries(std::int32_t layer, std::int32_t t, std::int32_t n = 1) const {
        return rows(q, shape.q_heads, layer, t, n);
    }
    std::span<const float> keys(std::int32_t layer, std::int32_t t, std::int32_t n = 1) const {
        return rows(k, shape.kv_heads, layer, t, n);
    }
    std::span<const float> values(std::int32_t layer, std::int32_t t, std::int32_t n = 1) const {
        return rows(v, shape.kv_heads, layer, t, n);
    }

    /// Checks shapes, sizes, prefill and alpha; throws format_error.
    void validate() const {
        const auto fail = [&](const std::string& what) { throw format_error(source + ": " + what); };
        try {
            shape.validate();
        } catch (const error& e) {
            fail(e.what());
        }
        if (tokens < 1) fail("the trace has no tokens");
        if (prefill < 0 || prefill >= tokens) {
            fail("prefill = " + std::to_string(prefill) + " must be in [0, " + std::to_string(tokens - 1) +
                 "]: at least one decode step must remain");
        }
        const auto expect = [&](const std::vector<float>& x, std::int32_t heads, const char* name) {
            const std::size_t n = static_cast<std::size_t>(shape.layers) * static_cast<std::size_t>(tokens) *
                                  static_cast<std::size_t>(heads) * static_cast<std::size_t>(shape.head_dim);
            if (x.size() != n)
                fail(std::string(name) + " holds " + std::to_string(x.size()) + " values, expected " +
                     std::to_string(n));
        };
        expect(q, shape.q_heads, "q");
        expect(k, shape.kv_heads, "k");
        expect(v, shape.kv_heads, "v");
        if (!alpha.empty()) {
            if (alpha.size() != static_cast<std::size_t>(shape.layers)) {
                fail("alpha has " + std::to_string(alpha.size()) + " rows, expected one per layer (" +
                     std::to_string(shape.layers) + ")");
            }
            for (std::size_t l = 0; l < alpha.size(); ++l) {
                if (alpha[l].size() != static_cast<std::size_t>(shape.kv_heads)) {
                    fail("alpha row " + std::to_string(l) + " has " + std::to_string(alpha[l].size()) +
                         " values, expected one per KV head (" + std::to_string(shape.kv_heads) + ")");
                }
            }
        }
        if (rope && !(rope->theta > 0.0f)) fail("rope theta must be positive");
        if (!needle_queries.empty() && needle_queries.size() != static_cast<std::size_t>(shape.layers) *
                                                                  static_cast<std::size_t>(tokens) *
                                                                  static_cast<std::size_t>(shape.q_heads)) {
            fail("needles.npy holds " + std::to_string(needle_queries.size()) + " marks, expected L * T * Hq");
        }
    }

private:
    std::span<const float> rows(const std::vector<float>& x, std::int32_t heads, std::int32_t layer, std::int32_t t,
                                std::int32_t n) const {
        const std::size_t row = static_cast<std::size_t>(heads) * static_cast<std::size_t>(shape.head_dim);
        const std::size_t first =
            (static_cast<std::size_t>(layer) * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(t)) * row;
        return std::span<const float>(x).subspan(first, static_cast<std::size_t>(n) * row);
    }
};

inline std::string_view rope_style_name(RopeStyle style) {
    return style == RopeStyle::interleaved ? "interleaved" : "half_split";
}

namespace detail {

inline void read_meta(const std::filesystem::path& file, Trace& trace) {
    const std::string where = file.string();
    std::ifstream in(file);
    if (!in) throw format_error(where + ": cannot open");
    nlohmann::json meta;
    try {
        meta = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
        throw format_error(where + ": not valid JSON: " + e.what());
    }
    if (!meta.is_object()) throw format_error(where + ": must hold a JSON object");
    if (meta.contains("prefill")) {
        const auto& p = meta["prefill"];
        if (!p.is_number_integer()) throw format_error(where + ": \"prefill\" must be an integer, got " + p.dump());
        const auto n = p.get<std::int64_t>();
        if (n < 0 || n >= trace.tokens) {
            throw format_error(where + ": \"prefill\" = " + std::to_string(n) + " must be in [0, " +
                               std::to_string(trace.tokens - 1) + "] (T = " + std::to_string(trace.tokens) +
                               "; at least one decode step must remain)");
        }
        trace.prefill = static_cast<std::int32_t>(n);
    }
    if (meta.contains("rope")) {
        const auto& r = meta["rope"];
        if (!r.is_object()) throw format_error(where + ": \"rope\" must be an object {\"style\": ..., \"theta\": ...}");
        Rope rope;
        if (r.contains("style")) {
            const auto& s = r["style"];
            if (s == "interleaved") {
                rope.style = RopeStyle::interleaved;
            } else if (s == "half_split") {
                rope.style = RopeStyle::half_split;
            } else {
                throw format_error(where + ": \"rope.style\" = " + s.dump() +
                                   ": expected \"interleaved\" or \"half_split\"");
            }
        }
        if (r.contains("theta")) {
            const auto& th = r["theta"];
            if (!th.is_number() || !(th.get<double>() > 0)) {
                throw format_error(where + ": \"rope.theta\" = " + th.dump() + ": expected a positive number");
            }
            rope.theta = th.get<float>();
        }
        trace.rope = rope;
    }
    if (meta.contains("alpha")) {
        const auto& a = meta["alpha"];
        if (!a.is_array()) throw format_error(where + ": \"alpha\" must be an array of per-layer arrays [L][Hkv]");
        trace.alpha.clear();
        for (const auto& row : a) {
            if (!row.is_array())
                throw format_error(where + ": \"alpha\" must be an array of per-layer arrays [L][Hkv]");
            std::vector<float> values;
            for (const auto& x : row) {
                if (!x.is_number()) throw format_error(where + ": \"alpha\" holds a non-number: " + x.dump());
                values.push_back(x.get<float>());
            }
            trace.alpha.push_back(std::move(values));
        }
    }
}

inline std::vector<float> read_tensor(const std::filesystem::path& file, std::string& dtype,
                                      std::vector<std::int64_t>& shape) {
    const npy::Array array = npy::read(file);
    if (array.dtype != npy::DType::float32 && array.dtype != npy::DType::float16) {
        throw format_error(file.string() + ": dtype " + std::string(npy::name_of(array.dtype)) +
                           ", expected float32 or float16");
    }
    if (array.shape.size() != 4) {
        throw format_error(file.string() + ": shape " + npy::shape_string(array.shape) +
                           ", expected 4 dimensions [L, T, H, D]");
    }
    for (const std::int64_t n : array.shape) {
        if (n < 1 || n > std::numeric_limits<std::int32_t>::max()) {
            throw format_error(file.string() + ": shape " + npy::shape_string(array.shape) +
                               ": every dimension must be in [1, 2^31)");
        }
    }
    dtype = std::string(npy::name_of(array.dtype));
    shape = array.shape;
    return array.to_float();
}

}  // namespace detail

/// Loads q.npy, k.npy, v.npy and the optional meta.json of `dir`.
inline Trace load_trace(const std::filesystem::path& dir) {
    Trace trace;
    trace.source = dir.string();
    if (!std::filesystem::is_directory(dir)) throw format_error(trace.source + ": not a directory");
    std::string q_type, k_type, v_type;
    std::vector<std::int64_t> qs, ks, vs;
    trace.q = detail::read_tensor(dir / "q.npy", q_type, qs);
    trace.k = detail::read_tensor(dir / "k.npy", k_type, ks);
    trace.v = detail::read_tensor(dir / "v.npy", v_type, vs);
    if (ks != vs)
        throw format_error(trace.source + ": k.npy " + npy::shape_string(ks) + " and v.npy " + npy::shape_string(vs) +
                           " differ in shape");
    if (qs[0] != ks[0] || qs[1] != ks[1] || qs[3] != ks[3]) {
        throw format_error(trace.source + ": q.npy " + npy::shape_string(qs) + " and k.npy " + npy::shape_string(ks) +
                           " must agree in L, T and D");
    }
    if (qs[2] % ks[2] != 0) {
        throw format_error(trace.source + ": q.npy has " + std::to_string(qs[2]) +
                           " heads, not a multiple of k.npy's " + std::to_string(ks[2]));
    }
    trace.dtype = q_type == k_type && k_type == v_type ? q_type : "mixed";
    trace.shape = ModelShape{static_cast<std::int32_t>(qs[0]), static_cast<std::int32_t>(qs[2]),
                             static_cast<std::int32_t>(ks[2]), static_cast<std::int32_t>(qs[3])};
    trace.tokens = static_cast<std::int32_t>(qs[1]);
    if (std::filesystem::exists(dir / "meta.json")) detail::read_meta(dir / "meta.json", trace);
    if (std::filesystem::exists(dir / "needles.npy")) {
        const npy::Array needles = npy::read(dir / "needles.npy");
        const std::vector<std::int64_t> expected{qs[0], qs[1], qs[2]};
        if (needles.dtype != npy::DType::uint8 || needles.shape != expected) {
            throw format_error((dir / "needles.npy").string() + ": expected uint8 " + npy::shape_string(expected) +
                               ", got " + std::string(npy::name_of(needles.dtype)) + " " + npy::shape_string(needles.shape));
        }
        trace.needle_queries = needles.to_uint8();
    }
    trace.validate();
    return trace;
}

/// Writes the trace as q.npy, k.npy, v.npy (float32) and meta.json into `dir` (created if needed).
inline void save_trace(const Trace& trace, const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    const auto L = std::int64_t{trace.shape.layers};
    const auto T = std::int64_t{trace.tokens};
    const auto D = std::int64_t{trace.shape.head_dim};
    npy::write(dir / "q.npy", npy::Array::float32({L, T, trace.shape.q_heads, D}, trace.q));
    npy::write(dir / "k.npy", npy::Array::float32({L, T, trace.shape.kv_heads, D}, trace.k));
    npy::write(dir / "v.npy", npy::Array::float32({L, T, trace.shape.kv_heads, D}, trace.v));
    nlohmann::json meta;
    meta["prefill"] = trace.prefill;
    if (trace.rope) meta["rope"] = {{"style", rope_style_name(trace.rope->style)}, {"theta", trace.rope->theta}};
    if (!trace.alpha.empty()) meta["alpha"] = trace.alpha;
    if (!trace.needle_queries.empty())
        npy::write(dir / "needles.npy", npy::Array::uint8({L, T, trace.shape.q_heads}, trace.needle_queries));
    std::ofstream out(dir / "meta.json");
    out << meta.dump(2) << "\n";
    if (!out) throw format_error((dir / "meta.json").string() + ": write failed");
}

}  // namespace kvsparse::tools
