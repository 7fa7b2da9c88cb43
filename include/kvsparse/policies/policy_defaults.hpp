#pragma once
// The answers most policies share. A policy derives from policy_defaults and overrides what differs;
// the kv_policy concept still states every member, so nothing is implicit to the cache.

#include <cstdint>

#include "kvsparse/stream.hpp"

namespace kvsparse {

struct policy_defaults {
    /// Every stored token survives a prefill.
    bool retain(const StreamState&, std::int32_t /*slot*/) const { return true; }
    /// Prefill is dense causal: one range [0, query_position].
    PrefillRanges prefill_ranges(std::int32_t /*layer*/, std::int32_t /*kv_head*/, std::int32_t query_position) const {
        return PrefillRanges::causal(query_position);
    }
    /// Keys keep their absolute rotation.
    bool rotates_in_cache() const { return false; }
    /// All query heads of a KV head attend to one set.
    bool per_query_head() const { return false; }
    /// No per-slot attention scores are kept (StreamState::scores stays empty).
    bool accumulates_attention() const { return false; }
    /// No per-page key bounds are kept (StreamState::bounds stays empty).
    std::int32_t bounds_page_size(std::int32_t /*layer*/, std::int32_t /*kv_head*/) const { return 0; }
    /// No per-stream memo (StreamState::memo stays empty).
    std::int32_t memo_size(std::int32_t /*layer*/, std::int32_t /*kv_head*/, std::int32_t /*group*/) const { return 0; }
};

}  // namespace kvsparse
