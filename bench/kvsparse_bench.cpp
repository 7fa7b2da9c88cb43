// kvsparse-bench: CPU cost of a decode step for each policy at a Llama-3-8B layer shape (32 query heads,
// 8 KV heads, head dimension 128, float16 storage, page 16), next to a STREAM-style copy measured in the
// same run, so every result is also a fraction of the machine's memory bandwidth. docs/benchmarks.md has
// the results and the commands.
//
//   Copy/<bytes>               memcpy between two buffers, split over the backend's threads.
//                              bytes_per_second: bytes read plus bytes written per second of wall time
//                              (STREAM's convention).
//   Decode/<policy>/<context>  one decode attention of one layer at `context` tokens: KVCache::attend, i.e.
//                              the policy's selection and the attention over it. The benchmark's time is
//                              this step. The step cycles over enough layers that their K/V and metadata
//                              exceed the last-level cache several times, so every step reads from memory
//                              as in a real model (whose other layers run in between). Counters:
//                                select_ns           KVCache::select alone (same layers, same data)
//                                attend_ns           the rest of the step (step time - select_ns)
//                                bytes_read          K/V rows attended + policy metadata the step reads
//                                bandwidth_fraction  bytes_read / step time / copy bandwidth of this run
//   Append/<policy>/<context>  one decode append (8 KV heads of one layer) with the policy's placement,
//                              eviction and metadata update.
//   H2OUpdate/<context>        H2O's per-step eviction choice over its budget, for all 8 KV heads (the
//                              score accumulation itself is fused into attention, so it is in
//                              Decode/h2o).
//   Paired/<policy>/<context>  Decode/dense and Decode/<policy> steps in turns (100 pairs at least): the
//                              Quest goal's measure on a machine whose memory drifts. speedup: median
//                              ratio of a dense step to the policy's; dense_ns, step_ns: median steps.
//   Paired/dense/<context>     Decode/dense steps and 256 MiB copies in turns: the dense goal's measure.
//                              bandwidth_fraction: median over the pairs of the step's rate over the
//                              copy's; dense_ns, copy_bytes_per_second: the medians.
//   Read/4096                  the 256 MiB of the copy read in 4 KiB pages, in address order and
//                              shuffled, in turns: what scattered cache pages cost this machine's memory.
//                              scattered_fraction: median ratio of the shuffled rate to the in-order one.
//   Reads/quest/32768          the bytes of a Decode/dense step and of a Decode/quest step (bounds, then
//                              selected pages), read alone, without arithmetic, in turns. speedup: median
//                              ratio of the two, the Quest speedup this machine's reads allow right now.
//   PageScores/<isa>/2048      Quest's page scores of one KV head (4 query heads) over 2048 float16 bounds
//                              pages, from memory, on one thread. ns_per_page, bytes_per_second.
//   AttendKernel/<isa>/<keys>  the CPU attention kernel with one instruction set (avx512, avx2, portable;
//                              CpuBackend takes the widest the CPU has) for one KV head (4 query heads)
//                              over `keys` keys on one thread, the data in L2: the kernel's arithmetic
//                              apart from memory. ns_per_key: time per key (its K and V rows, 4 heads).
//
// Adding a policy is one line in register_policies(). The copy bandwidth every bandwidth_fraction divides
// by is measured once at start-up (the median of 12 copies of 256 MiB on all threads) and is in the JSON
// context as copy_bytes_per_second (the best of the 12: copy_best_bytes_per_second). When --benchmark_min_time is not given, 0.2 s is used. --threads=N
// runs the copy and the cache on N threads (default: the hardware's, CpuBackend's default).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvsparse/detail/huge_page_allocator.hpp>
#include <kvsparse/detail/thread_pool.hpp>
#include <kvsparse/kvsparse.hpp>
#include <kvsparse/policies/lserve.hpp>
#include <kvsparse/policies/quest.hpp>

#include "random.hpp"

namespace {

using namespace kvsparse;
using kvsparse::bench::Random;
using Storage = half;
using Clock = std::chrono::steady_clock;

// ---- shape -------------------------------------------------------------------------------------------

constexpr std::int32_t q_heads = 32;
constexpr std::int32_t kv_heads = 8;
constexpr std::int32_t head_dim = 128;
constexpr std::int32_t page_size = 16;
constexpr std::int32_t token_budget = 2048;  // every sparse policy reads about this many tokens per step
constexpr std::int64_t decode_contexts[] = {4096, 8192, 16384, 32768, 65536, 131072, 262144};
constexpr std::int64_t small_contexts[] = {4096, 32768};  // where the cost does not grow with the context
constexpr std::int64_t mib = std::int64_t{1} << 20;
constexpr std::int64_t token_bytes = 2 * head_dim * static_cast<std::int64_t>(sizeof(Storage));  // K + V row
/// Bytes the layers a Decode benchmark cycles over must read in all: four times a 32 MiB last-level cache,
/// so a layer's data is gone from the caches when its turn comes again (at twice, a dense step at 16K
/// still found part of its data there, the replacement not being strict LRU).
constexpr std::int64_t cold_bytes = 128 * mib;
constexpr std::int32_t max_layers = 16;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

/// The seconds f() takes.
template <class F>
double timed(F f) {
    const auto start = Clock::now();
    f();
    return seconds_since(start);
}

/// The median of `v` (not empty); sorts it.
double median(std::vector<double>& v) {
    std::sort(v.begin(), v.end());
    const std::size_t half = v.size() / 2;
    return v.size() % 2 ? v[half] : 0.5 * (v[half - 1] + v[half]);
}

/// The benchmarks' threads, the copy's as the attention's: CpuBackend's default (the hardware's) unless
/// --threads=N says otherwise.
int threads = detail::ThreadPool::default_threads();

detail::ThreadPool& pool() {
    static detail::ThreadPool instance(threads);
    return instance;
}

// ---- copy bandwidth ----------------------------------------------------------------------------------

struct Buffer {
    std::unique_ptr<std::byte[]> data;
    std::int64_t bytes = 0;

    explicit Buffer(std::int64_t n) : data(new std::byte[static_cast<std::size_t>(n)]), bytes(n) {
        // First touch on the threads that later use the memory.
        pool().parallel_for(pool().size(), [&](std::int64_t t) {
            const auto [begin, end] = share(t);
            std::memset(data.get() + begin, 1, static_cast<std::size_t>(end - begin));
        });
    }
    /// Bytes [begin, end) of thread t's part, cache-line aligned.
    std::pair<std::int64_t, std::int64_t> share(std::int64_t t) const {
        const std::int64_t threads = pool().size();
        const std::int64_t part = (bytes / threads + 63) / 64 * 64;
        return {std::min(bytes, t * part), std::min(bytes, (t + 1) * part)};
    }
};

/// One STREAM-style copy of `from` into `to`, every thread copying its share.
void copy(const Buffer& from, Buffer& to) {
    pool().parallel_for(pool().size(), [&](std::int64_t t) {
        const auto [begin, end] = from.share(t);
        std::memcpy(to.data.get() + begin, from.data.get() + begin, static_cast<std::size_t>(end - begin));
    });
}

/// Bytes of the copies every bandwidth_fraction compares with: far beyond the last-level cache.
constexpr std::int64_t reference_copy_bytes = 256 * mib;

/// Copy bandwidth (bytes read + bytes written per second) of 256 MiB copies, measured once: the median
/// of 12 (the reference of every bandwidth_fraction) and the best. On a shared machine the best of a few
/// copies can be far above what the same copy does most of the time (here up to 1.6x), while every Decode
/// time is a mean over many steps; the median compares like with like.
struct CopyRates {
    double median = 0.0;
    double best = 0.0;
};

const CopyRates& copy_rates() {
    static const CopyRates measured = [] {
        constexpr std::int64_t bytes = reference_copy_bytes;
        Buffer a(bytes), b(bytes);
        std::vector<double> seconds;
        for (int rep = 0; rep < 12; ++rep) seconds.push_back(timed([&] { copy(rep % 2 ? b : a, rep % 2 ? a : b); }));
        const double typical = median(seconds);  // sorts them
        return CopyRates{2.0 * static_cast<double>(bytes) / typical, 2.0 * static_cast<double>(bytes) / seconds.front()};
    }();
    return measured;
}

double copy_bandwidth() { return copy_rates().median; }

void BM_Copy(benchmark::State& state, std::int64_t bytes) {
    Buffer a(bytes), b(bytes);
    const auto start = Clock::now();
    for (auto _ : state) {
        copy(a, b);
        benchmark::ClobberMemory();
    }
    // Over wall time: Google Benchmark's own rates divide by the main thread's CPU time.
    const double seconds = seconds_since(start);
    state.counters["bytes_per_second"] = 2.0 * static_cast<double>(bytes) * static_cast<double>(state.iterations()) / seconds;
    state.counters["threads"] = static_cast<double>(pool().size());
}

// ---- synthetic caches ----------------------------------------------------------------------------------

/// A cache of `layers` layers holding one sequence of `context` tokens (decode appends of random keys and
/// values), one random query per layer, room for `extra` more tokens per layer.
template <class Policy>
struct Filled {
    std::int32_t layers;
    KVCache<Policy, CpuBackend, Storage> cache;
    SequenceId seq;
    std::vector<std::vector<float>> queries;
    std::vector<float> out;

    static std::int32_t pool_pages(const Policy& policy, std::int32_t layers, std::int64_t tokens) {
        std::int64_t pages = 0;
        for (std::int32_t l = 0; l < layers; ++l) {
            for (std::int32_t h = 0; h < kv_heads; ++h) {
                const std::int64_t held = std::min<std::int64_t>(tokens, policy.capacity(l, h));
                pages += (held + page_size - 1) / page_size + 1;
            }
        }
        return static_cast<std::int32_t>(pages);
    }

    Filled(const Policy& policy, std::int32_t layers_, std::int64_t context, std::int64_t extra = 0)
        : layers(layers_),
          cache(CacheConfig{.shape = {layers_, q_heads, kv_heads, head_dim},
                            .page_size = page_size,
                            .num_pages = pool_pages(policy, layers_, context + extra)},
                policy, CpuBackend({.threads = threads})),
          seq(cache.add_sequence()),
          out(static_cast<std::size_t>(q_heads * head_dim)) {
        Random random{0x5eed0000u + static_cast<std::uint64_t>(context)};
        constexpr std::int64_t chunk = 1024;
        std::vector<float> keys, values;
        for (std::int32_t layer = 0; layer < layers; ++layer) {
            for (std::int64_t done = 0; done < context; done += chunk) {
                const std::int64_t n = std::min(chunk, context - done);
                keys.resize(static_cast<std::size_t>(n * kv_heads * head_dim));
                values.resize(keys.size());
                random.fill(keys);
                random.fill(values);
                cache.append(seq, layer, keys, values);
            }
            queries.emplace_back(out.size());
            random.fill(queries.back());
        }
    }

    /// One decode attention of `layer`'s query.
    void step(std::int32_t layer) {
        cache.attend(seq, layer, queries[static_cast<std::size_t>(layer)], out);
        benchmark::DoNotOptimize(out.data());
    }

    /// One decode attention of the next layer in a cycle over the layers.
    void step_next() {
        step(next_layer);
        next_layer = next_layer + 1 == layers ? 0 : next_layer + 1;
    }
    std::int32_t next_layer = 0;

    /// Bytes a decode step of `layer` reads: the K/V rows of every selected set, plus the policy's metadata:
    /// per-page key bounds (two vectors per page, in the storage type) and accumulated scores (a float per
    /// held token, read and written back by the fused accumulation).
    std::int64_t step_bytes(std::int32_t layer, Selection& selection) {
        cache.select(seq, layer, queries[static_cast<std::size_t>(layer)], selection);
        std::int64_t bytes = static_cast<std::int64_t>(selection.slots.size()) * token_bytes;
        const Policy& policy = cache.policy();
        for (std::int32_t h = 0; h < kv_heads; ++h) {
            const StreamState s = cache.stream_state(seq, layer, h);
            const std::int32_t bounds_page = policy.bounds_page_size(layer, h);
            if (bounds_page > 0) {
                const std::int64_t pages = (static_cast<std::int64_t>(s.positions.size()) + bounds_page - 1) / bounds_page;
                bytes += pages * token_bytes;
            }
            if (policy.accumulates_attention()) bytes += std::int64_t{s.held} * static_cast<std::int64_t>(sizeof(float));
        }
        return bytes;
    }
};

/// Filling a long context takes seconds, and Google Benchmark calls a benchmark several times while it
/// settles the iteration count: the last two caches built stay (Paired/ needs dense and its policy at
/// once) until others are asked for.
struct FixtureSlot {
    std::string key;
    std::shared_ptr<void> object;  // whatever its policy
};

template <class Policy>
Filled<Policy>& fixture(const std::string& key, const Policy& policy, std::int32_t layers, std::int64_t context,
                        std::int64_t extra = 0) {
    static std::array<FixtureSlot, 2> slots;  // [0] the most recently used
    if (slots[1].key == key && slots[1].object) std::swap(slots[0], slots[1]);
    if (slots[0].key != key || !slots[0].object) {
        slots[1] = {};  // the older one goes before the new one is built
        std::swap(slots[0], slots[1]);
        slots[0].object = std::make_shared<Filled<Policy>>(policy, layers, context, extra);
        slots[0].key = key;
    }
    return *static_cast<Filled<Policy>*>(slots[0].object.get());
}

// ---- decode ------------------------------------------------------------------------------------------

/// make(layers) gives the policy for a cache of that many layers (LServe's head kinds are per layer).
template <class Make>
using PolicyOf = std::invoke_result_t<const Make&, std::int32_t>;

/// The layers a decode step of policy `name` at `context` cycles over: enough that one pass over them
/// reads cold_bytes. The bytes of one step come from a one-layer probe (the same data as layer 0 of the
/// real fixture), once per benchmark.
template <class Make>
std::int32_t decode_layers(const std::string& name, const Make& make, std::int64_t context) {
    static std::map<std::string, std::int64_t> probed;
    const std::string key = name + "/" + std::to_string(context);
    if (!probed.contains(key)) {
        Filled<PolicyOf<Make>> probe(make(1), 1, context);
        Selection selection;
        probed[key] = probe.step_bytes(0, selection);
    }
    const std::int64_t bytes_per_step = probed[key];
    return static_cast<std::int32_t>(std::clamp<std::int64_t>((cold_bytes + bytes_per_step - 1) / bytes_per_step, 1, max_layers));
}

/// The fixture of Decode/<name>/<context>.
template <class Make>
Filled<PolicyOf<Make>>& decode_fixture(const std::string& name, const Make& make, std::int64_t context) {
    const std::int32_t layers = decode_layers(name, make, context);
    return fixture("decode/" + name + "/" + std::to_string(context), make(layers), layers, context);
}

const auto make_dense = [](std::int32_t) { return Dense{}; };

template <class Make>
void BM_Decode(benchmark::State& state, const std::string& name, const Make& make, std::int64_t context) {
    auto& f = decode_fixture(name, make, context);
    const std::int32_t layers = f.layers;

    Selection selection;
    std::int64_t bytes = 0, tokens = 0;
    for (std::int32_t l = 0; l < layers; ++l) {
        bytes += f.step_bytes(l, selection);
        tokens += static_cast<std::int64_t>(selection.slots.size());
        f.step(l);  // scratch grows once
    }

    const auto start = Clock::now();
    for (auto _ : state) f.step_next();
    const double step = seconds_since(start) / static_cast<double>(state.iterations());

    // The selection alone, over the same cycle of layers.
    const std::int64_t selects = std::max<std::int64_t>(layers, std::min<std::int64_t>(state.iterations(), 4 * layers));
    const auto select_start = Clock::now();
    for (std::int64_t i = 0; i < selects; ++i) {
        const auto l = static_cast<std::size_t>(i % layers);
        f.cache.select(f.seq, static_cast<std::int32_t>(l), f.queries[l], selection);
        benchmark::DoNotOptimize(selection.slots.data());
    }
    const double select = std::min(seconds_since(select_start) / static_cast<double>(selects), step);

    const double mean_bytes = static_cast<double>(bytes) / layers;
    state.counters["select_ns"] = select * 1e9;
    state.counters["attend_ns"] = (step - select) * 1e9;
    state.counters["bytes_read"] = mean_bytes;
    state.counters["bandwidth_fraction"] = mean_bytes / step / copy_bandwidth();
    state.counters["tokens_read"] = static_cast<double>(tokens) / layers;
    state.counters["layers"] = layers;
    state.counters["threads"] = static_cast<double>(pool().size());
}

/// The seconds of two things timed in turns, pair by pair.
struct TimedPairs {
    std::vector<double> first, second;

    /// first[i] / second[i] for every pair.
    std::vector<double> ratios() const {
        std::vector<double> r(first.size());
        for (std::size_t i = 0; i < r.size(); ++i) r[i] = first[i] / second[i];
        return r;
    }
};

/// Times first() and second() (each returns its seconds) in turns, once per iteration and at least 100
/// times, whatever --benchmark_min_time allows: a neighbour's burst of a few milliseconds can be most of
/// a short run, and the medians taken of the pairs should not see it. On a shared machine the memory
/// bandwidth drifts over seconds (here up to 1.5x between runs a minute apart), so two benchmarks run one
/// after the other can each see another machine; a pair a few milliseconds apart sees the same one.
template <class First, class Second>
TimedPairs in_turns(benchmark::State& state, First first, Second second) {
    TimedPairs t;
    const auto pair = [&] {
        t.first.push_back(first());
        t.second.push_back(second());
    };
    for (auto _ : state) pair();
    while (t.first.size() < 100) pair();
    return t;
}

/// Paired/<name>/<context>: Decode/dense/<context> and Decode/<name>/<context> in turns: one dense step,
/// then a step of every layer of the policy's cache. speedup: the median ratio of the dense step to the
/// policy's mean step; dense_ns and step_ns: the median steps.
template <class Make>
void BM_Paired(benchmark::State& state, const std::string& name, const Make& make, std::int64_t context) {
    auto& dense = decode_fixture("dense", make_dense, context);
    auto& f = decode_fixture(name, make, context);
    for (std::int32_t l = 0; l < f.layers; ++l) f.step(l);  // scratch grows once
    dense.step(0);

    TimedPairs t = in_turns(
        state, [&] { return timed([&] { dense.step_next(); }); },
        [&] { return timed([&] { for (std::int32_t l = 0; l < f.layers; ++l) f.step(l); }) / f.layers; });
    auto ratios = t.ratios();
    state.counters["speedup"] = median(ratios);
    state.counters["dense_ns"] = median(t.first) * 1e9;
    state.counters["step_ns"] = median(t.second) * 1e9;
    state.counters["threads"] = static_cast<double>(pool().size());
}

/// Paired/dense/<context>: Decode/dense/<context> and the 256 MiB copy of copy_rates() in turns, for a
/// bandwidth fraction whose two rates saw the same machine (Decode's compares a step with a copy timed
/// once, seconds or minutes away). bandwidth_fraction: the median over the pairs of the step's bytes
/// read per second over the copy's bytes read and written per second; dense_ns: the median step;
/// copy_bytes_per_second: the median copy.
void BM_PairedCopy(benchmark::State& state, std::int64_t context) {
    auto& dense = decode_fixture("dense", make_dense, context);
    Selection selection;
    const double step_bytes = static_cast<double>(dense.step_bytes(0, selection));
    constexpr std::int64_t copy_bytes = reference_copy_bytes;
    static Buffer from(copy_bytes), to(copy_bytes);
    dense.step(0);

    TimedPairs t = in_turns(
        state, [&] { return timed([&] { dense.step_next(); }); }, [&] { return timed([&] { copy(from, to); }); });
    // (step_bytes / step) / (2 copy_bytes / copy) = (copy / step) * step_bytes / (2 copy_bytes)
    auto fractions = t.ratios();
    for (double& f : fractions) f = step_bytes / (2.0 * copy_bytes) / f;
    state.counters["bandwidth_fraction"] = median(fractions);
    state.counters["dense_ns"] = median(t.first) * 1e9;
    state.counters["copy_bytes_per_second"] = 2.0 * copy_bytes / median(t.second);
    state.counters["threads"] = static_cast<double>(pool().size());
}

/// The sum of the 64-bit words of [p, p + bytes): a plain read the compiler cannot drop.
std::uint64_t sum_words(const std::byte* p, std::int64_t bytes) {
    std::uint64_t sum = 0;
    for (std::int64_t w = 0; w < bytes; w += 8) {
        std::uint64_t word;
        std::memcpy(&word, p + w, sizeof word);
        sum += word;
    }
    return sum;
}

/// Read/4096: 256 MiB (on huge pages where the system gives them, as KVCache's pool) read in 4 KiB pages on
/// all threads, in address order and in a shuffled order, in turns; the reads go a row of 256 bytes at a
/// time, asking for the same row of the next page in that order (4 KiB on), as the attention's score pass
/// does. A cache page of one KV head's keys is 4 KiB: a dense step reads runs of such pages, Quest's
/// attention pages scattered over the pool. scattered_fraction: the median over the pairs of the shuffled
/// rate over the in-order rate; in_order_bytes_per_second, scattered_bytes_per_second: the median rates.
void BM_Read(benchmark::State& state) {
    constexpr std::int64_t bytes = reference_copy_bytes, page = 4096, row = 256, pages = bytes / page;
    static std::vector<std::byte, detail::HugePageAllocator<std::byte>> data(static_cast<std::size_t>(bytes), std::byte{1});
    std::vector<std::int32_t> in_order(static_cast<std::size_t>(pages));
    std::iota(in_order.begin(), in_order.end(), 0);
    std::vector<std::int32_t> shuffled = in_order;
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(7));
    const auto read = [&](const std::vector<std::int32_t>& order) {
        return timed([&] {
            pool().parallel_for(pool().size(), [&](std::int64_t t) {
                const std::int64_t part = (pages + pool().size() - 1) / pool().size();
                const std::int64_t first = t * part, end = std::min(pages, first + part);
                const auto at = [&](std::int64_t i) { return data.data() + std::int64_t{order[static_cast<std::size_t>(i)]} * page; };
                std::uint64_t sum = 0;
                for (std::int64_t i = first; i < end; ++i) {
                    const std::byte* here = at(i);
                    const std::byte* next = at(std::min(i + 1, end - 1));
                    for (std::int64_t r = 0; r < page; r += row) {
                        detail::cpu::prefetch_row(next + r, row);
                        sum += sum_words(here + r, row);
                    }
                }
                benchmark::DoNotOptimize(sum);
            });
        });
    };
    TimedPairs t = in_turns(state, [&] { return read(in_order); }, [&] { return read(shuffled); });
    auto fractions = t.ratios();  // in-order time / shuffled time = shuffled rate / in-order rate
    state.counters["scattered_fraction"] = median(fractions);
    state.counters["in_order_bytes_per_second"] = static_cast<double>(bytes) / median(t.first);
    state.counters["scattered_bytes_per_second"] = static_cast<double>(bytes) / median(t.second);
    state.counters["threads"] = static_cast<double>(pool().size());
}

/// What one decode step of a layer reads, per KV head: its key bounds (one run; none without them), then
/// the K and V rows of its selected set, as runs of rows within a cache page.
struct StepReads {
    struct Run {
        const std::byte* keys;
        const std::byte* values;
        std::int64_t rows;
    };
    struct Head {
        const std::byte* bounds = nullptr;
        std::int64_t bounds_bytes = 0;
        std::vector<Run> runs;
    };
    std::vector<Head> heads;

    template <class Policy>
    StepReads(Filled<Policy>& f, std::int32_t layer) : heads(static_cast<std::size_t>(kv_heads)) {
        Selection selection;
        f.cache.select(f.seq, layer, f.queries[static_cast<std::size_t>(layer)], selection);
        for (std::int32_t h = 0; h < kv_heads; ++h) {
            Head& head = heads[static_cast<std::size_t>(h)];
            const KeyBoundsView bounds = f.cache.stream_state(f.seq, layer, h).bounds;
            head.bounds = static_cast<const std::byte*>(bounds.data);
            head.bounds_bytes = std::int64_t{bounds.pages} * bounds.page_stride * static_cast<std::int64_t>(sizeof(Storage));
            const StreamView<Storage> view = f.cache.stream_view(f.seq, layer, h);
            std::int32_t previous = -2;
            for (const std::int32_t slot : selection.slots_of(h)) {
                if (slot == previous + 1 && slot % page_size != 0) {
                    ++head.runs.back().rows;
                } else {
                    head.runs.push_back({reinterpret_cast<const std::byte*>(view.key(slot)),
                                         reinterpret_cast<const std::byte*>(view.value(slot)), 1});
                }
                previous = slot;
            }
        }
    }

    /// Reads it all on the benchmark's threads, a KV head per task, asking for what comes next as the
    /// library's kernels do: the bounds detail::cpu::bounds_ahead_bytes ahead, non-temporally; each K and V
    /// row the same row of the next run (a cache page on, as Read/4096).
    void read() const {
        constexpr std::int64_t row = head_dim * static_cast<std::int64_t>(sizeof(Storage));
        constexpr auto ahead = static_cast<std::int64_t>(detail::cpu::bounds_ahead_bytes);
        pool().parallel_for(kv_heads, [&](std::int64_t h) {
            const Head& head = heads[static_cast<std::size_t>(h)];
            std::uint64_t sum = 0;
            for (std::int64_t b = 0; b < head.bounds_bytes; b += row) {
                if (b + ahead < head.bounds_bytes) detail::cpu::prefetch_row<0>(head.bounds + b + ahead, row);
                sum += sum_words(head.bounds + b, row);
            }
            for (std::size_t i = 0; i < head.runs.size(); ++i) {
                const Run& here = head.runs[i];
                const Run& next = head.runs[std::min(i + 1, head.runs.size() - 1)];
                for (std::int64_t r = 0; r < here.rows * row; r += row) {
                    detail::cpu::prefetch_row(next.keys + r, row);
                    detail::cpu::prefetch_row(next.values + r, row);
                    sum += sum_words(here.keys + r, row) + sum_words(here.values + r, row);
                }
            }
            benchmark::DoNotOptimize(sum);
        });
    }
};

/// Reads/<name>/<context>: the bytes a decode step reads (Decode's bytes_read), read alone, without the
/// arithmetic, in the step's order and pattern: a dense step's (Decode/dense/<context>, its runs of
/// pages) and a step of every layer of the policy's cache (its bounds, then its selected pages), in turns
/// as in Paired/. speedup: the median ratio of the dense reads to the policy's mean layer, the speedup
/// Paired/ would show if both steps took only the time their reads take on this machine now (for Quest,
/// not the 8x of the bound, which counts bytes: scattered pages read more slowly than runs of pages, see
/// Read/4096); dense_ns and step_ns: the median reads.
template <class Make>
void BM_Reads(benchmark::State& state, const std::string& name, const Make& make, std::int64_t context) {
    auto& dense = decode_fixture("dense", make_dense, context);
    auto& f = decode_fixture(name, make, context);
    std::vector<StepReads> dense_reads, reads;
    for (std::int32_t l = 0; l < dense.layers; ++l) dense_reads.emplace_back(dense, l);
    for (std::int32_t l = 0; l < f.layers; ++l) reads.emplace_back(f, l);
    std::size_t next = 0;

    TimedPairs t = in_turns(
        state,
        [&] {
            next = (next + 1) % dense_reads.size();
            return timed([&] { dense_reads[next].read(); });
        },
        [&] { return timed([&] { for (const StepReads& r : reads) r.read(); }) / static_cast<double>(reads.size()); });
    auto ratios = t.ratios();
    state.counters["speedup"] = median(ratios);
    state.counters["dense_ns"] = median(t.first) * 1e9;
    state.counters["step_ns"] = median(t.second) * 1e9;
    state.counters["threads"] = static_cast<double>(pool().size());
}

// ---- append and H2O update -----------------------------------------------------------------------------

constexpr std::int64_t append_room = 16384;  // tokens appended before the cache is put back to `context`

template <class Make>
void BM_Append(benchmark::State& state, const std::string& name, const Make& make, std::int64_t context) {
    using Policy = PolicyOf<Make>;
    const Filled<Policy>& pristine = fixture("append/" + name + "/" + std::to_string(context), make(1), 1, context, append_room);
    auto f = std::make_unique<Filled<Policy>>(pristine);
    Random random{0xa99e9du};
    std::vector<float> key(static_cast<std::size_t>(kv_heads * head_dim)), value(key.size());
    random.fill(key);
    random.fill(value);
    std::int64_t appended = 0;
    for (auto _ : state) {
        if (appended == append_room) {
            state.PauseTiming();
            *f = pristine;
            appended = 0;
            state.ResumeTiming();
        }
        f->cache.append(f->seq, 0, key, value);
        ++appended;
        benchmark::ClobberMemory();
    }
}

void BM_H2OUpdate(benchmark::State& state, std::int64_t context) {
    const H2OHeavyHitter policy(token_budget / 2, token_budget / 2);
    Filled<H2OHeavyHitter>& f = fixture("h2o-update/" + std::to_string(context), policy, 1, context);
    f.step(0);  // scores that are not all zero
    for (auto _ : state) {
        for (std::int32_t h = 0; h < kv_heads; ++h) benchmark::DoNotOptimize(policy.place(f.cache.stream_state(f.seq, 0, h)));
    }
}

/// The CPU attention kernel with one instruction set (detail::cpu::attend_with: what CpuBackend::attend
/// runs, the widest the CPU has) for one KV head (its group of 4 query heads) over `keys` keys in shuffled
/// pages, on the calling thread, the same data every iteration: with a few thousand keys they stay in L2,
/// so this times the kernel's arithmetic apart from memory (a regression in the generated code shows here
/// first). Skipped where the CPU lacks the instruction set.
void BM_AttendKernel(benchmark::State& state, detail::cpu::Isa isa, std::int32_t keys) {
    const std::int32_t group = q_heads / kv_heads, pages = keys / page_size;
    std::vector<Storage> k(static_cast<std::size_t>(keys) * head_dim), v(k.size());
    Random random{7};
    for (std::size_t i = 0; i < k.size(); ++i) {
        k[i] = Storage(random.next());
        v[i] = Storage(random.next());
    }
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages)), slots(static_cast<std::size_t>(keys));
    for (std::int32_t p = 0; p < pages; ++p) table[static_cast<std::size_t>(p)] = (p * 7919) % pages;  // 7919: prime
    for (std::int32_t j = 0; j < keys; ++j) slots[static_cast<std::size_t>(j)] = j;
    std::vector<float> queries(static_cast<std::size_t>(group) * head_dim), out(queries.size());
    random.fill(queries);
    std::vector<std::byte> workspace(CpuBackend::workspace_bytes(group, keys, head_dim));
    AttendArgs<Storage> args;
    args.stream = {.keys = PagePoolView<Storage>::packed(k.data(), Layout::HND, pages, page_size, 1, head_dim),
                   .values = PagePoolView<Storage>::packed(v.data(), Layout::HND, pages, page_size, 1, head_dim),
                   .table = {table.data(), pages},
                   .head = 0};
    args.slots = slots;
    args.queries = queries;
    args.group = group;
    args.scale = 0.08838834764f;  // 1 / sqrt(128)
    args.out = out;
    const detail::cpu::Scratch scratch = detail::cpu::carve(workspace, static_cast<std::size_t>(group),
                                                            static_cast<std::size_t>(keys), static_cast<std::size_t>(head_dim));
    if (!detail::cpu::attend_with(isa, args, scratch)) {
        state.SkipWithError("this CPU has no such path");
        return;
    }
    for (auto _ : state) {
        std::fill(out.begin(), out.end(), 0.0f);  // attend_with adds into a zeroed output
        detail::cpu::attend_with(isa, args, scratch);
        benchmark::DoNotOptimize(out.data());
    }
    state.counters["ns_per_key"] = benchmark::Counter(static_cast<double>(keys) * static_cast<double>(state.iterations()),
                                                      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

/// Quest's page scores of one KV head (its 4 query heads, GQA max) over `pages` pages of float16 bounds
/// with one instruction set, on the calling thread, each iteration the next head of enough heads that
/// their bounds exceed the last-level cache several times: the scoring as a decode step does it, from
/// memory. bytes_per_second: bounds read per second.
void BM_PageScores(benchmark::State& state, detail::cpu::Isa isa, std::int32_t pages) {
    if (isa != detail::cpu::Isa::portable && detail::cpu::page_rows_simd<Storage>(head_dim, isa) == nullptr) {
        state.SkipWithError("this CPU has no such path");
        return;
    }
    const std::int32_t group = q_heads / kv_heads;
    const std::size_t per_head = KeyBounds<Storage>::elements(pages, head_dim);
    const std::int64_t heads = std::max<std::int64_t>(1, 2 * cold_bytes / static_cast<std::int64_t>(per_head * sizeof(Storage)));
    std::vector<Storage, detail::HugePageAllocator<Storage>> bounds(static_cast<std::size_t>(heads) * per_head);
    Random random{11};
    for (Storage& x : bounds) x = Storage(random.next());
    std::vector<float> queries(static_cast<std::size_t>(group) * head_dim), scores(static_cast<std::size_t>(pages));
    random.fill(queries);
    std::int64_t head = 0;
    for (auto _ : state) {
        const auto view = KeyBounds<Storage>::packed(bounds.data() + static_cast<std::size_t>(head) * per_head, pages, page_size, head_dim);
        detail::pages::page_scores(view, pages, queries, group, GqaAggregation::max, scores, isa);
        benchmark::DoNotOptimize(scores.data());
        head = head + 1 == heads ? 0 : head + 1;
    }
    state.counters["ns_per_page"] = benchmark::Counter(static_cast<double>(pages) * static_cast<double>(state.iterations()),
                                                       benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
    state.counters["bytes_per_second"] = benchmark::Counter(static_cast<double>(per_head * sizeof(Storage)) * static_cast<double>(state.iterations()),
                                                            benchmark::Counter::kIsRate);
}

// ---- registration --------------------------------------------------------------------------------------

/// Decode/<name>/<context> at every context, Append/<name>/<context> at the small ones. make(layers) gives
/// the policy for a cache of `layers` layers.
template <class Make>
void add_policy(const std::string& name, Make make) {
    for (const std::int64_t context : decode_contexts) {
        benchmark::RegisterBenchmark(("Decode/" + name + "/" + std::to_string(context)).c_str(),
                                     [=](benchmark::State& s) { BM_Decode(s, name, make, context); })
            ->Unit(benchmark::kMicrosecond);
    }
    for (const std::int64_t context : small_contexts) {
        benchmark::RegisterBenchmark(("Paired/" + name + "/" + std::to_string(context)).c_str(),
                                     [=](benchmark::State& s) {
                                         if (name == "dense") {
                                             BM_PairedCopy(s, context);  // dense's pair is the copy
                                         } else {
                                             BM_Paired(s, name, make, context);
                                         }
                                     })
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark(("Append/" + name + "/" + std::to_string(context)).c_str(),
                                     [=](benchmark::State& s) { BM_Append(s, name, make, context); })
            ->Unit(benchmark::kMicrosecond);
    }
}

/// LServe at the benchmark's budget: every other KV head streams (static sparsity 0.5, sink 64 + local
/// 512), the others retrieve 2048 tokens in physical pages of 64. A fresh selection every step
/// (reuse_interval 1): the benchmark repeats one step, so a longer interval would time only reuses; this
/// is the most a step costs, with interval I only 1 step in I pays for the scoring.
LServeHybrid lserve(std::int32_t layers) {
    std::vector<std::vector<bool>> streaming(static_cast<std::size_t>(layers), std::vector<bool>(kv_heads));
    for (auto& row : streaming)
        for (std::size_t h = 0; h < row.size(); h += 2) row[h] = true;
    return LServeHybrid(HeadKinds::from_mask(streaming),
                        {.sink = 64, .local = 512, .logical_page = page_size, .physical_page = 64,
                         .token_budget = token_budget, .reuse_interval = 1});
}

void register_policies() {
    // One line per policy; every sparse one reads about token_budget tokens per step (per KV head).
    add_policy("dense", make_dense);
    add_policy("window", [](std::int32_t) { return SlidingWindow(token_budget); });
    add_policy("sink", [](std::int32_t) { return AttentionSink({.sinks = 4, .window = token_budget - 4}); });
    add_policy("h2o", [](std::int32_t) { return H2OHeavyHitter(token_budget / 2, token_budget / 2); });
    const auto quest = [](std::int32_t) {
        return QuestPageSelector({.page_size = page_size, .token_budget = token_budget, .dense_layers = 0});
    };
    add_policy("quest", quest);
    add_policy("lserve", lserve);
    // The Quest goal's context: what its step and dense's take when they only read.
    benchmark::RegisterBenchmark("Reads/quest/32768", [=](benchmark::State& s) { BM_Reads(s, "quest", quest, 32768); })
        ->Unit(benchmark::kMicrosecond);
}

void register_all() {
    for (const std::int64_t bytes : {4 * mib, 256 * mib}) {
        benchmark::RegisterBenchmark(("Copy/" + std::to_string(bytes)).c_str(),
                                     [=](benchmark::State& s) { BM_Copy(s, bytes); })
            ->Unit(benchmark::kMicrosecond);
    }
    benchmark::RegisterBenchmark("Read/4096", BM_Read)->Unit(benchmark::kMicrosecond);
    register_policies();
    using detail::cpu::Isa;
    for (const auto& path : {std::pair{Isa::avx512, "avx512"}, std::pair{Isa::avx2, "avx2"}, std::pair{Isa::portable, "portable"}}) {
        const Isa isa = path.first;  // a copy: clang 14 cannot capture a structured binding
        for (const std::int32_t keys : {1024, 4096}) {
            benchmark::RegisterBenchmark(("AttendKernel/" + std::string(path.second) + "/" + std::to_string(keys)).c_str(),
                                         [=](benchmark::State& s) { BM_AttendKernel(s, isa, keys); })
                ->Unit(benchmark::kMicrosecond);
        }
        benchmark::RegisterBenchmark(("PageScores/" + std::string(path.second) + "/2048").c_str(),
                                     [=](benchmark::State& s) { BM_PageScores(s, isa, 2048); })
            ->Unit(benchmark::kMicrosecond);
    }
    for (const std::int64_t context : small_contexts) {
        benchmark::RegisterBenchmark(("H2OUpdate/" + std::to_string(context)).c_str(),
                                     [=](benchmark::State& s) { BM_H2OUpdate(s, context); })
            ->Unit(benchmark::kMicrosecond);
    }
}

}  // namespace

int main(int argc, char** argv) {
    // 0.2 s per benchmark unless the command line says otherwise.
    std::vector<char*> args(argv, argv + argc);
    std::string min_time = "--benchmark_min_time=0.2";
    if (std::none_of(args.begin(), args.end(), [](const char* a) { return std::string_view(a).starts_with("--benchmark_min_time"); }))
        args.insert(args.begin() + 1, min_time.data());
    // Our own option: --threads=N (default: the hardware's).
    const auto ours = std::find_if(args.begin(), args.end(), [](const char* a) { return std::string_view(a).starts_with("--threads="); });
    if (ours != args.end()) {
        threads = std::max(1, std::atoi(*ours + std::strlen("--threads=")));
        args.erase(ours);
    }
    const bool listing = std::any_of(args.begin(), args.end(), [](const char* a) {
        const std::string_view s(a);
        return s == "--benchmark_list_tests" || s == "--benchmark_list_tests=true";
    });
    int count = static_cast<int>(args.size());
    benchmark::Initialize(&count, args.data());
    if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
    register_all();
    benchmark::AddCustomContext("kvsparse_threads", std::to_string(pool().size()));
    benchmark::AddCustomContext("kvsparse_shape", "q_heads 32, kv_heads 8, head_dim 128, float16, page 16");
    benchmark::AddCustomContext("kvsparse_token_budget", std::to_string(token_budget));
    // The reference of every bandwidth_fraction, measured once before any benchmark runs (not to list them).
    if (!listing) {
        benchmark::AddCustomContext("copy_bytes_per_second", std::to_string(copy_rates().median));
        benchmark::AddCustomContext("copy_best_bytes_per_second", std::to_string(copy_rates().best));
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
