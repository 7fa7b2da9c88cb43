#pragma once
// Where the model meets kvsparse. This is the whole integration:
//
//   KVCache<Policy, CpuBackend> cache(config, policy);      // every layer's keys and values
//   per token, per layer:  cache.append(seq, layer, k, v);  // the policy places it, may evict one
//                          cache.attend(seq, layer, q, out); // softmax attention over the policy's set
//
// The model (model.hpp) computes q, k, v and never sees a cache; the cache never sees the model. The
// cache is configured with the model's RoPE (interleaved pairs, theta 10000) and receives q and k
// *before* RoPE (CacheConfig::inputs_rotated = false): it rotates keys at their absolute positions as it
// stores them and queries as it attends, so a policy with in-cache positions (StreamingLLM) can turn
// keys to their rank in the set instead. Policies come from the tools' shared spec parser
// (common/policy_spec.hpp): any policy in its table works here unchanged.
//
// Besides policies: `recompute:window=W`, StreamingLLM's "sliding window with re-computation"
// baseline: for every token, the model runs from scratch over the last W tokens (positions 0..W-1).

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <kvsparse/kvsparse.hpp>

#include "common/policy_spec.hpp"
#include "llama/attention_mass.hpp"
#include "llama/model.hpp"

namespace kvsparse::llama {

/// The RoPE of llama2.c models.
inline constexpr Rope model_rope{RopeStyle::interleaved, 10000.0f};

/// One sequence run through the model with one policy, a token at a time.
class Engine {
public:
    virtual ~Engine() = default;
    /// Feeds the token at the next position; returns the logits for the token after it.
    virtual std::span<const float> step(std::int32_t token) = 0;
    /// Feeds the token when its logits are not needed (an engine without state may skip the work).
    virtual void feed(std::int32_t token) { step(token); }
    /// Measure the attention mass on positions [0, first) per layer (see attention_mass.hpp).
    virtual void measure_mass(std::int32_t /*first*/, std::int32_t /*segment*/) {}
    virtual const AttentionMass* mass() const { return nullptr; }
    /// Called with every layer's q, k, v (before RoPE) as they are computed.
    using Tap = std::function<void(std::int32_t layer, std::span<const float> q, std::span<const float> k,
                                   std::span<const float> v)>;
    virtual void set_tap(Tap) {}
};

/// A cache for `max_tokens` positions under `policy`: each (layer, KV head) stream gets the pages for
/// what the policy lets it hold, at most `max_tokens`, plus one.
template <kv_policy Policy>
CacheConfig cache_config(const ModelConfig& model, const Policy& policy, std::int32_t max_tokens) {
    CacheConfig config;
    config.shape = model.attention_shape();
    config.page_size = 16;
    config.rope = model_rope;
    config.inputs_rotated = false;  // the cache rotates raw q and k
    std::int64_t pages = 0;
    for (std::int32_t l = 0; l < model.layers; ++l) {
        for (std::int32_t h = 0; h < model.kv_heads; ++h) {
            const std::int64_t held = std::min<std::int64_t>(policy.capacity(l, h), max_tokens);
            pages += (held + config.page_size - 1) / config.page_size + 1;
        }
    }
    config.num_pages = static_cast<std::int32_t>(pages);
    return config;
}

/// The model with KVCache<Policy> as every layer's attention.
template <kv_policy Policy>
class CachedEngine final : public Engine {
public:
    CachedEngine(const Model& model, const Policy& policy, std::int32_t max_tokens)
        : model_(model),
          activations_(model.config()),
          // One thread: a step of this small model attends over a few heads, and the tools run their
          // policies in parallel, an engine each.
          cache_(cache_config(model.config(), policy, max_tokens), policy, CpuBackend({.threads = 1})),
          sequence_(cache_.add_sequence()),
          logits_(static_cast<std::size_t>(model.config().vocab)) {}

    std::span<const float> step(std::int32_t token) override {
        model_.forward(
            token, activations_,
            [&](std::int32_t layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
                std::span<float> out) {
                cache_.append(sequence_, layer, k, v);
                cache_.attend(sequence_, layer, q, out);
                if (tap_) tap_(layer, q, k, v);
                if (mass_) mass_->measure(cache_, sequence_, layer, q);
            },
            logits_);
        return logits_;
    }

    void measure_mass(std::int32_t first, std::int32_t segment) override {
        mass_.emplace(model_.config().attention_shape(), first, segment);
    }
    const AttentionMass* mass() const override { return mass_ ? &*mass_ : nullptr; }
    void set_tap(Tap tap) override { tap_ = std::move(tap); }

private:
    const Model& model_;
    Activations activations_;
    KVCache<Policy, CpuBackend> cache_;
    SequenceId sequence_;
    std::vector<float> logits_;
    Tap tap_;
    std::optional<AttentionMass> mass_;
};

/// StreamingLLM's sliding window with re-computation: every step rebuilds a dense cache from the last
/// `window` tokens (the current one included), at positions 0..window-1, and keeps only the last logits.
class RecomputeEngine final : public Engine {
public:
    RecomputeEngine(const Model& model, std::int32_t window)
        : model_(model),
          window_(window),
          activations_(model.config()),
          cache_(cache_config(model.config(), Dense{}, window), Dense{}, CpuBackend({.threads = 1})),
          sequence_(cache_.add_sequence()),
          logits_(static_cast<std::size_t>(model.config().vocab)) {}

    void feed(std::int32_t token) override {
        recent_.push_back(token);
        if (static_cast<std::int32_t>(recent_.size()) > window_) recent_.pop_front();
    }

    std::span<const float> step(std::int32_t token) override {
        feed(token);
        cache_.reset_sequence(sequence_);
        for (std::size_t i = 0; i < recent_.size(); ++i) {
            const bool last = i + 1 == recent_.size();
            model_.forward(
                recent_[i], activations_,
                [&](std::int32_t layer, std::span<const float> q, std::span<const float> k, std::span<const float> v,
                    std::span<float> out) {
                    cache_.append(sequence_, layer, k, v);
                    cache_.attend(sequence_, layer, q, out);
                },
                last ? std::span<float>(logits_) : std::span<float>());
        }
        return logits_;
    }

private:
    const Model& model_;
    std::int32_t window_;
    Activations activations_;
    KVCache<Dense, CpuBackend> cache_;
    SequenceId sequence_;
    std::vector<float> logits_;
    std::deque<std::int32_t> recent_;
};

/// A parsed `--policy`: a cache policy from the shared table, or the recompute baseline.
struct EngineSpec {
    std::string text;
    std::optional<tools::PolicySpec> policy;  ///< empty for recompute
    std::int32_t recompute_window = 0;
};

/// Parses `recompute:window=W` here, anything else with the shared policy-spec parser; throws
/// invalid_argument naming the problem.
inline EngineSpec parse_engine_spec(std::string_view text) {
    EngineSpec spec;
    const std::string_view trimmed = tools::detail::trim(text);
    spec.text = std::string(trimmed);
    const std::string_view prefix = "recompute";
    if (trimmed.substr(0, trimmed.find(':')) == prefix) {
        const std::string_view rest = trimmed.size() > prefix.size() ? trimmed.substr(prefix.size() + 1) : "";
        const std::size_t eq = rest.find('=');
        const std::string_view key = tools::detail::trim(rest.substr(0, eq));
        const std::string_view value = eq == std::string_view::npos ? "" : tools::detail::trim(rest.substr(eq + 1));
        std::int64_t window = 0;
        const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), window);
        if (key != "window" || value.empty() || ec != std::errc{} || end != value.data() + value.size() ||
            window < 1 || window > (1 << 30)) {
            throw invalid_argument("policy spec '" + spec.text +
                                   "': expected recompute:window=W with W an integer in [1, 2^30]");
        }
        spec.recompute_window = static_cast<std::int32_t>(window);
        return spec;
    }
    spec.policy = tools::parse_policy_spec(trimmed);
    return spec;
}

/// Gate values alpha[layer][kv_head] (LServe's head kinds); empty when none were given.
using GateValues = std::vector<std::vector<float>>;

/// What the spec table's policies may ask of the model: its shape, and the gate values `alpha` that
/// lserve specs need. llama2.c models ship none: `kvsparse-llama calibrate-gates` measures them
/// (gate_calibration.hpp) and `--gates FILE.tsv` passes them here.
inline tools::PolicyContext policy_context(const ModelConfig& model, const GateValues& alpha = {}) {
    tools::PolicyContext context;
    context.layers = model.layers;
    context.kv_heads = model.kv_heads;
    context.alpha = alpha;
    return context;
}

/// The engine for `spec`, sized for sequences of up to `max_tokens` tokens.
inline std::unique_ptr<Engine> make_engine(const EngineSpec& spec, const Model& model, std::int32_t max_tokens,
                                           const GateValues& alpha = {}) {
    if (!spec.policy) return std::make_unique<RecomputeEngine>(model, spec.recompute_window);
    const tools::AnyPolicy policy = tools::make_policy(*spec.policy, policy_context(model.config(), alpha));
    return std::visit(
        [&](const auto& p) -> std::unique_ptr<Engine> {
            return std::make_unique<CachedEngine<std::decay_t<decltype(p)>>>(model, p, max_tokens);
        },
        policy);
}

/// One line for --help.
inline constexpr std::string_view recompute_help =
    "  recompute: sliding window with re-computation (baseline, not a cache policy)\n"
    "      window=integer (required): for every token, the model runs from scratch on the last W tokens\n";

}  // namespace kvsparse::llama
