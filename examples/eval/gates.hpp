#pragma once
// Gate values alpha[L][Hkv] measured on a trace, for LServe's head kinds when a model ships no
// DuoAttention patterns. alpha of a (layer, KV head) is the dense attention mass its query heads put
// outside the first `sink` positions and the last `local` positions (what a streaming head would lose),
// averaged over the group and over the given query positions. Local heads get a low alpha and stream first.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "eval/trace.hpp"

namespace kvsparse::tools {

inline std::vector<std::vector<float>> gate_values(const Trace& trace, std::int32_t sink, std::int32_t local,
                                                   std::span<const std::int32_t> query_positions) {
    const std::int32_t G = trace.shape.group_size(), D = trace.shape.head_dim;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<std::vector<float>> alpha(static_cast<std::size_t>(trace.shape.layers),
                                          std::vector<float>(static_cast<std::size_t>(trace.shape.kv_heads), 0.0f));
    std::vector<double> logits;
    for (std::int32_t l = 0; l < trace.shape.layers; ++l) {
        for (std::int32_t kv = 0; kv < trace.shape.kv_heads; ++kv) {
            double outside = 0;  // summed over the group's query heads and the queries
            for (const std::int32_t t : query_positions) {
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
            const double queries = static_cast<double>(query_positions.size()) * G;
            alpha[static_cast<std::size_t>(l)][static_cast<std::size_t>(kv)] =
                static_cast<float>(std::clamp(outside / queries, 0.0, 1.0));
        }
    }
    return alpha;
}

}  // namespace kvsparse::tools
