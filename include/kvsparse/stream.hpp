#pragma once
// What a policy sees of one stream: the tokens that one (sequence, layer, KV head) holds.

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "kvsparse/key_bounds.hpp"

namespace kvsparse {

/// Marks a free slot in StreamState::positions.
inline constexpr std::int32_t free_slot = -1;

/// Capacity of a policy that never evicts.
inline constexpr std::int32_t unbounded = std::numeric_limits<std::int32_t>::max();

/// The token bookkeeping of one (sequence, layer, KV head). Slots are storage places; `positions[s]` is
/// the absolute position of the token in slot s, or `free_slot`. Slots need not be in position order
/// (ring buffers, slot reuse after eviction).
struct StreamState {
    std::span<const std::int32_t> positions;
    std::int32_t held = 0;           ///< occupied slots
    std::int32_t next_position = 0;  ///< position the next appended token will get
    std::int32_t layer = 0;
    std::int32_t kv_head = 0;
    /// Per slot, the attention the token has drawn since it was placed (summed over the group's query
    /// heads and every attention call); indexed like `positions`. Empty unless the policy
    /// `accumulates_attention()`. A free slot's entry is meaningless.
    std::span<const float> scores = {};
    /// Per-page key bounds (element-wise min/max of the stored keys of every `bounds.page_size` slots),
    /// with scratch for the selection; empty unless the policy's `bounds_page_size(layer, kv_head)` > 0.
    KeyBoundsView bounds = {};
    /// The stream's policy memo: `memo_size(layer, kv_head, group)` int32 that the policy's select may
    /// read and write (LServe keeps its previous page selection there). All zeros when the stream starts;
    /// the cache (or the engine that owns the buffer) keeps it between calls. Empty when the size is 0.
    std::span<std::int32_t> memo = {};
    /// The query head of the group (0 .. group-1) that select is asked for, when the policy selects per
    /// query head; 0 otherwise.
    std::int32_t group_member = 0;
};

/// Positions [begin, end).
struct PositionRange {
    std::int32_t begin = 0;
    std::int32_t end = 0;
};

/// The key positions a prefill query sees, as ascending, disjoint position ranges within [0, query]
/// (a policy's `prefill_ranges`). The cache gathers only the held tokens inside them, so a sparse
/// prefill pattern costs work proportional to what it shows, not to the square of the prompt.
struct PrefillRanges {
    static constexpr std::int32_t max_ranges = 4;
    std::array<PositionRange, max_ranges> ranges{};
    std::int32_t count = 0;

    /// Appends [begin, end) unless it is empty; ranges must come in ascending order, not overlapping.
    constexpr void add(std::int32_t begin, std::int32_t end) {
        if (begin < end && count < max_ranges) ranges[static_cast<std::size_t>(count++)] = {begin, end};
    }
    constexpr bool contains(std::int32_t position) const {
        for (std::int32_t r = 0; r < count; ++r) {
            const PositionRange& range = ranges[static_cast<std::size_t>(r)];
            if (position >= range.begin && position < range.end) return true;
        }
        return false;
    }
    /// Dense causal: [0, query_position].
    static constexpr PrefillRanges causal(std::int32_t query_position) {
        PrefillRanges result;
        result.add(0, query_position + 1);
        return result;
    }
};

}  // namespace kvsparse
