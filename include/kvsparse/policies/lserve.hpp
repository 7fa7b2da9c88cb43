#pragma once
// LServeHybrid (LServe, Yang et al. 2025): two kinds of heads in one policy.
//
// - Streaming heads keep only `sink` + `local` positions (bounded memory) and prefill with a static
//   block-sparse pattern (sinks plus a local band). They are an AttentionSink{sink, local}; the prefill
//   pattern is an AttentionSink{prefill_sink, prefill_local}'s attended set, as position ranges, so the
//   cache gathers only the visible keys (work proportional to them, never n^2).
// - Retrieval heads keep everything and select pages per query at two granularities: Quest's key bounds
//   and scores on logical pages of `logical_page` positions (QuestPageSelector::score_pages), a physical
//   page of `physical_page` positions scoring the max of its logical pages, and the top Kp - 1 physical
//   pages plus the last one, Kp = max(3, token_budget / physical_page). A selection is reused for
//   `reuse_interval` steps; it lives in the stream's memo (StreamState::memo, memo_size int32).
//
// Which heads stream: an explicit HeadKinds mask, or DuoAttention gate values alpha[L][Hkv] with a static
// sparsity (HeadKinds::from_gates, load_gate_values for DuoAttention's TSV files). The exact semantics
// are the project reference's (section LServeHybrid); docs/lserve.md says what differs from the original.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <limits>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvsparse/backends/cpu_backend.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/policies/attention_sink.hpp"
#include "kvsparse/policies/policy_defaults.hpp"
#include "kvsparse/policies/quest.hpp"
#include "kvsparse/shape.hpp"
#include "kvsparse/stream.hpp"

namespace kvsparse {

enum class HeadKind : std::uint8_t {
    retrieval,  ///< keeps every token; pages selected per query
    streaming,  ///< sinks + local window only
};

/// The kind of every (layer, KV head), row-major [layer][kv_head].
class HeadKinds {
public:
    HeadKinds() = default;
    HeadKinds(std::int32_t layers, std::int32_t kv_heads, std::vector<HeadKind> kinds)
        : layers_(layers), kv_heads_(kv_heads), kinds_(std::move(kinds)) {
        detail::require(layers >= 1, "head kinds layers", layers, "must be at least 1");
        detail::require(kv_heads >= 1, "head kinds kv_heads", kv_heads, "must be at least 1");
        detail::require(kinds_.size() == static_cast<std::size_t>(layers) * static_cast<std::size_t>(kv_heads),
                        "head kinds size", kinds_.size(), "must be layers * kv_heads");
    }

    /// Every head of one kind.
    static HeadKinds all(std::int32_t layers, std::int32_t kv_heads, HeadKind kind) {
        return HeadKinds(layers, kv_heads,
                         std::vector<HeadKind>(static_cast<std::size_t>(std::max(layers, 0)) *
                                                   static_cast<std::size_t>(std::max(kv_heads, 0)),
                                               kind));
    }

    /// An explicit mask, one row per layer: true marks a streaming head.
    static HeadKinds from_mask(const std::vector<std::vector<bool>>& streaming) {
        detail::require(!streaming.empty(), "head mask rows", 0, "must be at least one layer");
        const std::size_t heads = streaming.front().size();
        std::vector<HeadKind> kinds;
        for (std::size_t l = 0; l < streaming.size(); ++l) {
            detail::require(streaming[l].size() == heads, "head mask row", l, "every row must have kv_heads entries");
            for (const bool s : streaming[l]) kinds.push_back(s ? HeadKind::streaming : HeadKind::retrieval);
        }
        return HeadKinds(static_cast<std::int32_t>(streaming.size()), static_cast<std::int32_t>(heads), std::move(kinds));
    }

    /// DuoAttention gate values alpha[L][Hkv] and a static sparsity s in [0, 1]: alpha clipped to [0, 1],
    /// heads ordered by alpha ascending (ties: lower layer, then lower head first), and the first
    /// floor(s * L * Hkv + 0.5) of them stream. Deterministic: no noise breaks the ties.
    static HeadKinds from_gates(const std::vector<std::vector<float>>& alpha, double sparsity) {
        detail::require(sparsity >= 0.0 && sparsity <= 1.0, "static_sparsity", sparsity, "must be in [0, 1]");
        detail::require(!alpha.empty() && !alpha.front().empty(), "gate values", alpha.size(),
                        "need at least one layer and one head");
        const std::size_t heads = alpha.front().size();
        std::vector<float> flat;
        for (std::size_t l = 0; l < alpha.size(); ++l) {
            detail::require(alpha[l].size() == heads, "gate values row", l, "every row must have kv_heads values");
            for (const float a : alpha[l]) {
                detail::require(!std::isnan(a), "gate value", "NaN", "gate values must be numbers");
                flat.push_back(std::clamp(a, 0.0f, 1.0f));
            }
        }
        std::vector<std::size_t> order(flat.size());
        std::iota(order.begin(), order.end(), std::size_t{0});
        // Stable: equal alphas keep index order, i.e. lower layer, then lower head, first.
        std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return flat[a] < flat[b]; });
        const auto streaming =
            static_cast<std::size_t>(std::floor(sparsity * static_cast<double>(flat.size()) + 0.5));
        std::vector<HeadKind> kinds(flat.size(), HeadKind::retrieval);
        for (std::size_t i = 0; i < std::min(streaming, order.size()); ++i) kinds[order[i]] = HeadKind::streaming;
        return HeadKinds(static_cast<std::int32_t>(alpha.size()), static_cast<std::int32_t>(heads), std::move(kinds));
    }

    std::int32_t layers() const { return layers_; }
    std::int32_t kv_heads() const { return kv_heads_; }
    bool contains(std::int32_t layer, std::int32_t kv_head) const {
        return layer >= 0 && layer < layers_ && kv_head >= 0 && kv_head < kv_heads_;
    }
    HeadKind at(std::int32_t layer, std::int32_t kv_head) const {
        if (!contains(layer, kv_head)) {
            throw invalid_argument("head (layer " + std::to_string(layer) + ", kv_head " + std::to_string(kv_head) +
                                   "): outside the head kinds [" + std::to_string(layers_) + "][" +
                                   std::to_string(kv_heads_) + "]");
        }
        return kinds_[static_cast<std::size_t>(layer) * static_cast<std::size_t>(kv_heads_) + static_cast<std::size_t>(kv_head)];
    }
    bool streaming(std::int32_t layer, std::int32_t kv_head) const { return at(layer, kv_head) == HeadKind::streaming; }
    std::int32_t streaming_count() const {
        return static_cast<std::int32_t>(std::count(kinds_.begin(), kinds_.end(), HeadKind::streaming));
    }

private:
    std::int32_t layers_ = 0;
    std::int32_t kv_heads_ = 0;
    std::vector<HeadKind> kinds_;
};

/// Gate values in DuoAttention's TSV format: one row per layer, one value per KV head, tab separated
/// (spaces around a value and a trailing tab are tolerated, as are '\r' line ends and empty lines at
/// the end). Throws format_error naming `name`, the line and the problem.
inline std::vector<std::vector<float>> parse_gate_values(std::string_view text, const std::string& name = "gate values") {
    std::vector<std::vector<float>> rows;
    std::vector<std::string_view> lines;
    for (std::size_t start = 0; start <= text.size();) {
        std::size_t end = text.find('\n', start);
        if (end == std::string_view::npos) end = text.size();
        std::string_view line = text.substr(start, end - start);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        lines.push_back(line);
        start = end + 1;
    }
    const auto blank = [](std::string_view s) { return s.find_first_not_of(" \t") == std::string_view::npos; };
    while (!lines.empty() && blank(lines.back())) lines.pop_back();
    if (lines.empty()) throw format_error(name + ": no gate values (expected one tab-separated row per layer)");
    for (std::size_t l = 0; l < lines.size(); ++l) {
        const std::string where = name + ":" + std::to_string(l + 1);
        std::string_view line = lines[l];
        if (blank(line)) throw format_error(where + ": empty line (expected one row per layer)");
        while (!line.empty() && (line.back() == '\t' || line.back() == ' ')) line.remove_suffix(1);
        std::vector<float> row;
        for (std::size_t start = 0; start <= line.size();) {
            std::size_t end = line.find('\t', start);
            if (end == std::string_view::npos) end = line.size();
            std::string_view field = line.substr(start, end - start);
            start = end + 1;
            while (!field.empty() && field.front() == ' ') field.remove_prefix(1);
            while (!field.empty() && field.back() == ' ') field.remove_suffix(1);
            const std::string value(field);
            std::size_t used = 0;
            double x = 0;
            try {
                x = std::stod(value, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            if (value.empty() || used != value.size() || std::isnan(x)) {
                throw format_error(where + ": value " + std::to_string(row.size() + 1) + " '" + value +
                                   "' is not a number");
            }
            row.push_back(static_cast<float>(x));
        }
        if (!rows.empty() && row.size() != rows.front().size()) {
            throw format_error(where + ": " + std::to_string(row.size()) + " values, but line 1 has " +
                               std::to_string(rows.front().size()) + " (one per KV head on every line)");
        }
        rows.push_back(std::move(row));
    }
    return rows;
}

/// Reads a gate-value TSV file (parse_gate_values).
inline std::vector<std::vector<float>> load_gate_values(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw format_error(path + ": cannot open the gate values");
    std::ostringstream text;
    text << file.rdbuf();
    if (file.bad()) throw format_error(path + ": read failed");
    return parse_gate_values(text.str(), path);
}

/// Scratch and buffers an engine-owned retrieval stream needs (see LServeHybrid::engine_sizes).
struct LServeSizes {
    std::size_t bounds_elements = 0;  ///< KeyBounds<T>::packed over this many elements of T (logical pages)
    std::int32_t bounds_pages = 0;    ///< logical pages of bounds
    std::size_t scores = 0;           ///< floats of StreamState::bounds.scores
    std::size_t order = 0;            ///< int32 of StreamState::bounds.order
    std::int32_t memo = 0;            ///< int32 of StreamState::memo, zeros at the start
};

class LServeHybrid : public policy_defaults {
public:
    struct Config {
        std::int32_t sink = 64;             ///< streaming heads: first positions kept
        std::int32_t local = 512;           ///< streaming heads: last positions kept (the current one included)
        std::int32_t logical_page = 16;     ///< positions per logical page (key bounds, scores); a power of two
        std::int32_t physical_page = 64;    ///< positions per physical page (selection); a multiple of logical_page
        std::int32_t token_budget = 4096;   ///< retrieval heads read Kp = max(3, budget / physical_page) pages
        std::int32_t reuse_interval = 4;    ///< a selection is made at t % reuse_interval == 0 and reused between
        std::int32_t prefill_sink = -1;     ///< streaming-head prefill: sink columns (-1: `sink`)
        std::int32_t prefill_local = -1;    ///< streaming-head prefill: local band width (-1: `local`)
        GqaAggregation gqa = GqaAggregation::max;
    };

    LServeHybrid(HeadKinds kinds, Config config)
        : kinds_(std::move(kinds)),
          config_(resolved(config)),
          streaming_(AttentionSink::Config{config_.sink, config_.local, PositionMode::absolute}),
          prefill_(AttentionSink::Config{config_.prefill_sink, config_.prefill_local, PositionMode::absolute}),
          logical_(QuestPageSelector::Config{config_.logical_page, config_.token_budget, 0, config_.gqa}) {
        detail::require(kinds_.layers() >= 1, "head kinds", kinds_.layers(), "need at least one layer (HeadKinds)");
        detail::require(config_.physical_page >= config_.logical_page && config_.physical_page % config_.logical_page == 0,
                        "physical_page", config_.physical_page, "must be a positive multiple of logical_page");
        detail::require(config_.reuse_interval >= 1, "reuse_interval", config_.reuse_interval, "must be at least 1");
    }

    const Config& config() const { return config_; }
    const HeadKinds& head_kinds() const { return kinds_; }
    bool streaming(std::int32_t layer, std::int32_t kv_head) const { return kinds_.streaming(layer, kv_head); }
    /// Kp: physical pages a retrieval head reads once it has more.
    std::int32_t page_budget() const { return std::max(3, config_.token_budget / config_.physical_page); }
    std::int32_t physical_pages_for(std::int32_t tokens) const {
        return static_cast<std::int32_t>((std::int64_t{tokens} + config_.physical_page - 1) / config_.physical_page);
    }
    /// The pieces it is made of.
    const AttentionSink& streaming_policy() const { return streaming_; }
    const AttentionSink& prefill_pattern() const { return prefill_; }
    const QuestPageSelector& logical_pages() const { return logical_; }

    // ---- kv_policy --------------------------------------------------------------------------------------

    std::int32_t capacity(std::int32_t layer, std::int32_t kv_head) const {
        return streaming(layer, kv_head) ? streaming_.budget() : unbounded;
    }
    /// Streaming heads: AttentionSink's ring. Retrieval heads: slot == position.
    std::int32_t place(const StreamState& stream) const {
        return streaming(stream.layer, stream.kv_head) ? streaming_.place(stream) : stream.next_position;
    }
    bool retain(const StreamState& stream, std::int32_t slot) const {
        return !streaming(stream.layer, stream.kv_head) || streaming_.retain(stream, slot);
    }
    /// Streaming heads: j <= i and (j < prefill_sink or j > i - prefill_local), as two ranges. Retrieval
    /// heads: dense causal.
    PrefillRanges prefill_ranges(std::int32_t layer, std::int32_t kv_head, std::int32_t query_position) const {
        return streaming(layer, kv_head) ? prefill_.attended_ranges(query_position) : PrefillRanges::causal(query_position);
    }
    bool per_query_head() const { return config_.gqa == GqaAggregation::per_query_head; }
    std::int32_t bounds_page_size(std::int32_t layer, std::int32_t kv_head) const {
        return streaming(layer, kv_head) ? 0 : config_.logical_page;
    }
    /// Retrieval heads: per selection row (one, or `group` with per_query_head) the step it was made at
    /// plus one (0: none), its page count and its pages.
    std::int32_t memo_size(std::int32_t layer, std::int32_t kv_head, std::int32_t group) const {
        if (streaming(layer, kv_head)) return 0;
        return (per_query_head() ? std::max(group, 1) : 1) * memo_row_size();
    }

    /// Streaming heads: AttentionSink's S_t. Retrieval heads: the slots of the selected physical pages,
    /// ascending (see the file comment and REFERENCE.md); `queries` [rows][head_dim].
    std::int32_t select(const StreamState& stream, std::span<const float> queries, std::span<std::int32_t> out) const {
        if (streaming(stream.layer, stream.kv_head)) return streaming_.select(stream, queries, out);
        return slots_of_pages(select_pages(stream, queries), config_.physical_page, stream.next_position, out);
    }

    /// Retrieval heads: the selected physical pages for the step at stream.next_position - 1, ascending,
    /// kept in (and reused from) the stream's memo; empty when every page is read (n <= Kp).
    std::span<const std::int32_t> select_pages(const StreamState& stream, std::span<const float> queries) const {
        const std::int32_t tokens = stream.next_position;
        const std::int32_t t = tokens - 1;
        const std::int32_t n = physical_pages_for(tokens);
        const std::span<std::int32_t> memo = memo_row(stream);
        if (n <= page_budget()) {
            memo[0] = 0;  // no selection: the next one over budget is made afresh
            return {};
        }
        const std::int32_t made = memo[0] - 1;  // step of the remembered selection, -1 for none
        const bool reuse = t % config_.reuse_interval != 0 && made >= 0 && (made == t || made == t - 1);
        std::int32_t count = memo[1];
        const std::span<std::int32_t> pages = memo.subspan(2);
        if (!reuse) {
            count = choose(stream, queries, n, pages);
        } else if (pages[static_cast<std::size_t>(count - 1)] != n - 1) {
            // A new physical page started: the reused set reads it too.
            detail::require(static_cast<std::size_t>(count) < pages.size(), "memo", count, "reused selection overflows");
            pages[static_cast<std::size_t>(count++)] = n - 1;
        }
        memo[0] = t + 1;
        memo[1] = count;
        return pages.first(static_cast<std::size_t>(count));
    }

    // ---- page lists (engines with their own kernels) ---------------------------------------------------
    // Indices are physical pages: page p holds the stream's slots [p * physical_page, (p + 1) *
    // physical_page). A retrieval head's row lists its selected pages (all of them while n <= Kp), a
    // streaming head's row the pages of every slot it holds (it attends to all it keeps, in slot order).

    /// Buffer sizes for the page lists of `streams` (sequence, KV head) pairs of `layer`, each with at
    /// most `max_tokens` tokens and `group` query heads per KV head: one row per stream, or one per query
    /// head with per_query_head; room for the larger row of either head kind.
    PageListSizes page_list_sizes(std::int32_t layer, std::int32_t streams, std::int32_t group,
                                  std::int32_t max_tokens) const {
        (void)layer;
        const std::size_t rows = static_cast<std::size_t>(streams) * static_cast<std::size_t>(per_query_head() ? group : 1);
        const std::int32_t retrieval = std::min(physical_pages_for(max_tokens), memo_row_size() - 2);
        const std::int32_t streaming = physical_pages_for(std::min(max_tokens, config_.sink + config_.local));
        return {rows, rows + 1, rows * static_cast<std::size_t>(std::max(retrieval, streaming)), rows};
    }

    /// Writes the rows of one (sequence, KV head) into `out`, starting at row `row`, whose start
    /// out.indptr[row] the caller has set (0 for the first row): one row, or `group` rows (one per query
    /// head) with per_query_head. `queries` [group][head_dim]. Returns the rows written. The selection is
    /// the step's, as select makes it (and remembers it for reuse).
    std::int32_t write_page_lists(const StreamState& stream, std::span<const float> queries, std::int32_t group,
                                  const PageLists& out, std::int32_t row) const {
        const bool streaming_head = streaming(stream.layer, stream.kv_head);
        const std::int32_t rows = per_query_head() ? group : 1;
        const std::size_t row_queries = queries.size() / static_cast<std::size_t>(rows);
        const std::int32_t tokens = streaming_head ? stream.held : stream.next_position;  // slots in use
        const std::int32_t n = physical_pages_for(tokens);
        for (std::int32_t r = 0; r < rows; ++r) {
            const auto at = static_cast<std::size_t>(row + r);
            detail::require(out.indptr.size() >= at + 2 && out.last_page_len.size() >= at + 1, "page lists rows",
                            row + r + 1, "exceed indptr / last_page_len (see page_list_sizes)");
            std::span<const std::int32_t> pages;  // empty: all n pages
            if (!streaming_head) {
                StreamState member = stream;
                member.group_member = r;
                const std::span<const float> q =
                    per_query_head() ? queries.subspan(static_cast<std::size_t>(r) * row_queries, row_queries) : queries;
                pages = select_pages(member, q);
            }
            const std::int32_t count = pages.empty() ? n : static_cast<std::int32_t>(pages.size());
            const auto first = static_cast<std::size_t>(out.indptr[at]);
            detail::require(out.indices.size() >= first + static_cast<std::size_t>(count), "page lists indices",
                            out.indices.size(), "too small (see page_list_sizes)");
            for (std::int32_t i = 0; i < count; ++i)
                out.indices[first + static_cast<std::size_t>(i)] = pages.empty() ? i : pages[static_cast<std::size_t>(i)];
            out.indptr[at + 1] = out.indptr[at] + count;
            out.last_page_len[at] = tokens == 0 ? 0 : tokens - (n - 1) * config_.physical_page;
        }
        return rows;
    }

    // ---- engine-owned memory ----------------------------------------------------------------------------

    /// Buffers one retrieval stream of up to `max_tokens` tokens needs, `group` query heads per KV head.
    LServeSizes engine_sizes(std::int32_t max_tokens, std::int32_t group, std::int32_t head_dim) const {
        const QuestScratchSizes scratch = logical_.scratch_sizes(max_tokens, group);
        return {logical_.bounds_elements(max_tokens, head_dim), logical_.bounds_pages(max_tokens), scratch.scores,
                scratch.order, (per_query_head() ? group : 1) * memo_row_size()};
    }

private:
    static Config resolved(Config config) {
        if (config.prefill_sink == -1) config.prefill_sink = config.sink;
        if (config.prefill_local == -1) config.prefill_local = config.local;
        detail::require(config.sink >= 0, "sink", config.sink, "must not be negative");
        detail::require(config.local >= 1, "local", config.local, "must be at least 1 (the current token)");
        detail::require(config.prefill_sink >= 0, "prefill_sink", config.prefill_sink, "must not be negative (-1: sink)");
        detail::require(config.prefill_local >= 1, "prefill_local", config.prefill_local, "must be at least 1 (-1: local)");
        detail::require_page_size(config.logical_page);
        detail::require(config.token_budget >= 1, "token_budget", config.token_budget, "must be at least 1");
        return config;
    }

    /// Pages a selection can hold: Kp, plus one per physical page that can start while it is reused.
    std::int32_t memo_row_size() const {
        return 2 + page_budget() + (config_.reuse_interval - 1 + config_.physical_page - 1) / config_.physical_page;
    }

    std::span<std::int32_t> memo_row(const StreamState& stream) const {
        const std::int32_t row = per_query_head() ? stream.group_member : 0;
        const auto size = static_cast<std::size_t>(memo_row_size());
        detail::require(row >= 0 && stream.memo.size() >= (static_cast<std::size_t>(row) + 1) * size, "memo.size()",
                        stream.memo.size(), "too small for the selection row (see memo_size)");
        return stream.memo.subspan(static_cast<std::size_t>(row) * size, size);
    }

    /// A fresh selection of n > Kp physical pages into `pages`: the top Kp - 1 of [0, n - 1) by score
    /// (ties: lower index), then n - 1. Returns the count.
    std::int32_t choose(const StreamState& stream, std::span<const float> queries, std::int32_t n,
                        std::span<std::int32_t> pages) const {
        const KeyBoundsView& b = stream.bounds;
        const std::int32_t scored = n - 1;  // physical pages [0, n - 1), all full
        const std::int32_t ratio = config_.physical_page / config_.logical_page;
        const std::int32_t logical = scored * ratio;
        const std::int32_t rows = b.head_dim > 0 ? static_cast<std::int32_t>(queries.size()) / b.head_dim : 0;
        // The max over a group commutes with the max over logical pages; a sum needs each head's own
        // physical scores first.
        const bool each_row = config_.gqa == GqaAggregation::sum && rows > 1;
        logical_.score_pages(stream, queries, rows, each_row ? GqaAggregation::per_query_head : GqaAggregation::max,
                             logical);
        float* s = b.scores.data();
        const std::int32_t scored_rows = each_row ? rows : 1;
        for (std::int32_t r = 0; r < scored_rows; ++r) {  // physical = max of its logical pages, in place
            for (std::int32_t p = 0; p < scored; ++p) {
                float best = -std::numeric_limits<float>::infinity();
                for (std::int32_t i = 0; i < ratio; ++i) {
                    const float u = s[static_cast<std::size_t>(r) * static_cast<std::size_t>(logical) +
                                      static_cast<std::size_t>(p * ratio + i)];
                    best = u > best ? u : best;
                }
                s[static_cast<std::size_t>(r) * static_cast<std::size_t>(scored) + static_cast<std::size_t>(p)] = best;
            }
        }
        if (each_row) {  // the group's sum, in row order as Quest adds it
            for (std::int32_t p = 0; p < scored; ++p) {
                float sum = 0.0f;
                for (std::int32_t r = 0; r < rows; ++r)
                    sum += s[static_cast<std::size_t>(r) * static_cast<std::size_t>(scored) + static_cast<std::size_t>(p)];
                s[static_cast<std::size_t>(p)] = sum;
            }
        }
        detail::require(b.order.size() >= static_cast<std::size_t>(scored), "bounds.order", b.order.size(),
                        "scratch too small (see engine_sizes)");
        const std::int32_t k = CpuBackend::top_pages(b.scores, scored, page_budget() - 1, b.order);
        std::copy(b.order.begin(), b.order.begin() + k, pages.begin());
        pages[static_cast<std::size_t>(k)] = n - 1;
        return k + 1;
    }

    HeadKinds kinds_;
    Config config_;
    AttentionSink streaming_;    ///< streaming heads at decode: sinks + local window, bounded memory
    AttentionSink prefill_;      ///< streaming heads at prefill: its attended set is the block-sparse pattern
    QuestPageSelector logical_;  ///< retrieval heads: logical-page key bounds and scores
};

}  // namespace kvsparse
