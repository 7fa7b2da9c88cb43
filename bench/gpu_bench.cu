// Times the CudaBackend primitives on shapes of a Llama-class model (head_dim 128, 8 KV heads, 4 query
// heads per KV head) and reports achieved bandwidth as a fraction of a device-to-device copy measured in
// the same run (the datasheet peak is printed for reference). Memory-bound kernels should approach the
// copy; single-stream attention over few slots cannot fill a large GPU (one block per 64 slots), which
// the numbers show. Run through bench/gpu.sh.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <kvsparse/backends/cuda_backend.cuh>

namespace {

using kvsparse::CudaBackend;
using kvsparse::cuda::check;

template <class T>
struct Device {
    T* data = nullptr;
    std::size_t size = 0;
    explicit Device(std::size_t n) : size(n) { check(cudaMalloc(reinterpret_cast<void**>(&data), n * sizeof(T) + 16), "cudaMalloc"); }
    explicit Device(const std::vector<T>& host) : Device(host.size()) {
        check(cudaMemcpy(data, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    Device(const Device&) = delete;
    Device& operator=(const Device&) = delete;
    ~Device() { cudaFree(data); }
    std::span<T> span() const { return {data, size}; }
    std::span<const T> cspan() const { return {data, size}; }
};

/// Deterministic pseudo-random contents in [-1, 1), stored as T.
template <class T>
__global__ void fill_kernel(T* p, std::size_t n, std::uint32_t seed) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        p[i] = kvsparse::from_float<T>(static_cast<float>(h & 0xffffu) / 32768.0f - 1.0f);
    }
}

template <class T>
void fill(Device<T>& d, std::uint32_t seed) {
    fill_kernel<<<1024, 256>>>(d.data, d.size, seed);
    check(cudaGetLastError(), "fill_kernel");
}

double copy_bytes_per_second = 0.0;  // measured by measure_copy, the ratio's denominator
std::FILE* out = stdout;

/// Mean milliseconds per call of `f` on `stream`, after warm-up: `iterations` calls captured in one CUDA
/// graph and replayed, so that the time is the device's and not the host's launch rate (engines replay
/// graphs for decode too).
template <class F>
double time_ms(cudaStream_t stream, F&& f, int iterations = 50) {
    for (int i = 0; i < 3; ++i) f();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
    for (int i = 0; i < iterations; ++i) f();
    check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");  // warm-up replay
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return static_cast<double>(ms) / iterations;
}

void report(const std::string& name, const std::string& shape, double ms, double bytes) {
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    std::fprintf(out, "%-28s %-44s %10.2f us %9.1f GB/s %6.1f %% of copy\n", name.c_str(), shape.c_str(), ms * 1e3, gbs,
                 100.0 * gbs * 1e9 / copy_bytes_per_second);
}

/// STREAM's copy on the device: 16-byte loads and stores over the whole grid.
__global__ void copy_kernel(const float4* from, float4* to, std::size_t n) {
    for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
        to[i] = from[i];
    }
}

/// The ratio's denominator: a copy of 2 GiB (many times the L2), counting bytes read plus bytes written.
/// A kernel rather than cudaMemcpy, whose device-to-device copies a graph may hand to a copy engine.
void measure_copy(cudaStream_t stream) {
    const std::size_t bytes = std::size_t{1} << 31;
    Device<std::byte> from(bytes), to(bytes);
    check(cudaMemsetAsync(from.data, 1, bytes, stream), "cudaMemsetAsync");
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "multiprocessor count");
    const double ms = time_ms(stream, [&] {
        copy_kernel<<<static_cast<unsigned>(sms * 8), 512, 0, stream>>>(reinterpret_cast<const float4*>(from.data),
                                                                        reinterpret_cast<float4*>(to.data), bytes / 16);
        check(cudaGetLastError(), "copy_kernel");
    }, 20);
    copy_bytes_per_second = 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
    report("copy (STREAM kernel)", "2 GiB device to device", ms, 2.0 * static_cast<double>(bytes));
}

template <class T>
const char* type_name() {
    if constexpr (std::is_same_v<T, float>) return "f32";
    else if constexpr (std::is_same_v<T, kvsparse::half>) return "f16";
    else return "bf16";
}

std::vector<std::int32_t> shuffled(std::int32_t n, std::uint32_t seed) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), 0);
    std::mt19937 rng(seed);
    std::shuffle(v.begin(), v.end(), rng);
    return v;
}

constexpr std::int32_t page_size = 16;  // of every stream below

/// Slots 0 .. n - 1 for each of `heads` heads: [heads][n].
std::vector<std::int32_t> every_slot(std::int32_t heads, std::int32_t n) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(heads) * static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::int32_t>(i % static_cast<std::size_t>(n));
    return v;
}

/// Quest's read at budget 2048 for each of `heads` heads of n slots: the slots of 128 pages scattered over
/// the stream, in page order, head h's pages drawn with seed + h: [heads][2048].
std::vector<std::int32_t> quest_slots(std::int32_t heads, std::int32_t n, std::uint32_t seed) {
    std::vector<std::int32_t> v;
    for (std::int32_t h = 0; h < heads; ++h) {
        std::vector<std::int32_t> pages = shuffled(n / page_size, seed + static_cast<std::uint32_t>(h));
        pages.resize(128);
        std::sort(pages.begin(), pages.end());
        for (const std::int32_t p : pages)
            for (std::int32_t i = 0; i < page_size; ++i) v.push_back(p * page_size + i);
    }
    return v;
}

/// A pool holding `heads` streams of `capacity` slots each, one head per page (kvsparse's own layout),
/// pages of each stream scattered over the pool.
template <class T>
struct Streams {
    std::int32_t heads, capacity, dim, pages_per_head;
    Device<T> keys, values;
    Device<std::int32_t> tables;
    Device<kvsparse::PageTableView> table_views;

    Streams(std::int32_t h, std::int32_t cap, std::int32_t d)
        : heads(h),
          capacity(cap),
          dim(d),
          pages_per_head((cap + page_size - 1) / page_size),
          keys(static_cast<std::size_t>(h) * static_cast<std::size_t>(pages_per_head) * page_size * static_cast<std::size_t>(d)),
          values(keys.size),
          tables(shuffled(h * pages_per_head, 1)),
          table_views(views(tables.data, h, pages_per_head)) {
        fill(keys, 2);
        fill(values, 3);
    }
    static std::vector<kvsparse::PageTableView> views(const std::int32_t* tables, std::int32_t h, std::int32_t per) {
        std::vector<kvsparse::PageTableView> v;
        for (std::int32_t i = 0; i < h; ++i) v.push_back({tables + static_cast<std::size_t>(i) * static_cast<std::size_t>(per), per});
        return v;
    }
    kvsparse::PagePoolView<T> pool(const Device<T>& d) const {
        return kvsparse::PagePoolView<T>::packed(d.data, kvsparse::Layout::NHD, heads * pages_per_head, page_size, 1, dim);
    }
    kvsparse::HeadBatchView<T> batch() const {
        return {pool(keys), pool(values), table_views.data, 1, 0, 0, heads};
    }
    kvsparse::StreamView<T> stream(std::int32_t h) const {
        return {pool(keys), pool(values), {tables.data + static_cast<std::size_t>(h) * static_cast<std::size_t>(pages_per_head), pages_per_head}, 0};
    }
};

template <class T>
void bench_write(cudaStream_t stream) {
    const std::int32_t heads = 8, dim = 128, tokens = 4096;
    Streams<T> s(heads, tokens, dim);
    Device<float> k(static_cast<std::size_t>(tokens) * heads * dim), v(k.size);
    fill(k, 4);
    fill(v, 5);
    Device<std::int32_t> slots(every_slot(1, tokens));  // one slot list shared by every head: a prefill chunk
    const CudaBackend backend;
    const double ms = time_ms(stream, [&] {
        backend.write(s.batch(), slots.cspan(), k.cspan(), v.cspan(), tokens, std::int64_t{heads} * dim, dim, stream);
    });
    const double elements = 2.0 * tokens * heads * dim;
    report(std::string("write (batched) ") + type_name<T>(), "4096 tokens x 8 heads x 128", ms,
           elements * (sizeof(float) + sizeof(T)));
}

template <class T>
void bench_copy(cudaStream_t stream) {
    const std::int32_t dim = 128, count = 8192;
    Streams<T> s(1, 2 * count, dim);
    const std::vector<std::int32_t> order = shuffled(2 * count, 6);
    Device<std::int32_t> from(std::vector<std::int32_t>(order.begin(), order.begin() + count));
    Device<std::int32_t> to(std::vector<std::int32_t>(order.begin() + count, order.end()));
    Device<std::byte> scratch(CudaBackend::copy_workspace_bytes<T>(count, dim));
    const CudaBackend backend(scratch.span());
    const double ms = time_ms(stream, [&] { backend.copy_slots(s.stream(0), from.cspan(), to.cspan(), stream); });
    // Gather and scatter each read and write every byte once.
    report(std::string("copy_slots ") + type_name<T>(), "8192 tokens x 128, staged", ms,
           4.0 * 2.0 * count * dim * sizeof(T));
}

void bench_rope(cudaStream_t stream) {
    const std::int32_t heads = 32, dim = 128;
    for (const std::int32_t tokens : {1, 4096}) {
        Device<float> x(static_cast<std::size_t>(tokens) * heads * dim);
        fill(x, 7);
        std::vector<std::int32_t> host_positions(static_cast<std::size_t>(tokens));
        std::iota(host_positions.begin(), host_positions.end(), 1000);
        Device<std::int32_t> positions(host_positions);
        const CudaBackend backend;
        for (const auto style : {kvsparse::RopeStyle::interleaved, kvsparse::RopeStyle::half_split}) {
            const double ms = time_ms(stream, [&] {
                backend.rope(x.span(), heads, dim, positions.cspan(), kvsparse::Rope{style, 10000.0f}, stream);
            });
            report(std::string("rope f32 ") + (style == kvsparse::RopeStyle::interleaved ? "interleaved" : "half-split"),
                   std::to_string(tokens) + " tokens x 32 heads x 128", ms, 2.0 * tokens * heads * dim * sizeof(float));
        }
    }
}

template <class T>
void bench_shift(cudaStream_t stream) {
    const std::int32_t heads = 8, dim = 128, per_head = 8192;
    Streams<T> s(heads, per_head, dim);
    Device<std::int32_t> slots(every_slot(1, per_head));  // every head shifts the same slots (llama.cpp's K-shift)
    const CudaBackend backend;
    const double ms = time_ms(stream, [&] {
        backend.shift_keys(s.batch(), slots.cspan(), per_head, -512, kvsparse::Rope{}, stream);
    });
    report(std::string("shift_keys (batched) ") + type_name<T>(), "8 heads x 8192 slots x 128", ms,
           2.0 * heads * per_head * dim * sizeof(T));
}

template <class T>
void bench_attend(cudaStream_t stream) {
    const std::int32_t group = 4, dim = 128;
    for (const std::int32_t n : {4096, 32768, 131072}) {
        Streams<T> s(1, n, dim);
        Device<std::int32_t> slots(every_slot(1, n));
        Device<float> queries(static_cast<std::size_t>(group) * dim), result(queries.size), probabilities(static_cast<std::size_t>(n));
        fill(queries, 8);
        check(cudaMemset(probabilities.data, 0, probabilities.size * sizeof(float)), "cudaMemset");
        Device<std::byte> workspace(CudaBackend::workspace_bytes(group, n, dim));
        const CudaBackend backend;
        for (const bool with_probabilities : {false, true}) {
            const kvsparse::AttendArgs<T> args{s.stream(0),
                                               slots.cspan(),
                                               queries.cspan(),
                                               group,
                                               0.08838834764f,
                                               {},
                                               kvsparse::Rope{},
                                               result.span(),
                                               with_probabilities ? probabilities.span() : std::span<float>{}};
            const double ms = time_ms(stream, [&] { backend.attend(args, workspace.span(), stream); });
            report(std::string("attend ") + type_name<T>() + (with_probabilities ? " +probabilities" : ""),
                   "group 4 x 128 over " + std::to_string(n) + " slots", ms, 2.0 * n * dim * sizeof(T));
        }
        const Device<std::int32_t> selected(quest_slots(1, n, 12));
        const kvsparse::AttendArgs<T> sparse{s.stream(0), selected.cspan(), queries.cspan(), group, 0.08838834764f, {},
                                             kvsparse::Rope{}, result.span(), {}};
        const double ms = time_ms(stream, [&] { backend.attend(sparse, workspace.span(), stream); });
        report(std::string("attend ") + type_name<T>() + " Quest-shaped",
               "128 scattered pages of 16 of " + std::to_string(n) + " slots", ms, 2.0 * 2048 * dim * sizeof(T));
    }
}

/// The eight KV heads of a layer in one batched attend (what an engine launches per layer and step), over
/// every slot and over a Quest-shaped selection of 128 pages per head.
template <class T>
void bench_attend_batch(cudaStream_t stream) {
    const std::int32_t heads = 8, group = 4, dim = 128, selected = 2048;
    for (const std::int32_t n : {32768, 131072}) {
        Streams<T> s(heads, n, dim);
        const Device<std::int32_t> dense_slots(every_slot(heads, n)), sparse_slots(quest_slots(heads, n, 20));
        Device<float> queries(static_cast<std::size_t>(heads) * group * dim), result(queries.size);
        fill(queries, 13);
        Device<std::byte> workspace(heads * CudaBackend::workspace_bytes(group, n, dim));
        const CudaBackend backend;
        for (const bool sparse : {false, true}) {
            const std::int32_t count = sparse ? selected : n;
            const kvsparse::BatchAttendArgs<T> args{s.batch(), count, (sparse ? sparse_slots : dense_slots).cspan(),
                                                    queries.cspan(), group, 0.08838834764f, {}, kvsparse::Rope{},
                                                    result.span(), {}};
            const double ms = time_ms(stream, [&] { backend.attend(args, workspace.span(), stream); });
            report(std::string("attend 8 heads ") + type_name<T>() + (sparse ? " Quest-shaped" : ""),
                   (sparse ? "128 pages of " : "all ") + std::to_string(n) + " slots per head", ms,
                   2.0 * heads * count * dim * sizeof(T));
        }
    }
}

/// Bench-only glue for the Quest step below: block h turns head h's chosen pages (the first `chosen` of
/// its row of `order`, which is `stride` long) plus the stream's last page into slots, `page_size` each.
__global__ void pages_to_slots_kernel(const std::int32_t* order, std::int32_t stride, std::int32_t chosen,
                                      std::int32_t last_page, std::int32_t page_size, std::int32_t* slots) {
    const std::int32_t h = static_cast<std::int32_t>(blockIdx.x);
    const std::int32_t count = (chosen + 1) * page_size;
    for (std::int32_t i = static_cast<std::int32_t>(threadIdx.x); i < count; i += static_cast<std::int32_t>(blockDim.x)) {
        const std::int32_t k = i / page_size;
        const std::int32_t page = k < chosen ? order[static_cast<std::int64_t>(h) * stride + k] : last_page;
        slots[static_cast<std::int64_t>(h) * count + i] = page * page_size + i % page_size;
    }
}

/// A whole Quest decode step of a layer on the device, all 8 KV heads in each launch: page scores of
/// every page but the last, the top 127, their slots with the last page's, attention over those 2048
/// slots; against dense attention over every slot in the same process. Bytes: K/V rows and bounds read.
void bench_quest_layer(cudaStream_t stream) {
    using T = kvsparse::half;
    const std::int32_t heads = 8, group = 4, dim = 128, budget = 128;
    for (const std::int32_t n : {32768, 131072}) {
        Streams<T> s(heads, n, dim);
        const std::int32_t pages = n / page_size, scored = pages - 1;
        const std::size_t per_head = kvsparse::KeyBounds<T>::elements(pages, dim);
        Device<T> bounds(heads * per_head);
        fill(bounds, 14);
        Device<float> queries(static_cast<std::size_t>(heads) * group * dim), result(queries.size);
        fill(queries, 15);
        Device<float> scores(static_cast<std::size_t>(heads) * pages);
        Device<std::int32_t> order(static_cast<std::size_t>(heads) * pages), slots(static_cast<std::size_t>(heads) * budget * page_size);
        Device<std::byte> workspace(heads * CudaBackend::workspace_bytes(group, n, dim));
        const Device<std::int32_t> dense_slots(every_slot(heads, n));
        const auto view = kvsparse::KeyBounds<const T>::packed(bounds.data, pages, page_size, dim);
        const CudaBackend backend;
        const float scale = 0.08838834764f;
        const double quest_ms = time_ms(stream, [&] {
            backend.batch_page_scores(view, static_cast<std::int64_t>(per_head), heads, scored, queries.cspan(), group,
                                      kvsparse::GqaAggregation::max, scores.span(), stream);
            backend.batch_top_pages(scores.cspan(), heads, scored, budget - 1, order.span(), stream);
            pages_to_slots_kernel<<<heads, 256, 0, stream>>>(order.data, scored, budget - 1, pages - 1, page_size, slots.data);
            check(cudaGetLastError(), "pages_to_slots_kernel");
            backend.attend(kvsparse::BatchAttendArgs<T>{s.batch(), budget * page_size, slots.cspan(), queries.cspan(), group,
                                                        scale, {}, kvsparse::Rope{}, result.span(), {}},
                           workspace.span(), stream);
        });
        // The selection's parts alone.
        const double scores_ms = time_ms(stream, [&] {
            backend.batch_page_scores(view, static_cast<std::int64_t>(per_head), heads, scored, queries.cspan(), group,
                                      kvsparse::GqaAggregation::max, scores.span(), stream);
        });
        const double top_ms = time_ms(stream, [&] { backend.batch_top_pages(scores.cspan(), heads, scored, budget - 1, order.span(), stream); });
        const double dense_ms = time_ms(stream, [&] {
            backend.attend(kvsparse::BatchAttendArgs<T>{s.batch(), n, dense_slots.cspan(), queries.cspan(), group, scale, {},
                                                        kvsparse::Rope{}, result.span(), {}},
                           workspace.span(), stream);
        });
        const std::string shape = "8 heads, " + std::to_string(n) + " tokens";
        report("Quest step f16", shape + ", 2048 of them", quest_ms,
               heads * (2.0 * budget * page_size * dim + 2.0 * scored * dim) * sizeof(T));
        report("dense step f16", shape, dense_ms, heads * 2.0 * n * dim * sizeof(T));
        report("  batch_page_scores", shape, scores_ms, heads * 2.0 * scored * dim * sizeof(T));
        report("  batch_top_pages", "127 of " + std::to_string(scored) + " per head", top_ms, heads * 4.0 * scored);
        std::fprintf(out, "%-28s %-44s %10.2fx (the bound L / (L/P + B): %.2fx)\n", "Quest speedup over dense", shape.c_str(),
                     dense_ms / quest_ms, static_cast<double>(n) / (static_cast<double>(n) / page_size + budget * page_size));
    }
}

/// Quest's page scores of one KV head's 4 query heads at 32K and 256K tokens (pages of 16, float16
/// bounds): bytes are the bounds read.
void bench_page_scores(cudaStream_t stream) {
    const std::int32_t rows = 4, dim = 128;
    for (const std::int32_t pages : {2048, 16384}) {
        Device<kvsparse::half> bounds(kvsparse::KeyBounds<kvsparse::half>::elements(pages, dim));
        Device<float> queries(static_cast<std::size_t>(rows) * dim), scores(static_cast<std::size_t>(pages));
        fill(bounds, 9);
        fill(queries, 10);
        const auto view = kvsparse::KeyBounds<const kvsparse::half>::packed(bounds.data, pages, 16, dim);
        const CudaBackend backend;
        const double ms = time_ms(stream, [&] {
            backend.page_scores(view, pages, queries.cspan(), rows, kvsparse::GqaAggregation::max, scores.span(), stream);
        });
        report("page_scores f16", "4 rows x 128 over " + std::to_string(pages) + " pages", ms,
               2.0 * pages * dim * sizeof(kvsparse::half));
        // The bounds of a prefill chunk of 4096 keys (float rows in, float16 bounds out).
        Device<float> keys(std::size_t{4096} * dim);
        fill(keys, 11);
        const auto writable = kvsparse::KeyBounds<kvsparse::half>::packed(bounds.data, pages, 16, dim);
        const double fold_ms = time_ms(stream, [&] { backend.append_key_bounds(writable, 0, 4096, keys.cspan(), dim, stream); });
        report("append_key_bounds f16", "4096 keys x 128 into pages of 16", fold_ms,
               4096.0 * dim * sizeof(float) + 2.0 * 256 * dim * sizeof(kvsparse::half));
        // Quest's top-k of the scored pages (all but the last), K - 1 = 127.
        Device<std::int32_t> order(static_cast<std::size_t>(pages));
        const double top_ms = time_ms(stream, [&] { backend.top_pages(scores.cspan(), pages - 1, 127, order.span(), stream); });
        report("top_pages", "127 of " + std::to_string(pages - 1) + " scores", top_ms, 4.0 * (pages - 1));
    }
}

/// For a profiler (bench/gpu.sh's header has the ncu command): the batched float16 attend of 8 KV heads
/// over 32K slots each, three times, untimed.
void profile_attend(cudaStream_t stream) {
    const std::int32_t heads = 8, group = 4, dim = 128, n = 32768;
    Streams<kvsparse::half> s(heads, n, dim);
    const Device<std::int32_t> slots(every_slot(heads, n));
    Device<float> queries(static_cast<std::size_t>(heads) * group * dim), result(queries.size);
    fill(queries, 16);
    Device<std::byte> workspace(heads * CudaBackend::workspace_bytes(group, n, dim));
    const kvsparse::BatchAttendArgs<kvsparse::half> args{s.batch(), n, slots.cspan(), queries.cspan(), group, 0.08838834764f,
                                                         {}, kvsparse::Rope{}, result.span(), {}};
    for (int i = 0; i < 3; ++i) CudaBackend().attend(args, workspace.span(), stream);
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

}  // namespace

/// gpu_bench [results file]: every timing; gpu_bench --profile-attend: profile_attend alone.
int main(int argc, char** argv) {
    const bool profile = argc > 1 && std::string(argv[1]) == "--profile-attend";
    if (argc > 1 && !profile) out = std::fopen(argv[1], "w");
    if (out == nullptr) {
        std::fprintf(stderr, "cannot write %s\n", argv[1]);
        return 2;
    }
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::fprintf(out, "no CUDA device\n");
        return 1;
    }
    try {
        cudaDeviceProp prop{};
        check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
        int memory_khz = 0, bus_bits = 0;
        check(cudaDeviceGetAttribute(&memory_khz, cudaDevAttrMemoryClockRate, 0), "memory clock");
        check(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0), "bus width");
        const double peak = 2.0 * memory_khz * 1e3 * bus_bits / 8.0;  // double data rate
        std::fprintf(out, "device: %s, sm_%d%d, %d SMs, %.0f GiB, datasheet memory bandwidth %.0f GB/s\n", prop.name,
                     prop.major, prop.minor, prop.multiProcessorCount,
                     static_cast<double>(prop.totalGlobalMem) / (1 << 30), peak / 1e9);
        std::fprintf(out, "%-28s %-44s %13s %14s %16s\n", "primitive", "shape", "time/call", "achieved", "ratio");

        cudaStream_t stream;
        check(cudaStreamCreate(&stream), "cudaStreamCreate");
        if (profile) {
            profile_attend(stream);
            return 0;
        }
        copy_bytes_per_second = peak;  // until measured
        measure_copy(stream);
        bench_write<float>(stream);
        bench_write<kvsparse::half>(stream);
        bench_write<kvsparse::bfloat16>(stream);
        bench_copy<kvsparse::half>(stream);
        bench_copy<float>(stream);
        bench_rope(stream);
        bench_shift<kvsparse::half>(stream);
        bench_shift<float>(stream);
        bench_attend<kvsparse::half>(stream);
        bench_attend<float>(stream);
        bench_attend_batch<kvsparse::half>(stream);
        bench_page_scores(stream);
        bench_quest_layer(stream);
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    } catch (const kvsparse::error& e) {
        std::fprintf(out, "error: %s\n", e.what());
        return 1;
    }
    if (out != stdout) std::fclose(out);
    return 0;
}
