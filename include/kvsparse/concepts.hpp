#pragma once
// What a policy and a backend must provide. KVCache<Policy, Backend> accepts exactly these.

#include <concepts>
#include <cstdint>
#include <span>

#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/stream.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

/// A KV-cache policy decides, per (layer, KV head) stream, where each new token is stored (and so which
/// token it evicts), which tokens survive a prefill, which keys a prefill query may see, and which held
/// tokens a decode query attends to.
///
/// - `capacity(layer, kv_head)`: most tokens the stream ever holds after a call, or `unbounded`.
/// - `place(stream)`: slot for the token at `stream.next_position`; a slot past the last one grows the
///   stream, an occupied slot evicts its token.
/// - `retain(stream, slot)`: after a prefill, whether the token in `slot` stays.
/// - `prefill_ranges(layer, kv_head, i)`: the key positions prefill query position i sees, as ascending
///   disjoint ranges within [0, i] (PrefillRanges; `PrefillRanges::causal(i)` for dense causal). The cache
///   gathers only held tokens inside them, so the work is proportional to the visible entries.
///   `prefill_visible(policy, layer, kv_head, i, j)` below is the same pattern as a predicate.
/// - `select(stream, queries, out)`: slots a decode query attends to, in ascending position order; returns
///   the count. `queries` are the group's query heads [group][head_dim] as attention sees them (one
///   head when `per_query_head()`), for policies whose choice depends on the query.
/// - `rotates_in_cache()`: whether keys are rotated at their rank in the attended set
///   (StreamingLLM's in-cache positions) rather than at their absolute position.
/// - `per_query_head()`: whether each query head of a group selects on its own (else one set per KV head).
/// - `accumulates_attention()`: whether the stream keeps a score per slot (StreamState::scores): reset to 0
///   when a token is placed, and after every attention (prefill and decode) increased by the probability
///   each attending query head gave the token (H2O's accumulated attention).
/// - `bounds_page_size(layer, kv_head)`: 0, or the page size (a power of two) of the per-page key bounds
///   (StreamState::bounds) the stream must keep for select: the element-wise min/max of the stored keys
///   of every page of slots, updated on every key write (Quest's metadata).
/// - `memo_size(layer, kv_head, group)`: int32 of mutable per-stream state (StreamState::memo) the
///   policy's select keeps between calls, zeros at the start; 0 for none. `group`: query heads per KV head.
/// policy_defaults (policies/policy_defaults.hpp) gives the usual answers for the last seven.
template <class P>
concept kv_policy = std::copy_constructible<P> &&
    requires(const P& policy, const StreamState& stream, std::int32_t i, std::span<const float> queries,
             std::span<std::int32_t> out) {
        { policy.capacity(i, i) } -> std::same_as<std::int32_t>;
        { policy.place(stream) } -> std::same_as<std::int32_t>;
        { policy.select(stream, queries, out) } -> std::same_as<std::int32_t>;
        { policy.retain(stream, i) } -> std::same_as<bool>;
        { policy.prefill_ranges(i, i, i) } -> std::same_as<PrefillRanges>;
        { policy.rotates_in_cache() } -> std::same_as<bool>;
        { policy.per_query_head() } -> std::same_as<bool>;
        { policy.accumulates_attention() } -> std::same_as<bool>;
        { policy.bounds_page_size(i, i) } -> std::same_as<std::int32_t>;
        { policy.memo_size(i, i, i) } -> std::same_as<std::int32_t>;
    };

/// Whether prefill query position `i` sees key position `j` under the policy's prefill pattern
/// (j <= i and j inside one of its prefill_ranges). For masks and tests; the cache uses the ranges.
template <kv_policy P>
bool prefill_visible(const P& policy, std::int32_t layer, std::int32_t kv_head, std::int32_t i, std::int32_t j) {
    return j >= 0 && j <= i && policy.prefill_ranges(layer, kv_head, i).contains(j);
}

/// Arguments of one gathered attention: the query heads of one KV head over a set of slots.
template <storage_type T>
struct AttendArgs {
    StreamView<T> stream;
    std::span<const std::int32_t> slots;          ///< keys to attend, any order
    std::span<const float> queries;               ///< [group][head_dim], already rotated
    std::int32_t group = 1;                       ///< query heads sharing this KV head
    float scale = 1.0f;                           ///< usually 1/sqrt(head_dim)
    std::span<const std::int32_t> key_rotation;   ///< per slot: turn the key by this many positions; empty = none
    Rope rope{};                                  ///< used with key_rotation
    std::span<float> out;                         ///< [group][head_dim]
    std::span<float> probabilities;               ///< per slot, += sum over the group; empty = not wanted
};

/// A backend runs the numeric primitives on some device, ordered on a stream.
/// `workspace_bytes` sizes the scratch that `attend` needs, so no allocation happens inside a step.
template <class B>
concept kv_backend = requires(B& backend, typename B::stream_type stream, const StreamView<float>& view,
                              std::span<const std::int32_t> slots, std::span<const float> src, std::span<float> x,
                              std::span<std::byte> workspace, const AttendArgs<float>& args, std::int32_t n) {
    typename B::stream_type;
    { B::workspace_bytes(n, n, n) } -> std::same_as<std::size_t>;
    { backend.write(view, slots, src, src, n, stream) };
    { backend.copy_slots(view, slots, slots, stream) };
    { backend.rope(x, n, n, slots, Rope{}, stream) };
    { backend.shift_keys(view, slots, n, Rope{}, stream) };
    { backend.attend(args, workspace, stream) };
};

}  // namespace kvsparse
