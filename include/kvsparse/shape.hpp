#pragma once
// The attention shape of a model, and the checks every entry point shares.

#include <cstdint>

#include "kvsparse/error.hpp"

namespace kvsparse {

/// Layers and heads of a (GQA) attention model: `q_heads / kv_heads` query heads share one KV head.
struct ModelShape {
    std::int32_t layers = 0;
    std::int32_t q_heads = 0;
    std::int32_t kv_heads = 0;
    std::int32_t head_dim = 0;

    /// Query heads per KV head (G); 1 is plain multi-head attention.
    constexpr std::int32_t group_size() const { return q_heads / kv_heads; }

    void validate() const {
        detail::require(layers > 0, "layers", layers, "must be positive");
        detail::require(q_heads > 0, "q_heads", q_heads, "must be positive");
        detail::require(kv_heads > 0, "kv_heads", kv_heads, "must be positive");
        detail::require(head_dim > 0, "head_dim", head_dim, "must be positive");
        detail::require(q_heads % kv_heads == 0, "q_heads", q_heads, "must be a multiple of kv_heads");
    }
};

constexpr bool is_power_of_two(std::int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

namespace detail {
inline void require_page_size(std::int32_t page_size) {
    require(is_power_of_two(page_size), "page_size", page_size, "must be a power of two");
}
}  // namespace detail

}  // namespace kvsparse
