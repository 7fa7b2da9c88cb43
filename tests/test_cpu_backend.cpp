// CpuBackend's attention kernel and thread pool: the vectorized path and the portable one against a double
// reference over shapes the model tests do not reach (large groups, head dimensions that are not a multiple
// of 8 or 16, shuffled slots, pages of any size), exact float16 widening, the vectorized exponential, and
// outputs that do not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "random_bounds.hpp"

#include <kvsparse/detail/cpu_attention.hpp>
#include <kvsparse/detail/cpu_convert.hpp>
#include <kvsparse/detail/cpu_page_scores_simd.hpp>
#include <kvsparse/detail/cpu_page_select.hpp>
#include <kvsparse/detail/huge_page_allocator.hpp>
#include <kvsparse/detail/thread_pool.hpp>
#include <kvsparse/kvsparse.hpp>
#include <kvsparse/policies/quest.hpp>

// Counts heap allocations while `counting` is set (any thread), for the no-allocation check below.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

// GCC pairs the library's inlined deletes with these malloc / free and warns; the pairing is right.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t size) {
    if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using kvsparse::AttendArgs;
using kvsparse::bfloat16;
using kvsparse::CpuBackend;
using kvsparse::half;

constexpr double tolerance = 1e-5;  // float32 attention against double, outputs of magnitude <= 1

/// K/V of one stream in a packed pool of `page_size`-token pages, slots scattered over shuffled pages.
template <class T>
struct Pool {
    int dim, page_size, pages;
    std::vector<T> keys, values;
    std::vector<std::int32_t> table;

    Pool(int dim_, int page_size_, int tokens, std::mt19937& rng)
        : dim(dim_), page_size(page_size_), pages((tokens + page_size_ - 1) / page_size_ + 1) {
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        keys.resize(static_cast<std::size_t>(pages) * static_cast<std::size_t>(page_size) * static_cast<std::size_t>(dim));
        values.resize(keys.size());
        for (T& x : keys) x = kvsparse::from_float<T>(u(rng));
        for (T& x : values) x = kvsparse::from_float<T>(u(rng));
        table.resize(static_cast<std::size_t>(pages));
        std::iota(table.begin(), table.end(), 0);
        std::shuffle(table.begin(), table.end(), rng);
    }
    kvsparse::StreamView<T> view() {
        using View = kvsparse::PagePoolView<T>;
        return {View::packed(keys.data(), kvsparse::Layout::NHD, pages, page_size, 1, dim),
                View::packed(values.data(), kvsparse::Layout::NHD, pages, page_size, 1, dim),
                kvsparse::PageTableView{table.data(), pages}, 0};
    }
};

/// Double attention of every query head over the slots; the keys turned by `rotation` (float, as the
/// backend turns them) when given. Also the summed probability of each slot over the group.
template <class T>
void reference(const kvsparse::StreamView<T>& view, const std::vector<std::int32_t>& slots, const std::vector<float>& q,
               int group, const std::vector<std::int32_t>& rotation, kvsparse::Rope rope, std::vector<double>& out,
               std::vector<double>& mass) {
    const int dim = view.keys.head_dim;
    const std::size_t n = slots.size();
    out.assign(static_cast<std::size_t>(group * dim), 0.0);
    mass.assign(n, 0.0);
    std::vector<std::vector<double>> k(n), v(n);
    for (std::size_t j = 0; j < n; ++j) {
        std::vector<float> key(static_cast<std::size_t>(dim));
        for (int d = 0; d < dim; ++d) key[static_cast<std::size_t>(d)] = kvsparse::to_float(view.key(slots[j])[d]);
        if (!rotation.empty()) kvsparse::rope_rotate(key.data(), dim, rotation[j], rope);
        for (int d = 0; d < dim; ++d) {
            k[j].push_back(key[static_cast<std::size_t>(d)]);
            v[j].push_back(kvsparse::to_float(view.value(slots[j])[d]));
        }
    }
    for (int g = 0; g < group; ++g) {
        std::vector<double> s(n);
        double top = -INFINITY;
        for (std::size_t j = 0; j < n; ++j) {
            double dot = 0;
            for (int d = 0; d < dim; ++d) dot += static_cast<double>(q[static_cast<std::size_t>(g * dim + d)]) * k[j][static_cast<std::size_t>(d)];
            s[j] = dot / std::sqrt(static_cast<double>(dim));
            top = std::max(top, s[j]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - top));
        for (std::size_t j = 0; j < n; ++j) {
            mass[j] += s[j] / sum;
            for (int d = 0; d < dim; ++d) out[static_cast<std::size_t>(g * dim + d)] += s[j] / sum * v[j][static_cast<std::size_t>(d)];
        }
    }
}

struct Case {
    int dim, group, n, page_size;
    bool rotate;
};

/// Cases a vectorized path was compared in, so that a CPU without one cannot pass silently.
int vector_cases = 0;

/// Where the CPU has AVX2 (and F16C), its vector paths must have been compared; elsewhere, say so.
void require_vector_paths(int compared) {
#if KVSPARSE_CPU_X86
    if (kvsparse::detail::cpu::has_avx2_fma_f16c()) {
        CHECK(compared > 0);
        if (!kvsparse::detail::cpu::has_avx512f()) WARN("no AVX-512 on this CPU: its path was not compared");
        return;
    }
#endif
    WARN("no AVX2 on this CPU: only the portable path was compared (" << compared << " vector cases)");
}

template <class T>
void check_case(const Case& c, std::uint32_t seed) {
    CAPTURE(c.dim, c.group, c.n, c.page_size, c.rotate, seed);
    std::mt19937 rng(seed);
    Pool<T> pool(c.dim, c.page_size, c.n, rng);
    std::vector<std::int32_t> slots(static_cast<std::size_t>(c.n));
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);  // any order
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> q(static_cast<std::size_t>(c.group * c.dim));
    for (float& x : q) x = 2.0f * u(rng);
    std::vector<std::int32_t> rotation;
    const kvsparse::Rope rope{kvsparse::RopeStyle::half_split, 10000.0f};
    if (c.rotate) {  // runs of equal deltas, as in-cache positions give
        for (int j = 0; j < c.n; ++j) rotation.push_back(j < c.n / 3 ? -5 : -(c.n + 17));
    }
    std::vector<double> want, want_mass;
    reference(pool.view(), slots, q, c.group, rotation, rope, want, want_mass);

    std::vector<std::byte> workspace(CpuBackend::workspace_bytes(c.group, c.n, c.dim));
    using kvsparse::detail::cpu::Isa;
    const Isa paths[] = {Isa::avx512, Isa::avx2, Isa::portable};
    for (int path = 0; path <= 3; ++path) {
        const bool entry = path == 3;  // the last pass goes through CpuBackend::attend
        const Isa isa = entry ? Isa::portable : paths[path];
        CAPTURE(static_cast<int>(isa), entry);
        std::vector<float> out(static_cast<std::size_t>(c.group * c.dim), 123.0f);
        std::vector<float> mass(static_cast<std::size_t>(c.n), 0.5f);  // added to
        AttendArgs<T> args{pool.view(), slots, q, c.group, 1.0f / std::sqrt(static_cast<float>(c.dim)),
                           rotation, rope, out, mass};
        if (entry) {
            CpuBackend{}.attend(args, workspace);
        } else {
            std::fill(out.begin(), out.end(), 0.0f);
            const auto scratch = kvsparse::detail::cpu::carve(workspace, static_cast<std::size_t>(c.group),
                                                              static_cast<std::size_t>(c.n), static_cast<std::size_t>(c.dim));
            if (!kvsparse::detail::cpu::attend_with(isa, args, scratch)) continue;  // not on this CPU / shape
            if (isa != Isa::portable) ++vector_cases;
            // attend_with leaves the probabilities in the scores; add them as attend does.
            for (int j = 0; j < c.n; ++j)
                for (int g = 0; g < c.group; ++g) mass[static_cast<std::size_t>(j)] += scratch.scores[static_cast<std::size_t>(g * c.n + j)];
        }
        double error = 0, mass_error = 0;
        for (std::size_t i = 0; i < want.size(); ++i) error = std::max(error, std::fabs(out[i] - want[i]));
        for (std::size_t j = 0; j < want_mass.size(); ++j) mass_error = std::max(mass_error, std::fabs(mass[j] - 0.5 - want_mass[j]));
        CHECK(error < tolerance);
        CHECK(mass_error < tolerance);
    }
}

}  // namespace

TEMPLATE_TEST_CASE("CpuBackend::attend matches a double reference on every path and shape", "[cpu][attend]", float, half,
                   bfloat16) {
    std::uint32_t seed = 1;
    // Three chunks of the vector paths (at most kAttendChunk keys each), the maximum moving between them.
    const int three_chunks = 2 * static_cast<int>(kvsparse::detail::cpu::kAttendChunk) + 300;
    for (const int dim : {8, 12, 16, 24, 40, 128, 136}) {
        for (const int group : {1, 2, 3, 4, 5, 8}) {
            for (const int n : {1, 2, 3, 17, 100, three_chunks}) check_case<TestType>({dim, group, n, 16, false}, seed++);
        }
    }
    for (const int page_size : {1, 12, 16, 64}) check_case<TestType>({128, 4, 1000, page_size, false}, seed++);
    check_case<TestType>({128, 4, 5000, 16, false}, seed++);
    for (const int group : {1, 4, 6}) check_case<TestType>({64, group, 77, 16, true}, seed++);
    check_case<TestType>({64, 4, three_chunks, 16, true}, seed++);  // turned keys over three chunks
    require_vector_paths(vector_cases);
}

TEST_CASE("CpuBackend::attend with no slots writes zeros", "[cpu][attend]") {
    std::mt19937 rng(3);
    Pool<half> pool(16, 16, 16, rng);
    std::vector<float> q(32, 1.0f), out(32, 7.0f);
    std::vector<std::byte> workspace(CpuBackend::workspace_bytes(2, 0, 16));
    CpuBackend{}.attend(AttendArgs<half>{pool.view(), {}, q, 2, 0.25f, {}, {}, out, {}}, workspace);
    CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.0f; }));
}

TEST_CASE("float16 widening is exact for every bit pattern", "[cpu][dtype]") {
    // The reference from the format's definition: (-1)^s * 2^(e - 15) * (1 + m / 1024), subnormals
    // m * 2^-24, and inf / NaN with the payload kept in the top mantissa bits.
    for (std::uint32_t bits = 0; bits < 0x10000u; ++bits) {
        const std::uint32_t sign = bits >> 15, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
        std::uint32_t want;
        if (exponent == 0x1fu) {
            want = (sign << 31) | 0x7f800000u | (mantissa << 13);
        } else {
            const double magnitude = exponent == 0 ? std::ldexp(static_cast<double>(mantissa), -24)
                                                   : std::ldexp(1.0 + mantissa / 1024.0, static_cast<int>(exponent) - 15);
            const float value = static_cast<float>(sign ? -magnitude : magnitude);
            std::memcpy(&want, &value, 4);
        }
        const float got_value = half::to_float(static_cast<std::uint16_t>(bits));
        std::uint32_t got;
        std::memcpy(&got, &got_value, 4);
        if (got != want) FAIL("pattern " << bits << ": " << got_value << ", bits " << got << " != " << want);
    }
}

TEST_CASE("append's narrowing and bounds fold give the scalar conversions' bits, F16C or not", "[cpu][dtype]") {
    // narrow: every float16 value, the halfway points between neighbours and a float either side of them,
    // signed zeros, infinities, NaNs with several payloads, overflow and underflow, random floats; a count
    // that is not a multiple of 8, so the vector loop's tail runs too.
    std::vector<float> x;
    for (std::uint32_t bits = 0; bits < 0x10000u; ++bits) {
        const float v = half::to_float(static_cast<std::uint16_t>(bits));
        x.push_back(v);
        const float next = half::to_float(static_cast<std::uint16_t>(bits + 1));
        if (std::isfinite(v) && std::isfinite(next) && (bits & 0x7fffu) != 0x7bffu) {
            const float mid = static_cast<float>((static_cast<double>(v) + next) / 2);
            x.insert(x.end(), {mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY)});
        }
    }
    for (const std::uint32_t nan : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu, 0xff812345u, 0x7fffffffu}) {
        float f;
        std::memcpy(&f, &nan, 4);
        x.push_back(f);
    }
    x.insert(x.end(), {65519.0f, 65520.0f, 1e30f, -1e30f, 0x1p-25f, 0x1.8p-25f, -0x1p-26f, 0.0f, -0.0f, INFINITY, -INFINITY});
    std::mt19937 rng(17);
    std::normal_distribution<float> normal(0.0f, 1000.0f);
    for (int i = 0; i < 10001; ++i) x.push_back(normal(rng));

    std::vector<half> got(x.size());
    kvsparse::detail::cpu::narrow(x.data(), got.data(), x.size());
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += got[i].bits != half::from_float(x[i]);
    CHECK(wrong == 0);
    std::vector<bfloat16> got_b(x.size());
    kvsparse::detail::cpu::narrow(x.data(), got_b.data(), x.size());
    wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += got_b[i].bits != bfloat16::from_float(x[i]);
    CHECK(wrong == 0);

    // fold_bounds: random bit patterns (NaN, infinities and both zeros among them, often equal) against
    // fold_key_bound element by element, then update_key_bounds from float keys against the same.
    std::uniform_int_distribution<int> pattern(0, 0xffff), pick(0, 7);
    const std::uint16_t specials[] = {0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x7d01, 0x3c00, 0xbc00};
    const auto random_half = [&] {
        half h;
        h.bits = static_cast<std::uint16_t>(pick(rng) < 2 ? specials[pick(rng)] : pattern(rng));
        return h;
    };
    for (const std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{8}, std::size_t{100}, std::size_t{512}, std::size_t{4096}}) {
        for (const bool first : {false, true}) {
            std::vector<half> lo(n), hi(n), stored(n);
            for (std::size_t i = 0; i < n; ++i) {
                if (n == 512) {  // every triple of the special patterns
                    lo[i].bits = specials[i % 8];
                    hi[i].bits = specials[i / 8 % 8];
                    stored[i].bits = specials[i / 64];
                    continue;
                }
                lo[i] = random_half();
                hi[i] = pick(rng) == 0 ? lo[i] : random_half();
                stored[i] = pick(rng) == 0 ? lo[i] : random_half();
            }
            std::vector<half> want_lo = lo, want_hi = hi;
            for (std::size_t i = 0; i < n; ++i) kvsparse::fold_key_bound(want_lo[i], want_hi[i], stored[i], first);
            kvsparse::detail::cpu::fold_bounds(lo.data(), hi.data(), stored.data(), n, first);
            wrong = 0;
            for (std::size_t i = 0; i < n; ++i) wrong += lo[i].bits != want_lo[i].bits || hi[i].bits != want_hi[i].bits;
            CAPTURE(n, first);
            CHECK(wrong == 0);
        }
    }
    constexpr std::int32_t dim = 136;  // 17 chunks of 8
    std::vector<half> bounds(2 * dim), want(2 * dim);
    const auto view = kvsparse::KeyBounds<half>::packed(bounds.data(), 1, 16, dim);
    for (int key = 0; key < 50; ++key) {
        std::vector<float> k(dim);
        for (float& v : k) v = key % 10 == 3 ? x[static_cast<std::size_t>(pattern(rng))] : normal(rng);
        kvsparse::detail::pages::update_key_bounds(view, 0, k.data(), key == 0);
        for (std::int32_t d = 0; d < dim; ++d)
            kvsparse::fold_key_bound(want[static_cast<std::size_t>(d)], want[static_cast<std::size_t>(dim + d)], half(k[static_cast<std::size_t>(d)]), key == 0);
        REQUIRE(std::memcmp(bounds.data(), want.data(), bounds.size() * sizeof(half)) == 0);
    }
}

TEST_CASE("the softmax exponential is within a few ulp of exp from -104 up to 0", "[cpu][exp]") {
    double worst = 0;
    for (double x = 0.0; x > -87.3; x -= 0.000731) {
        const double want = std::exp(x);
        const double got = kvsparse::detail::cpu::exp_nonpositive(static_cast<float>(x));
        worst = std::max(worst, std::fabs(got - std::exp(static_cast<double>(static_cast<float>(x)))) / want);
    }
    CHECK(worst < 4e-7);  // 2 ulp of float
    CHECK(kvsparse::detail::cpu::exp_nonpositive(0.0f) == 1.0f);
    CHECK(kvsparse::detail::cpu::exp_nonpositive(-88.0f) == 0.0f);
    CHECK(kvsparse::detail::cpu::exp_nonpositive(-1e30f) == 0.0f);
    CHECK(kvsparse::detail::cpu::exp_nonpositive(-INFINITY) == 0.0f);
}

TEST_CASE("ThreadPool runs every index once, inline when nested, and rethrows the first error", "[cpu][threads]") {
    kvsparse::detail::ThreadPool pool(3);
    CHECK(pool.size() == 3);
    for (const std::int64_t n : {0, 1, 2, 3, 7, 1000}) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        pool.parallel_for(n, [&](std::int64_t i) { ++hits[static_cast<std::size_t>(i)]; });
        CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; }));
    }
    std::atomic<int> inner{0};
    pool.parallel_for(4, [&](std::int64_t) { pool.parallel_for(5, [&](std::int64_t) { ++inner; }); });
    CHECK(inner == 20);
    for (int round = 0; round < 50; ++round) {
        CHECK_THROWS_AS(pool.parallel_for(16, [](std::int64_t i) {
                            if (i == 5) throw std::runtime_error("task 5");
                        }),
                        std::runtime_error);
    }
    std::atomic<int> after{0};
    pool.parallel_for(10, [&](std::int64_t) { ++after; });  // still usable
    CHECK(after == 10);
}

TEST_CASE("ThreadPool wakes its workers whether they spin or sleep, and stops while they spin", "[cpu][threads]") {
    for (int round = 0; round < 20; ++round) {
        kvsparse::detail::ThreadPool pool(2);
        std::atomic<int> sum{0};
        // Back to back (the worker is still spinning), then after a pause longer than the spin (asleep).
        for (int loop = 0; loop < 4; ++loop) {
            if (loop == 3) std::this_thread::sleep_for(std::chrono::milliseconds(2));
            std::vector<std::atomic<int>> hits(8);
            pool.parallel_for(8, [&](std::int64_t i) {
                ++hits[static_cast<std::size_t>(i)];
                sum += static_cast<int>(i);
            });
            CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; }));
        }
        CHECK(sum == 4 * 28);
    }  // each pool is destroyed right after a loop, its worker still spinning
}

TEST_CASE("HugePageAllocator gives blocks from 1 MiB 2 MiB-aligned, smaller ones plainly", "[cpu][memory]") {
    kvsparse::detail::HugePageAllocator<std::uint16_t> allocator;
    for (const std::size_t bytes : {std::size_t{64}, std::size_t{1} << 19, (std::size_t{1} << 20) - 2, std::size_t{1} << 20,
                                    (std::size_t{3} << 20) + 2}) {
        CAPTURE(bytes);
        const std::size_t n = bytes / sizeof(std::uint16_t);
        std::uint16_t* p = allocator.allocate(n);
        REQUIRE(p != nullptr);
        if (bytes >= std::size_t{1} << 20) CHECK(reinterpret_cast<std::uintptr_t>(p) % (std::size_t{2} << 20) == 0);
        for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::uint16_t>(i * 7);  // the whole block is usable
        bool intact = true;
        for (std::size_t i = 0; i < n; ++i) intact = intact && p[i] == static_cast<std::uint16_t>(i * 7);
        CHECK(intact);
        allocator.deallocate(p, n);
    }
    // A vector growing across the 1 MiB line keeps its contents (key bounds grow with their stream).
    std::vector<std::uint16_t, kvsparse::detail::HugePageAllocator<std::uint16_t>> grown;
    for (std::size_t i = 0; i < (std::size_t{3} << 19); ++i) grown.push_back(static_cast<std::uint16_t>(i));
    bool kept = true;
    for (std::size_t i = 0; i < grown.size(); ++i) kept = kept && grown[i] == static_cast<std::uint16_t>(i);
    CHECK(kept);
}

namespace {

/// Outputs (and H2O's kept positions, Quest's selections) of a decode run with `threads` threads.
template <class Policy>
std::vector<float> decode_run(const Policy& policy, int threads) {
    constexpr int layers = 2, q_heads = 16, kv_heads = 4, dim = 64, tokens = 300;
    kvsparse::KVCache<Policy, CpuBackend, half> cache(
        {.shape = {layers, q_heads, kv_heads, dim}, .page_size = 16, .num_pages = 4096}, policy, CpuBackend({.threads = threads}));
    const auto seq = cache.add_sequence();
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> k(kv_heads * dim), v(k.size()), q(q_heads * dim), out(q.size()), all;
    for (int t = 0; t < tokens; ++t) {
        for (int layer = 0; layer < layers; ++layer) {
            for (float& x : k) x = u(rng);
            for (float& x : v) x = u(rng);
            for (float& x : q) x = 2.0f * u(rng);
            cache.append(seq, layer, k, v);
            cache.attend(seq, layer, q, out);
            all.insert(all.end(), out.begin(), out.end());
        }
    }
    kvsparse::Selection selection;
    cache.select(seq, 1, std::vector<float>(q_heads * dim, 0.5f), selection);
    for (const int p : selection.positions) all.push_back(static_cast<float>(p));
    return all;
}

}  // namespace

TEST_CASE("decode outputs do not depend on the number of threads", "[cpu][threads]") {
    const auto same_for_all_threads = [](const auto& policy) {
        const std::vector<float> one = decode_run(policy, 1);
        for (const int threads : {2, 3, 8}) {
            CAPTURE(threads);
            CHECK(decode_run(policy, threads) == one);  // bit for bit
        }
    };
    same_for_all_threads(kvsparse::Dense{});
    same_for_all_threads(kvsparse::H2OHeavyHitter(40, 24));
    same_for_all_threads(kvsparse::QuestPageSelector({.page_size = 16, .token_budget = 64, .dense_layers = 1}));
    same_for_all_threads(kvsparse::AttentionSink({.sinks = 4, .window = 60}));
}

TEMPLATE_TEST_CASE("vectorized page scores equal the portable ones bit for bit", "[cpu][quest]", float, half, bfloat16) {
    std::mt19937 rng(5);
    int compared = 0;
    for (const int dim : {8, 16, 64, 128, 136}) {
        for (const int rows : {1, 2, 3, 4, 7, 8, 9, 17}) {
            for (const auto mode : {kvsparse::GqaAggregation::max, kvsparse::GqaAggregation::sum, kvsparse::GqaAggregation::per_query_head}) {
                CAPTURE(dim, rows, static_cast<int>(mode));
                const int pages = 37;
                std::vector<TestType> data;
                const auto bounds = test_inputs::random_bounds(data, pages, dim, rng);
                const std::vector<float> q = test_inputs::random_queries(rows, dim, rng);
                const std::size_t n = static_cast<std::size_t>(pages * rows);
                using kvsparse::detail::cpu::Isa;
                std::vector<float> want(n, -1.0f);
                kvsparse::detail::pages::page_scores(bounds, pages, q, rows, mode, want, Isa::portable);
                for (const Isa isa : {Isa::avx512, Isa::avx2}) {
                    CAPTURE(static_cast<int>(isa));
                    if (kvsparse::detail::cpu::page_rows_simd<TestType>(dim, isa) == nullptr) continue;  // not on this CPU or shape
                    std::vector<float> got(n, -1.0f);
                    kvsparse::detail::pages::page_scores(bounds, pages, q, rows, mode, got, isa);
                    CHECK(std::memcmp(want.data(), got.data(), n * sizeof(float)) == 0);
                    ++compared;
                }
            }
        }
    }
    require_vector_paths(compared);
}

TEST_CASE("steady-state decode attention allocates nothing, on any thread", "[cpu][threads]") {
    const auto check = [](const auto& policy) {
        constexpr int q_heads = 8, kv_heads = 4, dim = 32;
        using Policy = std::decay_t<decltype(policy)>;
        kvsparse::KVCache<Policy, CpuBackend, half> cache(
            {.shape = {1, q_heads, kv_heads, dim}, .page_size = 16, .num_pages = 1024}, policy, CpuBackend({.threads = 2}));
        const auto seq = cache.add_sequence();
        std::vector<float> k(kv_heads * dim, 0.25f), v(k.size(), 0.5f), q(q_heads * dim, 1.0f), out(q.size());
        for (int t = 0; t < 300; ++t) {
            for (std::size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>((t * 7 + static_cast<int>(i)) % 13) / 13.0f;
            cache.append(seq, 0, k, v);
            cache.attend(seq, 0, q, out);
        }
        allocations = 0;
        counting = true;
        for (int step = 0; step < 20; ++step) cache.attend(seq, 0, q, out);
        counting = false;
        CHECK(allocations == 0);
    };
    check(kvsparse::Dense{});
    check(kvsparse::AttentionSink({.sinks = 4, .window = 60}));
    check(kvsparse::H2OHeavyHitter(32, 32));
    check(kvsparse::QuestPageSelector({.page_size = 16, .token_budget = 64, .dense_layers = 0}));
}

TEST_CASE("top_pages keeps the k best, ties to the lower index, NaN as -inf, ascending", "[cpu][quest]") {
    std::mt19937 rng(9);
    const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f};
    for (int round = 0; round < 400; ++round) {
        const int n = 1 + static_cast<int>(rng() % 300);
        const int k = static_cast<int>(rng() % static_cast<unsigned>(n + 3)) - 1;  // -1 .. n + 1
        std::vector<float> scores(static_cast<std::size_t>(n));
        const int distinct = 1 + static_cast<int>(rng() % 8);  // few values: many ties
        // Every other round, values one ulp-step apart around a base, so keys share their leading bytes
        // and each byte of the radix select decides.
        const float base = static_cast<float>(static_cast<int>(rng() % 200) - 100) * 0.37f;
        for (float& s : scores) {
            if (rng() % 5 == 0) {
                s = specials[rng() % 7];
            } else if (round % 2 == 0) {
                s = static_cast<float>(static_cast<int>(rng() % static_cast<unsigned>(distinct)) - 3) * 0.5f;
            } else {
                s = std::bit_cast<float>(std::bit_cast<std::uint32_t>(base) + static_cast<std::uint32_t>(rng() % (1u << (3 * distinct))));
            }
        }
        // Reference: sort all indices by (score descending, NaN as -inf; index ascending), take k, sort.
        std::vector<int> all(static_cast<std::size_t>(n));
        std::iota(all.begin(), all.end(), 0);
        const auto value = [&](int i) { return std::isnan(scores[static_cast<std::size_t>(i)]) ? -INFINITY : scores[static_cast<std::size_t>(i)]; };
        std::stable_sort(all.begin(), all.end(), [&](int a, int b) { return value(a) > value(b); });
        const int want_count = std::clamp(k, 0, n);
        std::vector<int> want(all.begin(), all.begin() + want_count);
        std::sort(want.begin(), want.end());

        std::vector<std::int32_t> order(static_cast<std::size_t>(n), -7);
        const int got_count = kvsparse::CpuBackend::top_pages(scores, n, k, order);
        CAPTURE(n, k, round);
        REQUIRE(got_count == want_count);
        CHECK(std::vector<int>(order.begin(), order.begin() + got_count) == want);
    }
}
