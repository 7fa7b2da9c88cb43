#pragma once
// H2OHeavyHitter (Zhang et al. 2023): keep the `heavy` tokens that have drawn the most attention so far
// plus the `recent` newest ones, at a fixed budget of heavy + recent tokens per (layer, KV head).
//
// The scores are the stream's per-slot attention channel (StreamState::scores, accumulates_attention()):
// every attention adds the probability each query head of the KV head's group gave a token (the GQA rule:
// one score, so one keep set, per KV head). KVCache maintains it; an engine with its own memory keeps one
// float per slot (score_slots) and lets its attention add the probabilities (docs/h2o.md).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
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
    /// Linear, O(budget): every attention changes every held score, so an ordered structure (heap, tree)
    /// would need O(budget log budget) repair per step to save an O(budget) scan; and the step's attention
    /// already reads budget * head_dim key elements, so the scan is a small fraction of it. A NaN score
    /// is never below another: it is evicted only as the first candidate in slot order, whose NaN no
    /// other score can then displace (the rule of one comparison scan, which this one keeps).
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
        const auto candidate = [&](std::size_t s) {
            const std::int32_t position = stream.positions[s];
            return position != free_slot && position <= last_candidate;
        };
        std::size_t first = 0;
        while (first < stream.positions.size() && !candidate(first)) ++first;
        // At the budget at least heavy + 1 held tokens are older than the recent window.
        detail::require(first < stream.positions.size(), "held", stream.held,
                        "H2O found no token outside the recent window to evict");
        if (std::isnan(stream.scores[first])) return static_cast<std::int32_t>(first);
        return lowest_candidate(stream, first, last_candidate);
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
    /// The candidate slot (position <= last_candidate) of the lowest score, the lowest position among equal
    /// ones, NaN scores aside, from slot `first` on. Two passes that compilers vectorize: one comparison
    /// chain over the slots, position tie-break included, is a serial dependence; eight independent lanes,
    /// first of the lowest score and then of the lowest position with it, are not. Any order of the
    /// candidates gives the same slot, as (score, position) orders them totally (positions are distinct).
    static std::int32_t lowest_candidate(const StreamState& stream, std::size_t first, std::int32_t last_candidate) {
        constexpr std::size_t lanes = 8;
        const std::int32_t* position = stream.positions.data();
        const float* score = stream.scores.data();
        const std::size_t end = stream.positions.size();
        const auto is_candidate = [&](std::size_t s) { return position[s] != free_slot && position[s] <= last_candidate; };
        float low[lanes];
        std::fill(low, low + lanes, std::numeric_limits<float>::infinity());
        std::size_t s = first;
        for (; s + lanes <= end; s += lanes) {
            for (std::size_t j = 0; j < lanes; ++j) {
                const bool lower = is_candidate(s + j) && score[s + j] < low[j];  // false for NaN
                low[j] = lower ? score[s + j] : low[j];
            }
        }
        for (; s < end; ++s) {
            if (is_candidate(s) && score[s] < low[0]) low[0] = score[s];
        }
        const float lowest = *std::min_element(low, low + lanes);  // a score of the first candidate at most
        std::int32_t oldest[lanes], slot[lanes];
        std::fill(oldest, oldest + lanes, std::numeric_limits<std::int32_t>::max());
        std::fill(slot, slot + lanes, -1);
        for (s = first; s + lanes <= end; s += lanes) {
            for (std::size_t j = 0; j < lanes; ++j) {
                const bool older = is_candidate(s + j) && score[s + j] == lowest && position[s + j] < oldest[j];
                oldest[j] = older ? position[s + j] : oldest[j];
                slot[j] = older ? static_cast<std::int32_t>(s + j) : slot[j];
            }
        }
        for (; s < end; ++s) {
            if (is_candidate(s) && score[s] == lowest && position[s] < oldest[0]) {
                oldest[0] = position[s];
                slot[0] = static_cast<std::int32_t>(s);
            }
        }
        return slot[std::min_element(oldest, oldest + lanes) - oldest];
    }

    static void require_scores(const StreamState& stream) {
        detail::require(stream.scores.size() >= stream.positions.size(), "scores.size()", stream.scores.size(),
                        "must cover every slot of positions (H2O accumulates attention)");
    }

    Config config_;
};

}  // namespace kvsparse
