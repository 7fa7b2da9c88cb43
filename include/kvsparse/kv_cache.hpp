#pragma once
// KVCache<Policy, Backend, T>: an owning paged KV cache driven by a policy, for users without a cache of
// their own. Several sequences share one page pool. Each (sequence, layer, KV head) is a stream with its
// own page table, so a policy can keep different tokens, and a different number of them, per head.
//
// Decode step at position t, per layer:   append(seq, layer, k, v);  attend(seq, layer, q, out);
// Prompt of n tokens, per layer:          prefill(seq, layer, q, k, v, out);
// Engines with their own kernels:         append(...);  select(seq, layer, q, selection);
//                                         (H2O: add_scores(seq, layer, head, slots, probabilities) after)
//                                         (Quest: select_pages(seq, layer, q, page_lists) for paged kernels)

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvsparse/backends/cpu_backend.hpp"
#include "kvsparse/concepts.hpp"
#include "kvsparse/detail/huge_page_allocator.hpp"
#include "kvsparse/detail/page_pool.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/shape.hpp"
#include "kvsparse/stream.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

struct CacheConfig {
    ModelShape shape;
    std::int32_t page_size = 16;  ///< tokens per page, a power of two
    std::int32_t num_pages = 0;   ///< pages in the shared pool; a page holds page_size tokens of one KV head
    /// The model's RoPE. Needed when the cache rotates (inputs not yet rotated) and for policies with
    /// in-cache positions. When empty, q and k are used exactly as given.
    std::optional<Rope> rope{};  // "{}": omitting it in designated initializers is not a GCC warning
    /// True when q and k arrive already rotated at their absolute positions (as engines cache them);
    /// false when they arrive before RoPE and the cache rotates them (only with `rope` set).
    bool inputs_rotated = false;
    /// Pages a stream takes from the pool at once when it grows (at most what its policy can fill), so
    /// that a cache grown one token per decode step still holds each stream's pages in runs: dense decode
    /// read such a cache 20-23% slower with pages taken one at a time (docs/memory.md). The pages a stream
    /// has taken but not filled count as free and go back to the pool whenever it runs short. 1: one at a time.
    std::int32_t page_run = 16;
};

using SequenceId = std::int32_t;

/// Memory one sequence holds (or the whole cache, from `pool_memory`).
struct MemoryStats {
    std::int64_t pages = 0;
    std::int64_t bytes = 0;                 ///< keys and values
    std::int64_t tokens = 0;                ///< held tokens, summed over (layer, KV head) streams
    std::int32_t max_stream_tokens = 0;     ///< most tokens any one stream holds
    std::int64_t metadata_bytes = 0;        ///< the policy's per-stream metadata, outside the pool and not in
                                            ///< `bytes`: page key bounds (Quest, LServe), accumulated scores
                                            ///< (H2O), memo (LServe)
};

/// The sets decode queries attend to, in ascending position order (CSR). One row per KV head, or, for a
/// policy that selects per query head, one row per query head (`rows_per_kv_head` = group size).
struct Selection {
    std::int32_t rows_per_kv_head = 1;
    std::vector<std::int32_t> indptr;     ///< [rows + 1]
    std::vector<std::int32_t> slots;      ///< storage slots, addressed through stream_view(seq, layer, head)
    std::vector<std::int32_t> positions;  ///< absolute positions of the same tokens

    /// The set of query head `member` (0 .. group-1) of `kv_head`; `member` is ignored for shared sets.
    std::span<const std::int32_t> slots_of(std::int32_t kv_head, std::int32_t member = 0) const {
        return row(slots, kv_head, member);
    }
    std::span<const std::int32_t> positions_of(std::int32_t kv_head, std::int32_t member = 0) const {
        return row(positions, kv_head, member);
    }

private:
    std::span<const std::int32_t> row(const std::vector<std::int32_t>& v, std::int32_t h, std::int32_t member) const {
        const std::size_t r = static_cast<std::size_t>(h * rows_per_kv_head + (rows_per_kv_head > 1 ? member : 0));
        const auto begin = static_cast<std::size_t>(indptr[r]);
        const auto end = static_cast<std::size_t>(indptr[r + 1]);
        return std::span<const std::int32_t>(v).subspan(begin, end - begin);
    }
};

template <kv_policy Policy, kv_backend Backend = CpuBackend, storage_type T = float>
class KVCache {
public:
    using policy_type = Policy;
    using backend_type = Backend;
    using value_type = T;
    using stream_type = typename Backend::stream_type;

    KVCache(CacheConfig config, Policy policy, Backend backend = {})
        : config_(validated(config, policy)),
          policy_(std::move(policy)),
          backend_(std::move(backend)),
          pool_(config_.num_pages, config_.page_size, config_.shape.head_dim) {}

    const CacheConfig& config() const { return config_; }
    const ModelShape& shape() const { return config_.shape; }
    const Policy& policy() const { return policy_; }

    // ---- sequences -------------------------------------------------------------------------------------

    /// Starts an empty sequence; its id stays valid until remove_sequence.
    SequenceId add_sequence() {
        Sequence sequence;
        sequence.streams.resize(static_cast<std::size_t>(config_.shape.layers * config_.shape.kv_heads));
        sequence.lengths.assign(static_cast<std::size_t>(config_.shape.layers), 0);
        for (std::size_t i = 0; i < sequences_.size(); ++i) {
            if (!sequences_[i]) {
                sequences_[i] = std::move(sequence);
                return static_cast<SequenceId>(i);
            }
        }
        sequences_.push_back(std::move(sequence));
        return static_cast<SequenceId>(sequences_.size() - 1);
    }

    /// Returns all pages of the sequence to the pool and forgets it.
    void remove_sequence(SequenceId id) {
        reset_sequence(id);
        sequences_[static_cast<std::size_t>(id)].reset();
    }

    /// Empties the sequence (pages back to the pool); positions start at 0 again.
    void reset_sequence(SequenceId id) {
        Sequence& sequence = at(id);
        for (Stream& stream : sequence.streams) {
            pool_.release(stream.pages);
            return_spares(stream);
            stream = Stream{};
        }
        std::fill(sequence.lengths.begin(), sequence.lengths.end(), 0);
    }

    bool contains(SequenceId id) const {
        return id >= 0 && static_cast<std::size_t>(id) < sequences_.size() && sequences_[static_cast<std::size_t>(id)];
    }

    /// Positions appended to `layer` so far (the next token gets this position).
    std::int32_t length(SequenceId id, std::int32_t layer) const {
        check_layer(layer);
        return at(id).lengths[static_cast<std::size_t>(layer)];
    }

    // ---- decode ----------------------------------------------------------------------------------------

    /// Appends tokens `keys`/`values` [n][kv_heads][head_dim] to `layer`, one decode append each: every
    /// token is placed by the policy, which may evict an older one. No attention is computed.
    void append(SequenceId id, std::int32_t layer, std::span<const float> keys, std::span<const float> values,
                stream_type stream = {}) {
        Sequence& sequence = at(id);
        const std::int32_t n = token_count(layer, keys, values);
        reserve_pages(sequence, layer, [&](std::int32_t slots, std::int32_t capacity) {
            return std::min<std::int64_t>(std::int64_t{slots} + n, capacity);
        });
        const std::int32_t first = sequence.lengths[static_cast<std::size_t>(layer)];
        std::span<const float> stored_keys = rotated_keys(keys, first, n, stream);
        const std::size_t row = static_cast<std::size_t>(config_.shape.kv_heads * config_.shape.head_dim);
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            Stream& s = stream_at(sequence, layer, h);
            scratch_slots_.clear();
            const std::int32_t bounds_page = policy_.bounds_page_size(layer, h);
            dirty_pages_.clear();
            for (std::int32_t i = 0; i < n; ++i) {
                const std::int32_t slot = policy_.place(state(s, layer, h));
                if (bounds_page > 0) bounds_before_place(s, bounds_page, slot);
                occupy(s, slot, first + i);
                scratch_slots_.push_back(slot);
            }
            // A token evicted within this same call is not written.
            for (std::int32_t i = 0; i < n; ++i) {
                const std::int32_t slot = scratch_slots_[static_cast<std::size_t>(i)];
                if (s.positions[static_cast<std::size_t>(slot)] != first + i) continue;
                const std::size_t offset = static_cast<std::size_t>(i) * row + static_cast<std::size_t>(h * config_.shape.head_dim);
                backend_.write(view(s), std::span<const std::int32_t>(&scratch_slots_[static_cast<std::size_t>(i)], 1),
                               stored_keys.subspan(offset), values.subspan(offset), 0, stream);
                if (bounds_page > 0) bounds_after_write(s, bounds_page, slot, stored_keys.data() + offset);
            }
            if (bounds_page > 0) rebuild_bounds(s, bounds_page, dirty_pages_);
        }
        sequence.lengths[static_cast<std::size_t>(layer)] += n;
    }

    /// Decode attention of the newest position's queries [q_heads][head_dim] over the policy's sets;
    /// writes `out` [q_heads][head_dim].
    void attend(SequenceId id, std::int32_t layer, std::span<const float> queries, std::span<float> out,
                stream_type stream = {}) {
        Sequence& sequence = at(id);
        check_layer(layer);
        check_queries(queries);
        detail::require(out.size() == queries.size(), "out.size()", out.size(), "must be q_heads * head_dim");
        const std::int32_t t = sequence.lengths[static_cast<std::size_t>(layer)] - 1;
        detail::require(t >= 0, "length", t + 1, "attend needs at least one appended token");
        const std::span<const float> q = rotated_queries(queries, t, 1, stream);
        const std::size_t dim = static_cast<std::size_t>(config_.shape.head_dim);
        // Every KV head's selection and attention is one task on the backend's threads.
        for_each_head([&](std::int32_t h, Scratch& w) {
            for_each_row(h, q, [&](std::int32_t first_q_head, std::span<const float> rows) {
                const auto slots = select_row(sequence, layer, h, rows, w, first_q_head);
                attend_group(stream_at(sequence, layer, h), slots, rows, t,
                             out.subspan(static_cast<std::size_t>(first_q_head) * dim, rows.size()), stream, &w);
            });
        });
    }

    /// The sets the next decode query of `layer` attends to, for engines that run attention themselves.
    /// `queries` [q_heads][head_dim] as given to attend (policies that select by query read them).
    void select(SequenceId id, std::int32_t layer, std::span<const float> queries, Selection& selection,
                stream_type stream = {}) {
        Sequence& sequence = at(id);
        check_layer(layer);
        check_queries(queries);
        // An empty stream selects nothing; its query position is then irrelevant.
        const std::int32_t t = std::max(sequence.lengths[static_cast<std::size_t>(layer)] - 1, 0);
        const std::span<const float> q = rotated_queries(queries, t, 1, stream);
        selection.rows_per_kv_head = policy_.per_query_head() ? config_.shape.group_size() : 1;
        selection.indptr.assign(1, 0);
        for_each_head([&](std::int32_t h, Scratch& w) {  // the heads in parallel, then concatenated in order
            w.selected.clear();
            w.row_ends.clear();
            for_each_row(h, q, [&](std::int32_t first_q_head, std::span<const float> rows) {
                const auto slots = select_row(sequence, layer, h, rows, w, first_q_head);
                w.selected.insert(w.selected.end(), slots.begin(), slots.end());
                w.row_ends.push_back(w.selected.size());
            });
        });
        std::size_t total = 0;
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            Scratch& w = head_scratch_[static_cast<std::size_t>(h)];
            w.first = total;
            for (const std::size_t end : w.row_ends) selection.indptr.push_back(static_cast<std::int32_t>(total + end));
            total += w.selected.size();
        }
        selection.slots.resize(total);
        selection.positions.resize(total);
        for_each_head([&](std::int32_t h, Scratch& w) {  // each head writes its part of the rows
            const Stream& s = stream_at(sequence, layer, h);
            for (std::size_t i = 0; i < w.selected.size(); ++i) {
                selection.slots[w.first + i] = w.selected[i];
                selection.positions[w.first + i] = s.positions[static_cast<std::size_t>(w.selected[i])];
            }
        });
    }

    /// Page lists (FlashInfer's indptr / indices / last_page_len) for engines with their own paged
    /// kernels, from policies that select whole pages (QuestPageSelector, LServeHybrid): the rows of every KV head of
    /// `layer` in order (of every query head with per_query_head), written into caller buffers sized by
    /// policy().page_list_sizes(layer, kv_heads, group, length). Indices are page numbers of each stream in
    /// units of the policy's page size, ascending; where that equals CacheConfig::page_size,
    /// stream_view(seq, layer, h).table.pages[index] is the pool page.
    void select_pages(SequenceId id, std::int32_t layer, std::span<const float> queries, const PageLists& out,
                      stream_type stream = {})
        requires requires(const Policy& p, const StreamState& s, std::span<const float> q, const PageLists& o) {
            { p.write_page_lists(s, q, 1, o, 0) } -> std::same_as<std::int32_t>;
        }
    {
        Sequence& sequence = at(id);
        check_layer(layer);
        check_queries(queries);
        detail::require(!out.indptr.empty(), "out.indptr.size()", 0, "must be rows + 1 (see page_list_sizes)");
        const std::int32_t t = std::max(sequence.lengths[static_cast<std::size_t>(layer)] - 1, 0);
        const std::span<const float> q = rotated_queries(queries, t, 1, stream);
        const std::int32_t group = config_.shape.group_size();
        const std::size_t group_size = static_cast<std::size_t>(group * config_.shape.head_dim);
        out.indptr[0] = 0;
        std::int32_t row = 0;
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            const StreamState state_h = bounds_state(stream_at(sequence, layer, h), layer, h);
            row += policy_.write_page_lists(state_h, q.subspan(static_cast<std::size_t>(h) * group_size, group_size), group,
                                            out, row);
        }
    }

    // ---- prefill ---------------------------------------------------------------------------------------

    /// Prompt chunk of n tokens: queries [n][q_heads][head_dim], keys/values [n][kv_heads][head_dim].
    /// Every query attends causally (through the policy's prefill pattern) to the held tokens and the
    /// chunk; then the policy's eviction cuts each stream back to its capacity. `out` [n][q_heads][head_dim].
    void prefill(SequenceId id, std::int32_t layer, std::span<const float> queries, std::span<const float> keys,
                 std::span<const float> values, std::span<float> out, stream_type stream = {}) {
        Sequence& sequence = at(id);
        const std::int32_t n = token_count(layer, keys, values);
        const std::size_t q_row = static_cast<std::size_t>(config_.shape.q_heads * config_.shape.head_dim);
        detail::require(queries.size() == static_cast<std::size_t>(n) * q_row, "queries.size()", queries.size(),
                        "must be n * q_heads * head_dim, n from keys");
        detail::require(out.size() == queries.size(), "out.size()", out.size(), "must equal queries.size()");
        // The chunk is stored after every held slot, whatever the capacity, until eviction runs.
        reserve_pages(sequence, layer, [&](std::int32_t slots, std::int32_t) { return std::int64_t{slots} + n; });

        const std::int32_t first = sequence.lengths[static_cast<std::size_t>(layer)];
        std::span<const float> stored_keys = rotated_keys(keys, first, n, stream);
        const std::span<const float> rotated_q = rotated_queries(queries, first, n, stream);
        const std::int32_t dim = config_.shape.head_dim;
        const std::int32_t group = config_.shape.group_size();
        const std::size_t kv_row = static_cast<std::size_t>(config_.shape.kv_heads * dim);
        const std::size_t group_size = static_cast<std::size_t>(group * dim);
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            Stream& s = stream_at(sequence, layer, h);
            const std::int32_t base = static_cast<std::int32_t>(s.positions.size());
            scratch_slots_.resize(static_cast<std::size_t>(n));
            for (std::int32_t i = 0; i < n; ++i) {
                scratch_slots_[static_cast<std::size_t>(i)] = base + i;
                occupy(s, base + i, first + i);
            }
            backend_.write(view(s), std::span<const std::int32_t>(scratch_slots_),
                           stored_keys.subspan(static_cast<std::size_t>(h * dim)),
                           values.subspan(static_cast<std::size_t>(h * dim)), static_cast<std::int32_t>(kv_row), stream);

            // Held slots in position order (the chunk's slots follow in order), and their positions.
            held_by_position(s, prefill_order_);
            order_positions_.resize(prefill_order_.size());
            for (std::size_t j = 0; j < prefill_order_.size(); ++j)
                order_positions_[j] = s.positions[static_cast<std::size_t>(prefill_order_[j])];
            std::vector<std::int32_t>& visible = visible_;
            for (std::int32_t i = 0; i < n; ++i) {
                const std::int32_t qpos = first + i;
                gather_prefill_visible(layer, h, qpos, visible);
                const std::size_t q_offset = static_cast<std::size_t>(i) * q_row + static_cast<std::size_t>(h) * group_size;
                attend_group(s, visible, rotated_q.subspan(q_offset, group_size), qpos, out.subspan(q_offset, group_size),
                             stream);
            }
        }
        sequence.lengths[static_cast<std::size_t>(layer)] += n;
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            const std::int32_t bounds_page = policy_.bounds_page_size(layer, h);
            if (bounds_page > 0) bounds_positions_.assign(stream_at(sequence, layer, h).positions.begin(), stream_at(sequence, layer, h).positions.end());
            evict_after_prefill(sequence, layer, h, stream);
            if (bounds_page > 0) bounds_after_prefill(stream_at(sequence, layer, h), bounds_page, n);
        }
    }

    // ---- views and memory ------------------------------------------------------------------------------

    /// The bookkeeping the policy sees for one stream.
    StreamState stream_state(SequenceId id, std::int32_t layer, std::int32_t kv_head) {
        check_head(kv_head);
        check_layer(layer);
        return bounds_state(stream_at(at(id), layer, kv_head), layer, kv_head);
    }

    /// Where one stream's keys and values live: slots from `select` address into it.
    StreamView<T> stream_view(SequenceId id, std::int32_t layer, std::int32_t kv_head) {
        check_head(kv_head);
        check_layer(layer);
        return view(stream_at(at(id), layer, kv_head));
    }

    /// K-shift for engines that cache rotated keys: re-rotate the keys of `slots` by `delta` positions.
    void shift_keys(SequenceId id, std::int32_t layer, std::int32_t kv_head, std::span<const std::int32_t> slots,
                    std::int32_t delta, stream_type stream = {}) {
        detail::require(config_.rope.has_value(), "rope", "none", "shift_keys needs CacheConfig::rope");
        StreamView<T> v = stream_view(id, layer, kv_head);
        const Stream& s = stream_at(at(id), layer, kv_head);
        check_held(s, slots);
        backend_.shift_keys(v, slots, delta, *config_.rope, stream);
        const std::int32_t bounds_page = policy_.bounds_page_size(layer, kv_head);
        if (bounds_page > 0) {  // the turned keys' pages get new bounds
            dirty_pages_.clear();
            for (const std::int32_t slot : slots) mark_dirty(slot / bounds_page);
            rebuild_bounds(stream_at(at(id), layer, kv_head), bounds_page, dirty_pages_);
        }
    }

    /// For engines that run attention themselves on the sets from `select`, with a policy that
    /// accumulates attention: adds `probabilities[i]` (the query heads of the group summed, as
    /// AttendArgs::probabilities returns them) to the score of the token in `slots[i]`. KVCache's own
    /// attend and prefill do this already.
    void add_scores(SequenceId id, std::int32_t layer, std::int32_t kv_head, std::span<const std::int32_t> slots,
                    std::span<const float> probabilities) {
        check_head(kv_head);
        check_layer(layer);
        detail::require(policy_.accumulates_attention(), "accumulates_attention", "false",
                        "add_scores needs a policy that accumulates attention");
        detail::require(probabilities.size() == slots.size(), "probabilities.size()", probabilities.size(),
                        "must equal slots.size()");
        Stream& s = stream_at(at(id), layer, kv_head);
        check_held(s, slots);
        for (std::size_t i = 0; i < slots.size(); ++i) s.scores[static_cast<std::size_t>(slots[i])] += probabilities[i];
    }

    MemoryStats memory(SequenceId id) const {
        MemoryStats stats;
        for (const Stream& s : at(id).streams) {
            stats.pages += static_cast<std::int64_t>(s.pages.size());
            stats.tokens += s.held;
            stats.max_stream_tokens = std::max(stats.max_stream_tokens, s.held);
            stats.metadata_bytes += static_cast<std::int64_t>(s.bounds.size() * sizeof(T) + s.scores.size() * sizeof(float) +
                                                              s.memo.size() * sizeof(std::int32_t));
        }
        stats.bytes = stats.pages * pool_.page_bytes();
        return stats;
    }

    /// Pages not holding tokens: the pool's, and those streams have taken ahead (CacheConfig::page_run).
    std::int32_t free_pages() const { return pool_.free_pages() + spare_pages_; }
    std::int32_t total_pages() const { return config_.num_pages; }

private:
    struct Stream {
        std::vector<std::int32_t> pages;
        std::vector<std::int32_t> spare;      // pages taken ahead; the next one to use is at the back
        std::vector<std::int32_t> positions;  // per slot; its size is the slot high-water mark
        std::vector<float> scores;            // per slot when the policy accumulates attention, else empty
        std::vector<T, detail::HugePageAllocator<T>> bounds;  // per bounds page [kmin][kmax] if kept (huge pages: read whole)
        std::vector<std::int32_t> memo;       // the policy's memo_size int32 (zeros at the start), else empty
        std::int32_t held = 0;
        std::int32_t next_position = 0;
    };
    struct Sequence {
        std::vector<Stream> streams;  // [layer][kv_head]
        std::vector<std::int32_t> lengths;
    };

    static CacheConfig validated(const CacheConfig& config, const Policy& policy) {
        config.shape.validate();
        detail::require_page_size(config.page_size);
        detail::require(config.num_pages > 0, "num_pages", config.num_pages, "must be positive");
        detail::require(config.page_run > 0, "page_run", config.page_run, "must be positive");
        if (config.rope) {
            detail::require(config.shape.head_dim % 2 == 0, "head_dim", config.shape.head_dim, "must be even for RoPE");
            detail::require(config.rope->theta > 0.0f, "rope.theta", config.rope->theta, "must be positive");
        }
        detail::require(!policy.rotates_in_cache() || config.rope.has_value(), "rope", "none",
                        "in-cache positions need CacheConfig::rope to re-rotate keys");
        for (std::int32_t layer = 0; layer < config.shape.layers; ++layer) {
            for (std::int32_t h = 0; h < config.shape.kv_heads; ++h) {
                const std::int32_t bounds_page = policy.bounds_page_size(layer, h);
                if (bounds_page == 0) continue;
                detail::require(is_power_of_two(bounds_page), "policy.bounds_page_size", bounds_page,
                                "must be 0 or a power of two");
                detail::require(backend_keeps_bounds, "policy.bounds_page_size", bounds_page,
                                "this backend has no key-bounds primitives (update_key_bounds)");
                detail::require(!policy.rotates_in_cache(), "policy.bounds_page_size", bounds_page,
                                "key bounds need keys at their absolute rotation, not in-cache positions");
            }
        }
        return config;
    }

    /// Whether the backend can maintain per-page key bounds in host memory (CpuBackend can; the CUDA
    /// backend cannot yet).
    static constexpr bool backend_keeps_bounds = requires(const KeyBounds<T>& b, const float* k, const T* stored) {
        Backend::update_key_bounds(b, 0, k, true);
        Backend::update_key_bounds(b, 0, stored, true);
    };

    Sequence& at(SequenceId id) {
        detail::require(contains(id), "sequence", id, "is not a sequence of this cache");
        return *sequences_[static_cast<std::size_t>(id)];
    }
    const Sequence& at(SequenceId id) const { return const_cast<KVCache*>(this)->at(id); }

    void check_layer(std::int32_t layer) const {
        detail::require(layer >= 0 && layer < config_.shape.layers, "layer", layer, "must be in [0, layers)");
    }
    void check_head(std::int32_t head) const {
        detail::require(head >= 0 && head < config_.shape.kv_heads, "kv_head", head, "must be in [0, kv_heads)");
    }

    std::int32_t token_count(std::int32_t layer, std::span<const float> keys, std::span<const float> values) const {
        check_layer(layer);
        const std::size_t row = static_cast<std::size_t>(config_.shape.kv_heads * config_.shape.head_dim);
        detail::require(!keys.empty() && keys.size() % row == 0, "keys.size()", keys.size(),
                        "must be a positive multiple of kv_heads * head_dim");
        detail::require(values.size() == keys.size(), "values.size()", values.size(), "must equal keys.size()");
        return static_cast<std::int32_t>(keys.size() / row);
    }

    Stream& stream_at(Sequence& sequence, std::int32_t layer, std::int32_t h) {
        return sequence.streams[static_cast<std::size_t>(layer * config_.shape.kv_heads + h)];
    }

    static StreamState state(const Stream& s, std::int32_t layer, std::int32_t h) {
        return StreamState{s.positions, s.held, s.next_position, layer, h, s.scores};
    }

    StreamView<T> view(Stream& s) {
        return StreamView<T>{pool_.keys(), pool_.values(),
                             PageTableView{s.pages.data(), static_cast<std::int32_t>(s.pages.size())}, 0};
    }

    void check_queries(std::span<const float> queries) const {
        const std::size_t q_size = static_cast<std::size_t>(config_.shape.q_heads * config_.shape.head_dim);
        detail::require(queries.size() == q_size, "queries.size()", queries.size(), "must be q_heads * head_dim");
    }

    static void check_held(const Stream& s, std::span<const std::int32_t> slots) {
        for (const std::int32_t slot : slots) {
            detail::require(slot >= 0 && static_cast<std::size_t>(slot) < s.positions.size() &&
                                s.positions[static_cast<std::size_t>(slot)] != free_slot,
                            "slot", slot, "is not a held slot of this stream");
        }
    }

    /// Notes page `page` of the stream being changed for a bounds rebuild, once.
    void mark_dirty(std::int32_t page) {
        if (std::find(dirty_pages_.begin(), dirty_pages_.end(), page) == dirty_pages_.end()) dirty_pages_.push_back(page);
    }

    /// Checks, before anything changes, that the pool can give each stream of `layer` the pages it needs
    /// to hold `slots_after(slots, capacity)` slots; then takes them.
    template <class SlotsAfter>
    void reserve_pages(Sequence& sequence, std::int32_t layer, SlotsAfter slots_after) {
        // Pages each stream lacks, once per head; most decode appends need none.
        lacking_.resize(static_cast<std::size_t>(config_.shape.kv_heads));
        std::int64_t needed = 0, needed_from_pool = 0;
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            const Stream& s = stream_at(sequence, layer, h);
            const std::int64_t slots = slots_after(static_cast<std::int32_t>(s.positions.size()), policy_.capacity(layer, h));
            const std::int64_t lacking = std::max<std::int64_t>(0, pool_.pages_for(slots) - static_cast<std::int64_t>(s.pages.size()));
            lacking_[static_cast<std::size_t>(h)] = lacking;
            needed += lacking;
            needed_from_pool += std::max<std::int64_t>(0, lacking - static_cast<std::int64_t>(s.spare.size()));
        }
        if (needed == 0) return;
        if (needed > free_pages()) {
            throw pool_exhausted("page pool: layer " + std::to_string(layer) + " needs " + std::to_string(needed) +
                                 " more pages, " + std::to_string(free_pages()) + " of " +
                                 std::to_string(config_.num_pages) + " are free");
        }
        if (needed_from_pool > pool_.free_pages()) {
            release_spares();
            needed_from_pool = needed;
        }
        for (std::int32_t h = 0; h < config_.shape.kv_heads; ++h) {
            Stream& s = stream_at(sequence, layer, h);
            const std::int64_t lacking = lacking_[static_cast<std::size_t>(h)];
            needed_from_pool -= std::max<std::int64_t>(0, lacking - static_cast<std::int64_t>(s.spare.size()));
            if (lacking > static_cast<std::int64_t>(s.spare.size())) {
                // A run: what the stream lacks, up to page_run if its policy can fill that many and the
                // pool keeps enough for the streams after it.
                return_spares(s);
                const std::int64_t fillable = pool_.pages_for(policy_.capacity(layer, h)) - static_cast<std::int64_t>(s.pages.size());
                const std::int64_t run = std::clamp<std::int64_t>(std::min<std::int64_t>(config_.page_run, fillable), lacking,
                                                                  std::max(lacking, pool_.free_pages() - needed_from_pool));
                for (std::int64_t i = 0; i < run; ++i) s.spare.push_back(pool_.take());
                std::reverse(s.spare.begin(), s.spare.end());
                spare_pages_ += static_cast<std::int32_t>(run);
            }
            for (std::int64_t i = 0; i < lacking; ++i) {
                s.pages.push_back(s.spare.back());
                s.spare.pop_back();
            }
            spare_pages_ -= static_cast<std::int32_t>(lacking);
        }
    }

    /// The pages `s` has taken ahead back to the pool.
    void return_spares(Stream& s) {
        pool_.release(s.spare);
        spare_pages_ -= static_cast<std::int32_t>(s.spare.size());
        s.spare.clear();
    }

    /// Every stream's spare pages back to the pool (it has run short).
    void release_spares() {
        for (auto& sequence : sequences_) {
            if (!sequence) continue;
            for (Stream& s : sequence->streams) return_spares(s);
        }
    }

    /// Puts `position` into `slot`, growing the slot range if needed (its page was reserved).
    void occupy(Stream& s, std::int32_t slot, std::int32_t position) {
        if (static_cast<std::size_t>(slot) >= s.positions.size()) s.positions.resize(static_cast<std::size_t>(slot) + 1, free_slot);
        std::int32_t& current = s.positions[static_cast<std::size_t>(slot)];
        if (current == free_slot) ++s.held;
        current = position;
        s.next_position = position + 1;
        if (policy_.accumulates_attention()) {  // a placed token starts with no attention drawn
            s.scores.resize(s.positions.size(), 0.0f);
            s.scores[static_cast<std::size_t>(slot)] = 0.0f;
        }
    }

    /// Stored keys are always rotated at their absolute positions (when there is a RoPE at all); in-cache
    /// positions are applied at attention time as a shift, like an engine's K-shift.
    bool cache_rotates() const { return config_.rope.has_value() && !config_.inputs_rotated; }

    std::span<const float> rotated_keys(std::span<const float> keys, std::int32_t first, std::int32_t n,
                                        stream_type stream) {
        return rotated(keys, config_.shape.kv_heads, first, n, rotated_, stream);
    }

    /// Queries [n][q_heads][head_dim] at positions first.. as attention sees them: rotated at their absolute
    /// positions when the cache rotates, else as given.
    std::span<const float> rotated_queries(std::span<const float> queries, std::int32_t first, std::int32_t n,
                                           stream_type stream) {
        return rotated(queries, config_.shape.q_heads, first, n, rotated_queries_, stream);
    }

    /// Rows [n][heads][head_dim] at positions first.., rotated into `buffer` when the cache rotates.
    std::span<const float> rotated(std::span<const float> rows, std::int32_t heads, std::int32_t first, std::int32_t n,
                                   std::vector<float>& buffer, stream_type stream) {
        if (!cache_rotates()) return rows;
        buffer.assign(rows.begin(), rows.end());
        positions_.resize(static_cast<std::size_t>(n));
        std::iota(positions_.begin(), positions_.end(), first);
        backend_.rope(buffer, heads, config_.shape.head_dim, positions_, *config_.rope, stream);
        return buffer;
    }

    /// Buffers of one task of attend / select (one per KV head, so the heads can run at once). They grow
    /// to their largest size once and are reused.
    struct Scratch {
        std::vector<std::int32_t> slots, selected, positions, key_rotation, page_order;
        std::vector<std::size_t> row_ends;
        std::vector<float> query, probabilities, page_scores;
        std::vector<std::byte> workspace;
        std::size_t first = 0;  // select: where this head's rows start in the Selection
    };

    /// Runs task(kv_head, its scratch) for every KV head: in parallel when the backend has threads
    /// (CpuBackend::parallel_for). The heads share nothing mutable (each has its own stream, scores, bounds
    /// and scratch; policies select through const member functions), so the results do not depend on the
    /// number of threads.
    template <class Task>
    void for_each_head(Task task) {
        const std::int32_t heads = config_.shape.kv_heads;
        if (head_scratch_.size() < static_cast<std::size_t>(heads)) head_scratch_.resize(static_cast<std::size_t>(heads));
        const auto run = [&](std::int64_t h) { task(static_cast<std::int32_t>(h), head_scratch_[static_cast<std::size_t>(h)]); };
        if constexpr (requires { backend_.parallel_for(std::int64_t{1}, run); }) {
            backend_.parallel_for(heads, run);
        } else {
            for (std::int32_t h = 0; h < heads; ++h) run(h);
        }
    }

    /// Calls visit(first query head, query rows) for each set KV head `h` attends with: once with the
    /// group's rows, or once per query head when the policy selects per query head.
    template <class Visit>
    void for_each_row(std::int32_t h, std::span<const float> queries, Visit visit) const {
        const std::int32_t group = config_.shape.group_size();
        const std::size_t dim = static_cast<std::size_t>(config_.shape.head_dim);
        const std::int32_t rows = policy_.per_query_head() ? 1 : group;
        for (std::int32_t first = h * group; first < (h + 1) * group; first += rows) {
            visit(first, queries.subspan(static_cast<std::size_t>(first) * dim, static_cast<std::size_t>(rows) * dim));
        }
    }

    /// The policy's decode selection of KV head `h` for query rows `q` (from query head `first_q_head`), in w.slots.
    std::span<const std::int32_t> select_row(Sequence& sequence, std::int32_t layer, std::int32_t h,
                                             std::span<const float> q, Scratch& w, std::int32_t first_q_head) {
        Stream& s = stream_at(sequence, layer, h);
        w.slots.resize(std::max<std::size_t>(w.slots.size(), static_cast<std::size_t>(s.held)));
        StreamState selecting = bounds_state(s, layer, h, &w);
        if (policy_.per_query_head()) selecting.group_member = first_q_head - h * config_.shape.group_size();
        const std::int32_t count = policy_.select(selecting, q, w.slots);
        return std::span<const std::int32_t>(w.slots.data(), static_cast<std::size_t>(count));
    }

    /// Attention of query rows (rotated as for their absolute position `qpos`) of KV head `h` over `slots`
    /// (ascending positions). In-cache positions turn every key from its position to its rank in the
    /// set, and the queries to the last rank.
    void attend_group(Stream& s, std::span<const std::int32_t> slots, std::span<const float> queries,
                      std::int32_t qpos, std::span<float> out, stream_type stream, Scratch* task = nullptr) {
        Scratch& w = task ? *task : scratch_;
        const std::int32_t dim = config_.shape.head_dim;
        const std::int32_t group = static_cast<std::int32_t>(queries.size()) / dim;
        std::span<const float> q = queries;
        std::span<const std::int32_t> key_rotation;
        const bool in_cache = policy_.rotates_in_cache();
        if (in_cache) {
            w.query.assign(queries.begin(), queries.end());
            w.positions.assign(1, static_cast<std::int32_t>(slots.size()) - 1 - qpos);
            backend_.rope(w.query, group, dim, w.positions, *config_.rope, stream);
            q = w.query;
            w.key_rotation.resize(slots.size());
            for (std::size_t i = 0; i < slots.size(); ++i) {
                w.key_rotation[i] = static_cast<std::int32_t>(i) - s.positions[static_cast<std::size_t>(slots[i])];
            }
            key_rotation = w.key_rotation;
        }
        const std::size_t bytes = Backend::workspace_bytes(group, static_cast<std::int32_t>(slots.size()), dim);
        if (w.workspace.size() < bytes) w.workspace.resize(bytes);
        // Accumulating policies: the attention adds the group's probability of each attended token (one
        // float per slot of the set, no attention matrix), which then goes to that token's score.
        const bool accumulate = policy_.accumulates_attention();
        if (accumulate) w.probabilities.assign(slots.size(), 0.0f);
        AttendArgs<T> args{view(s),
                           slots,
                           q,
                           group,
                           1.0f / std::sqrt(static_cast<float>(dim)),
                           key_rotation,
                           config_.rope.value_or(Rope{}),
                           out,
                           accumulate ? std::span<float>(w.probabilities) : std::span<float>{}};
        backend_.attend(args, std::span<std::byte>(w.workspace.data(), w.workspace.size()), stream);
        if (accumulate) {
            for (std::size_t j = 0; j < slots.size(); ++j) s.scores[static_cast<std::size_t>(slots[j])] += w.probabilities[j];
        }
    }

    // ---- per-page key bounds (policies with bounds_page_size > 0) -----------------------------------------
    // Page p of a stream's bounds covers slots [p * bounds_page, (p + 1) * bounds_page). A key written into
    // a page that already holds tokens is folded in; a page that gets its first token, or loses a token
    // to an eviction, is rebuilt from the keys it stores once the call's keys are written, so bounds are
    // never merged into stale memory and always cover exactly the page's held keys.

    KeyBounds<T> bounds_of(Stream& s, std::int32_t bounds_page) {
        const std::int32_t dim = config_.shape.head_dim;
        return KeyBounds<T>::packed(s.bounds.data(), static_cast<std::int32_t>(s.bounds.size() / (2 * static_cast<std::size_t>(dim))),
                                    bounds_page, dim);
    }

    /// Grows the bounds to cover every slot of the stream.
    void grow_bounds(Stream& s, std::int32_t bounds_page) {
        const std::int64_t pages = (static_cast<std::int64_t>(s.positions.size()) + bounds_page - 1) / bounds_page;
        const std::size_t elements = KeyBounds<T>::elements(static_cast<std::int32_t>(pages), config_.shape.head_dim);
        if (s.bounds.size() < elements) s.bounds.resize(elements);
    }

    /// The state `select` sees: with the policy's memo, and with the bounds and the cache's selection
    /// scratch when the policy keeps them.
    StreamState bounds_state(Stream& s, std::int32_t layer, std::int32_t h, Scratch* task = nullptr) {
        StreamState result = state(s, layer, h);
        const std::int32_t memo = policy_.memo_size(layer, h, config_.shape.group_size());
        if (memo > 0) {
            if (s.memo.size() < static_cast<std::size_t>(memo)) s.memo.resize(static_cast<std::size_t>(memo), 0);
            result.memo = s.memo;
        }
        const std::int32_t bounds_page = policy_.bounds_page_size(layer, h);
        if (bounds_page == 0) return result;
        grow_bounds(s, bounds_page);
        const auto pages = static_cast<std::int32_t>((static_cast<std::int64_t>(s.positions.size()) + bounds_page - 1) / bounds_page);
        const std::size_t scores = static_cast<std::size_t>(pages) * static_cast<std::size_t>(config_.shape.group_size());
        Scratch& w = task ? *task : scratch_;
        if (w.page_scores.size() < scores) w.page_scores.resize(scores);
        if (w.page_order.size() < static_cast<std::size_t>(pages)) w.page_order.resize(static_cast<std::size_t>(pages));
        result.bounds = KeyBoundsView::of(bounds_of(s, bounds_page), pages, w.page_scores, w.page_order);
        return result;
    }

    /// Before `slot` is occupied: note its page for a rebuild if it is empty or the slot's token is evicted.
    void bounds_before_place(const Stream& s, std::int32_t bounds_page, std::int32_t slot) {
        const std::int32_t page = slot / bounds_page;
        const std::size_t size = s.positions.size();
        bool rebuild = static_cast<std::size_t>(slot) < size && s.positions[static_cast<std::size_t>(slot)] != free_slot;
        if (!rebuild) {
            rebuild = true;
            const std::size_t end = std::min(size, static_cast<std::size_t>(page + 1) * static_cast<std::size_t>(bounds_page));
            for (std::size_t j = static_cast<std::size_t>(page) * static_cast<std::size_t>(bounds_page); j < end; ++j) {
                if (s.positions[j] != free_slot) {
                    rebuild = false;
                    break;
                }
            }
        }
        if (rebuild) mark_dirty(page);
    }

    /// After the key of `slot` is written: fold it into its page, unless that page is to be rebuilt.
    void bounds_after_write(Stream& s, std::int32_t bounds_page, std::int32_t slot, const float* key) {
        const std::int32_t page = slot / bounds_page;
        if (std::find(dirty_pages_.begin(), dirty_pages_.end(), page) != dirty_pages_.end()) return;
        grow_bounds(s, bounds_page);
        if constexpr (backend_keeps_bounds) backend_.update_key_bounds(bounds_of(s, bounds_page), page, key, false);
    }

    /// Rebuilds `pages` from the keys their held slots store (a page with none is left as is: its next
    /// key rebuilds it again).
    void rebuild_bounds(Stream& s, std::int32_t bounds_page, std::span<const std::int32_t> pages) {
        if constexpr (backend_keeps_bounds) {
            grow_bounds(s, bounds_page);
            const KeyBounds<T> bounds = bounds_of(s, bounds_page);
            const StreamView<T> v = view(s);
            for (const std::int32_t page : pages) {
                const std::size_t end = std::min(s.positions.size(), static_cast<std::size_t>(page + 1) * static_cast<std::size_t>(bounds_page));
                bool first = true;
                for (std::size_t j = static_cast<std::size_t>(page) * static_cast<std::size_t>(bounds_page); j < end; ++j) {
                    if (s.positions[j] == free_slot) continue;
                    backend_.update_key_bounds(bounds, page, static_cast<const T*>(v.key(static_cast<std::int32_t>(j))), first);
                    first = false;
                }
            }
        }
    }

    /// After a prefill's eviction: rebuilds every page from the first slot whose token changed (the
    /// chunk's first slot at the latest). `bounds_positions_` holds the slots before the eviction.
    void bounds_after_prefill(Stream& s, std::int32_t bounds_page, std::int32_t chunk) {
        const std::size_t before = bounds_positions_.size();
        std::size_t changed = before - static_cast<std::size_t>(chunk);
        for (std::size_t j = 0; j < std::min(changed, s.positions.size()); ++j) {
            if (bounds_positions_[j] != s.positions[j]) {
                changed = j;
                break;
            }
        }
        const auto pages = static_cast<std::int32_t>((static_cast<std::int64_t>(s.positions.size()) + bounds_page - 1) / bounds_page);
        dirty_pages_.clear();
        for (auto p = static_cast<std::int32_t>(changed / static_cast<std::size_t>(bounds_page)); p < pages; ++p) dirty_pages_.push_back(p);
        rebuild_bounds(s, bounds_page, dirty_pages_);
    }

    /// The held slots that prefill query position `qpos` of KV head `h` sees, ascending: the policy's
    /// prefill ranges clipped to [0, qpos], each found by binary search in order_positions_ (held
    /// positions ascending, slots in prefill_order_). O(ranges * log held + visible): a sparse pattern
    /// never visits the keys it masks.
    void gather_prefill_visible(std::int32_t layer, std::int32_t h, std::int32_t qpos, std::vector<std::int32_t>& visible) {
        visible.clear();
        const PrefillRanges ranges = policy_.prefill_ranges(layer, h, qpos);
        detail::require(ranges.count >= 0 && ranges.count <= PrefillRanges::max_ranges, "prefill_ranges.count", ranges.count,
                        "must be in [0, PrefillRanges::max_ranges]");
        std::int32_t previous_end = 0;
        for (std::int32_t r = 0; r < ranges.count; ++r) {
            const PositionRange range = ranges.ranges[static_cast<std::size_t>(r)];
            detail::require(range.begin >= previous_end, "prefill_ranges.begin", range.begin,
                            "ranges must be ascending, disjoint and not negative");
            previous_end = std::max(previous_end, range.end);
            const std::int32_t end = std::min(range.end, qpos + 1);
            if (range.begin >= end) continue;
            const auto from = std::lower_bound(order_positions_.begin(), order_positions_.end(), range.begin);
            for (auto it = from; it != order_positions_.end() && *it < end; ++it)
                visible.push_back(prefill_order_[static_cast<std::size_t>(it - order_positions_.begin())]);
        }
    }

    /// Held slots sorted by position.
    static void held_by_position(const Stream& s, std::vector<std::int32_t>& order) {
        order.clear();
        for (std::size_t slot = 0; slot < s.positions.size(); ++slot) {
            if (s.positions[slot] != free_slot) order.push_back(static_cast<std::int32_t>(slot));
        }
        std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
            return s.positions[static_cast<std::size_t>(a)] < s.positions[static_cast<std::size_t>(b)];
        });
    }

    /// Drops what the policy does not retain, re-places the survivors (in position order) where the
    /// policy's own decode placement would have put them, and returns unused pages to the pool.
    void evict_after_prefill(Sequence& sequence, std::int32_t layer, std::int32_t h, stream_type stream) {
        Stream& s = stream_at(sequence, layer, h);
        const StreamState before = state(s, layer, h);
        held_by_position(s, prefill_order_);
        Stream placed;
        scratch_slots_.clear();  // from
        visible_.clear();        // to
        for (const std::int32_t slot : prefill_order_) {
            if (!policy_.retain(before, slot)) continue;
            const std::int32_t position = s.positions[static_cast<std::size_t>(slot)];
            placed.next_position = position;
            const std::int32_t target = policy_.place(state(placed, layer, h));
            detail::require(target >= 0 && (static_cast<std::size_t>(target) >= placed.positions.size() ||
                                            placed.positions[static_cast<std::size_t>(target)] == free_slot),
                            "policy.place", target, "re-placing retained tokens must not collide");
            occupy(placed, target, position);
            if (policy_.accumulates_attention()) {  // a survivor keeps the attention it has drawn
                placed.scores[static_cast<std::size_t>(target)] = s.scores[static_cast<std::size_t>(slot)];
            }
            if (target != slot) {
                scratch_slots_.push_back(slot);
                visible_.push_back(target);
            }
        }
        detail::require(static_cast<std::int64_t>(placed.positions.size()) <= static_cast<std::int64_t>(s.pages.size()) * config_.page_size,
                        "policy.place", static_cast<std::int64_t>(placed.positions.size()), "slot beyond the reserved pages");
        if (!scratch_slots_.empty()) backend_.copy_slots(view(s), scratch_slots_, visible_, stream);
        placed.next_position = s.next_position;
        placed.pages = std::move(s.pages);
        placed.bounds = std::move(s.bounds);  // the caller rebuilds the pages whose slots changed
        placed.memo = std::move(s.memo);
        placed.spare = std::move(s.spare);
        const std::size_t keep_pages = static_cast<std::size_t>(pool_.pages_for(static_cast<std::int64_t>(placed.positions.size())));
        pool_.release(std::span<const std::int32_t>(placed.pages).subspan(keep_pages));
        placed.pages.resize(keep_pages);
        s = std::move(placed);
    }

    CacheConfig config_;
    Policy policy_;
    Backend backend_;
    detail::PagePool<T> pool_;
    std::vector<std::optional<Sequence>> sequences_;
    std::int32_t spare_pages_ = 0;        // pages streams have taken ahead of need (CacheConfig::page_run)
    std::vector<std::int64_t> lacking_;   // reserve_pages: pages each stream of the layer lacks

    // Scratch reused across calls, so steady-state decode does not allocate.
    std::vector<std::int32_t> scratch_slots_, prefill_order_, order_positions_, visible_, positions_;
    std::vector<float> rotated_, rotated_queries_;
    std::vector<std::int32_t> dirty_pages_, bounds_positions_;  // key bounds
    Scratch scratch_;                    // attention and selection outside attend / select (prefill, ...)
    std::vector<Scratch> head_scratch_;  // attend / select: one per KV head
};

}  // namespace kvsparse
