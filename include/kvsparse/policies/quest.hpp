#pragma once
// QuestPageSelector (Quest, Tang et al. 2024): query-aware page selection. Every token stays (slot ==
// position, like Dense); each decode query reads only the pages whose upper-bound score can matter.
//
// Per (layer, KV head) and page of `page_size` positions the stream keeps the element-wise min and max
// of the page's stored keys (StreamState::bounds). A page's score for query q is
// U(i) = sum_d max(q_d * kmax_d, q_d * kmin_d), an upper bound of q . k for every key k of the page.
// The query reads the last page (it holds the current token) and the K - 1 other pages with the highest
// scores, K = max(1, token_budget / page_size). Layers below `dense_layers`, and prefill, are dense.
// docs/quest.md explains the GQA modes, the costs and what differs from the original.
//
// Three ways to use it:
//   KVCache<QuestPageSelector>:   append / attend, or select (slots) and select_pages (page lists).
//   Engine-owned memory:          bounds in a buffer of bounds_elements(max_tokens, head_dim) elements,
//                                 append_key_bounds(...) on every appended key, then select_pages or
//                                 write_page_lists with a StreamState built over that buffer.
//   Primitives:                   CpuBackend::update_key_bounds / page_scores / top_pages.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>

#include "kvsparse/backends/cpu_backend.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/policies/policy_defaults.hpp"
#include "kvsparse/shape.hpp"
#include "kvsparse/stream.hpp"

namespace kvsparse {

/// Scratch a selection needs (StreamState::bounds.scores / .order), in elements.
struct QuestScratchSizes {
    std::size_t scores = 0;  ///< floats
    std::size_t order = 0;   ///< int32
};

/// The slots of `pages` (ascending page numbers, `page_size` slots each) of a stream of `tokens` slots,
/// into `out`, the last page cut at `tokens`; every slot when `pages` is empty. Returns the count.
inline std::int32_t slots_of_pages(std::span<const std::int32_t> pages, std::int32_t page_size, std::int32_t tokens,
                                   std::span<std::int32_t> out) {
    if (pages.empty()) {
        std::iota(out.begin(), out.begin() + tokens, 0);
        return tokens;
    }
    std::int32_t count = 0;
    for (const std::int32_t page : pages) {
        const std::int32_t end = std::min(tokens, (page + 1) * page_size);
        for (std::int32_t slot = page * page_size; slot < end; ++slot) out[static_cast<std::size_t>(count++)] = slot;
    }
    return count;
}

class QuestPageSelector : public policy_defaults {
public:
    struct Config {
        std::int32_t page_size = 16;       ///< positions per selection page, a power of two
        std::int32_t token_budget = 4096;  ///< tokens a decode query reads: K = max(1, budget / page) pages
        std::int32_t dense_layers = 2;     ///< layers [0, dense_layers) attend densely
        GqaAggregation gqa = GqaAggregation::max;
    };

    explicit QuestPageSelector(Config config) : config_(config) {
        detail::require_page_size(config.page_size);
        detail::require(config.token_budget >= 1, "token_budget", config.token_budget, "must be at least 1");
        detail::require(config.dense_layers >= 0, "dense_layers", config.dense_layers, "must not be negative");
        detail::require(config.gqa == GqaAggregation::max || config.gqa == GqaAggregation::sum ||
                            config.gqa == GqaAggregation::per_query_head,
                        "gqa", static_cast<int>(config.gqa), "must be max, sum or per_query_head");
    }
    QuestPageSelector(std::int32_t page_size, std::int32_t token_budget, std::int32_t dense_layers = 2,
                      GqaAggregation gqa = GqaAggregation::max)
        : QuestPageSelector(Config{page_size, token_budget, dense_layers, gqa}) {}
    QuestPageSelector() : QuestPageSelector(Config{}) {}

    const Config& config() const { return config_; }
    std::int32_t page_size() const { return config_.page_size; }
    /// K: pages a decode query reads once the stream has more.
    std::int32_t page_budget() const { return std::max(1, config_.token_budget / config_.page_size); }
    bool dense_layer(std::int32_t layer) const { return layer < config_.dense_layers; }
    /// Selection pages covering `tokens` positions.
    std::int32_t pages_for(std::int32_t tokens) const {
        return static_cast<std::int32_t>((std::int64_t{tokens} + config_.page_size - 1) / config_.page_size);
    }

    // ---- kv_policy --------------------------------------------------------------------------------------

    std::int32_t capacity(std::int32_t /*layer*/, std::int32_t /*kv_head*/) const { return unbounded; }
    /// Nothing is evicted: slot i holds position i, so page i covers slots and positions [iP, (i+1)P).
    std::int32_t place(const StreamState& stream) const { return stream.next_position; }
    bool per_query_head() const { return config_.gqa == GqaAggregation::per_query_head; }
    /// Bounds are kept where selection happens: every layer but the dense ones.
    std::int32_t bounds_page_size(std::int32_t layer, std::int32_t /*kv_head*/) const {
        return dense_layer(layer) ? 0 : config_.page_size;
    }

    /// Slots of the selected pages, ascending: all of [0, t] on dense layers or while the stream has at
    /// most K pages; else the last page and the top K - 1 others. `queries` [rows][head_dim]: the group's
    /// heads (aggregated with max or sum) or one head (per_query_head).
    std::int32_t select(const StreamState& stream, std::span<const float> queries, std::span<std::int32_t> out) const {
        const std::int32_t tokens = stream.next_position;
        const bool all = dense_layer(stream.layer) || pages_for(tokens) <= page_budget();
        return slots_of_pages(all ? std::span<const std::int32_t>{} : choose(stream, queries), config_.page_size, tokens, out);
    }

    // ---- page lists (engines with their own kernels) ---------------------------------------------------

    /// Selected pages of `stream` for `queries` (as in select), ascending, into `pages`, which has room
    /// for min(pages_for(tokens), K) entries (all pages on dense layers); returns the count.
    std::int32_t select_pages(const StreamState& stream, std::span<const float> queries,
                              std::span<std::int32_t> pages) const {
        const std::int32_t n = pages_for(stream.next_position);
        if (dense_layer(stream.layer) || n <= page_budget()) {
            for (std::int32_t p = 0; p < n; ++p) pages[static_cast<std::size_t>(p)] = p;
            return n;
        }
        const std::span<const std::int32_t> chosen = choose(stream, queries);
        std::copy(chosen.begin(), chosen.end(), pages.begin());
        return static_cast<std::int32_t>(chosen.size());
    }

    /// Buffer sizes for the page lists of `streams` (sequence, KV head) pairs of `layer`, each with at
    /// most `max_tokens` tokens and `group` query heads per KV head: one row per stream, or one per query
    /// head with per_query_head.
    PageListSizes page_list_sizes(std::int32_t layer, std::int32_t streams, std::int32_t group,
                                  std::int32_t max_tokens) const {
        const std::size_t rows = static_cast<std::size_t>(streams) * static_cast<std::size_t>(per_query_head() ? group : 1);
        const std::int32_t all = pages_for(max_tokens);
        const std::int32_t per_row = dense_layer(layer) ? all : std::min(all, page_budget());
        return {rows, rows + 1, rows * static_cast<std::size_t>(per_row), rows};
    }

    /// Writes the rows of one (sequence, KV head) into `out`, starting at row `row`, whose start
    /// out.indptr[row] the caller has set (0 for the first row): one row, or `group` rows (one per query
    /// head) with per_query_head. `queries` [group][head_dim]. Returns the rows written. With
    /// per_query_head every head's scores come from one pass over the bounds.
    std::int32_t write_page_lists(const StreamState& stream, std::span<const float> queries, std::int32_t group,
                                  const PageLists& out, std::int32_t row) const {
        const std::int32_t tokens = stream.next_position;
        const std::int32_t n = pages_for(tokens);
        const std::int32_t rows = per_query_head() ? group : 1;
        const bool all = dense_layer(stream.layer) || n <= page_budget();
        const std::int32_t per_row = all ? n : page_budget();
        const auto r0 = static_cast<std::size_t>(row);
        detail::require(out.indptr.size() >= r0 + static_cast<std::size_t>(rows) + 1 && out.last_page_len.size() >= r0 + static_cast<std::size_t>(rows),
                        "page lists rows", row + rows, "exceed indptr / last_page_len (see page_list_sizes)");
        detail::require(out.indices.size() >= static_cast<std::size_t>(out.indptr[r0]) + static_cast<std::size_t>(rows * per_row),
                        "page lists indices", out.indices.size(), "too small (see page_list_sizes)");
        if (!all) {
            score(stream, queries, group, config_.gqa);
        }
        for (std::int32_t r = 0; r < rows; ++r) {
            const auto at = r0 + static_cast<std::size_t>(r);
            std::int32_t* indices = out.indices.data() + out.indptr[at];
            if (all) {
                for (std::int32_t p = 0; p < n; ++p) indices[p] = p;
            } else {
                const std::span<const std::int32_t> chosen = pick(stream, n, r);
                std::copy(chosen.begin(), chosen.end(), indices);
            }
            out.indptr[at + 1] = out.indptr[at] + per_row;
            out.last_page_len[at] = tokens == 0 ? 0 : tokens - (n - 1) * config_.page_size;
        }
        return rows;
    }

    // ---- engine-owned memory ----------------------------------------------------------------------------

    /// Pages of bounds a stream of `max_tokens` tokens needs, and the elements of a packed buffer for them
    /// (KeyBounds<T>::packed over `bounds_elements` elements of T).
    std::int32_t bounds_pages(std::int32_t max_tokens) const { return pages_for(max_tokens); }
    std::size_t bounds_elements(std::int32_t max_tokens, std::int32_t head_dim) const {
        return KeyBounds<float>::elements(bounds_pages(max_tokens), head_dim);
    }
    /// Scratch a selection over `max_tokens` tokens needs, `group` query heads per KV head.
    QuestScratchSizes scratch_sizes(std::int32_t max_tokens, std::int32_t group) const {
        const auto pages = static_cast<std::size_t>(pages_for(max_tokens));
        return {pages * static_cast<std::size_t>(group), pages};
    }

private:
    GqaAggregation aggregation() const {
        return config_.gqa == GqaAggregation::sum ? GqaAggregation::sum : GqaAggregation::max;
    }

    /// Scores pages [0, n - 1) (the last page is always read) into bounds.scores.
    void score(const StreamState& stream, std::span<const float> queries, std::int32_t rows, GqaAggregation mode) const {
        const std::int32_t n = pages_for(stream.next_position);
        detail::require(stream.bounds.order.size() >= static_cast<std::size_t>(n), "bounds.order", stream.bounds.order.size(),
                        "scratch too small (see scratch_sizes)");
        score_pages(stream, queries, rows, mode, n - 1);
    }

public:
    /// The building block of the selection, for policies that compose it (LServeHybrid): upper-bound
    /// scores U of the stream's pages [0, pages) for `queries` [rows][head_dim] into stream.bounds.scores,
    /// aggregated over the rows by `mode` (`per_query_head`: row r's scores at [r * pages, (r + 1) * pages)).
    void score_pages(const StreamState& stream, std::span<const float> queries, std::int32_t rows, GqaAggregation mode,
                     std::int32_t pages) const {
        const KeyBoundsView& b = stream.bounds;
        detail::require(b.page_size == config_.page_size && b.pages >= pages, "bounds.pages", b.pages,
                        "the stream keeps no key bounds of this page size for its tokens");
        detail::require(b.head_dim > 0 && queries.size() == static_cast<std::size_t>(rows) * static_cast<std::size_t>(b.head_dim),
                        "queries.size()", queries.size(), "must be rows * bounds.head_dim");
        const std::size_t rows_scored = mode == GqaAggregation::per_query_head ? static_cast<std::size_t>(rows) : 1;
        detail::require(b.scores.size() >= rows_scored * static_cast<std::size_t>(std::max(pages, 0)), "bounds.scores",
                        b.scores.size(), "scratch too small (see scratch_sizes)");
        if (pages <= 0) return;
        visit_bounds(b, [&](const auto& typed) { CpuBackend::page_scores(typed, pages, queries, rows, mode, b.scores); });
    }

private:

    /// Row `r` of the scores: the top K - 1 of pages [0, n - 1), then the last page; ascending, in
    /// bounds.order.
    std::span<const std::int32_t> pick(const StreamState& stream, std::int32_t n, std::int32_t r) const {
        const KeyBoundsView& b = stream.bounds;
        const auto first = static_cast<std::size_t>(r) * static_cast<std::size_t>(n - 1);
        const std::int32_t k = CpuBackend::top_pages(b.scores.subspan(first), n - 1, page_budget() - 1, b.order);
        b.order[static_cast<std::size_t>(k)] = n - 1;
        return b.order.first(static_cast<std::size_t>(k) + 1);
    }

    /// The selection for `queries` (the group's rows, or one head's with per_query_head).
    std::span<const std::int32_t> choose(const StreamState& stream, std::span<const float> queries) const {
        const std::int32_t rows = stream.bounds.head_dim > 0 ? static_cast<std::int32_t>(queries.size()) / stream.bounds.head_dim : 0;
        score(stream, queries, rows, aggregation());
        return pick(stream, pages_for(stream.next_position), 0);
    }

    Config config_;
};

/// For engines that own their cache: folds the key appended at `position` (slot == position, append-only)
/// into its page of `bounds`; the page's first position initializes the page.
template <storage_type T, storage_type K>
void append_key_bounds(const KeyBounds<T>& bounds, std::int32_t position, const K* key) {
    CpuBackend::update_key_bounds(bounds, position / bounds.page_size, key, position % bounds.page_size == 0);
}

}  // namespace kvsparse
