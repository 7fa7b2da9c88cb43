// The embeddable core on memory an engine owns: policies decide on the engine's own position
// bookkeeping, backend primitives read and write the engine's pages through views (NHD and HND), and the
// result is the reference attention. Plus tensor parallelism: a cache sharded by KV heads makes the same
// decisions and outputs as one cache holding every head.

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::AttentionSink;
using kvsparse::CpuBackend;
using kvsparse::Layout;
using kvsparse::PagePoolView;
using kvsparse::StreamState;
using kvsparse::StreamView;

/// A vLLM-style engine cache for one layer of one sequence: pages hold every KV head, one page table for
/// all heads, and a cell -> position map the engine keeps for itself.
struct EngineCache {
    int page_size, heads, dim;
    Layout layout;
    std::vector<float> key_pool, value_pool;
    std::vector<std::int32_t> page_table;
    std::vector<std::int32_t> positions;  // per cell, -1 = free

    EngineCache(int pages, int page_size_, int heads_, int dim_, Layout layout_)
        : page_size(page_size_), heads(heads_), dim(dim_), layout(layout_),
          key_pool(static_cast<std::size_t>(pages * page_size_ * heads_ * dim_)), value_pool(key_pool.size()) {
        // Pages in a scrambled order, as a real allocator hands them out.
        for (int p = 0; p < pages; ++p) page_table.push_back((p * 7 + 3) % pages);
    }
    PagePoolView<float> pool(std::vector<float>& data) {
        return PagePoolView<float>::packed(data.data(), layout, static_cast<std::int32_t>(page_table.size()), page_size,
                                           heads, dim);
    }
    StreamView<float> head(int h) {
        return {pool(key_pool), pool(value_pool), {page_table.data(), static_cast<std::int32_t>(page_table.size())}, h};
    }
    StreamState state(int next_position) const {
        std::int32_t held = 0;
        for (const auto p : positions) held += p != kvsparse::free_slot;
        return {positions, held, next_position, 0, 0};
    }
};

}  // namespace

TEST_CASE("engine-owned NHD and HND pages: policy decisions plus backend primitives give reference attention",
          "[engine]") {
    const Layout layout = GENERATE(Layout::NHD, Layout::HND);
    const int q_heads = 8, kv_heads = 4, dim = 16, page_size = 16, group = q_heads / kv_heads;
    const AttentionSink policy({.sinks = 2, .window = 21});
    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, 2, 21};
    const ref::Tokens data{91, q_heads, kv_heads, dim};
    EngineCache engine(8, page_size, kv_heads, dim, layout);
    const CpuBackend backend;
    std::vector<std::int32_t> slots(static_cast<std::size_t>(policy.budget()));
    std::vector<std::byte> workspace(CpuBackend::workspace_bytes(group, policy.budget(), dim));
    std::vector<float> out(static_cast<std::size_t>(group * dim));

    for (int t = 0; t < 100; ++t) {
        // Append: the policy picks the engine cell (evicting its old token); the backend stores every head.
        const std::int32_t cell = policy.place(engine.state(t));
        if (static_cast<std::size_t>(cell) >= engine.positions.size()) engine.positions.resize(static_cast<std::size_t>(cell) + 1, -1);
        engine.positions[static_cast<std::size_t>(cell)] = t;
        const std::vector<float> k = data.keys(0, t, 1), v = data.values(0, t, 1);
        for (int h = 0; h < kv_heads; ++h) {
            const auto row = static_cast<std::size_t>(h * dim);
            backend.write(engine.head(h), std::span<const std::int32_t>(&cell, 1), std::span<const float>(k).subspan(row),
                          std::span<const float>(v).subspan(row), 0);
        }
        // Select on the engine's bookkeeping, attend on the engine's pages.
        const std::int32_t count = policy.select(engine.state(t + 1), {}, slots);
        std::vector<int> selected;
        for (int i = 0; i < count; ++i) selected.push_back(engine.positions[static_cast<std::size_t>(slots[static_cast<std::size_t>(i)])]);
        REQUIRE(selected == ref::closed_form_set(spec, t));

        const std::vector<float> q = data.queries(0, t, 1);
        for (int h = 0; h < kv_heads; ++h) {
            const kvsparse::AttendArgs<float> args{engine.head(h),
                                                   std::span<const std::int32_t>(slots.data(), static_cast<std::size_t>(count)),
                                                   std::span<const float>(q).subspan(static_cast<std::size_t>(h * group * dim),
                                                                                     static_cast<std::size_t>(group * dim)),
                                                   group,
                                                   1.0f / std::sqrt(static_cast<float>(dim)),
                                                   {},
                                                   {},
                                                   out,
                                                   {}};
            backend.attend(args, workspace);
            for (int g = 0; g < group; ++g) {
                const int qh = h * group + g;
                std::vector<double> qd;
                std::vector<std::vector<double>> keys, values;
                for (int d = 0; d < dim; ++d) qd.push_back(data.q(0, t, qh, d));
                for (const int p : selected) {
                    keys.emplace_back();
                    values.emplace_back();
                    for (int d = 0; d < dim; ++d) {
                        keys.back().push_back(data.k(0, p, h, d));
                        values.back().push_back(data.v(0, p, h, d));
                    }
                }
                const std::vector<double> want = ref::attention(qd, keys, values);
                for (int d = 0; d < dim; ++d) {
                    REQUIRE(std::abs(out[static_cast<std::size_t>(g * dim + d)] - want[static_cast<std::size_t>(d)]) <= 1e-5);
                }
            }
        }
    }
}

namespace {

/// Runs `tokens` decode steps of a 2-layer model through KVCache holding KV heads [first, first+count) of
/// `data`; returns every selection (positions) and every attention output, in step order.
template <class Policy>
std::pair<std::vector<int>, std::vector<float>> run_shard(const Policy& policy, const ref::Tokens& data, int first,
                                                          int count, int tokens) {
    const int group = data.q_heads / data.kv_heads, dim = data.dim, layers = 2;
    kvsparse::KVCache<Policy> cache({.shape = {layers, count * group, count, dim}, .page_size = 16, .num_pages = 512}, policy);
    const auto seq = cache.add_sequence();
    const auto slice = [&](const std::vector<float>& rows, int heads_per_kv) {
        const auto width = static_cast<std::size_t>(count * heads_per_kv * dim);
        return std::vector<float>(rows.begin() + static_cast<std::ptrdiff_t>(first * heads_per_kv * dim),
                                  rows.begin() + static_cast<std::ptrdiff_t>(first * heads_per_kv * dim) +
                                      static_cast<std::ptrdiff_t>(width));
    };
    std::vector<int> positions;
    std::vector<float> outputs;
    std::vector<float> out(static_cast<std::size_t>(count * group * dim));
    kvsparse::Selection selection;
    for (int t = 0; t < tokens; ++t) {
        for (int layer = 0; layer < layers; ++layer) {
            const std::vector<float> q = slice(data.queries(layer, t, 1), group);
            cache.append(seq, layer, slice(data.keys(layer, t, 1), 1), slice(data.values(layer, t, 1), 1));
            cache.select(seq, layer, q, selection);
            positions.insert(positions.end(), selection.positions.begin(), selection.positions.end());
            positions.push_back(-1);  // separates sets
            cache.attend(seq, layer, q, out);
            outputs.insert(outputs.end(), out.begin(), out.end());
        }
    }
    return {positions, outputs};
}

/// Interleaves per-step results of two shards back into the order of the unsharded run.
template <class Policy>
void check_sharding(const Policy& policy) {
    const ref::Tokens data{7, 8, 4, 8};
    const int tokens = 90;
    const auto whole = run_shard(policy, data, 0, 4, tokens);
    const auto lower = run_shard(policy, data, 0, 2, tokens);
    const auto upper = run_shard(policy, data, 2, 2, tokens);
    // Per (step, layer): the whole run's sets are the lower shard's then the upper shard's; outputs too.
    std::vector<int> positions;
    std::vector<float> outputs;
    std::size_t lp = 0, up = 0, lo = 0, uo = 0;
    const std::size_t half_out = static_cast<std::size_t>(2 * 2 * data.dim);
    for (int step = 0; step < tokens * 2; ++step) {
        while (lower.first[lp] != -1) positions.push_back(lower.first[lp++]);
        ++lp;
        while (upper.first[up] != -1) positions.push_back(upper.first[up++]);
        ++up;
        positions.push_back(-1);
        outputs.insert(outputs.end(), lower.second.begin() + static_cast<std::ptrdiff_t>(lo),
                       lower.second.begin() + static_cast<std::ptrdiff_t>(lo + half_out));
        outputs.insert(outputs.end(), upper.second.begin() + static_cast<std::ptrdiff_t>(uo),
                       upper.second.begin() + static_cast<std::ptrdiff_t>(uo + half_out));
        lo += half_out;
        uo += half_out;
    }
    REQUIRE(positions == whole.first);
    REQUIRE(outputs == whole.second);  // bit for bit: every decision and every sum is per KV head
}

}  // namespace

TEST_CASE("tensor parallel: two shards of KV heads decide and attend exactly like one cache", "[engine]") {
    SECTION("Dense") { check_sharding(kvsparse::Dense{}); }
    SECTION("SlidingWindow") { check_sharding(kvsparse::SlidingWindow{17}); }
    SECTION("AttentionSink") { check_sharding(AttentionSink({.sinks = 3, .window = 20})); }
}
