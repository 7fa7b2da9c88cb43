#pragma once
// AttentionSink (StreamingLLM, Xiao et al. 2023): keep the first `sinks` positions forever and the last
// `window` positions; memory stays bounded however long the stream runs.

#include <algorithm>
#include <cstdint>
#include <span>

#include "kvsparse/error.hpp"
#include "kvsparse/policies/policy_defaults.hpp"
#include "kvsparse/stream.hpp"

namespace kvsparse {

/// How cached keys are rotated (see docs/positions.md).
enum class PositionMode : std::uint8_t {
    absolute,  ///< a key keeps the rotation of its original position (engines caching post-RoPE keys)
    in_cache,  ///< the i-th attended key is rotated at i, the query at |S_t| - 1 (original StreamingLLM)
};

class AttentionSink : public policy_defaults {
public:
    struct Config {
        std::int32_t sinks = 4;
        std::int32_t window = 1020;
        PositionMode positions = PositionMode::absolute;
    };

    explicit AttentionSink(Config config) : config_(config) {
        detail::require(config.sinks >= 0, "sinks", config.sinks, "must not be negative");
        detail::require(config.window >= 1, "window", config.window, "must be at least 1");
        detail::require(std::int64_t{config.sinks} + config.window < unbounded, "window", config.window,
                        "sinks + window overflows int32");
    }
    AttentionSink() : AttentionSink(Config{}) {}

    const Config& config() const { return config_; }
    std::int32_t budget() const { return config_.sinks + config_.window; }

    std::int32_t capacity(std::int32_t /*layer*/, std::int32_t /*kv_head*/) const { return budget(); }

    /// Sinks and the first window fill slots in order; later tokens overwrite the ring slot of position t - W.
    std::int32_t slot_of(std::int32_t position) const {
        const std::int32_t s = config_.sinks;
        return position < budget() ? position : s + (position - s) % config_.window;
    }
    std::int32_t place(const StreamState& stream) const { return slot_of(stream.next_position); }

    bool retain(const StreamState& stream, std::int32_t slot) const {
        const std::int32_t position = stream.positions[static_cast<std::size_t>(slot)];
        const std::int32_t newest = stream.next_position - 1;
        return position < config_.sinks || position > newest - config_.window;
    }

    /// S_t = [0, min(S, t+1)) ∪ [max(S, t-W+1), t] as position ranges (empty ranges left out).
    PrefillRanges attended_ranges(std::int32_t t) const {
        PrefillRanges result;
        result.add(0, std::min(config_.sinks, t + 1));
        result.add(std::max(config_.sinks, t - config_.window + 1), t + 1);
        return result;
    }

    /// S_t = [0, min(S, t+1)) ∪ [max(S, t-W+1), t], in ascending position order.
    std::int32_t select(const StreamState& stream, std::span<const float> /*queries*/,
                        std::span<std::int32_t> slots) const {
        const std::int32_t t = stream.next_position - 1;
        std::int32_t count = 0;
        for (std::int32_t p = 0; p < std::min(config_.sinks, t + 1); ++p) slots[static_cast<std::size_t>(count++)] = slot_of(p);
        for (std::int32_t p = std::max(config_.sinks, t - config_.window + 1); p <= t; ++p) {
            slots[static_cast<std::size_t>(count++)] = slot_of(p);
        }
        return count;
    }

    bool rotates_in_cache() const { return config_.positions == PositionMode::in_cache; }

private:
    Config config_;
};

/// SlidingWindow{W}: the last W positions, nothing else. An attention sink without sinks.
class SlidingWindow : public AttentionSink {
public:
    explicit SlidingWindow(std::int32_t window) : AttentionSink(Config{0, window, PositionMode::absolute}) {}
    std::int32_t window() const { return config().window; }
};

}  // namespace kvsparse
