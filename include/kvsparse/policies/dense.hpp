#pragma once
// Dense: every position stays and every query attends to all of them. The baseline for quality.

#include <cstdint>
#include <span>

#include "kvsparse/policies/policy_defaults.hpp"
#include "kvsparse/stream.hpp"

namespace kvsparse {

class Dense : public policy_defaults {
public:
    std::int32_t capacity(std::int32_t /*layer*/, std::int32_t /*kv_head*/) const { return unbounded; }
    /// Slot i holds position i.
    std::int32_t place(const StreamState& stream) const { return stream.next_position; }
    std::int32_t select(const StreamState& stream, std::span<const float> /*queries*/, std::span<std::int32_t> slots) const {
        for (std::int32_t p = 0; p < stream.next_position; ++p) slots[static_cast<std::size_t>(p)] = p;
        return stream.next_position;
    }
};

}  // namespace kvsparse
