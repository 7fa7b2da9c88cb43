#pragma once
// What a policy sees of one stream: the tokens that one (sequence, layer, KV head) holds.

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
};

}  // namespace kvsparse
