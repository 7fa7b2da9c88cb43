// Dense, SlidingWindow and AttentionSink through KVCache on CpuBackend: at every step the selected
// positions equal S_t from REFERENCE.md, and attention outputs equal double-precision attention over S_t.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::AttentionSink;
using kvsparse::CacheConfig;
using kvsparse::PositionMode;
using kvsparse::Rope;
using kvsparse::RopeStyle;

struct Shape {
    int layers, q_heads, kv_heads, dim;
};

kvsparse::ModelShape model(Shape s) { return {s.layers, s.q_heads, s.kv_heads, s.dim}; }

/// How the reference positions keys and the query.
enum class Positions {
    none,      ///< no RoPE: vectors as given
    absolute,  ///< key at its position, query at t
    in_cache,  ///< i-th key of the set at i, query at |S| - 1
};

std::vector<double> rotated(std::vector<double> x, double position, const Rope& rope) {
    ref::rope(x.data(), static_cast<int>(x.size()), position, rope.style == RopeStyle::interleaved, rope.theta);
    return x;
}

/// The synthetic tokens of positions [0, positions) as double rows, each generated (and rounded to T)
/// once: the reference reads them many times.
template <class T>
class TokenTable {
public:
    TokenTable(const ref::Tokens& data, int layers, int positions) : data_(data), positions_(positions) {
        for (int l = 0; l < layers; ++l)
            for (int p = 0; p < positions; ++p) {
                for (int h = 0; h < data.kv_heads; ++h)
                    for (int d = 0; d < data.dim; ++d) {
                        keys_.push_back(data.k(l, p, h, d));
                        stored_keys_.push_back(ref::stored<T>(data.k(l, p, h, d)));
                        stored_values_.push_back(ref::stored<T>(data.v(l, p, h, d)));
                    }
                for (int h = 0; h < data.q_heads; ++h)
                    for (int d = 0; d < data.dim; ++d) queries_.push_back(data.q(l, p, h, d));
            }
    }
    const ref::Tokens& data() const { return data_; }
    std::vector<double> key(int l, int p, int h) const { return row(keys_, l, p, h, data_.kv_heads); }
    std::vector<double> stored_key(int l, int p, int h) const { return row(stored_keys_, l, p, h, data_.kv_heads); }
    std::vector<double> stored_value(int l, int p, int h) const { return row(stored_values_, l, p, h, data_.kv_heads); }
    std::vector<double> query(int l, int p, int h) const { return row(queries_, l, p, h, data_.q_heads); }

private:
    std::vector<double> row(const std::vector<double>& v, int l, int p, int h, int heads) const {
        const auto begin = static_cast<std::ptrdiff_t>(((static_cast<std::size_t>(l) * static_cast<std::size_t>(positions_) +
                                                         static_cast<std::size_t>(p)) * static_cast<std::size_t>(heads) +
                                                        static_cast<std::size_t>(h)) * static_cast<std::size_t>(data_.dim));
        return {v.begin() + begin, v.begin() + begin + data_.dim};
    }
    ref::Tokens data_;
    int positions_;
    std::vector<double> keys_, stored_keys_, stored_values_, queries_;
};

/// Output of query head `q_head` at `query_position` over `positions` (ascending), in double.
/// Without RoPE the keys are the stored (rounded) ones; with RoPE the keys are rotated in double from the
/// caller's float keys and the storage rounding is left to the tolerance (the cache rounds after rotating).
template <class T>
std::vector<double> expected_output(const TokenTable<T>& table, int layer, int q_head, const std::vector<int>& positions,
                                    int query_position, Positions mode, const Rope& rope) {
    const ref::Tokens& data = table.data();
    const int h = q_head / (data.q_heads / data.kv_heads);
    std::vector<std::vector<double>> keys, values;
    for (std::size_t i = 0; i < positions.size(); ++i) {
        std::vector<double> k = mode == Positions::none ? table.stored_key(layer, positions[i], h) : table.key(layer, positions[i], h);
        if (mode == Positions::absolute) k = rotated(k, positions[i], rope);
        if (mode == Positions::in_cache) k = rotated(k, static_cast<double>(i), rope);
        keys.push_back(k);
        values.push_back(table.stored_value(layer, positions[i], h));
    }
    std::vector<double> q = table.query(layer, query_position, q_head);
    if (mode == Positions::absolute) q = rotated(q, query_position, rope);
    if (mode == Positions::in_cache) q = rotated(q, static_cast<double>(positions.size()) - 1, rope);
    return ref::attention(q, keys, values);
}

double max_difference(const float* got, const std::vector<double>& want) {
    double e = 0;
    for (std::size_t d = 0; d < want.size(); ++d) e = std::max(e, std::fabs(static_cast<double>(got[d]) - want[d]));
    return e;
}

std::vector<int> iota_set(int first, int last) {  // [first, last]
    std::vector<int> s;
    for (int p = first; p <= last; ++p) s.push_back(p);
    return s;
}

// ---- the main sweep ------------------------------------------------------------------------------------

struct Scenario {
    Shape shape;
    int page_size;
    int prefill;
    int decode;
    ref::PolicySpec spec;
    std::uint64_t seed;

    std::string describe() const {
        std::ostringstream s;
        s << "policy kind " << spec.kind << " sinks " << spec.sinks << " window " << spec.window << ", shape "
          << shape.layers << "x" << shape.q_heads << "/" << shape.kv_heads << "x" << shape.dim << ", page "
          << page_size << ", prefill " << prefill << ", decode " << decode;
        return s.str();
    }
};

/// Float32 arithmetic over at most ~100 keys with outputs of magnitude <= 1, the reference reading the
/// same rounded K/V as the cache: the storage type does not change this bound (observed 2e-7).
constexpr double sweep_tolerance = 1e-5;

template <class T, class Policy>
void run_scenario(const Scenario& sc, const Policy& policy) {
    INFO(sc.describe());
    const Shape& sh = sc.shape;
    const int group = sh.q_heads / sh.kv_heads;
    const ref::Tokens data{sc.seed, sh.q_heads, sh.kv_heads, sh.dim};
    const int total = sc.prefill + sc.decode;
    const TokenTable<T> table(data, sh.layers, total);
    const int pages = sh.layers * sh.kv_heads * ((total + sc.page_size - 1) / sc.page_size + 1);
    kvsparse::KVCache<Policy, kvsparse::CpuBackend, T> cache(CacheConfig{model(sh), sc.page_size, pages}, policy);
    const auto seq = cache.add_sequence();
    std::vector<ref::Held> held(static_cast<std::size_t>(sh.layers * sh.kv_heads), ref::Held(sc.spec));
    const auto held_at = [&](int layer, int h) -> ref::Held& { return held[static_cast<std::size_t>(layer * sh.kv_heads + h)]; };

    // Selection, slot contents, stream state and memory of `layer` against the simulation.
    const auto verify_state = [&](int layer) {
        kvsparse::Selection selection;
        cache.select(seq, layer, ref::unused_queries(cache), selection);
        REQUIRE(selection.indptr.size() == static_cast<std::size_t>(sh.kv_heads + 1));
        for (int h = 0; h < sh.kv_heads; ++h) {
            const ref::Held& expected = held_at(layer, h);
            const int t = expected.newest();
            const std::vector<int> want = expected.positions();
            REQUIRE(want == ref::closed_form_set(sc.spec, t));  // the two derivations of S_t agree
            const auto got = selection.positions_of(h);
            REQUIRE(std::vector<int>(got.begin(), got.end()) == want);
            const kvsparse::StreamView<T> view = cache.stream_view(seq, layer, h);
            const auto slots = selection.slots_of(h);
            REQUIRE(slots.size() == want.size());
            // Each slot holds its position's K/V, bit-exact: the reference's rounding is exact too.
            int wrong = 0;
            for (std::size_t i = 0; i < want.size(); ++i) {
                const T* k = view.key(slots[i]);
                const T* v = view.value(slots[i]);
                const std::vector<double> k_want = table.stored_key(layer, want[i], h);
                const std::vector<double> v_want = table.stored_value(layer, want[i], h);
                for (std::size_t d = 0; d < k_want.size(); ++d) {
                    wrong += static_cast<double>(kvsparse::to_float(k[d])) != k_want[d];
                    wrong += static_cast<double>(kvsparse::to_float(v[d])) != v_want[d];
                }
            }
            REQUIRE(wrong == 0);
            const kvsparse::StreamState state = cache.stream_state(seq, layer, h);
            REQUIRE(state.held == static_cast<std::int32_t>(want.size()));
            REQUIRE(state.next_position == t + 1);
        }
        REQUIRE(cache.length(seq, layer) == held_at(layer, 0).newest() + 1);
        std::int64_t tokens = 0;
        std::int32_t most = 0;
        for (const ref::Held& h : held) {
            tokens += static_cast<std::int64_t>(h.size());
            most = std::max(most, static_cast<std::int32_t>(h.size()));
        }
        const kvsparse::MemoryStats memory = cache.memory(seq);
        REQUIRE(memory.tokens == tokens);
        REQUIRE(memory.max_stream_tokens == most);
        REQUIRE(memory.pages + cache.free_pages() == cache.total_pages());
    };

    if (sc.prefill > 0) {
        for (int layer = 0; layer < sh.layers; ++layer) {
            const int n = sc.prefill;
            std::vector<float> out(static_cast<std::size_t>(n * sh.q_heads * sh.dim));
            cache.prefill(seq, layer, data.queries(layer, 0, n), data.keys(layer, 0, n), data.values(layer, 0, n), out);
            // Prefill is dense causal whatever the policy; eviction comes after.
            for (int i = 0; i < n; ++i) {
                for (int qh = 0; qh < sh.q_heads; ++qh) {
                    const auto want = expected_output<T>(table, layer, qh, iota_set(0, i), i, Positions::none, Rope{});
                    CAPTURE(layer, i, qh);
                    REQUIRE(max_difference(&out[static_cast<std::size_t>((i * sh.q_heads + qh) * sh.dim)], want) <= sweep_tolerance);
                }
            }
            for (int h = 0; h < sh.kv_heads; ++h) held_at(layer, h).prefill(0, n);
            verify_state(layer);
        }
    }

    std::vector<float> out(static_cast<std::size_t>(sh.q_heads * sh.dim));
    int t = sc.prefill;
    for (int step = 0; t < total; ++step) {
        // Every 7th step appends three tokens in one call (three decode appends), then attends the newest.
        const int n = (step % 7 == 6) ? std::min(3, total - t) : 1;
        for (int layer = 0; layer < sh.layers; ++layer) {
            cache.append(seq, layer, data.keys(layer, t, n), data.values(layer, t, n));
            for (int h = 0; h < sh.kv_heads; ++h)
                for (int i = 0; i < n; ++i) held_at(layer, h).decode(t + i);
            verify_state(layer);
            const int now = t + n - 1;
            cache.attend(seq, layer, data.queries(layer, now, 1), out);
            for (int qh = 0; qh < sh.q_heads; ++qh) {
                const auto want = expected_output<T>(table, layer, qh, held_at(layer, qh / group).positions(), now,
                                                     Positions::none, Rope{});
                CAPTURE(layer, now, qh);
                REQUIRE(max_difference(&out[static_cast<std::size_t>(qh * sh.dim)], want) <= sweep_tolerance);
            }
        }
        t += n;
    }
}

}  // namespace

TEMPLATE_TEST_CASE("policies through KVCache: S_t and attention match the reference at every step", "[policies]",
                   float, kvsparse::half, kvsparse::bfloat16) {
    using T = TestType;
    const Shape shapes[] = {{2, 8, 4, 16} /* GQA */, {1, 4, 4, 8} /* MHA */, {1, 6, 2, 32} /* G = 3 */};
    const int pages[] = {1, 16, 64};
    std::uint64_t seed = 1000;
    // Sections hold the loops (not the reverse): Catch enters a given section once per run.
    SECTION("Dense") {
        for (const Shape shape : shapes)
            for (const int page : pages)
                for (const int prefill : {0, 9, 40}) {
                    run_scenario<T>({shape, page, prefill, 45, {ref::PolicySpec::dense, 0, 0}, seed++}, kvsparse::Dense{});
                }
    }
    SECTION("SlidingWindow") {
        for (const Shape shape : shapes)
            for (const int page : pages)
                for (const int prefill : {0, 11, 24, 45}) {  // shorter than, equal to, longer than the window
                    run_scenario<T>({shape, page, prefill, 58, {ref::PolicySpec::sliding_window, 0, 24}, seed++},
                                    kvsparse::SlidingWindow{24});
                }
    }
    SECTION("AttentionSink") {
        for (const Shape shape : shapes)
            for (const int page : pages)
                for (const auto& [sinks, window] : {std::pair{4, 28}, std::pair{3, 13}, std::pair{1, 1}}) {
                    const int budget = sinks + window;
                    for (const int prefill : {0, std::max(1, budget / 2), budget + 21}) {
                        run_scenario<T>({shape, page, prefill, 2 * budget + 17, {ref::PolicySpec::attention_sink, sinks, window}, seed++},
                                        AttentionSink{{sinks, window, PositionMode::absolute}});
                        }
                }
    }
}

// ---- positions: absolute and in-cache RoPE --------------------------------------------------------------

namespace {

template <class T>
constexpr double rope_tolerance() {
    // The cache rounds keys to storage after rotating them; the reference rotates unrounded keys in double.
    // Observed maxima: float 2e-7, half 6e-5, bfloat16 7e-4.
    if constexpr (std::is_same_v<T, float>) return 2e-5;
    if constexpr (std::is_same_v<T, kvsparse::half>) return 5e-4;
    return 4e-3;
}

enum class Inputs { pre_rope, rotated };

/// Runs an AttentionSink cache whose inputs are pre-RoPE (the cache rotates) or already rotated at their
/// absolute positions (the engine rotated them), and checks prefill and decode outputs against `mode`.
template <class T>
void run_positions(PositionMode position_mode, Inputs inputs, Rope rope, int prefill, int decode) {
    const Shape sh{2, 4, 2, 16};
    const int sinks = 4, window = 12;
    const Positions mode = position_mode == PositionMode::in_cache ? Positions::in_cache : Positions::absolute;
    INFO("in_cache " << (mode == Positions::in_cache) << ", rotated inputs " << (inputs == Inputs::rotated)
                     << ", style " << static_cast<int>(rope.style) << ", prefill " << prefill);
    const ref::Tokens data{77, sh.q_heads, sh.kv_heads, sh.dim};
    const TokenTable<T> table(data, sh.layers, prefill + decode);
    CacheConfig config{model(sh), 4, 64, rope, inputs == Inputs::rotated};
    kvsparse::KVCache<AttentionSink, kvsparse::CpuBackend, T> cache(config, AttentionSink{{sinks, window, position_mode}});
    const auto seq = cache.add_sequence();

    // What the caller hands over: as generated, or rotated at the absolute position (in double, then float).
    const auto prepare = [&](std::vector<float> x, int first, int heads) {
        if (inputs == Inputs::pre_rope) return x;
        for (std::size_t row = 0; row * static_cast<std::size_t>(sh.dim) < x.size(); ++row) {
            const int position = first + static_cast<int>(row) / heads;
            std::vector<double> v(x.begin() + static_cast<std::ptrdiff_t>(row * sh.dim),
                                  x.begin() + static_cast<std::ptrdiff_t>((row + 1) * sh.dim));
            v = rotated(v, position, rope);
            for (int d = 0; d < sh.dim; ++d) x[row * static_cast<std::size_t>(sh.dim) + static_cast<std::size_t>(d)] = static_cast<float>(v[static_cast<std::size_t>(d)]);
        }
        return x;
    };

    const double tolerance = rope_tolerance<T>();
    if (prefill > 0) {
        for (int layer = 0; layer < sh.layers; ++layer) {
            std::vector<float> out(static_cast<std::size_t>(prefill * sh.q_heads * sh.dim));
            cache.prefill(seq, layer, prepare(data.queries(layer, 0, prefill), 0, sh.q_heads),
                          prepare(data.keys(layer, 0, prefill), 0, sh.kv_heads), data.values(layer, 0, prefill), out);
            for (int i = 0; i < prefill; ++i) {
                for (int qh = 0; qh < sh.q_heads; ++qh) {
                    // Dense causal: the rank of position j in [0, i] is j, so both modes agree here.
                    const auto want = expected_output<T>(table, layer, qh, iota_set(0, i), i, mode, rope);
                    CAPTURE(layer, i, qh);
                    REQUIRE(max_difference(&out[static_cast<std::size_t>((i * sh.q_heads + qh) * sh.dim)], want) <= tolerance);
                }
            }
        }
    }
    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, sinks, window};
    std::vector<float> out(static_cast<std::size_t>(sh.q_heads * sh.dim));
    for (int t = prefill; t < prefill + decode; ++t) {
        for (int layer = 0; layer < sh.layers; ++layer) {
            cache.append(seq, layer, prepare(data.keys(layer, t, 1), t, sh.kv_heads), data.values(layer, t, 1));
            cache.attend(seq, layer, prepare(data.queries(layer, t, 1), t, sh.q_heads), out);
            for (int qh = 0; qh < sh.q_heads; ++qh) {
                const auto want = expected_output<T>(table, layer, qh, ref::closed_form_set(spec, t), t, mode, rope);
                CAPTURE(layer, t, qh);
                REQUIRE(max_difference(&out[static_cast<std::size_t>(qh * sh.dim)], want) <= tolerance);
            }
        }
    }
}

}  // namespace

TEMPLATE_TEST_CASE("AttentionSink positions: absolute and in-cache RoPE match re-rotation from scratch",
                   "[policies][rope]", float, kvsparse::half, kvsparse::bfloat16) {
    using T = TestType;
    for (const Rope rope : {Rope{RopeStyle::interleaved, 10000.0f}, Rope{RopeStyle::half_split, 500000.0f}}) {
        for (const PositionMode mode : {PositionMode::absolute, PositionMode::in_cache}) {
            for (const Inputs inputs : {Inputs::pre_rope, Inputs::rotated}) {
                run_positions<T>(mode, inputs, rope, 0, 60);
                run_positions<T>(mode, inputs, rope, 10, 40);  // prefill shorter than the budget (16)
                run_positions<T>(mode, inputs, rope, 37, 40);  // and longer
            }
        }
    }
}

TEST_CASE("in-cache positions are not absolute ones once tokens are evicted", "[policies][rope]") {
    // Guards the test above against a reference that cannot tell the modes apart.
    const ref::Tokens data{5, 1, 1, 8};
    const TokenTable<float> table(data, 1, 21);
    const Rope rope{};
    const std::vector<int> set = ref::closed_form_set({ref::PolicySpec::attention_sink, 2, 3}, 20);
    const auto a = expected_output<float>(table, 0, 0, set, 20, Positions::absolute, rope);
    const auto b = expected_output<float>(table, 0, 0, set, 20, Positions::in_cache, rope);
    double difference = 0;
    for (std::size_t d = 0; d < a.size(); ++d) difference = std::max(difference, std::fabs(a[d] - b[d]));
    CHECK(difference > 1e-3);
}

TEST_CASE("engine-style K-shift: rotated keys re-rotated by -1 on each eviction equal in-cache positions",
          "[policies][rope]") {
    // The engine (llama.cpp style) caches keys rotated at its own cell positions. Each eviction removes one
    // cell, and it shifts every later non-sink key by -1, so cell positions stay contiguous; the new token
    // and the query get the next cell position, t - evictions. This is StreamingLLM's in-cache rule.
    const Shape sh{1, 4, 2, 16};
    const int sinks = 4, window = 12;
    const Rope rope{RopeStyle::interleaved, 10000.0f};
    const ref::Tokens data{99, sh.q_heads, sh.kv_heads, sh.dim};
    const TokenTable<float> table(data, 1, 120);

    CacheConfig engine_config{model(sh), 16, 16, rope, true};
    kvsparse::KVCache<AttentionSink> engine(engine_config, AttentionSink{{sinks, window, PositionMode::absolute}});
    kvsparse::KVCache<AttentionSink> in_cache(CacheConfig{model(sh), 16, 16, rope},
                                              AttentionSink{{sinks, window, PositionMode::in_cache}});
    const auto e_seq = engine.add_sequence();
    const auto c_seq = in_cache.add_sequence();

    const auto rotate_rows = [&](std::vector<float> x, int position) {
        for (std::size_t row = 0; row * static_cast<std::size_t>(sh.dim) < x.size(); ++row) {
            std::vector<double> v(x.begin() + static_cast<std::ptrdiff_t>(row * sh.dim),
                                  x.begin() + static_cast<std::ptrdiff_t>((row + 1) * sh.dim));
            v = rotated(v, position, rope);
            for (int d = 0; d < sh.dim; ++d) x[row * static_cast<std::size_t>(sh.dim) + static_cast<std::size_t>(d)] = static_cast<float>(v[static_cast<std::size_t>(d)]);
        }
        return x;
    };

    const ref::PolicySpec spec{ref::PolicySpec::attention_sink, sinks, window};
    int evictions = 0;
    std::vector<float> engine_out(static_cast<std::size_t>(sh.q_heads * sh.dim)), cache_out(engine_out.size());
    for (int t = 0; t < 120; ++t) {
        const bool evicts = t >= sinks + window;
        if (evicts) ++evictions;
        const int cell = t - evictions;
        engine.append(e_seq, 0, rotate_rows(data.keys(0, t, 1), cell), data.values(0, t, 1));
        if (evicts) {
            kvsparse::Selection selection;
            engine.select(e_seq, 0, ref::unused_queries(engine), selection);
            for (int h = 0; h < sh.kv_heads; ++h) {
                std::vector<std::int32_t> later;
                const auto positions = selection.positions_of(h);
                for (std::size_t i = 0; i < positions.size(); ++i) {
                    if (positions[i] >= sinks && positions[i] != t) later.push_back(selection.slots_of(h)[i]);
                }
                REQUIRE(later.size() == static_cast<std::size_t>(window - 1));
                engine.shift_keys(e_seq, 0, h, later, -1);
            }
        }
        engine.attend(e_seq, 0, rotate_rows(data.queries(0, t, 1), cell), engine_out);

        in_cache.append(c_seq, 0, data.keys(0, t, 1), data.values(0, t, 1));
        in_cache.attend(c_seq, 0, data.queries(0, t, 1), cache_out);

        CAPTURE(t);
        for (int qh = 0; qh < sh.q_heads; ++qh) {
            const auto want = expected_output<float>(table, 0, qh, ref::closed_form_set(spec, t), t, Positions::in_cache, rope);
            // Window keys are re-rotated up to `window` times in float32 (observed 1.2e-7).
            REQUIRE(max_difference(&engine_out[static_cast<std::size_t>(qh * sh.dim)], want) <= 2e-5);
            REQUIRE(max_difference(&cache_out[static_cast<std::size_t>(qh * sh.dim)], want) <= 2e-5);
        }
    }
}
