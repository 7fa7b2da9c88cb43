#pragma once
// H2OHeavyHitter (Zhang et al. 2023): keep the `heavy` tokens that have drawn the most attention so far
// plus the `recent` newest ones, at a fixed budget of heavy + recent tokens per (layer, KV head).
//
// The scores are the stream's per-slot attention channel (StreamState::scores, accumulates_attention()):
// every attention adds the probability each query head of the KV head's group gave a token (the GQA rule:
// one score, so one keep set, per KV head). KVCache maintains it; an engine with its own memory keeps one
// float per slot (score_slots) and lets its attention add the probabilities (docs/h2o.md).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "kvsparse/error.hpp"
#include "kvsparse/policies/policy_defaults.hpp"
#include "kvsparse/stream.hpp"

namespace kvsparse {

class H2OHeavyHitter : public policy_defaults {
public:
    struct Config {
        std::int32_t heavy = 0;   ///< tokens kept for their accumulated attention
        std::int32_t recent = 0;  ///< newest tokens always kept (the current one included), at least 1
    };

    explicit H2OHeavyHitter(Config config) : config_(config) {
        detail::require(config.heavy >= 0, "heavy", config.heavy, "must not be negative");
        detail::require(config.recent >= 1, "recent", config.recent,
                        "must be at least 1 (the budget includes the current token)");
        detail::require(std::int64_t{config.heavy} + config.recent < unbounded, "recent", config.recent,
                        "heavy + recent overflows int32");
    }
    H2OHeavyHitter(std::int32_t heavy, std::int32_t recent) : H2OHeavyHitter(Config{heavy, recent}) {}

    const Config& config() const { return config_; }
    std::int32_t heavy() const { return config_.heavy; }
    std::int32_t recent() const { return config_.recent; }
    std::int32_t budget() const { return config_.heavy + config_.recent; }

    std::int32_t capacity(std::int32_t /*layer*/, std::int32_t /*kv_head*/) const { return budget(); }

    /// Floats of score state one engine-owned stream needs: one per slot it may use. A stream that
    /// only decodes uses `capacity` slots; one that stores a prefill chunk before cutting it back needs
    /// as many as it then holds.
    std::int32_t score_slots(std::int32_t layer, std::int32_t kv_head) const { return capacity(layer, kv_head); }

    bool accumulates_attention() const { return true; }

    /// Below the budget: the first free slot, else a new one. At the budget: the slot of the token to
    /// evict, the one with the smallest score among those that will not be among the `recent` newest once
    /// the new token is in (ties: lowest position).
    ///
    /// A linear scan, O(budget): every attention changes every held score, so an ordered structure
    /// (heap, tree) would need O(budget log budget) repair per step to save an O(budget) scan; and the
    /// step's attention already reads budget * head_dim key elements, so the scan is a small fraction of it.
    std::int32_t place(const StreamState& stream) const {
        const auto slots = static_cast<std::int32_t>(stream.positions.size());
        if (stream.held < budget()) {
            if (stream.held >= slots) return slots;
            for (std::int32_t s = 0; s < slots; ++s) {
                if (stream.positions[static_cast<std::size_t>(s)] == free_slot) return s;
            }
            return slots;
        }
        require_scores(stream);
        // The new token takes position next_position; the `recent` newest are then (next - recent, next].
        const std::int32_t last_candidate = stream.next_position - config_.recent;
        std::int32_t victim = -1;
        float victim_score = 0.0f;
        std::int32_t victim_position = 0;
        for (std::int32_t s = 0; s < slots; ++s) {
            const std::int32_t position = stream.positions[static_cast<std::size_t>(s)];
            if (position == free_slot || position > last_candidate) continue;
            const float score = stream.scores[static_cast<std::size_t>(s)];
            if (victim < 0 || score < victim_score || (score == victim_score && position < victim_position)) {
                victim = s;
                victim_score = score;
                victim_position = position;
            }
        }
        // At the budget at least heavy + 1 held tokens are older than the recent window.
        detail::require(victim >= 0, "held", stream.held, "H2O found no token outside the recent window to evict");
        return victim;
    }

    /// After a prefill: if the stream holds more than the budget, the `recent` newest positions stay, and
    /// among the rest the `heavy` with the highest scores (ties: lower position kept).
    ///
    /// O(held) per slot: a token stays unless `heavy` others outside the window beat it, and the count
    /// stops there. The whole cut costs at most O(held^2), below the O(held^2 * head_dim) of the
    /// prefill's own attention.
    bool retain(const StreamState& stream, std::int32_t slot) const {
        if (stream.held <= budget()) return true;
        const std::int32_t position = stream.positions[static_cast<std::size_t>(slot)];
        // The `recent` newest are (newest - recent, newest], newest = next_position - 1.
        const std::int32_t last_candidate = stream.next_position - 1 - config_.recent;
        if (position > last_candidate) return true;
        if (config_.heavy == 0) return false;
        require_scores(stream);
        const float score = stream.scores[static_cast<std::size_t>(slot)];
        std::int32_t better = 0;
        for (std::size_t s = 0; s < stream.positions.size(); ++s) {
            const std::int32_t p = stream.positions[s];
            if (p == free_slot || p > last_candidate || p == position) continue;
            const float other = stream.scores[s];
            if (other > score || (other == score && p < position)) {
                if (++better >= config_.heavy) return false;
            }
        }
        return true;
    }

    /// Every held token, in ascending position order: H2O evicts, it does not select.
    ///
    /// The `recent` newest positions are all held (none leaves while among them), so they go straight to
    /// their place at the end; only the older (heavy) tokens are sorted: O(budget + heavy log heavy).
    std::int32_t select(const StreamState& stream, std::span<const float> /*queries*/,
                        std::span<std::int32_t> slots) const {
        const std::int32_t newest = stream.next_position - 1;
        const std::int32_t first_recent = std::max(0, newest - config_.recent + 1);
        std::int32_t old = 0, recent = 0;
        for (const std::int32_t position : stream.positions) {
            if (position == free_slot) continue;
            if (position >= first_recent) {
                ++recent;
            } else {
                ++old;
            }
        }
        const auto by_position = [&](std::int32_t a, std::int32_t b) {
            return stream.positions[static_cast<std::size_t>(a)] < stream.positions[static_cast<std::size_t>(b)];
        };
        const bool window_whole = recent == newest - first_recent + 1;
        std::int32_t next_old = 0;
        for (std::size_t s = 0; s < stream.positions.size(); ++s) {
            const std::int32_t position = stream.positions[s];
            if (position == free_slot) continue;
            if (window_whole && position >= first_recent) {
                slots[static_cast<std::size_t>(old + position - first_recent)] = static_cast<std::int32_t>(s);
            } else {
                slots[static_cast<std::size_t>(next_old++)] = static_cast<std::int32_t>(s);
            }
        }
        // A stream whose window has gaps (not filled by this policy's own decisions) is sorted whole.
        const auto unsorted = slots.first(static_cast<std::size_t>(next_old));
        std::sort(unsorted.begin(), unsorted.end(), by_position);
        return old + recent;
    }

private:
    static void require_scores(const StreamState& stream) {
        detail::require(stream.scores.size() >= stream.positions.size(), "scores.size()", stream.scores.size(),
                        "must cover every slot of positions (H2O accumulates attention)");
    }

    Config config_;
};

}  // namespace kvsparse
