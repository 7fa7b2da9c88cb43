// KVCache bookkeeping: bounded memory over long streams, pages returned to the shared pool, several
// sequences in one pool, chunked prefill, and decode appends that evict within one call.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::AttentionSink;
using kvsparse::CacheConfig;
using kvsparse::KVCache;

std::vector<int> positions_of(KVCache<AttentionSink>& cache, kvsparse::SequenceId seq, int layer, int h) {
    kvsparse::Selection selection;
    cache.select(seq, layer, ref::unused_queries(cache), selection);
    const auto p = selection.positions_of(h);
    return {p.begin(), p.end()};
}

/// Double attention of one query head over `positions` (float storage: the cache holds K/V exactly).
std::vector<double> expected(const ref::Tokens& data, const std::vector<int>& positions, int query_position,
                             int q_head = 0, int layer = 0) {
    const int h = q_head / (data.q_heads / data.kv_heads);
    std::vector<std::vector<double>> keys, values;
    for (const int p : positions) {
        std::vector<double> k, v;
        for (int d = 0; d < data.dim; ++d) {
            k.push_back(data.k(layer, p, h, d));
            v.push_back(data.v(layer, p, h, d));
        }
        keys.push_back(k);
        values.push_back(v);
    }
    std::vector<double> q;
    for (int d = 0; d < data.dim; ++d) q.push_back(data.q(layer, query_position, q_head, d));
    return ref::attention(q, keys, values);
}

double max_difference(const float* got, const std::vector<double>& want) {
    double e = 0;
    for (std::size_t d = 0; d < want.size(); ++d) e = std::max(e, std::fabs(static_cast<double>(got[d]) - want[d]));
    return e;
}

constexpr double tolerance = 1e-5;  // float32 attention against double, outputs of magnitude <= 1

}  // namespace

TEST_CASE("AttentionSink{4 / 1020}: a long stream never holds more than ceil(1024/16)+1 pages", "[cache][memory]") {
    // Tiny dimensions keep a million appends fast; attention is checked at sparse checkpoints (it costs
    // 1024 keys per call).
    const int tokens = 1'000'000;
    const int bound = (1024 + 15) / 16 + 1;  // per (layer, KV head) stream
    const int layers = 2, heads = 2, dim = 2;
    const ref::Tokens data{2024, heads, heads, dim};
    KVCache<AttentionSink> cache(CacheConfig{{layers, heads, heads, dim}, 16, layers * heads * bound}, AttentionSink{{4, 1020}});
    const auto seq = cache.add_sequence();
    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, 4, 1020};
    const auto start = std::chrono::steady_clock::now();
    std::vector<float> k(heads * dim), v(heads * dim), q(heads * dim), out(heads * dim);
    int failures = 0;
    for (int t = 0; t < tokens; ++t) {
        for (int layer = 0; layer < layers; ++layer) {
            for (int h = 0; h < heads; ++h)
                for (int d = 0; d < dim; ++d) {
                    k[static_cast<std::size_t>(h * dim + d)] = data.k(layer, t, h, d);
                    v[static_cast<std::size_t>(h * dim + d)] = data.v(layer, t, h, d);
                }
            cache.append(seq, layer, k, v);
            // Counted rather than REQUIREd per step: millions of assertions would dominate the run time.
            for (int h = 0; h < heads; ++h) failures += cache.stream_view(seq, layer, h).table.num_pages > bound;
        }
        const kvsparse::MemoryStats memory = cache.memory(seq);
        failures += memory.tokens != layers * heads * std::min(t + 1, 1024) || memory.max_stream_tokens != std::min(t + 1, 1024) ||
                    memory.pages + cache.free_pages() != cache.total_pages() ||
                    memory.bytes != memory.pages * 2 * 16 * dim * static_cast<std::int64_t>(sizeof(float));
        if (t % 99'991 == 0 || t == tokens - 1 || t == 1023 || t == 1024) {
            CAPTURE(t, failures);
            for (int layer = 0; layer < layers; ++layer) {
                for (int h = 0; h < heads; ++h) REQUIRE(positions_of(cache, seq, layer, h) == ref::closed_form_set(spec, t));
                cache.attend(seq, layer, data.queries(layer, t, 1), out);
                for (int qh = 0; qh < heads; ++qh) {
                    REQUIRE(max_difference(&out[static_cast<std::size_t>(qh * dim)], expected(data, ref::closed_form_set(spec, t), t, qh, layer)) <= tolerance);
                }
            }
        }
    }
    REQUIRE(failures == 0);
    CHECK(cache.length(seq, 1) == tokens);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (seconds > 10) WARN("streaming took " << seconds << " s");

    cache.remove_sequence(seq);
    CHECK(cache.free_pages() == cache.total_pages());
}

TEST_CASE("sequences share the pool / remove and reset return every page", "[cache][memory]") {
    const ref::Tokens data{7, 2, 2, 4};
    const int per_stream = 64 / 8;  // AttentionSink{4, 60}, page 8: 8 pages per stream at most
    const int streams = 2 * 2;      // layers x KV heads
    const int per_sequence = streams * per_stream;
    // Exactly enough for three long sequences.
    KVCache<AttentionSink> cache(CacheConfig{{2, 2, 2, 4}, 8, 3 * per_sequence}, AttentionSink{{4, 60}});
    std::vector<kvsparse::SequenceId> seqs;
    for (int i = 0; i < 3; ++i) seqs.push_back(cache.add_sequence());
    CHECK(seqs == std::vector<kvsparse::SequenceId>{0, 1, 2});

    // Sequence i reads layers 2i and 2i+1 of the synthetic data, so no two sequences share tokens.
    const auto data_layer = [](std::size_t i, int layer) { return layer + 2 * static_cast<int>(i); };
    const auto length = [](std::size_t i) { return 100 * static_cast<int>(i + 1) + 50; };
    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, 4, 60};
    std::vector<float> out(2 * 4);
    // Interleaved decode of different lengths.
    for (int t = 0; t < 350; ++t)
        for (std::size_t i = 0; i < seqs.size(); ++i)
            for (int layer = 0; layer < 2; ++layer)
                if (t < length(i)) cache.append(seqs[i], layer, data.keys(data_layer(i, layer), t, 1), data.values(data_layer(i, layer), t, 1));

    for (std::size_t i = 0; i < seqs.size(); ++i) {
        const kvsparse::MemoryStats m = cache.memory(seqs[i]);
        CHECK(m.pages == per_sequence);
        CHECK(m.tokens == streams * 64);
        CHECK(m.max_stream_tokens == 64);
        for (int layer = 0; layer < 2; ++layer) {
            const int t = length(i) - 1;
            CHECK(cache.length(seqs[i], layer) == t + 1);
            const std::vector<int> set = ref::closed_form_set(spec, t);
            REQUIRE(positions_of(cache, seqs[i], layer, 1) == set);
            // Each sequence attends over its own tokens only.
            cache.attend(seqs[i], layer, data.queries(data_layer(i, layer), t, 1), out);
            for (int qh = 0; qh < 2; ++qh) {
                REQUIRE(max_difference(&out[static_cast<std::size_t>(qh * 4)], expected(data, set, t, qh, data_layer(i, layer))) <= tolerance);
            }
        }
    }
    REQUIRE(cache.free_pages() == 0);

    // A fourth sequence finds the pool empty; the failed append leaves it empty too.
    const auto extra = cache.add_sequence();
    CHECK(extra == 3);
    REQUIRE_THROWS_AS(cache.append(extra, 0, data.keys(6, 0, 1), data.values(6, 0, 1)), kvsparse::pool_exhausted);
    CHECK(cache.length(extra, 0) == 0);
    CHECK(cache.memory(extra).pages == 0);

    // remove_sequence returns every page the sequence held; its id is reused; the pages serve `extra`.
    cache.remove_sequence(seqs[1]);
    CHECK_FALSE(cache.contains(seqs[1]));
    CHECK(cache.free_pages() == per_sequence);
    for (int t = 0; t < 500; ++t)
        for (int layer = 0; layer < 2; ++layer) cache.append(extra, layer, data.keys(6 + layer, t, 1), data.values(6 + layer, t, 1));
    CHECK(cache.free_pages() == 0);
    CHECK(cache.add_sequence() == seqs[1]);
    CHECK(cache.memory(seqs[1]).pages == 0);
    CHECK(cache.length(seqs[1], 0) == 0);

    // reset_sequence returns the pages and restarts positions at 0.
    cache.reset_sequence(seqs[0]);
    CHECK(cache.contains(seqs[0]));
    CHECK(cache.free_pages() == per_sequence);
    CHECK(cache.memory(seqs[0]).tokens == 0);
    CHECK(cache.length(seqs[0], 1) == 0);
    cache.append(seqs[0], 1, data.keys(1, 0, 1), data.values(1, 0, 1));
    CHECK(positions_of(cache, seqs[0], 1, 0) == std::vector<int>{0});
    cache.attend(seqs[0], 1, data.queries(1, 0, 1), out);
    // One key: the output is its value.
    for (int qh = 0; qh < 2; ++qh)
        for (int d = 0; d < 4; ++d) CHECK(out[static_cast<std::size_t>(qh * 4 + d)] == data.v(1, 0, qh, d));

    for (const auto id : {seqs[0], seqs[1], seqs[2], extra}) cache.remove_sequence(id);
    CHECK(cache.free_pages() == cache.total_pages());
}

TEST_CASE("decode appends take each stream's pages in runs / a pool with no page to spare still fills", "[cache][memory]") {
    const int layers = 2, heads = 2, dim = 4, page = 4, tokens = 40, run = 4;  // 10 pages a stream: 2.5 runs
    const int exact = layers * heads * (tokens / page);  // every page of the pool holds tokens at the end
    const ref::Tokens data{11, heads, heads, dim};
    const kvsparse::ModelShape shape{layers, heads, heads, dim};
    KVCache<kvsparse::Dense> roomy(CacheConfig{shape, page, 4 * exact, std::nullopt, false, run}, kvsparse::Dense{});
    KVCache<kvsparse::Dense> tight(CacheConfig{shape, page, exact, std::nullopt, false, run}, kvsparse::Dense{});
    KVCache<kvsparse::Dense> single(CacheConfig{shape, page, exact, std::nullopt, false, 1}, kvsparse::Dense{});
    const auto seq = roomy.add_sequence();
    REQUIRE((tight.add_sequence() == seq && single.add_sequence() == seq));
    std::vector<float> a(heads * dim), b(a.size()), c(a.size());
    std::vector<int> held;
    for (int t = 0; t < tokens; ++t) {
        held.push_back(t);
        for (int layer = 0; layer < layers; ++layer) {
            for (auto* cache : {&roomy, &tight, &single}) {
                cache->append(seq, layer, data.keys(layer, t, 1), data.values(layer, t, 1));
                REQUIRE(cache->memory(seq).pages + cache->free_pages() == cache->total_pages());
            }
            const auto q = data.queries(layer, t, 1);
            roomy.attend(seq, layer, q, a);
            tight.attend(seq, layer, q, b);
            single.attend(seq, layer, q, c);
            REQUIRE((a == b && a == c));  // where the pages lie changes nothing
            for (int qh = 0; qh < heads; ++qh)
                REQUIRE(max_difference(&a[static_cast<std::size_t>(qh * dim)], expected(data, held, t, qh, layer)) <= tolerance);
        }
    }
    // Runs: within each run of `run` pages a stream's pages are consecutive in the pool. One page at a
    // time, the four streams' pages alternate instead.
    for (int layer = 0; layer < layers; ++layer) {
        for (int h = 0; h < heads; ++h) {
            const kvsparse::PageTableView table = roomy.stream_view(seq, layer, h).table;
            REQUIRE(table.num_pages == tokens / page);
            for (int i = 1; i < table.num_pages; ++i)
                if (i % run != 0) CHECK(table.pages[i] == table.pages[i - 1] + 1);
        }
    }
    const kvsparse::PageTableView alternating = single.stream_view(seq, 0, 0).table;
    CHECK(alternating.pages[1] == alternating.pages[0] + layers * heads);
    // The tight pool ran short while streams held runs ahead: they went back and it filled every page.
    CHECK(tight.free_pages() == 0);
    REQUIRE_THROWS_AS(tight.append(seq, 0, data.keys(0, tokens, 1), data.values(0, tokens, 1)), kvsparse::pool_exhausted);
    CHECK(tight.length(seq, 0) == tokens);
    // Pages taken ahead go back with the sequence.
    roomy.remove_sequence(seq);
    CHECK(roomy.free_pages() == roomy.total_pages());
}

TEST_CASE("a prefill longer than the budget gives back the pages it no longer needs", "[cache][memory]") {
    const ref::Tokens data{8, 2, 1, 4};
    KVCache<AttentionSink> cache(CacheConfig{{1, 2, 1, 4}, 4, 64}, AttentionSink{{4, 12}});
    const auto seq = cache.add_sequence();
    const int n = 100;
    std::vector<float> out(static_cast<std::size_t>(n * 2 * 4));
    cache.prefill(seq, 0, data.queries(0, 0, n), data.keys(0, 0, n), data.values(0, 0, n), out);
    CHECK(cache.memory(seq).pages == 4);  // 16 tokens, page 4
    CHECK(cache.free_pages() == 60);
    CHECK(positions_of(cache, seq, 0, 0) == ref::closed_form_set({ref::PolicySpec::attention_sink, 4, 12}, n - 1));
    // The prefill needed the whole chunk at once: a pool smaller than that refuses it, unchanged.
    KVCache<AttentionSink> small(CacheConfig{{1, 2, 1, 4}, 4, 20}, AttentionSink{{4, 12}});
    const auto s = small.add_sequence();
    REQUIRE_THROWS_AS(small.prefill(s, 0, data.queries(0, 0, n), data.keys(0, 0, n), data.values(0, 0, n), out),
                      kvsparse::pool_exhausted);
    CHECK(small.free_pages() == 20);
    CHECK(small.length(s, 0) == 0);
}

TEST_CASE("chunked prefill: later chunks see the held tokens and themselves / causally", "[cache]") {
    const ref::Tokens data{31, 4, 2, 8};
    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, 3, 9};
    KVCache<AttentionSink> cache(CacheConfig{{1, 4, 2, 8}, 4, 64}, AttentionSink{{3, 9}});
    const auto seq = cache.add_sequence();
    ref::Held held(spec);
    int first = 0;
    for (const int n : {25, 7, 1, 16}) {
        std::vector<float> out(static_cast<std::size_t>(n * 4 * 8));
        const std::vector<int> before = held.positions();
        cache.prefill(seq, 0, data.queries(0, first, n), data.keys(0, first, n), data.values(0, first, n), out);
        for (int i = 0; i < n; ++i) {
            std::vector<int> visible = before;
            for (int p = first; p <= first + i; ++p) visible.push_back(p);
            for (int qh = 0; qh < 4; ++qh) {
                CAPTURE(first, i, qh);
                REQUIRE(max_difference(&out[static_cast<std::size_t>((i * 4 + qh) * 8)], expected(data, visible, first + i, qh)) <= tolerance);
            }
        }
        held.prefill(first, n);
        first += n;
        for (int h = 0; h < 2; ++h) REQUIRE(positions_of(cache, seq, 0, h) == held.positions());
    }
    // Decode continues from there.
    std::vector<float> out(4 * 8);
    for (int t = first; t < first + 20; ++t) {
        cache.append(seq, 0, data.keys(0, t, 1), data.values(0, t, 1));
        held.decode(t);
        REQUIRE(positions_of(cache, seq, 0, 1) == ref::closed_form_set(spec, t));
        cache.attend(seq, 0, data.queries(0, t, 1), out);
        for (int qh = 0; qh < 4; ++qh)
            REQUIRE(max_difference(&out[static_cast<std::size_t>(qh * 8)], expected(data, held.positions(), t, qh)) <= tolerance);
    }
}

TEST_CASE("one append of several tokens is several decode appends / tokens evicted within it are dropped",
          "[cache]") {
    const ref::Tokens data{12, 1, 1, 4};
    KVCache<kvsparse::SlidingWindow> cache(CacheConfig{{1, 1, 1, 4}, 1, 8}, kvsparse::SlidingWindow{2});
    const auto seq = cache.add_sequence();
    cache.append(seq, 0, data.keys(0, 0, 5), data.values(0, 0, 5));
    kvsparse::Selection selection;
    cache.select(seq, 0, ref::unused_queries(cache), selection);
    REQUIRE(std::vector<int>(selection.positions.begin(), selection.positions.end()) == std::vector<int>{3, 4});
    const kvsparse::StreamView<float> view = cache.stream_view(seq, 0, 0);
    for (std::size_t i = 0; i < 2; ++i)
        for (int d = 0; d < 4; ++d) {
            REQUIRE(view.key(selection.slots[i])[d] == data.k(0, static_cast<int>(3 + i), 0, d));
            REQUIRE(view.value(selection.slots[i])[d] == data.v(0, static_cast<int>(3 + i), 0, d));
        }
    CHECK(cache.memory(seq).pages == 2);
    CHECK(cache.memory(seq).tokens == 2);
    CHECK(cache.length(seq, 0) == 5);
    std::vector<float> out(4);
    cache.attend(seq, 0, data.queries(0, 4, 1), out);
    REQUIRE(max_difference(out.data(), expected(data, {3, 4}, 4)) <= tolerance);
}

TEST_CASE("Dense prefill after decode tokens / and the stream state a policy sees", "[cache]") {
    const ref::Tokens data{41, 2, 2, 4};
    KVCache<kvsparse::Dense> cache(CacheConfig{{1, 2, 2, 4}, 16, 8}, kvsparse::Dense{});
    const auto seq = cache.add_sequence();
    for (int t = 0; t < 5; ++t) cache.append(seq, 0, data.keys(0, t, 1), data.values(0, t, 1));
    std::vector<float> out(6 * 2 * 4);
    cache.prefill(seq, 0, data.queries(0, 5, 6), data.keys(0, 5, 6), data.values(0, 5, 6), out);
    for (int i = 0; i < 6; ++i)
        for (int qh = 0; qh < 2; ++qh) {
            std::vector<int> visible;
            for (int p = 0; p <= 5 + i; ++p) visible.push_back(p);
            REQUIRE(max_difference(&out[static_cast<std::size_t>((i * 2 + qh) * 4)], expected(data, visible, 5 + i, qh)) <= tolerance);
        }
    const kvsparse::StreamState state = cache.stream_state(seq, 0, 1);
    CHECK(state.held == 11);
    CHECK(state.next_position == 11);
    CHECK(state.layer == 0);
    CHECK(state.kv_head == 1);
    REQUIRE(state.positions.size() >= 11);
    for (int p = 0; p < 11; ++p) CHECK(std::count(state.positions.begin(), state.positions.end(), p) == 1);
}
