#pragma once
// dump-trace: a dense run that records every layer's post-RoPE q, k and v as a kvsparse-eval trace
// (eval/trace.hpp: q [L][T][Hq][D], k and v [L][T][Hkv][D], prefill 1, the model's RoPE), so the
// model's real attention can be replayed through every policy.

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include <kvsparse/rope.hpp>

#include "eval/trace.hpp"
#include "llama/engine.hpp"
#include "llama/model.hpp"

namespace kvsparse::llama {

/// Runs `tokens` densely; `on_token` is called after each one.
inline tools::Trace record_trace(const Model& model, std::span<const std::int32_t> tokens,
                                 const std::function<void()>& on_token = {}) {
    const ModelConfig& c = model.config();
    const auto n = static_cast<std::int32_t>(tokens.size());
    tools::Trace trace;
    trace.source = "kvsparse-llama dump-trace";
    trace.shape = c.attention_shape();
    trace.tokens = n;
    trace.prefill = 1;
    trace.rope = model_rope;
    const std::size_t D = static_cast<std::size_t>(c.head_dim());
    const std::size_t q_row = static_cast<std::size_t>(c.heads) * D, kv_row = static_cast<std::size_t>(c.kv_heads) * D;
    const std::size_t rows = static_cast<std::size_t>(c.layers) * static_cast<std::size_t>(n);
    trace.q.resize(rows * q_row);
    trace.k.resize(rows * kv_row);
    trace.v.resize(rows * kv_row);

    // The tap copies each layer's q, k, v and rotates q and k at their absolute positions with the
    // library's RoPE, exactly as the cache stores keys and rotates queries.
    const std::unique_ptr<Engine> engine = make_engine(parse_engine_spec("dense"), model, n);
    std::int32_t t = 0;
    engine->set_tap([&](std::int32_t layer, std::span<const float> q, std::span<const float> k,
                        std::span<const float> v) {
        const std::size_t row = static_cast<std::size_t>(layer) * static_cast<std::size_t>(n) + static_cast<std::size_t>(t);
        float* qd = trace.q.data() + row * q_row;
        float* kd = trace.k.data() + row * kv_row;
        std::copy(q.begin(), q.end(), qd);
        std::copy(k.begin(), k.end(), kd);
        std::copy(v.begin(), v.end(), trace.v.data() + row * kv_row);
        for (std::int32_t h = 0; h < c.heads; ++h) rope_rotate(qd + static_cast<std::size_t>(h) * D, c.head_dim(), t, model_rope);
        for (std::int32_t h = 0; h < c.kv_heads; ++h) rope_rotate(kd + static_cast<std::size_t>(h) * D, c.head_dim(), t, model_rope);
    });
    for (; t < n; ++t) {
        engine->feed(tokens[static_cast<std::size_t>(t)]);
        if (on_token) on_token();
    }
    return trace;
}

}  // namespace kvsparse::llama
