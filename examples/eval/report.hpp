#pragma once
// The table and the JSON document of an evaluation.

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "eval/replay.hpp"
#include "eval/trace.hpp"

namespace kvsparse::tools {

/// "16.00 MiB", "512.0 KiB", "900 B".
inline std::string human_bytes(std::int64_t bytes) {
    const double b = static_cast<double>(bytes);
    if (bytes >= (std::int64_t{1} << 30)) return fmt::format("{:.2f} GiB", b / (1 << 30));
    if (bytes >= (std::int64_t{1} << 20)) return fmt::format("{:.2f} MiB", b / (1 << 20));
    if (bytes >= (std::int64_t{1} << 10)) return fmt::format("{:.1f} KiB", b / (1 << 10));
    return fmt::format("{} B", bytes);
}

/// One line about the trace.
inline std::string describe_trace(const Trace& trace) {
    std::string rope = "none declared";
    if (trace.rope) rope = fmt::format("{}, theta {:g}", rope_style_name(trace.rope->style), trace.rope->theta);
    std::string needles;
    if (!trace.needle_queries.empty()) {
        std::int64_t marked = 0;
        for (std::int32_t l = 0; l < trace.shape.layers; ++l)
            for (std::int32_t t = trace.prefill; t < trace.tokens; ++t)
                for (std::int32_t h = 0; h < trace.shape.q_heads; ++h) marked += trace.needle_query(l, t, h) ? 1 : 0;
        needles = fmt::format(", {} decode queries aligned with a needle", marked);
    }
    return fmt::format("trace: {}\n  L={} T={} Hq={} Hkv={} D={} ({}), prefill {} + {} decode steps, RoPE: {}{}",
                       trace.source, trace.shape.layers, trace.tokens, trace.shape.q_heads, trace.shape.kv_heads,
                       trace.shape.head_dim, trace.dtype, trace.prefill, trace.decode_steps(), rope, needles);
}

/// The results as a fixed-width table, one row per policy.
inline std::string format_table(const std::vector<PolicyResult>& results) {
    std::size_t width = 6;
    for (const PolicyResult& r : results) width = std::max(width, r.spec.size());
    std::string out =
        fmt::format("{:<{}}  {:>11}  {:>10}  {:>13}  {:>12}  {:>11}  {:>10}  {:>14}\n", "policy", width, "recall mean",
                    "recall min", "needle recall", "out err mean", "peak tokens", "peak bytes", "select ns/step");
    out += std::string(width + 2 + 11 + 2 + 10 + 2 + 13 + 2 + 12 + 2 + 11 + 2 + 10 + 2 + 14, '-') + "\n";
    for (const PolicyResult& r : results) {
        const std::string needle =
            std::isfinite(r.needle_recall_mean) ? fmt::format("{:.4f}", r.needle_recall_mean) : std::string("-");
        out += fmt::format("{:<{}}  {:>11.4f}  {:>10.4f}  {:>13}  {:>12.4f}  {:>11}  {:>10}  {:>14.0f}\n", r.spec, width,
                           r.recall_mean, r.recall_min, needle, r.output_error_mean, r.peak_tokens,
                           human_bytes(r.peak_bytes), r.select_ns_per_step);
    }
    return out;
}

/// {"trace": {...}, "policies": [{"spec", "recall_mean", "recall_min", "needle_recall_mean",
///  "output_error_mean", "peak_tokens", "peak_bytes", "select_ns_per_step"}, ...]}
inline nlohmann::ordered_json to_json(const Trace& trace, const std::vector<PolicyResult>& results) {
    nlohmann::ordered_json t = {
        {"source", trace.source},         {"layers", trace.shape.layers},     {"tokens", trace.tokens},
        {"q_heads", trace.shape.q_heads}, {"kv_heads", trace.shape.kv_heads}, {"head_dim", trace.shape.head_dim},
        {"dtype", trace.dtype},           {"prefill", trace.prefill},         {"decode_steps", trace.decode_steps()},
    };
    if (trace.rope) {
        t["rope"] = {{"style", rope_style_name(trace.rope->style)}, {"theta", trace.rope->theta}};
    } else {
        t["rope"] = nullptr;
    }
    nlohmann::ordered_json policies = nlohmann::ordered_json::array();
    const auto number = [](double x) {
        return std::isfinite(x) ? nlohmann::ordered_json(x) : nlohmann::ordered_json(nullptr);
    };
    for (const PolicyResult& r : results) {
        policies.push_back({
            {"spec", r.spec},
            {"recall_mean", number(r.recall_mean)},
            {"recall_min", number(r.recall_min)},
            {"needle_recall_mean", number(r.needle_recall_mean)},
            {"output_error_mean", number(r.output_error_mean)},
            {"peak_tokens", r.peak_tokens},
            {"peak_bytes", r.peak_bytes},
            {"select_ns_per_step", number(r.select_ns_per_step)},
        });
    }
    return {{"trace", t}, {"policies", policies}};
}

}  // namespace kvsparse::tools
