// QuestPageSelector: property tests on random data against independent double-precision references.
//
// - The page score U(i) = sum_d max(q_d kmax_d, q_d kmin_d) bounds q.k from above for every key of the
//   page (float32, float16 and bfloat16 storage) and equals q.k for a page of one key.
// - Selections (KVCache::select, KVCache::select_pages, engine-owned buffers) equal a brute-force
//   reference that scores every page in double from the keys themselves and stable-sorts with the tie
//   rule, for the three GQA modes, budgets below and above the page count, partial last pages and
//   page sizes 1, 16 and 64. Keys and queries are small integers there, so float and double scores are
//   exactly equal and ties are frequent (the tie rule is exercised, not just tolerated).
// - A budget covering every page gives exactly dense attention.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::bfloat16;
using kvsparse::CacheConfig;
using kvsparse::CpuBackend;
using kvsparse::GqaAggregation;
using kvsparse::half;
using kvsparse::KeyBounds;
using kvsparse::KeyBoundsView;
using kvsparse::KVCache;
using kvsparse::PageLists;
using kvsparse::QuestPageSelector;

const char* mode_name(GqaAggregation mode) {
    switch (mode) {
        case GqaAggregation::max:
            return "max";
        case GqaAggregation::sum:
            return "sum";
        case GqaAggregation::per_query_head:
            return "per_query_head";
    }
    return "?";
}

/// A small integer in [-3, 3] from the hash of the coordinates (exact in every storage type).
float small_int(std::uint64_t seed, std::uint64_t a, std::uint64_t b, std::uint64_t c, std::uint64_t d) {
    return static_cast<float>(static_cast<int>(ref::mix(seed ^ ref::mix(a ^ ref::mix(b ^ ref::mix(c ^ ref::mix(d))))) % 7) - 3);
}

/// Integer-valued tokens: keys [t][Hkv][D], values continuous, queries [Hq][D] per step.
struct IntTokens {
    std::uint64_t seed;
    int q_heads, kv_heads, dim;
    std::vector<float> keys(int layer, int first, int n) const {
        std::vector<float> out;
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < kv_heads; ++h)
                for (int d = 0; d < dim; ++d) out.push_back(k(layer, first + i, h, d));
        return out;
    }
    float k(int layer, int pos, int h, int d) const {
        return small_int(seed, 2, static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(pos),
                         static_cast<std::uint64_t>(h * 4096 + d));
    }
    std::vector<float> values(int layer, int first, int n) const {
        std::vector<float> out;
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < kv_heads; ++h)
                for (int d = 0; d < dim; ++d)
                    out.push_back(ref::uniform(seed, 3, static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(first + i),
                                               static_cast<std::uint64_t>(h * 4096 + d)));
        return out;
    }
    std::vector<float> queries(int layer, int pos, int n = 1) const {
        std::vector<float> out;
        for (int i = 0; i < n; ++i)
            for (int h = 0; h < q_heads; ++h)
                for (int d = 0; d < dim; ++d)
                    out.push_back(small_int(seed, 1, static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(pos + i),
                                            static_cast<std::uint64_t>(h * 4096 + d)));
        return out;
    }
};

/// REFERENCE.md's selection, from the keys themselves: pages of `tokens` positions (the last partial),
/// scored in double per query row of `rows` [r][D], aggregated (max or sum; one row for per_query_head),
/// stable-sorted by descending score (equal scores keep the lower page first); the top K - 1 of the
/// pages before the last, plus the last. Returns the selected pages, ascending.
std::vector<int> brute_pages(const std::vector<std::vector<double>>& page_keys_min,
                             const std::vector<std::vector<double>>& page_keys_max, const std::vector<std::vector<double>>& rows,
                             GqaAggregation mode, int budget_pages, bool dense) {
    const int n = static_cast<int>(page_keys_min.size());
    std::vector<int> all(static_cast<std::size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    if (dense || n <= budget_pages) return all;
    std::vector<double> score(static_cast<std::size_t>(n - 1));
    for (int i = 0; i + 1 < n; ++i) {
        double aggregate = mode == GqaAggregation::sum ? 0.0 : -std::numeric_limits<double>::infinity();
        for (const auto& q : rows) {
            double u = 0;
            for (std::size_t d = 0; d < q.size(); ++d) {
                u += std::max(q[d] * page_keys_max[static_cast<std::size_t>(i)][d], q[d] * page_keys_min[static_cast<std::size_t>(i)][d]);
            }
            aggregate = mode == GqaAggregation::sum ? aggregate + u : std::max(aggregate, u);
        }
        score[static_cast<std::size_t>(i)] = aggregate;
    }
    std::vector<int> order(all.begin(), all.end() - 1);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)]; });
    order.resize(static_cast<std::size_t>(budget_pages - 1));
    order.push_back(n - 1);
    std::sort(order.begin(), order.end());
    return order;
}

/// Element-wise min / max per page of the keys of positions [0, tokens) of (layer, kv head), as stored in T.
template <class T>
void brute_bounds(const IntTokens& tokens, int layer, int h, int count, int page, std::vector<std::vector<double>>& lo,
                  std::vector<std::vector<double>>& hi) {
    const int n = (count + page - 1) / page;
    lo.assign(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(tokens.dim), std::numeric_limits<double>::infinity()));
    hi.assign(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(tokens.dim), -std::numeric_limits<double>::infinity()));
    for (int j = 0; j < count; ++j) {
        for (int d = 0; d < tokens.dim; ++d) {
            const double x = ref::stored<T>(tokens.k(layer, j, h, d));
            auto& l = lo[static_cast<std::size_t>(j / page)][static_cast<std::size_t>(d)];
            auto& u = hi[static_cast<std::size_t>(j / page)][static_cast<std::size_t>(d)];
            l = std::min(l, x);
            u = std::max(u, x);
        }
    }
}

std::vector<int> expand(const std::vector<int>& pages, int page, int tokens) {
    std::vector<int> positions;
    for (const int p : pages)
        for (int j = p * page; j < std::min(tokens, (p + 1) * page); ++j) positions.push_back(j);
    return positions;
}

template <class T>
std::vector<std::vector<double>> query_rows(const std::vector<float>& q, int first_head, int heads, int dim) {
    std::vector<std::vector<double>> rows;
    for (int r = 0; r < heads; ++r) {
        rows.emplace_back();
        for (int d = 0; d < dim; ++d) rows.back().push_back(q[static_cast<std::size_t>((first_head + r) * dim + d)]);
    }
    return rows;
}

/// Streams `total` tokens through KVCache<Quest> (a prefill of `prefill`, then decode appends) and checks
/// every decode step's select and select_pages against brute_pages on each layer (layer 0 dense).
template <class T>
void check_selections(int page, int budget, GqaAggregation mode, int total, int prefill) {
    const int layers = 2, q_heads = 4, kv_heads = 2, dim = 8, group = q_heads / kv_heads;
    const IntTokens tokens{static_cast<std::uint64_t>(page * 131 + budget), q_heads, kv_heads, dim};
    const QuestPageSelector policy({.page_size = page, .token_budget = budget, .dense_layers = 1, .gqa = mode});
    CacheConfig config{{layers, q_heads, kv_heads, dim}, 16, 0, {}};
    config.num_pages = layers * kv_heads * ((total + 15) / 16 + 1);
    KVCache<QuestPageSelector, CpuBackend, T> cache(config, policy);
    const auto seq = cache.add_sequence();
    const int K = policy.page_budget();
    std::vector<float> out(static_cast<std::size_t>(prefill * q_heads * dim));
    if (prefill > 0) {
        for (int l = 0; l < layers; ++l) {
            cache.prefill(seq, l, tokens.queries(l, 0, prefill), tokens.keys(l, 0, prefill), tokens.values(l, 0, prefill), out);
        }
    }
    kvsparse::Selection selection;
    std::vector<std::vector<double>> lo, hi;
    for (int t = prefill; t < total; ++t) {
        for (int l = 0; l < layers; ++l) {
            cache.append(seq, l, tokens.keys(l, t, 1), tokens.values(l, t, 1));
            const std::vector<float> q = tokens.queries(l, t);
            cache.select(seq, l, q, selection);
            const auto sizes = cache.policy().page_list_sizes(l, kv_heads, group, t + 1);
            std::vector<std::int32_t> indptr(sizes.indptr), indices(sizes.indices), last(sizes.last_page_len);
            cache.select_pages(seq, l, q, PageLists{indptr, indices, last});
            const int pages = (t + 1 + page - 1) / page;
            for (int h = 0; h < kv_heads; ++h) {
                brute_bounds<T>(tokens, l, h, t + 1, page, lo, hi);
                REQUIRE(static_cast<int>(lo.size()) == pages);
                for (int member = 0; member < group; ++member) {
                    const bool own = mode == GqaAggregation::per_query_head;
                    const auto rows = own ? query_rows<T>(q, h * group + member, 1, dim) : query_rows<T>(q, h * group, group, dim);
                    const std::vector<int> want_pages = brute_pages(lo, hi, rows, own ? GqaAggregation::max : mode, K, l == 0);
                    const std::vector<int> want = expand(want_pages, page, t + 1);
                    const auto got = selection.positions_of(h, member);
                    const auto got_slots = selection.slots_of(h, member);
                    CAPTURE(t, l, h, member);
                    REQUIRE(std::vector<int>(got.begin(), got.end()) == want);
                    REQUIRE(std::vector<int>(got_slots.begin(), got_slots.end()) == want);  // slot == position
                    const std::size_t row = static_cast<std::size_t>(own ? h * group + member : h);
                    const std::vector<int> got_pages(indices.begin() + indptr[row], indices.begin() + indptr[row + 1]);
                    REQUIRE(got_pages == want_pages);
                    REQUIRE(last[row] == t + 1 - (pages - 1) * page);
                }
            }
        }
    }
}

}  // namespace

TEST_CASE("quest: the page score bounds q.k of every key of the page from float32 / float16 / bfloat16 storage",
          "[quest][bounds]") {
    // Continuous random keys and queries. Tolerances: U is a float sum of D terms, so it may fall below
    // the exact value by D * 2^-24 of the sum of the terms' magnitudes (we allow 1e-5 of it); against the
    // keys before narrowing, the stored key also differs by half an ulp per element (2^-11 for float16,
    // 2^-8 for bfloat16, relative), which the bound covers only up to that rounding.
    const auto check = [](auto tag, double rounding) {
        using T = decltype(tag);
        const int dim = 64;
        for (const int page : {1, 16, 64}) {
            const int tokens = 5 * page + page / 2 + 1;  // a partial last page
            const int pages = (tokens + page - 1) / page;
            std::vector<T> buffer(KeyBounds<T>::elements(pages, dim));
            const auto bounds = KeyBounds<T>::packed(buffer.data(), pages, page, dim);
            std::vector<std::vector<float>> keys;
            for (int j = 0; j < tokens; ++j) {
                keys.emplace_back();
                for (int d = 0; d < dim; ++d) keys.back().push_back(3.0f * ref::uniform(7, 2, static_cast<std::uint64_t>(page), static_cast<std::uint64_t>(j), static_cast<std::uint64_t>(d)));
                kvsparse::append_key_bounds(bounds, j, keys.back().data());
            }
            std::vector<float> scores(static_cast<std::size_t>(pages));
            for (int trial = 0; trial < 8; ++trial) {
                std::vector<float> q;
                for (int d = 0; d < dim; ++d) q.push_back(2.0f * ref::uniform(7, 1, static_cast<std::uint64_t>(page), static_cast<std::uint64_t>(trial), static_cast<std::uint64_t>(d)));
                CpuBackend::page_scores(bounds.read_only(), pages, q, 1, GqaAggregation::max, scores);
                for (int j = 0; j < tokens; ++j) {
                    const int i = j / page;
                    double exact_stored = 0, exact_original = 0, magnitude = 0, rounding_room = 0;
                    for (int d = 0; d < dim; ++d) {
                        const double k = keys[static_cast<std::size_t>(j)][static_cast<std::size_t>(d)];
                        exact_stored += q[static_cast<std::size_t>(d)] * ref::stored<T>(static_cast<float>(k));
                        exact_original += q[static_cast<std::size_t>(d)] * k;
                        magnitude += std::fabs(q[static_cast<std::size_t>(d)]) *
                                     std::max(std::fabs(kvsparse::to_float(bounds.kmin(i)[d])), std::fabs(kvsparse::to_float(bounds.kmax(i)[d])));
                        rounding_room += std::fabs(q[static_cast<std::size_t>(d)] * k) * rounding;
                    }
                    const double u = scores[static_cast<std::size_t>(i)];
                    CAPTURE(page, j, trial, u, exact_stored, exact_original);
                    CHECK(u >= exact_stored - 1e-5 * magnitude);
                    CHECK(u >= exact_original - 1e-5 * magnitude - rounding_room);
                    if (page == 1) CHECK(std::fabs(u - exact_stored) <= 1e-5 * magnitude);  // one key: the maximum itself
                }
            }
        }
    };
    check(float{}, 0.0);
    check(half{}, 0x1p-11);
    check(bfloat16{}, 0x1p-8);
}

TEST_CASE("quest: bounds are exact min and max of the stored keys / a page's first key never merges into stale memory",
          "[quest][bounds]") {
    // Engine-owned buffer full of garbage (as memory reused from an older page or sequence would be).
    const int dim = 8, page = 4, pages = 3;
    std::vector<half> buffer(KeyBounds<half>::elements(pages, dim), half(1000.0f));
    const auto bounds = KeyBounds<half>::packed(buffer.data(), pages, page, dim);
    for (int j = 0; j < 10; ++j) {
        std::vector<float> key;
        for (int d = 0; d < dim; ++d) key.push_back(ref::uniform(3, static_cast<std::uint64_t>(j), static_cast<std::uint64_t>(d)));
        kvsparse::append_key_bounds(bounds, j, key.data());
        for (int d = 0; d < dim; ++d) {
            double lo = std::numeric_limits<double>::infinity(), hi = -lo;
            for (int i = j / page * page; i <= j; ++i) {
                const double x = ref::stored<half>(ref::uniform(3, static_cast<std::uint64_t>(i), static_cast<std::uint64_t>(d)));
                lo = std::min(lo, x);
                hi = std::max(hi, x);
            }
            CHECK(kvsparse::to_float(bounds.kmin(j / page)[d]) == lo);
            CHECK(kvsparse::to_float(bounds.kmax(j / page)[d]) == hi);
        }
    }

    // Through KVCache: a sequence removed and a new one started reuses pool pages; every page's bounds
    // are the exact min / max of the keys the stream stores.
    const QuestPageSelector policy({.page_size = 8, .token_budget = 16, .dense_layers = 0});
    KVCache<QuestPageSelector, CpuBackend, bfloat16> cache(CacheConfig{{1, 2, 1, 16}, 4, 64, {}}, policy);
    const ref::Tokens tokens{5, 2, 1, 16};
    for (int round = 0; round < 2; ++round) {
        const auto seq = cache.add_sequence();
        std::vector<float> out(static_cast<std::size_t>(5 * 2 * 16));
        cache.prefill(seq, 0, tokens.queries(0, 100 * round, 5), tokens.keys(0, 100 * round, 5), tokens.values(0, 100 * round, 5), out);
        for (int t = 5; t < 37; ++t) {
            cache.append(seq, 0, tokens.keys(0, 100 * round + t, 1), tokens.values(0, 100 * round + t, 1));
            const kvsparse::StreamState state = cache.stream_state(seq, 0, 0);
            const auto view = cache.stream_view(seq, 0, 0);
            REQUIRE(state.bounds.pages == (t + 1 + 7) / 8);
            REQUIRE(state.bounds.type == kvsparse::dtype::bfloat16);
            const auto b = state.bounds.typed<bfloat16>();
            for (int i = 0; i < state.bounds.pages; ++i) {
                for (int d = 0; d < 16; ++d) {
                    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
                    for (int j = 8 * i; j < std::min(t + 1, 8 * i + 8); ++j) {
                        lo = std::min(lo, kvsparse::to_float(view.key(j)[d]));
                        hi = std::max(hi, kvsparse::to_float(view.key(j)[d]));
                    }
                    CAPTURE(round, t, i, d);
                    CHECK(kvsparse::to_float(b.kmin(i)[d]) == lo);
                    CHECK(kvsparse::to_float(b.kmax(i)[d]) == hi);
                }
            }
        }
        CHECK(cache.memory(seq).metadata_bytes == 5 * 2 * 16 * 2);  // 5 pages of kmin and kmax, 16 bfloat16 each
        cache.remove_sequence(seq);
    }
}

TEST_CASE("quest: top_pages keeps the k best with ties to the lower index", "[quest][topk]") {
    const std::vector<float> scores{1, 5, 3, 5, std::numeric_limits<float>::quiet_NaN(), 3, 5, -1};
    std::vector<std::int32_t> order(scores.size());
    const auto top = [&](int k) {
        const int n = CpuBackend::top_pages(scores, static_cast<int>(scores.size()), k, order);
        return std::vector<int>(order.begin(), order.begin() + n);
    };
    CHECK(top(0).empty());
    CHECK(top(1) == std::vector<int>{1});
    CHECK(top(2) == std::vector<int>{1, 3});
    CHECK(top(3) == std::vector<int>{1, 3, 6});
    CHECK(top(4) == std::vector<int>{1, 2, 3, 6});
    CHECK(top(5) == std::vector<int>{1, 2, 3, 5, 6});
    CHECK(top(7) == std::vector<int>{0, 1, 2, 3, 5, 6, 7});  // NaN ranks last
    CHECK(top(8) == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
    CHECK(top(20).size() == 8);
    // Many equal scores: the lowest indices win.
    const std::vector<float> flat(1000, 2.0f);
    std::vector<std::int32_t> many(flat.size());
    REQUIRE(CpuBackend::top_pages(flat, 1000, 10, many) == 10);
    CHECK(std::vector<int>(many.begin(), many.begin() + 10) == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
}

TEST_CASE("quest: selections equal the brute-force reference for every GQA mode / budget / page size", "[quest][select]") {
    for (const GqaAggregation mode : {GqaAggregation::max, GqaAggregation::sum, GqaAggregation::per_query_head}) {
        for (const int page : {1, 16, 64}) {
            // Budgets of 1 page, of 3 pages plus a remainder, and of more pages than the stream ever has.
            const int total = page == 1 ? 90 : page == 16 ? 150 : 330;
            for (const int budget : {page, 3 * page + page / 2, 2 * total}) {
                CAPTURE(mode_name(mode), page, budget);
                check_selections<float>(page, budget, mode, total, page == 1 ? 7 : 20);
            }
        }
    }
    // Stored as float16 and bfloat16 (integer keys are exact there): the same sets.
    check_selections<half>(16, 64, GqaAggregation::max, 120, 0);
    check_selections<bfloat16>(16, 48, GqaAggregation::per_query_head, 120, 33);
}

TEST_CASE("quest: a budget covering every page gives exactly dense attention", "[quest][dense]") {
    const int layers = 3, q_heads = 6, kv_heads = 2, dim = 16, total = 100, prefill = 13;
    const ref::Tokens tokens{21, q_heads, kv_heads, dim};
    const CacheConfig config{{layers, q_heads, kv_heads, dim}, 16, 64, {}};
    for (const GqaAggregation mode : {GqaAggregation::max, GqaAggregation::sum, GqaAggregation::per_query_head}) {
        CAPTURE(mode_name(mode));
        KVCache<QuestPageSelector, CpuBackend, half> quest(config, QuestPageSelector(16, 112, 1, mode));
        KVCache<kvsparse::Dense, CpuBackend, half> dense(config, kvsparse::Dense{});
        const auto a = quest.add_sequence();
        const auto b = dense.add_sequence();
        std::vector<float> out_a(static_cast<std::size_t>(prefill * q_heads * dim)), out_b(out_a.size());
        for (int l = 0; l < layers; ++l) {
            quest.prefill(a, l, tokens.queries(l, 0, prefill), tokens.keys(l, 0, prefill), tokens.values(l, 0, prefill), out_a);
            dense.prefill(b, l, tokens.queries(l, 0, prefill), tokens.keys(l, 0, prefill), tokens.values(l, 0, prefill), out_b);
            REQUIRE(out_a == out_b);
        }
        out_a.resize(static_cast<std::size_t>(q_heads * dim));
        out_b.resize(out_a.size());
        kvsparse::Selection selection;
        for (int t = prefill; t < total; ++t) {
            for (int l = 0; l < layers; ++l) {
                quest.append(a, l, tokens.keys(l, t, 1), tokens.values(l, t, 1));
                dense.append(b, l, tokens.keys(l, t, 1), tokens.values(l, t, 1));
                quest.attend(a, l, tokens.queries(l, t, 1), out_a);
                dense.attend(b, l, tokens.queries(l, t, 1), out_b);
                CAPTURE(t, l);
                REQUIRE(out_a == out_b);  // bit for bit: the same slots in the same order
                quest.select(a, l, tokens.queries(l, t, 1), selection);
                for (int h = 0; h < q_heads; ++h) CHECK(static_cast<int>(selection.positions_of(h / 3, h % 3).size()) == t + 1);
            }
        }
    }
}

TEST_CASE("quest: engine-owned bounds and scratch give the cache's page lists", "[quest][engine]") {
    // An engine keeps the bounds in its own float16 buffer (sized by the policy), folds every appended
    // key in with append_key_bounds, and asks for FlashInfer-style page lists with its own scratch.
    const int q_heads = 8, kv_heads = 2, dim = 8, group = 4, total = 200, page = 16;
    const IntTokens tokens{99, q_heads, kv_heads, dim};
    for (const GqaAggregation mode : {GqaAggregation::max, GqaAggregation::sum, GqaAggregation::per_query_head}) {
        CAPTURE(mode_name(mode));
        const QuestPageSelector policy({.page_size = page, .token_budget = 80, .dense_layers = 0, .gqa = mode});
        KVCache<QuestPageSelector, CpuBackend, half> cache(CacheConfig{{1, q_heads, kv_heads, dim}, 32, 32, {}}, policy);
        const auto seq = cache.add_sequence();

        std::vector<std::vector<half>> buffers(kv_heads, std::vector<half>(policy.bounds_elements(total, dim), half(-7.0f)));
        const kvsparse::QuestScratchSizes scratch = policy.scratch_sizes(total, group);
        std::vector<float> scores(scratch.scores);
        std::vector<std::int32_t> order(scratch.order);
        const auto sizes = policy.page_list_sizes(0, kv_heads, group, total);
        CHECK(sizes.rows == static_cast<std::size_t>(mode == GqaAggregation::per_query_head ? kv_heads * group : kv_heads));
        CHECK(sizes.indices == sizes.rows * 5);
        std::vector<std::int32_t> indptr(sizes.indptr), indices(sizes.indices), last(sizes.last_page_len);
        std::vector<std::int32_t> c_indptr(sizes.indptr), c_indices(sizes.indices), c_last(sizes.last_page_len);

        for (int t = 0; t < total; ++t) {
            const auto k = tokens.keys(0, t, 1);
            cache.append(seq, 0, k, tokens.values(0, t, 1));
            for (int h = 0; h < kv_heads; ++h) {
                const auto bounds = KeyBounds<half>::packed(buffers[static_cast<std::size_t>(h)].data(), policy.bounds_pages(total), page, dim);
                kvsparse::append_key_bounds(bounds, t, k.data() + h * dim);
            }
            const auto q = tokens.queries(0, t);
            const PageLists mine{indptr, indices, last};
            indptr[0] = 0;
            std::int32_t row = 0;
            for (int h = 0; h < kv_heads; ++h) {
                const auto bounds = KeyBounds<half>::packed(buffers[static_cast<std::size_t>(h)].data(), policy.bounds_pages(total), page, dim);
                kvsparse::StreamState state;
                state.held = t + 1;
                state.next_position = t + 1;
                state.kv_head = h;
                state.bounds = KeyBoundsView::of(bounds, policy.pages_for(t + 1), scores, order);
                row += policy.write_page_lists(state, std::span<const float>(q).subspan(static_cast<std::size_t>(h * group * dim), static_cast<std::size_t>(group * dim)),
                                               group, mine, row);
            }
            REQUIRE(static_cast<std::size_t>(row) == sizes.rows);
            cache.select_pages(seq, 0, q, PageLists{c_indptr, c_indices, c_last});
            CAPTURE(t);
            REQUIRE(indptr == c_indptr);
            REQUIRE(std::vector<int>(indices.begin(), indices.begin() + indptr.back()) ==
                    std::vector<int>(c_indices.begin(), c_indices.begin() + c_indptr.back()));
            REQUIRE(last == c_last);
            REQUIRE(last[0] == t % page + 1);
        }
    }
}

namespace {

/// A backend with the kv_backend members only (no key-bounds primitives).
struct PlainBackend {
    struct stream_type {};
    static std::size_t workspace_bytes(std::int32_t, std::int32_t, std::int32_t) { return 0; }
    template <kvsparse::storage_type T>
    void write(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::span<const float>, std::span<const float>,
               std::int32_t, stream_type = {}) const {}
    template <kvsparse::storage_type T>
    void copy_slots(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::span<const std::int32_t>,
                    stream_type = {}) const {}
    void rope(std::span<float>, std::int32_t, std::int32_t, std::span<const std::int32_t>, kvsparse::Rope, stream_type = {}) const {}
    template <kvsparse::storage_type T>
    void shift_keys(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::int32_t, kvsparse::Rope,
                    stream_type = {}) const {}
    template <kvsparse::storage_type T>
    void attend(const kvsparse::AttendArgs<T>&, std::span<std::byte>, stream_type = {}) const {}
};

/// A policy with key bounds that also evicts: a ring of `window` slots after `sinks` pinned ones (the
/// AttentionSink placement), pages of 4. Its bounds must follow overwritten slots and prefill cuts.
struct RingWithBounds : kvsparse::AttentionSink {
    RingWithBounds() : kvsparse::AttentionSink({.sinks = 3, .window = 10}) {}
    std::int32_t bounds_page_size(std::int32_t, std::int32_t) const { return 4; }
};

}  // namespace

TEST_CASE("quest: bounds follow evictions / prefill cuts / K-shifts of other policies", "[quest][bounds]") {
    static_assert(kvsparse::kv_policy<RingWithBounds>);
    const int dim = 8;
    CacheConfig config{{1, 1, 1, dim}, 4, 16, kvsparse::Rope{}};
    config.inputs_rotated = true;
    KVCache<RingWithBounds, CpuBackend, half> cache(config, RingWithBounds{});
    const ref::Tokens tokens{17, 1, 1, dim};
    const auto seq = cache.add_sequence();
    const auto check_exact = [&](const char* when) {
        const kvsparse::StreamState state = cache.stream_state(seq, 0, 0);
        const auto view = cache.stream_view(seq, 0, 0);
        const auto b = state.bounds.typed<half>();
        for (int i = 0; i < state.bounds.pages; ++i) {
            for (int d = 0; d < dim; ++d) {
                float lo = std::numeric_limits<float>::infinity(), hi = -lo;
                for (int j = 4 * i; j < std::min<int>(static_cast<int>(state.positions.size()), 4 * i + 4); ++j) {
                    if (state.positions[static_cast<std::size_t>(j)] == kvsparse::free_slot) continue;
                    lo = std::min(lo, kvsparse::to_float(view.key(j)[d]));
                    hi = std::max(hi, kvsparse::to_float(view.key(j)[d]));
                }
                CAPTURE(when, i, d);
                CHECK(kvsparse::to_float(b.kmin(i)[d]) == lo);
                CHECK(kvsparse::to_float(b.kmax(i)[d]) == hi);
            }
        }
    };
    std::vector<float> out(static_cast<std::size_t>(20 * dim));
    cache.prefill(seq, 0, tokens.queries(0, 0, 20), tokens.keys(0, 0, 20), tokens.values(0, 0, 20), out);  // cut to 13
    check_exact("after a prefill cut");
    for (int t = 20; t < 45; ++t) {
        cache.append(seq, 0, tokens.keys(0, t, 1), tokens.values(0, t, 1));  // overwrites ring slots
        check_exact("after an evicting append");
    }
    cache.append(seq, 0, tokens.keys(0, 45, 3), tokens.values(0, 45, 3));  // several tokens in one call
    check_exact("after a three-token append");
    const std::vector<std::int32_t> turned{1, 5, 6, 11};
    cache.shift_keys(seq, 0, 0, turned, -7);
    check_exact("after a K-shift");
}

TEST_CASE("quest: configuration is checked / dense layers keep no bounds / budgets in pages", "[quest][config]") {
    // Bounds need a backend with the key-bounds primitives (the CUDA backend has none yet).
    CHECK_THROWS_AS((KVCache<QuestPageSelector, PlainBackend>(CacheConfig{{3, 2, 2, 8}, 16, 32, {}}, QuestPageSelector(16, 64, 2))),
                    kvsparse::invalid_argument);
    CHECK_NOTHROW(KVCache<QuestPageSelector, PlainBackend>(CacheConfig{{2, 2, 2, 8}, 16, 32, {}}, QuestPageSelector(16, 64, 2)));

    CHECK_THROWS_AS(QuestPageSelector(12, 64), kvsparse::invalid_argument);
    CHECK_THROWS_AS(QuestPageSelector(16, 0), kvsparse::invalid_argument);
    CHECK_THROWS_AS(QuestPageSelector(16, 64, -1), kvsparse::invalid_argument);
    const QuestPageSelector q(16, 100, 2);
    CHECK(q.page_budget() == 6);
    CHECK(QuestPageSelector(16, 8).page_budget() == 1);  // K = max(1, B / P)
    CHECK(q.bounds_page_size(0, 0) == 0);
    CHECK(q.bounds_page_size(1, 3) == 0);
    CHECK(q.bounds_page_size(2, 0) == 16);
    CHECK(q.capacity(5, 1) == kvsparse::unbounded);
    CHECK_FALSE(q.per_query_head());
    CHECK(QuestPageSelector(16, 64, 0, GqaAggregation::per_query_head).per_query_head());

    // Dense layers cost no metadata: 2 layers dense of 3, 2 KV heads, 40 tokens = 3 pages of 16.
    KVCache<QuestPageSelector> cache(CacheConfig{{3, 2, 2, 8}, 16, 32, {}}, q);
    const auto seq = cache.add_sequence();
    const ref::Tokens tokens{1, 2, 2, 8};
    std::vector<float> out(static_cast<std::size_t>(40 * 2 * 8));
    for (int l = 0; l < 3; ++l) cache.prefill(seq, l, tokens.queries(l, 0, 40), tokens.keys(l, 0, 40), tokens.values(l, 0, 40), out);
    CHECK(cache.memory(seq).metadata_bytes == 2 * 3 * 2 * 8 * 4);
    CHECK(cache.stream_state(seq, 0, 0).bounds.pages == 0);
    CHECK(cache.stream_state(seq, 2, 1).bounds.pages == 3);
}
