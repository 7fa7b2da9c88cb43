#pragma once
// calibrate-gates: DuoAttention-style gate values alpha[L][Hkv] for a model that ships none, measured on
// a dense run (LServe's head kinds, docs/lserve.md). For each (layer, KV head), alpha is the dense
// attention mass that the head's query heads put outside the first `sink` positions and the last
// `local` positions (the part a streaming head would lose), averaged over the group's query heads and
// over every query at positions t >= sink + local (earlier queries lose nothing). A local head gets a
// low alpha and streams first under LServe's static sparsity. The definition is the one kvsparse-eval's
// synthetic trace uses for its gates (eval/synthetic.hpp), on every query instead of 64 samples.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "eval/trace.hpp"
#include "llama/model.hpp"
#include "llama/trace_dump.hpp"

namespace kvsparse::llama {

/// alpha[L][Hkv] of `trace` (post-RoPE q and k): see the top of this file. Needs tokens > sink + local.
inline std::vector<std::vector<float>> gate_values(const tools::Trace& trace, std::int32_t sink, std::int32_t local) {
    const std::int32_t L = trace.shape.layers, G = trace.shape.group_size();
    const std::int32_t T = trace.tokens, D = trace.shape.head_dim;
    if (sink < 0 || local < 1 || T <= sink + local) {
        throw invalid_argument("calibrate-gates: " + std::to_string(T) + " tokens leave no query past sink " +
                               std::to_string(sink) + " + local " + std::to_string(local));
    }
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<std::vector<float>> alpha(static_cast<std::size_t>(L),
                                          std::vector<float>(static_cast<std::size_t>(trace.shape.kv_heads), 0.0f));
    std::vector<double> logits;
    for (std::int32_t l = 0; l < L; ++l) {
        for (std::int32_t kv = 0; kv < trace.shape.kv_heads; ++kv) {
            double outside = 0;  // summed over the group's query heads and the queries
            for (std::int32_t t = sink + local; t < T; ++t) {
                for (std::int32_t h = kv * G; h < (kv + 1) * G; ++h) {
                    const float* q = trace.queries(l, t).data() + static_cast<std::size_t>(h) * static_cast<std::size_t>(D);
                    logits.assign(static_cast<std::size_t>(t) + 1, 0.0);
                    double top = -std::numeric_limits<double>::infinity();
                    for (std::int32_t j = 0; j <= t; ++j) {
                        const float* k = trace.keys(l, j).data() + static_cast<std::size_t>(kv) * static_cast<std::size_t>(D);
                        double dot = 0;
                        for (std::int32_t d = 0; d < D; ++d) dot += static_cast<double>(q[d]) * static_cast<double>(k[d]);
                        logits[static_cast<std::size_t>(j)] = dot * scale;
                        top = std::max(top, dot * scale);
                    }
                    double total = 0, far = 0;
                    for (std::int32_t j = 0; j <= t; ++j) {
                        const double p = std::exp(logits[static_cast<std::size_t>(j)] - top);
                        total += p;
                        if (j >= sink && j <= t - local) far += p;
                    }
                    outside += far / total;
                }
            }
            const double queries = static_cast<double>(T - sink - local) * G;
            alpha[static_cast<std::size_t>(l)][static_cast<std::size_t>(kv)] =
                static_cast<float>(std::clamp(outside / queries, 0.0, 1.0));
        }
    }
    return alpha;
}

/// The dense run of `tokens` through `model`, then gate_values.
inline std::vector<std::vector<float>> calibrate_gates(const Model& model, std::span<const std::int32_t> tokens,
                                                       std::int32_t sink, std::int32_t local,
                                                       const std::function<void()>& on_token = {}) {
    return gate_values(record_trace(model, tokens, on_token), sink, local);
}

/// The TSV of DuoAttention's released patterns (one row per layer, tab separated; load_gate_values reads it).
inline std::string gate_values_tsv(const std::vector<std::vector<float>>& alpha) {
    std::string out;
    for (const std::vector<float>& row : alpha) {
        for (std::size_t h = 0; h < row.size(); ++h) out += fmt::format("{}{:.6f}", h ? "\t" : "", row[h]);
        out += "\n";
    }
    return out;
}

}  // namespace kvsparse::llama
