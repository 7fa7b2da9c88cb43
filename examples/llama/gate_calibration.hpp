#pragma once
// calibrate-gates: DuoAttention-style gate values alpha[L][Hkv] for a model that ships none, measured on
// a dense run (LServe's head kinds, docs/lserve.md). For each (layer, KV head), alpha is the dense
// attention mass that the head's query heads put outside the first `sink` positions and the last
// `local` positions (the part a streaming head would lose), averaged over the group's query heads and
// over every query at positions t >= sink + local (earlier queries lose nothing). A local head gets a
// low alpha and streams first under LServe's static sparsity. The measure is eval/gates.hpp's, shared
// with kvsparse-eval's synthetic trace; here on every query instead of 64 samples.

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

#include "eval/gates.hpp"
#include "eval/trace.hpp"
#include "llama/model.hpp"
#include "llama/trace_dump.hpp"

namespace kvsparse::llama {

/// alpha[L][Hkv] of `trace` (post-RoPE q and k) over every query past sink + local (see the top of this file).
inline std::vector<std::vector<float>> gate_values(const tools::Trace& trace, std::int32_t sink, std::int32_t local) {
    const std::int32_t T = trace.tokens;
    if (sink < 0 || local < 1 || T <= sink + local) {
        throw invalid_argument("calibrate-gates: " + std::to_string(T) + " tokens leave no query past sink " +
                               std::to_string(sink) + " + local " + std::to_string(local));
    }
    std::vector<std::int32_t> positions;
    for (std::int32_t t = sink + local; t < T; ++t) positions.push_back(t);
    return tools::gate_values(trace, sink, local, positions);
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
