// Prefill of one attention head through KVCache<LServeHybrid>: a streaming head (block-sparse pattern:
// prefill_sink sink columns plus a local band of prefill_local) against the same head as a retrieval head
// (dense causal prefill), same tokens, same cache, same backend, in one run. Linked into kvsparse-bench.
//
//   Prefill/lserve_streaming/<tokens>  the streaming head: each query gathers only its visible keys
//                                      (sink range + local range), so the work is ~ tokens * (sink + local)
//   Prefill/lserve_dense/<tokens>      the retrieval head: dense causal, ~ tokens^2 / 2
//
// Shape: one layer, one KV head, one query head, head dimension 64, float32 storage, pages of 16; sink 64,
// local 512. Counters: keys_per_query (mean keys each query attends) and tokens_per_second.
// docs/lserve.md has the measured speedup and the command.

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include <kvsparse/kvsparse.hpp>

#include "random.hpp"

namespace {

using namespace kvsparse;

constexpr std::int32_t prefill_dim = 64;
constexpr std::int32_t prefill_sink = 64;
constexpr std::int32_t prefill_local = 512;

// Deterministic values in [-1, 1): the first value of a splitmix64 stream seeded with x.
float prefill_value(std::uint64_t x) { return bench::Random{x}.next(); }

void BM_Prefill(benchmark::State& state, HeadKind kind) {
    const auto tokens = static_cast<std::int32_t>(state.range(0));
    const std::size_t size = static_cast<std::size_t>(tokens) * prefill_dim;
    std::vector<float> q(size), k(size), v(size), out(size);
    for (std::size_t i = 0; i < size; ++i) {
        q[i] = prefill_value(3 * i);
        k[i] = prefill_value(3 * i + 1);
        v[i] = prefill_value(3 * i + 2);
    }
    const LServeHybrid policy(HeadKinds::all(1, 1, kind), {.sink = prefill_sink, .local = prefill_local});
    const CacheConfig config{{1, 1, 1, prefill_dim}, 16, tokens / 16 + 2, {}};
    KVCache<LServeHybrid> cache(config, policy);
    const SequenceId seq = cache.add_sequence();
    for (auto _ : state) {
        cache.reset_sequence(seq);
        cache.prefill(seq, 0, q, k, v, out);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    double keys = 0;
    for (std::int32_t i = 0; i < tokens; ++i) {
        const PrefillRanges r = policy.prefill_ranges(0, 0, i);
        for (std::int32_t j = 0; j < r.count; ++j) keys += r.ranges[static_cast<std::size_t>(j)].end - r.ranges[static_cast<std::size_t>(j)].begin;
    }
    state.counters["keys_per_query"] = keys / tokens;
    state.counters["tokens_per_second"] =
        benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(BM_Prefill, lserve_streaming, HeadKind::streaming)
    ->Name("Prefill/lserve_streaming")
    ->Arg(4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Prefill, lserve_dense, HeadKind::retrieval)
    ->Name("Prefill/lserve_dense")
    ->Arg(4096)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond);

}  // namespace
