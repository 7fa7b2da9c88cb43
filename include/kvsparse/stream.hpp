#pragma once
// What a policy sees of one stream: the tokens that one (sequence, layer, KV head) holds.

#include <cstdint>
#include <limits>
#include <span>

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
};

}  // namespace kvsparse
