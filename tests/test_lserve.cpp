// LServeHybrid against brute-force references written from REFERENCE.md (section LServeHybrid):
//
// - head kinds from gate values: a rank-counting reference (clip, order by alpha, ties by layer then
//   head), sparsity 0 and 1, many ties; the explicit mask; the TSV loader and its errors;
// - the streaming-head prefill pattern for every (i, j) on small sizes, and KVCache::prefill's outputs
//   against masked attention in double (one prompt, and a second chunk after the cut);
// - decode sets on random integer traces (exact scores, frequent ties) across reuse and page boundaries,
//   for the three GQA modes, mixed head kinds, memory bounded on streaming heads;
// - with physical_page == logical_page and reuse_interval == 1, retrieval heads select exactly what
//   QuestPageSelector selects.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "error_message.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::CacheConfig;
using kvsparse::CpuBackend;
using kvsparse::GqaAggregation;
using kvsparse::HeadKind;
using kvsparse::HeadKinds;
using kvsparse::KVCache;
using kvsparse::LServeHybrid;

// ---- head kinds ---------------------------------------------------------------------------------------

/// REFERENCE.md's rule by counting: head (l, h) streams iff fewer than `count` heads come before it,
/// where a head comes before another when its clipped alpha is lower, or equal at a lower (layer, head).
std::vector<std::vector<bool>> brute_kinds(const std::vector<std::vector<float>>& alpha, double sparsity) {
    const std::size_t L = alpha.size(), H = alpha[0].size();
    const auto clip = [](float a) { return a < 0.0f ? 0.0 : a > 1.0f ? 1.0 : static_cast<double>(a); };
    const auto count = static_cast<std::size_t>(std::floor(sparsity * static_cast<double>(L * H) + 0.5));
    std::vector<std::vector<bool>> out(L, std::vector<bool>(H));
    for (std::size_t l = 0; l < L; ++l) {
        for (std::size_t h = 0; h < H; ++h) {
            std::size_t before = 0;
            for (std::size_t l2 = 0; l2 < L; ++l2) {
                for (std::size_t h2 = 0; h2 < H; ++h2) {
                    const double a = clip(alpha[l2][h2]), b = clip(alpha[l][h]);
                    if (a < b || (a == b && (l2 < l || (l2 == l && h2 < h)))) ++before;
                }
            }
            out[l][h] = before < count;
        }
    }
    return out;
}

std::vector<std::vector<bool>> kinds_of(const HeadKinds& kinds) {
    std::vector<std::vector<bool>> out(static_cast<std::size_t>(kinds.layers()));
    for (int l = 0; l < kinds.layers(); ++l)
        for (int h = 0; h < kinds.kv_heads(); ++h) out[static_cast<std::size_t>(l)].push_back(kinds.streaming(l, h));
    return out;
}

TEST_CASE("lserve: head kinds from gate values follow the deterministic rule", "[lserve][heads]") {
    for (std::uint64_t seed = 1; seed <= 40; ++seed) {
        const int L = 1 + static_cast<int>(ref::mix(seed) % 5), H = 1 + static_cast<int>(ref::mix(seed + 99) % 6);
        std::vector<std::vector<float>> alpha(static_cast<std::size_t>(L));
        for (int l = 0; l < L; ++l) {
            for (int h = 0; h < H; ++h) {
                // Few distinct values (many ties), some outside [0, 1] (clipped into ties with 0 and 1).
                const int v = static_cast<int>(ref::mix(seed * 1000 + static_cast<std::uint64_t>(l * 16 + h)) % 7);
                const float values[7] = {-0.5f, 0.0f, 0.25f, 0.5f, 0.75f, 1.0f, 1.5f};
                alpha[static_cast<std::size_t>(l)].push_back(values[v]);
            }
        }
        for (const double s : {0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0}) {
            CAPTURE(seed, L, H, s);
            const HeadKinds kinds = HeadKinds::from_gates(alpha, s);
            CHECK(kinds_of(kinds) == brute_kinds(alpha, s));
            CHECK(kinds.streaming_count() == static_cast<int>(std::floor(s * (L * H) + 0.5)));
        }
        CHECK(HeadKinds::from_gates(alpha, 0.0).streaming_count() == 0);
        CHECK(HeadKinds::from_gates(alpha, 1.0).streaming_count() == L * H);
    }
}

TEST_CASE("lserve: equal gate values stream the lower layer and head first", "[lserve][heads]") {
    const std::vector<std::vector<float>> alpha = {{0.5f, 0.5f, 0.2f}, {0.5f, -1.0f, 0.0f}};
    // Clipped: (1,1) 0 and (1,2) 0 tie: layer 1 head 1 first; then (0,2) 0.2; then the 0.5s by index.
    CHECK(kinds_of(HeadKinds::from_gates(alpha, 2.0 / 6)) == std::vector<std::vector<bool>>{{false, false, false}, {false, true, true}});
    CHECK(kinds_of(HeadKinds::from_gates(alpha, 1.0 / 6)) == std::vector<std::vector<bool>>{{false, false, false}, {false, true, false}});
    CHECK(kinds_of(HeadKinds::from_gates(alpha, 4.0 / 6)) == std::vector<std::vector<bool>>{{true, false, true}, {false, true, true}});
    // floor(s * 6 + 0.5): 0.25 * 6 = 1.5 rounds up to 2.
    CHECK(HeadKinds::from_gates(alpha, 0.25).streaming_count() == 2);
    const HeadKinds mask = HeadKinds::from_mask({{true, false}, {false, false}});
    CHECK(mask.at(0, 0) == HeadKind::streaming);
    CHECK(mask.at(1, 1) == HeadKind::retrieval);
    CHECK_THROWS_AS(mask.at(2, 0), kvsparse::invalid_argument);
    CHECK_THROWS_AS(HeadKinds::from_gates(alpha, 1.5), kvsparse::invalid_argument);
    CHECK_THROWS_AS(HeadKinds::from_gates({{0.5f}, {0.5f, 0.1f}}, 0.5), kvsparse::invalid_argument);
    CHECK_THROWS_AS(HeadKinds::from_gates({{std::nanf("")}}, 0.5), kvsparse::invalid_argument);
}

TEST_CASE("lserve: gate values load from DuoAttention TSV files", "[lserve][heads]") {
    const auto rows = kvsparse::parse_gate_values("0.1\t0.9\t1\r\n-0.5\t2e-1\t0.5\t\n\n");
    CHECK(rows == std::vector<std::vector<float>>{{0.1f, 0.9f, 1.0f}, {-0.5f, 0.2f, 0.5f}});
    const auto error_of = [](const char* text) {
        return error_message_of<kvsparse::format_error>([&] { kvsparse::parse_gate_values(text, "gates.tsv"); });
    };
    CHECK_THAT(error_of(""), Catch::Contains("gates.tsv: no gate values"));
    CHECK_THAT(error_of("0.1\t0.2\n0.3\n"), Catch::Contains("gates.tsv:2: 1 values, but line 1 has 2"));
    CHECK_THAT(error_of("0.1\tx\n"), Catch::Contains("gates.tsv:1: value 2 'x' is not a number"));
    CHECK_THAT(error_of("0.1\t\t0.2\n"), Catch::Contains("value 2 '' is not a number"));
    CHECK_THAT(error_of("0.1\n\n0.2\n"), Catch::Contains("gates.tsv:2: empty line"));
    CHECK_THAT(error_of("nan\n"), Catch::Contains("not a number"));
    CHECK_THAT(error_of("0.5abc\n"), Catch::Contains("'0.5abc' is not a number"));

    const std::string path = "test_lserve_gates.tsv";
    {
        std::ofstream file(path);
        file << "0.9\t0.1\n0.3\t0.7\n";
    }
    const auto loaded = kvsparse::load_gate_values(path);
    std::remove(path.c_str());
    CHECK(kinds_of(HeadKinds::from_gates(loaded, 0.5)) == std::vector<std::vector<bool>>{{false, true}, {true, false}});
    CHECK_THROWS_AS(kvsparse::load_gate_values("no_such_dir/gates.tsv"), kvsparse::format_error);
}

// ---- prefill ------------------------------------------------------------------------------------------

TEST_CASE("lserve: the prefill pattern is the reference predicate for every (i j)", "[lserve][prefill]") {
    const HeadKinds kinds = HeadKinds::from_mask({{true, false}});
    for (int ps = 0; ps <= 4; ++ps) {
        for (int pl = 1; pl <= 6; ++pl) {
            const LServeHybrid policy(kinds, {.sink = 2, .local = 3, .prefill_sink = ps, .prefill_local = pl});
            for (int i = 0; i < 14; ++i) {
                for (int j = -1; j <= 15; ++j) {
                    CAPTURE(ps, pl, i, j);
                    const bool want = j >= 0 && j <= i && (j < ps || j > i - pl);
                    CHECK(kvsparse::prefill_visible(policy, 0, 0, i, j) == want);
                    CHECK(kvsparse::prefill_visible(policy, 0, 1, i, j) == (j >= 0 && j <= i));  // retrieval: causal
                }
                // The ranges are ascending, disjoint and inside [0, i]; their sizes add up to the visible count.
                const kvsparse::PrefillRanges r = policy.prefill_ranges(0, 0, i);
                int covered = 0, previous = 0;
                for (int k = 0; k < r.count; ++k) {
                    const auto range = r.ranges[static_cast<std::size_t>(k)];
                    CHECK(range.begin >= previous);
                    CHECK(range.end <= i + 1);
                    CHECK(range.begin < range.end);
                    covered += range.end - range.begin;
                    previous = range.end;
                }
                int visible = 0;
                for (int j = 0; j <= i; ++j) visible += (j < ps || j > i - pl) ? 1 : 0;
                CHECK(covered == visible);
            }
        }
    }
    // Unset prefill_sink / prefill_local take the decode values.
    const LServeHybrid defaults(kinds, {.sink = 2, .local = 3});
    CHECK(defaults.config().prefill_sink == 2);
    CHECK(defaults.config().prefill_local == 3);
}

/// Masked causal attention in double: query head `qh` at position i over the held keys j visible to it.
std::vector<double> masked_attention(const ref::Tokens& tokens, int layer, int qh, int group, int i,
                                     const std::vector<int>& keys) {
    std::vector<double> q;
    std::vector<std::vector<double>> k, v;
    for (int d = 0; d < tokens.dim; ++d) q.push_back(tokens.q(layer, i, qh, d));
    for (const int j : keys) {
        k.emplace_back();
        v.emplace_back();
        for (int d = 0; d < tokens.dim; ++d) {
            k.back().push_back(tokens.k(layer, j, qh / group, d));
            v.back().push_back(tokens.v(layer, j, qh / group, d));
        }
    }
    return ref::attention(q, k, v);
}

TEST_CASE("lserve: KVCache prefill attends exactly the block-sparse pattern", "[lserve][prefill]") {
    const int layers = 1, q_heads = 4, kv_heads = 2, dim = 8, group = 2;
    const ref::Tokens tokens{7, q_heads, kv_heads, dim};
    const HeadKinds kinds = HeadKinds::from_mask({{true, false}});
    const LServeHybrid policy(kinds, {.sink = 3, .local = 5, .logical_page = 2, .physical_page = 4, .token_budget = 12,
                                      .prefill_sink = 2, .prefill_local = 4});
    CacheConfig config{{layers, q_heads, kv_heads, dim}, 4, 64, {}};
    KVCache<LServeHybrid> cache(config, policy);
    const auto seq = cache.add_sequence();
    // First chunk 0..22, then a second chunk 23..30 over what the first one left.
    const int first = 23, second = 8;
    std::vector<int> held0(static_cast<std::size_t>(first));
    std::iota(held0.begin(), held0.end(), 0);
    for (const auto& [start, n] : {std::pair{0, first}, std::pair{first, second}}) {
        std::vector<float> out(static_cast<std::size_t>(n * q_heads * dim));
        cache.prefill(seq, 0, tokens.queries(0, start, n), tokens.keys(0, start, n), tokens.values(0, start, n), out);
        for (int qh = 0; qh < q_heads; ++qh) {
            const bool streaming = qh / group == 0;
            for (int i = start; i < start + n; ++i) {
                // Held before this chunk: everything for retrieval; sinks + local window for streaming.
                std::vector<int> keys;
                for (int j = 0; j <= i; ++j) {
                    const bool held = j >= start || !streaming || j < 3 || j > start - 1 - 5;
                    const bool visible = !streaming || j < 2 || j > i - 4;
                    if (held && visible) keys.push_back(j);
                }
                const std::vector<double> want = masked_attention(tokens, 0, qh, group, i, keys);
                for (int d = 0; d < dim; ++d) {
                    CAPTURE(start, qh, i, d);
                    CHECK(out[static_cast<std::size_t>(((i - start) * q_heads + qh) * dim + d)] ==
                          Approx(want[static_cast<std::size_t>(d)]).margin(1e-5));
                }
            }
        }
        // Streaming head cut back to sinks + local; retrieval head keeps everything.
        const int length = start + n;
        CHECK(cache.stream_state(seq, 0, 0).held == std::min(length, 3 + 5));
        CHECK(cache.stream_state(seq, 0, 1).held == length);
    }
}

// ---- decode -------------------------------------------------------------------------------------------

/// A small integer in [-3, 3] (exact in float: scores are exact, ties frequent).
float small_int(std::uint64_t seed, std::uint64_t a, std::uint64_t b, std::uint64_t c) {
    return static_cast<float>(static_cast<int>(ref::mix(seed ^ ref::mix(a ^ ref::mix(b ^ ref::mix(c)))) % 7) - 3);
}

struct IntTrace {
    std::uint64_t seed;
    int q_heads, kv_heads, dim;
    float k(int l, int pos, int h, int d) const { return small_int(seed, 2, static_cast<std::uint64_t>(l * 100000 + pos), static_cast<std::uint64_t>(h * 64 + d)); }
    float q(int l, int pos, int h, int d) const { return small_int(seed, 1, static_cast<std::uint64_t>(l * 100000 + pos), static_cast<std::uint64_t>(h * 64 + d)); }
    std::vector<float> rows(bool keys, int l, int first, int n) const {
        std::vector<float> out;
        const int heads = keys ? kv_heads : q_heads;
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < heads; ++h)
                for (int d = 0; d < dim; ++d) out.push_back(keys ? k(l, first + i, h, d) : q(l, first + i, h, d));
        return out;
    }
    std::vector<float> values(int l, int first, int n) const {
        std::vector<float> out;
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < kv_heads; ++h)
                for (int d = 0; d < dim; ++d) out.push_back(ref::uniform(seed, 3, static_cast<std::uint64_t>(l * 100000 + first + i), static_cast<std::uint64_t>(h * 64 + d)));
        return out;
    }
};

/// REFERENCE.md's retrieval selection, simulated step by step in double from the keys themselves.
class BruteRetrieval {
public:
    BruteRetrieval(const IntTrace& trace, int layer, int kv_head, int logical, int physical, int budget, int reuse,
                   GqaAggregation mode)
        : trace_(trace), layer_(layer), h_(kv_head), Pl_(logical), Pp_(physical), Kp_(std::max(3, budget / physical)),
          I_(reuse), mode_(mode) {}

    /// The set (positions) for query rows `heads` (query head indices) at step t; `row` keys the memory
    /// (per query head with per_query_head).
    std::vector<int> step(int t, const std::vector<int>& heads, int row) {
        const int tokens = t + 1, n = (tokens + Pp_ - 1) / Pp_;
        Memory& m = memory_[row];
        std::vector<int> pages;
        if (n <= Kp_) {
            m.step = -1;
            for (int p = 0; p < n; ++p) pages.push_back(p);
        } else {
            const bool exists = m.step == t - 1 || m.step == t;
            if (t % I_ == 0 || !exists) {
                m.pages = choose(n, heads, t);
            } else if (m.pages.back() != n - 1) {
                m.pages.push_back(n - 1);
            }
            m.step = t;
            pages = m.pages;
        }
        std::vector<int> positions;
        for (const int p : pages)
            for (int j = p * Pp_; j < std::min(tokens, (p + 1) * Pp_); ++j) positions.push_back(j);
        return positions;
    }

private:
    struct Memory {
        int step = -1;
        std::vector<int> pages;
    };

    double logical_score(int page, int qh, int t) const {
        double u = 0;
        for (int d = 0; d < trace_.dim; ++d) {
            double lo = std::numeric_limits<double>::infinity(), hi = -lo;
            for (int j = page * Pl_; j < (page + 1) * Pl_; ++j) {
                lo = std::min(lo, static_cast<double>(trace_.k(layer_, j, h_, d)));
                hi = std::max(hi, static_cast<double>(trace_.k(layer_, j, h_, d)));
            }
            const double q = trace_.q(layer_, t, qh, d);
            u += std::max(q * lo, q * hi);
        }
        return u;
    }

    std::vector<int> choose(int n, const std::vector<int>& heads, int t) const {
        std::vector<double> score(static_cast<std::size_t>(n - 1));
        for (int p = 0; p + 1 < n; ++p) {
            double aggregate = mode_ == GqaAggregation::sum ? 0.0 : -std::numeric_limits<double>::infinity();
            for (const int qh : heads) {
                double physical = -std::numeric_limits<double>::infinity();
                for (int i = p * (Pp_ / Pl_); i < (p + 1) * (Pp_ / Pl_); ++i) physical = std::max(physical, logical_score(i, qh, t));
                aggregate = mode_ == GqaAggregation::sum ? aggregate + physical : std::max(aggregate, physical);
            }
            score[static_cast<std::size_t>(p)] = aggregate;
        }
        std::vector<int> order(static_cast<std::size_t>(n - 1));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int a, int b) { return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)]; });
        order.resize(static_cast<std::size_t>(Kp_ - 1));
        std::sort(order.begin(), order.end());
        order.push_back(n - 1);
        return order;
    }
    const IntTrace& trace_;
    int layer_, h_, Pl_, Pp_, Kp_, I_;
    GqaAggregation mode_;
    std::map<int, Memory> memory_;
};

struct DecodeCase {
    int logical, physical, budget, reuse;
    GqaAggregation mode;
    int prefill, total;
};

/// KVCache::select_pages at the same step as `selection`: each row's physical pages, expanded to slots,
/// are the row's selected slots (a retrieval head, in order) or the slots its streaming head holds (the
/// same set; the page list is in slot order). The rows fit the sizes page_list_sizes gives.
void check_page_lists(KVCache<LServeHybrid>& cache, kvsparse::SequenceId seq, int layer, const std::vector<float>& q,
                      const kvsparse::Selection& selection, int physical, int tokens) {
    const auto& shape = cache.config().shape;
    const int group = shape.group_size();
    const auto sizes = cache.policy().page_list_sizes(layer, shape.kv_heads, group, tokens);
    std::vector<std::int32_t> indptr(sizes.indptr), indices(sizes.indices, -1), last(sizes.last_page_len);
    cache.select_pages(seq, layer, q, kvsparse::PageLists{indptr, indices, last});
    const int rows_per_head = cache.policy().per_query_head() ? group : 1;
    for (int h = 0; h < shape.kv_heads; ++h) {
        for (int member = 0; member < rows_per_head; ++member) {
            const auto r = static_cast<std::size_t>(h * rows_per_head + member);
            std::vector<int> slots;
            for (int i = indptr[r]; i < indptr[r + 1]; ++i) {
                const int page = indices[static_cast<std::size_t>(i)];
                const int length = i + 1 == indptr[r + 1] ? last[r] : physical;
                for (int j = 0; j < length; ++j) slots.push_back(page * physical + j);
            }
            const auto want_span = selection.slots_of(h, member);
            std::vector<int> want(want_span.begin(), want_span.end());
            if (cache.policy().streaming(layer, h)) std::sort(want.begin(), want.end());
            CAPTURE(layer, h, member, tokens);
            REQUIRE(slots == want);
        }
    }
    REQUIRE(static_cast<std::size_t>(indptr.back()) <= sizes.indices);
}

void check_decode(const DecodeCase& c, std::uint64_t seed) {
    const int layers = 2, q_heads = 4, kv_heads = 2, dim = 8, group = 2, sink = 3, local = 7;
    const IntTrace trace{seed, q_heads, kv_heads, dim};
    const HeadKinds kinds = HeadKinds::from_mask({{true, false}, {false, false}});
    const LServeHybrid policy(kinds, {.sink = sink, .local = local, .logical_page = c.logical, .physical_page = c.physical,
                                      .token_budget = c.budget, .reuse_interval = c.reuse, .gqa = c.mode});
    CacheConfig config{{layers, q_heads, kv_heads, dim}, 4, 0, {}};
    config.num_pages = layers * kv_heads * ((c.total + 3) / 4 + 2);
    KVCache<LServeHybrid> cache(config, policy);
    const auto seq = cache.add_sequence();
    std::vector<BruteRetrieval> brute;
    for (int l = 0; l < layers; ++l)
        for (int h = 0; h < kv_heads; ++h)
            brute.emplace_back(trace, l, h, c.logical, c.physical, c.budget, c.reuse, c.mode);
    if (c.prefill > 0) {
        std::vector<float> out(static_cast<std::size_t>(c.prefill * q_heads * dim));
        for (int l = 0; l < layers; ++l)
            cache.prefill(seq, l, trace.rows(false, l, 0, c.prefill), trace.rows(true, l, 0, c.prefill),
                          trace.values(l, 0, c.prefill), out);
    }
    kvsparse::Selection selection;
    std::vector<float> out(static_cast<std::size_t>(q_heads * dim));
    int fresh = 0, grown = 0;
    for (int t = c.prefill; t < c.total; ++t) {
        for (int l = 0; l < layers; ++l) {
            cache.append(seq, l, trace.rows(true, l, t, 1), trace.values(l, t, 1));
            const std::vector<float> q = trace.rows(false, l, t, 1);
            cache.select(seq, l, q, selection);
            cache.attend(seq, l, q, out);  // selects again at the same step: must not change the memo's outcome
            cache.select(seq, l, q, selection);
            check_page_lists(cache, seq, l, q, selection, c.physical, t + 1);
            for (int h = 0; h < kv_heads; ++h) {
                BruteRetrieval& b = brute[static_cast<std::size_t>(l * kv_heads + h)];
                for (int member = 0; member < group; ++member) {
                    std::vector<int> want;
                    if (kinds.streaming(l, h)) {
                        for (int j = 0; j <= t; ++j)
                            if (j < sink || j > t - local) want.push_back(j);
                    } else if (c.mode == GqaAggregation::per_query_head) {
                        want = b.step(t, {h * group + member}, member);
                    } else {
                        want = b.step(t, {h * group, h * group + 1}, 0);
                    }
                    const auto got = selection.positions_of(h, member);
                    CAPTURE(t, l, h, member);
                    REQUIRE(std::vector<int>(got.begin(), got.end()) == want);
                }
                if (!kinds.streaming(l, h)) {
                    const int n = (t + 1 + c.physical - 1) / c.physical;
                    if (n > policy.page_budget()) {
                        const auto got = selection.positions_of(h, 0);
                        const auto pages = static_cast<int>((got.size() + static_cast<std::size_t>(c.physical) - 1) /
                                                            static_cast<std::size_t>(c.physical));
                        if (t % c.reuse == 0) ++fresh;
                        if (pages > policy.page_budget()) ++grown;
                    }
                }
            }
            const auto memory = cache.memory(seq);
            REQUIRE(cache.stream_state(seq, 0, 0).held <= sink + local);  // streaming head bounded
            REQUIRE(memory.max_stream_tokens == t + 1);
        }
    }
    CHECK(fresh > 0);
    if (c.reuse > 1 && c.physical % c.reuse != 0) CHECK(grown > 0);  // a reused set grew by a new page
}

TEST_CASE("lserve: decode sets match the reference across reuse and page boundaries", "[lserve][decode]") {
    const std::vector<DecodeCase> cases = {
        {2, 4, 12, 3, GqaAggregation::max, 0, 90},   {2, 4, 12, 3, GqaAggregation::sum, 5, 90},
        {2, 4, 12, 3, GqaAggregation::per_query_head, 9, 90}, {2, 8, 16, 5, GqaAggregation::max, 17, 120},
        {4, 8, 40, 4, GqaAggregation::sum, 1, 140},  {1, 2, 6, 7, GqaAggregation::max, 0, 60},
        {2, 2, 8, 1, GqaAggregation::per_query_head, 3, 50}, {4, 4, 8, 2, GqaAggregation::max, 30, 80},
    };
    std::uint64_t seed = 11;
    for (const DecodeCase& c : cases) {
        CAPTURE(c.logical, c.physical, c.budget, c.reuse, static_cast<int>(c.mode), c.prefill);
        check_decode(c, seed++);
    }
}

TEST_CASE("lserve: with one page size and no reuse retrieval heads select as Quest does", "[lserve][quest]") {
    const int layers = 1, q_heads = 8, kv_heads = 2, dim = 16, total = 300, prefill = 37;
    const ref::Tokens tokens{23, q_heads, kv_heads, dim};  // float data: the float paths must agree bit for bit
    for (const GqaAggregation mode : {GqaAggregation::max, GqaAggregation::sum, GqaAggregation::per_query_head}) {
        for (const int page : {1, 4, 16}) {
            const int budget = page * 5;
            const LServeHybrid lserve(HeadKinds::all(layers, kv_heads, HeadKind::retrieval),
                                      {.logical_page = page, .physical_page = page, .token_budget = budget,
                                       .reuse_interval = 1, .gqa = mode});
            const kvsparse::QuestPageSelector quest(
                {.page_size = page, .token_budget = budget, .dense_layers = 0, .gqa = mode});
            CacheConfig config{{layers, q_heads, kv_heads, dim}, 16, kv_heads * (total / 16 + 2), {}};
            KVCache<LServeHybrid> a(config, lserve);
            KVCache<kvsparse::QuestPageSelector> b(config, quest);
            const auto sa = a.add_sequence(), sb = b.add_sequence();
            std::vector<float> out(static_cast<std::size_t>(prefill * q_heads * dim));
            a.prefill(sa, 0, tokens.queries(0, 0, prefill), tokens.keys(0, 0, prefill), tokens.values(0, 0, prefill), out);
            b.prefill(sb, 0, tokens.queries(0, 0, prefill), tokens.keys(0, 0, prefill), tokens.values(0, 0, prefill), out);
            kvsparse::Selection x, y;
            std::vector<float> oa(static_cast<std::size_t>(q_heads * dim)), ob(oa.size());
            for (int t = prefill; t < total; ++t) {
                a.append(sa, 0, tokens.keys(0, t, 1), tokens.values(0, t, 1));
                b.append(sb, 0, tokens.keys(0, t, 1), tokens.values(0, t, 1));
                const auto q = tokens.queries(0, t, 1);
                a.select(sa, 0, q, x);
                b.select(sb, 0, q, y);
                CAPTURE(static_cast<int>(mode), page, t);
                REQUIRE(x.rows_per_kv_head == y.rows_per_kv_head);
                REQUIRE(x.indptr == y.indptr);
                REQUIRE(x.positions == y.positions);
                a.attend(sa, 0, q, oa);
                b.attend(sb, 0, q, ob);
                REQUIRE(oa == ob);
            }
        }
    }
}

TEST_CASE("lserve: streaming memory stays bounded and errors name the field", "[lserve][memory]") {
    const int layers = 2, q_heads = 2, kv_heads = 2, dim = 4, total = 700;
    const ref::Tokens tokens{5, q_heads, kv_heads, dim};
    const HeadKinds kinds = HeadKinds::from_gates({{0.1f, 0.9f}, {0.0f, 0.05f}}, 0.75);
    CHECK(kinds_of(kinds) == std::vector<std::vector<bool>>{{true, false}, {true, true}});
    const LServeHybrid policy(kinds, {.sink = 4, .local = 60, .token_budget = 256});
    CacheConfig config{{layers, q_heads, kv_heads, dim}, 16, 200, {}};
    KVCache<LServeHybrid> cache(config, policy);
    const auto seq = cache.add_sequence();
    std::vector<float> out(static_cast<std::size_t>(q_heads * dim));
    for (int t = 0; t < total; ++t) {
        for (int l = 0; l < layers; ++l) {
            cache.append(seq, l, tokens.keys(l, t, 1), tokens.values(l, t, 1));
            cache.attend(seq, l, tokens.queries(l, t, 1), out);
            for (int h = 0; h < kv_heads; ++h) {
                if (!kinds.streaming(l, h)) continue;
                REQUIRE(cache.stream_state(seq, l, h).held == std::min(t + 1, 64));
                REQUIRE(cache.stream_view(seq, l, h).table.num_pages <= 4);  // ceil(64 / 16)
            }
        }
    }
    CHECK(cache.stream_state(seq, 0, 1).held == total);
    // Metadata only on the retrieval head: the bounds of 44 pages of 16 (kmin and kmax of 4 floats) and
    // its memo; the streaming heads keep none.
    CHECK(cache.memory(seq).metadata_bytes == 44 * 2 * dim * 4 + 4 * policy.memo_size(0, 1, q_heads / kv_heads));

    using kvsparse::invalid_argument;
    CHECK_THROWS_AS(LServeHybrid(kinds, {.logical_page = 16, .physical_page = 24}), invalid_argument);
    CHECK_THROWS_AS(LServeHybrid(kinds, {.logical_page = 12, .physical_page = 24}), invalid_argument);
    CHECK_THROWS_AS(LServeHybrid(kinds, {.local = 0}), invalid_argument);
    CHECK_THROWS_AS(LServeHybrid(kinds, {.reuse_interval = 0}), invalid_argument);
    CHECK_THROWS_AS(LServeHybrid(kinds, {.prefill_local = 0}), invalid_argument);
    CHECK_THROWS_AS(LServeHybrid(HeadKinds{}, {}), invalid_argument);
    // A cache whose shape has heads the kinds do not cover is rejected at construction.
    CacheConfig wide{{layers, q_heads * 2, kv_heads * 2, dim}, 16, 200, {}};
    CHECK_THROWS_WITH((KVCache<LServeHybrid>(wide, policy)), Catch::Contains("outside the head kinds"));
    CHECK(policy.page_budget() == 4);
    CHECK(LServeHybrid(kinds, {.token_budget = 64}).page_budget() == 3);  // never below 3 physical pages
}

TEST_CASE("lserve: engine-owned buffers select as KVCache does", "[lserve][engine]") {
    const int q_heads = 2, kv_heads = 1, dim = 8, total = 400, group = 2;
    const IntTrace trace{77, q_heads, kv_heads, dim};
    const LServeHybrid policy(HeadKinds::all(1, 1, HeadKind::retrieval),
                              {.logical_page = 4, .physical_page = 16, .token_budget = 64, .reuse_interval = 3});
    CacheConfig config{{1, q_heads, kv_heads, dim}, 16, total / 16 + 2, {}};
    KVCache<LServeHybrid> cache(config, policy);
    const auto seq = cache.add_sequence();
    const kvsparse::LServeSizes sizes = policy.engine_sizes(total, group, dim);
    REQUIRE(sizes.memo == policy.memo_size(0, 0, group));
    std::vector<float> bounds(sizes.bounds_elements), scores(sizes.scores);
    std::vector<std::int32_t> order(sizes.order), memo(static_cast<std::size_t>(sizes.memo), 0), positions, slots(total);
    const auto view = kvsparse::KeyBounds<float>::packed(bounds.data(), sizes.bounds_pages, 4, dim);
    kvsparse::Selection selection;
    for (int t = 0; t < total; ++t) {
        const std::vector<float> k = trace.rows(true, 0, t, 1), q = trace.rows(false, 0, t, 1);
        cache.append(seq, 0, k, trace.values(0, t, 1));
        cache.select(seq, 0, q, selection);
        kvsparse::append_key_bounds(view, t, k.data());
        positions.push_back(t);
        kvsparse::StreamState s{.positions = positions, .held = t + 1, .next_position = t + 1, .layer = 0, .kv_head = 0,
                                .bounds = kvsparse::KeyBoundsView::of(view, (t + 1 + 3) / 4, scores, order), .memo = memo};
        const std::int32_t count = policy.select(s, q, slots);
        const auto want = selection.slots_of(0);
        CAPTURE(t);
        REQUIRE(std::vector<std::int32_t>(slots.begin(), slots.begin() + count) == std::vector<std::int32_t>(want.begin(), want.end()));
    }
}

}  // namespace
