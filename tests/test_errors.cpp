// Error paths of every public entry point: the exception type, a message naming the field and its value,
// and a cache that is exactly as it was before the failed call.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::AttentionSink;
using kvsparse::CacheConfig;
using kvsparse::PositionMode;
using kvsparse::Rope;
using Cache = kvsparse::KVCache<AttentionSink>;

static_assert(std::is_base_of_v<kvsparse::error, kvsparse::invalid_argument>);
static_assert(std::is_base_of_v<kvsparse::error, kvsparse::pool_exhausted>);
static_assert(std::is_base_of_v<kvsparse::error, kvsparse::format_error>);
static_assert(std::is_base_of_v<std::runtime_error, kvsparse::error>);
static_assert(!std::is_base_of_v<kvsparse::invalid_argument, kvsparse::pool_exhausted>);

/// Runs `call`, which must throw exactly an E (another type escapes and fails the test); every needle
/// must occur in the message.
template <class E, class Call>
void expect_error(Call&& call, std::initializer_list<std::string> needles) {
    static_assert(std::is_base_of_v<kvsparse::error, E>);
    try {
        call();
    } catch (const E& e) {
        const std::string message = e.what();
        INFO("message: " << message);
        for (const std::string& needle : needles) CHECK(message.find(needle) != std::string::npos);
        return;
    }
    FAIL("no exception thrown");
}

/// Everything observable about a cache: pool, per-sequence memory and lengths, selections, stored keys
/// and values of the selected slots, and the output of an attend on every non-empty layer.
struct Snapshot {
    std::vector<std::int64_t> numbers;
    std::vector<std::int32_t> selections;
    std::vector<float> contents;
    bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(Cache& cache, const std::vector<kvsparse::SequenceId>& seqs) {
    const kvsparse::ModelShape shape = cache.shape();
    Snapshot s;
    s.numbers.push_back(cache.free_pages());
    s.numbers.push_back(cache.total_pages());
    const ref::Tokens probe{555, shape.q_heads, shape.kv_heads, shape.head_dim};
    for (const auto seq : seqs) {
        const kvsparse::MemoryStats m = cache.memory(seq);
        s.numbers.insert(s.numbers.end(), {m.pages, m.bytes, m.tokens, m.max_stream_tokens});
        for (int layer = 0; layer < shape.layers; ++layer) {
            s.numbers.push_back(cache.length(seq, layer));
            kvsparse::Selection selection;
            cache.select(seq, layer, ref::unused_queries(cache), selection);
            s.selections.insert(s.selections.end(), selection.indptr.begin(), selection.indptr.end());
            s.selections.insert(s.selections.end(), selection.slots.begin(), selection.slots.end());
            s.selections.insert(s.selections.end(), selection.positions.begin(), selection.positions.end());
            for (int h = 0; h < shape.kv_heads; ++h) {
                const kvsparse::StreamView<float> view = cache.stream_view(seq, layer, h);
                for (const std::int32_t slot : selection.slots_of(h)) {
                    s.contents.insert(s.contents.end(), view.key(slot), view.key(slot) + shape.head_dim);
                    s.contents.insert(s.contents.end(), view.value(slot), view.value(slot) + shape.head_dim);
                }
            }
            if (cache.length(seq, layer) > 0) {
                std::vector<float> out(static_cast<std::size_t>(shape.q_heads * shape.head_dim));
                cache.attend(seq, layer, probe.queries(layer, 0, 1), out);
                s.contents.insert(s.contents.end(), out.begin(), out.end());
            }
        }
    }
    return s;
}

}  // namespace

TEST_CASE("construction errors name the field and the value", "[errors]") {
    const kvsparse::ModelShape good{2, 4, 2, 8};
    const auto make = [](kvsparse::ModelShape shape, int page_size, int num_pages, std::optional<Rope> rope = {},
                         AttentionSink policy = AttentionSink{}) {
        return [=] { Cache(CacheConfig{shape, page_size, num_pages, rope}, policy); };
    };
    using kvsparse::invalid_argument;
    expect_error<invalid_argument>(make(good, 0, 8), {"page_size = 0", "power of two"});
    expect_error<invalid_argument>(make(good, 3, 8), {"page_size = 3"});
    expect_error<invalid_argument>(make(good, 24, 8), {"page_size = 24"});
    expect_error<invalid_argument>(make(good, -16, 8), {"page_size = -16"});
    expect_error<invalid_argument>(make({0, 4, 2, 8}, 16, 8), {"layers = 0"});
    expect_error<invalid_argument>(make({2, 0, 2, 8}, 16, 8), {"q_heads = 0"});
    expect_error<invalid_argument>(make({2, 4, 0, 8}, 16, 8), {"kv_heads = 0"});
    expect_error<invalid_argument>(make({2, 4, 2, 0}, 16, 8), {"head_dim = 0"});
    expect_error<invalid_argument>(make({2, 4, 2, -8}, 16, 8), {"head_dim = -8"});
    expect_error<invalid_argument>(make({2, 6, 4, 8}, 16, 8), {"q_heads = 6", "kv_heads"});
    expect_error<invalid_argument>(make(good, 16, 0), {"num_pages = 0"});
    expect_error<invalid_argument>(make(good, 16, -3), {"num_pages = -3"});
    expect_error<invalid_argument>([=] { Cache(CacheConfig{good, 16, 8, std::nullopt, false, 0}, AttentionSink{}); }, {"page_run = 0"});
    expect_error<invalid_argument>(make({2, 4, 2, 7}, 16, 8, Rope{}), {"head_dim = 7", "even"});
    expect_error<invalid_argument>(make(good, 16, 8, Rope{kvsparse::RopeStyle::interleaved, 0.0f}), {"rope.theta = 0"});
    expect_error<invalid_argument>(make(good, 16, 8, Rope{kvsparse::RopeStyle::half_split, -1.0f}), {"rope.theta = -1"});
    expect_error<invalid_argument>(make(good, 16, 8, std::nullopt, AttentionSink{{4, 12, PositionMode::in_cache}}),
                                   {"rope = none", "in-cache"});
    expect_error<invalid_argument>([] { AttentionSink{{4, 0}}; }, {"window = 0"});
    expect_error<invalid_argument>([] { AttentionSink{{4, -5}}; }, {"window = -5"});
    expect_error<invalid_argument>([] { AttentionSink{{-1, 12}}; }, {"sinks = -1"});
    expect_error<invalid_argument>([] { AttentionSink{{std::numeric_limits<std::int32_t>::max(), 1}}; }, {"window = 1", "overflow"});
    expect_error<invalid_argument>([] { kvsparse::SlidingWindow{0}; }, {"window = 0"});
    expect_error<invalid_argument>([] { kvsparse::ModelShape{1, 3, 2, 4}.validate(); }, {"q_heads = 3"});
    // The smallest valid configuration is accepted.
    CHECK_NOTHROW(Cache(CacheConfig{{1, 1, 1, 1}, 1, 1}, AttentionSink{{0, 1}}));
}

TEST_CASE("a failed call leaves the cache exactly as it was", "[errors]") {
    using kvsparse::invalid_argument;
    using kvsparse::pool_exhausted;
    const kvsparse::ModelShape shape{2, 4, 2, 8};
    const ref::Tokens data{3, 4, 2, 8};
    // AttentionSink{2, 6}: 8 tokens, 2 pages of 4 per stream. A holds 8 pages, B 4; 3 of 15 are free, so
    // a call that would take pages before failing is seen.
    Cache cache(CacheConfig{shape, 4, 15, Rope{}}, AttentionSink{{2, 6}});
    const auto a = cache.add_sequence();
    const auto b = cache.add_sequence();
    const auto removed = cache.add_sequence();
    cache.remove_sequence(removed);
    for (int layer = 0; layer < 2; ++layer) {
        std::vector<float> out(10 * 4 * 8);
        cache.prefill(a, layer, data.queries(layer, 0, 10), data.keys(layer, 0, 10), data.values(layer, 0, 10), out);
        for (int t = 10; t < 13; ++t) cache.append(a, layer, data.keys(layer, t, 1), data.values(layer, t, 1));
    }
    for (int t = 0; t < 5; ++t) cache.append(b, 0, data.keys(0, t, 1), data.values(0, t, 1));  // layer 1 stays empty
    REQUIRE(cache.free_pages() == 3);

    const std::vector<kvsparse::SequenceId> seqs = {a, b};
    const Snapshot before = snapshot(cache, seqs);
    const auto unchanged = [&] { REQUIRE(snapshot(cache, seqs) == before); };
    const std::string bad_seq = "sequence = " + std::to_string(removed);

    const std::vector<float> k1 = data.keys(0, 20, 1), v1 = data.values(0, 20, 1), q1 = data.queries(0, 20, 1);
    std::vector<float> out1(q1.size());
    const std::vector<float> k4 = data.keys(0, 20, 4), v4 = data.values(0, 20, 4), q4 = data.queries(0, 20, 4);
    std::vector<float> out4(q4.size());
    const std::vector<float> k9 = data.keys(0, 20, 9), v9 = data.values(0, 20, 9);
    const std::span<const float> k1s(k1);

    // Valid calls on B would take pages (3 are free): a check made after taking them shows up.
    SECTION("append") {
        expect_error<invalid_argument>([&] { cache.append(b, 1, k1s.first(15), v1); }, {"keys.size() = 15", "multiple"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(b, 1, {}, {}); }, {"keys.size() = 0"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(b, 1, k1, v4); }, {"values.size() = 64"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(a, 2, k1, v1); }, {"layer = 2"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(a, -1, k1, v1); }, {"layer = -1"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(7, 0, k1, v1); }, {"sequence = 7"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(-1, 0, k1, v1); }, {"sequence = -1"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.append(removed, 0, k1, v1); }, {bad_seq});
        unchanged();
        // Nine tokens on B's empty layer 1: two pages per KV head (capacity 8), four in all; 3 are free.
        expect_error<pool_exhausted>([&] { cache.append(b, 1, k9, v9); }, {"page pool", "needs 4 more pages", "3 of 15"});
        unchanged();
    }
    SECTION("attend") {
        expect_error<invalid_argument>([&] { cache.attend(a, 0, std::span<const float>(q1).first(31), out1); }, {"queries.size() = 31"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.attend(a, 0, q1, out4); }, {"out.size() = 128"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.attend(a, 2, q1, out1); }, {"layer = 2"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.attend(9, 0, q1, out1); }, {"sequence = 9"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.attend(removed, 0, q1, out1); }, {bad_seq});
        unchanged();
        expect_error<invalid_argument>([&] { cache.attend(b, 1, q1, out1); }, {"length = 0", "appended"});
        unchanged();
    }
    SECTION("prefill") {
        // Four tokens after B's five on layer 0 need a third page per KV head: 2 of the 3 free.
        expect_error<invalid_argument>([&] { cache.prefill(b, 0, q1, k4, v4, out4); }, {"queries.size() = 32"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.prefill(b, 0, q4, k4, v4, out1); }, {"out.size() = 32"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.prefill(b, 0, q4, std::span<const float>(k4).first(40), v4, out4); }, {"keys.size() = 40"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.prefill(b, 0, q4, k4, v1, out4); }, {"values.size() = 16"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.prefill(b, 5, q4, k4, v4, out4); }, {"layer = 5"});
        unchanged();
        expect_error<invalid_argument>([&] { cache.prefill(removed, 0, q4, k4, v4, out4); }, {bad_seq});
        unchanged();
        // The chunk is stored whole before eviction: A's 8 held slots plus 4 fill 3 pages per KV head, 2
        // more in all, which fits; 9 more tokens need 3 pages per head beyond the 2 held: 6 > 3.
        expect_error<pool_exhausted>([&] {
            std::vector<float> out(9 * 4 * 8);
            cache.prefill(a, 0, data.queries(0, 20, 9), k9, v9, out);
        }, {"page pool", "needs 6 more pages", "3 of 15"});
        unchanged();
    }
    SECTION("select, length, memory, stream_state, stream_view") {
        kvsparse::Selection selection;
        expect_error<invalid_argument>([&] { cache.select(a, 2, ref::unused_queries(cache), selection); }, {"layer = 2"});
        expect_error<invalid_argument>([&] { cache.select(removed, 0, ref::unused_queries(cache), selection); }, {bad_seq});
        expect_error<invalid_argument>([&] { (void)cache.length(a, -3); }, {"layer = -3"});
        expect_error<invalid_argument>([&] { (void)cache.length(11, 0); }, {"sequence = 11"});
        expect_error<invalid_argument>([&] { (void)cache.memory(removed); }, {bad_seq});
        expect_error<invalid_argument>([&] { (void)cache.stream_state(a, 0, 2); }, {"kv_head = 2"});
        expect_error<invalid_argument>([&] { (void)cache.stream_state(a, 2, 0); }, {"layer = 2"});
        expect_error<invalid_argument>([&] { (void)cache.stream_state(removed, 0, 0); }, {bad_seq});
        expect_error<invalid_argument>([&] { (void)cache.stream_view(a, 0, -1); }, {"kv_head = -1"});
        expect_error<invalid_argument>([&] { (void)cache.stream_view(a, 7, 0); }, {"layer = 7"});
        expect_error<invalid_argument>([&] { (void)cache.stream_view(12, 0, 0); }, {"sequence = 12"});
        unchanged();
    }
    SECTION("remove_sequence and reset_sequence") {
        expect_error<invalid_argument>([&] { cache.remove_sequence(removed); }, {bad_seq});
        unchanged();
        expect_error<invalid_argument>([&] { cache.reset_sequence(removed); }, {bad_seq});
        unchanged();
        expect_error<invalid_argument>([&] { cache.remove_sequence(-2); }, {"sequence = -2"});
        unchanged();
        CHECK_FALSE(cache.contains(removed));
        CHECK_FALSE(cache.contains(-2));
    }
    SECTION("shift_keys") {
        kvsparse::Selection selection;
        cache.select(b, 0, ref::unused_queries(cache), selection);
        const std::int32_t held = selection.slots_of(0)[0];
        const std::int32_t free_slot = 5;  // B holds positions 0..4 in slots 0..4; slot 5 is in a held page
        REQUIRE(std::find(selection.slots.begin(), selection.slots.end(), free_slot) == selection.slots.end());
        for (const std::int32_t bad : {-1, 999, free_slot}) {
            const std::vector<std::int32_t> slots = {held, bad};  // the valid slot must not move either
            expect_error<invalid_argument>([&] { cache.shift_keys(b, 0, 0, slots, -1); }, {"slot = " + std::to_string(bad)});
            unchanged();
        }
        const std::vector<std::int32_t> slots = {held};
        expect_error<invalid_argument>([&] { cache.shift_keys(b, 0, 2, slots, -1); }, {"kv_head = 2"});
        expect_error<invalid_argument>([&] { cache.shift_keys(b, 2, 0, slots, -1); }, {"layer = 2"});
        expect_error<invalid_argument>([&] { cache.shift_keys(removed, 0, 0, slots, -1); }, {bad_seq});
        unchanged();
        // Without a RoPE there is nothing to shift by.
        Cache plain(CacheConfig{shape, 4, 8}, AttentionSink{{2, 6}});
        const auto s = plain.add_sequence();
        plain.append(s, 0, k1, v1);
        expect_error<invalid_argument>([&] { plain.shift_keys(s, 0, 0, slots, -1); }, {"rope = none"});
        // A valid shift does change the cache: the snapshot can see a difference.
        cache.shift_keys(b, 0, 0, slots, -1);
        CHECK_FALSE(snapshot(cache, seqs) == before);
    }
}
