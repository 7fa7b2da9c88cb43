// CudaBackend against CpuBackend on random data: stores must match bit for bit, rotations to float
// rounding, attention to summation order. Without a CUDA device every GPU test warns
// "no CUDA device: skipped" and passes; ctest reports them as skipped (SKIP_REGULAR_EXPRESSION).
// kvsparse::half is spelled out: CUB brings cuda_fp16.h, whose global `half` would shadow it.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <kvsparse/backends/cpu_backend.hpp>
#include <kvsparse/backends/cuda_backend.cuh>
#include <kvsparse/policies/quest.hpp>

#include "catch.hpp"
#include "random_bounds.hpp"

using kvsparse::bfloat16;
using kvsparse::CpuBackend;
using kvsparse::CudaBackend;
using kvsparse::Layout;
using kvsparse::PagePoolView;
using kvsparse::PageTableView;
using kvsparse::Rope;
using kvsparse::RopeStyle;
using kvsparse::StreamView;

namespace {

bool device_available() {
    static const bool available = [] {
        int count = 0;
        const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
        (void)cudaGetLastError();
        return ok;
    }();
    return available;
}

#define SKIP_WITHOUT_DEVICE()                    \
    if (!device_available()) {                   \
        WARN("no CUDA device: skipped");         \
        return;                                  \
    }

void check(cudaError_t status, const char* what) { kvsparse::cuda::check(status, what); }

/// Device memory for n elements; frees itself.
template <class T>
class DeviceBuffer {
public:
    explicit DeviceBuffer(std::size_t n) : size_(n) {
        if (n > 0) check(cudaMalloc(reinterpret_cast<void**>(&data_), n * sizeof(T)), "cudaMalloc");
    }
    explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
    DeviceBuffer(DeviceBuffer&& other) noexcept : data_(std::exchange(other.data_, nullptr)), size_(other.size_) {}
    DeviceBuffer& operator=(DeviceBuffer&&) = delete;
    ~DeviceBuffer() {
        if (data_ != nullptr) cudaFree(data_);
    }

    T* data() const { return data_; }
    std::size_t size() const { return size_; }
    std::span<T> span() const { return {data_, size_}; }

    void upload(const std::vector<T>& host) {
        REQUIRE(host.size() == size_);
        if (size_ > 0) check(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
    }
    std::vector<T> download() const {
        std::vector<T> host(size_);
        if (size_ > 0) check(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
        return host;
    }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

std::vector<float> random_floats(std::size_t n, std::mt19937& rng, float range = 1.0f) {
    std::uniform_real_distribution<float> dist(-range, range);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

template <class T>
std::vector<T> random_stored(std::size_t n, std::mt19937& rng) {
    std::vector<T> v(n);
    const std::vector<float> f = random_floats(n, rng);
    for (std::size_t i = 0; i < n; ++i) v[i] = kvsparse::from_float<T>(f[i]);
    return v;
}

/// `count` distinct slots out of [0, capacity), in random order.
std::vector<std::int32_t> distinct_slots(std::int32_t count, std::int32_t capacity, std::mt19937& rng) {
    std::vector<std::int32_t> all(static_cast<std::size_t>(capacity));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<std::size_t>(count));
    return all;
}

template <class T>
std::string type_name() {
    if constexpr (std::is_same_v<T, float>) return "float";
    else if constexpr (std::is_same_v<T, kvsparse::half>) return "half";
    else return "bfloat16";
}

/// Index of the first element whose bits differ, or -1.
template <class T>
std::int64_t first_bit_difference(const std::vector<T>& a, const std::vector<T>& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<std::int64_t>(i);
    }
    return -1;
}

/// Relative precision of T's storage: rotations may differ by one rounding step of T.
template <class T>
float storage_epsilon() {
    if constexpr (std::is_same_v<T, float>) return 2e-6f;
    else if constexpr (std::is_same_v<T, kvsparse::half>) return 1.0f / 1024.0f;
    else return 1.0f / 128.0f;
}

/// Largest |a - b| / (|b| + floor) over two stored arrays.
template <class T>
float worst_relative(const std::vector<T>& a, const std::vector<T>& b, float floor = 1e-3f) {
    REQUIRE(a.size() == b.size());
    float worst = 0.0f;
    for (std::size_t i = 0; i < a.size(); ++i) {
        const float x = kvsparse::to_float(a[i]);
        const float y = kvsparse::to_float(b[i]);
        worst = std::max(worst, std::fabs(x - y) / (std::fabs(y) + floor));
    }
    return worst;
}

/// Key and value pools with the same random contents on the host and the device, and page tables.
template <class T>
struct Pools {
    std::int32_t num_pages, page_size, heads, dim;
    Layout layout;
    std::vector<T> host_keys, host_values;
    DeviceBuffer<T> device_keys, device_values;

    Pools(std::int32_t pages, std::int32_t page, std::int32_t h, std::int32_t d, Layout l, std::mt19937& rng)
        : num_pages(pages),
          page_size(page),
          heads(h),
          dim(d),
          layout(l),
          host_keys(random_stored<T>(elements(), rng)),
          host_values(random_stored<T>(elements(), rng)),
          device_keys(host_keys),
          device_values(host_values) {}

    std::size_t elements() const {
        return static_cast<std::size_t>(num_pages) * static_cast<std::size_t>(page_size) *
               static_cast<std::size_t>(heads) * static_cast<std::size_t>(dim);
    }
    PagePoolView<T> host_pool(std::vector<T>& data) {
        return PagePoolView<T>::packed(data.data(), layout, num_pages, page_size, heads, dim);
    }
    PagePoolView<T> device_pool(DeviceBuffer<T>& data) {
        return PagePoolView<T>::packed(data.data(), layout, num_pages, page_size, heads, dim);
    }
    StreamView<T> host_stream(const std::vector<std::int32_t>& table, std::int32_t head) {
        return {host_pool(host_keys), host_pool(host_values),
                PageTableView{table.data(), static_cast<std::int32_t>(table.size())}, head};
    }
    StreamView<T> device_stream(const DeviceBuffer<std::int32_t>& table, std::int32_t head) {
        return {device_pool(device_keys), device_pool(device_values),
                PageTableView{table.data(), static_cast<std::int32_t>(table.size())}, head};
    }
    /// Both pools of the device equal the host's, bit for bit.
    void require_equal() const {
        CHECK(first_bit_difference(device_keys.download(), host_keys) == -1);
        CHECK(first_bit_difference(device_values.download(), host_values) == -1);
    }
};

std::vector<std::int32_t> page_table(std::int32_t pages, std::int32_t num_pages, std::mt19937& rng) {
    return distinct_slots(pages, num_pages, rng);
}

struct Stream {
    cudaStream_t handle = nullptr;
    Stream() { check(cudaStreamCreate(&handle), "cudaStreamCreate"); }
    ~Stream() { cudaStreamDestroy(handle); }
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    void sync() const { check(cudaStreamSynchronize(handle), "cudaStreamSynchronize"); }
};

/// The device's attention output and probabilities against the host's: equal up to summation order.
void require_attention_close(const DeviceBuffer<float>& device_out, const std::vector<float>& out,
                             const DeviceBuffer<float>& device_probabilities, const std::vector<float>& probabilities) {
    const std::vector<float> gpu_out = device_out.download();
    for (std::size_t i = 0; i < out.size(); ++i) CHECK(std::fabs(gpu_out[i] - out[i]) <= 1e-5f + 1e-4f * std::fabs(out[i]));
    const std::vector<float> gpu_probabilities = device_probabilities.download();
    for (std::size_t i = 0; i < probabilities.size(); ++i) {
        CHECK(std::fabs(gpu_probabilities[i] - probabilities[i]) <= 1e-6f + 1e-4f * std::fabs(probabilities[i]));
    }
}

}  // namespace

TEMPLATE_TEST_CASE("write stores rows like CpuBackend / bit for bit", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(11);
    Stream stream;
    for (const Layout layout : {Layout::NHD, Layout::HND}) {
        for (const std::int32_t dim : {64, 6}) {  // 6: no 4-wide path
            INFO("layout " << (layout == Layout::NHD ? "NHD" : "HND") << ", dim " << dim << ", " << type_name<TestType>());
            Pools<TestType> pools(12, 16, 3, dim, layout, rng);
            const std::vector<std::int32_t> table = page_table(5, 12, rng);
            const DeviceBuffer<std::int32_t> device_table(table);
            const std::int32_t tokens = 37;
            const std::vector<std::int32_t> slots = distinct_slots(tokens, 80, rng);
            const DeviceBuffer<std::int32_t> device_slots(slots);
            // Rows of a [tokens][3][dim] tensor; this stream is head 1.
            const std::vector<float> keys = random_floats(static_cast<std::size_t>(tokens * 3 * dim), rng, 4.0f);
            const std::vector<float> values = random_floats(keys.size(), rng, 4.0f);
            const DeviceBuffer<float> device_keys(keys), device_values(values);
            const auto offset = static_cast<std::size_t>(dim);

            CpuBackend().write(pools.host_stream(table, 1), slots, std::span(keys).subspan(offset),
                               std::span(values).subspan(offset), 3 * dim);
            CudaBackend().write(pools.device_stream(device_table, 1), std::span<const std::int32_t>(device_slots.span()),
                                std::span<const float>(device_keys.span()).subspan(offset),
                                std::span<const float>(device_values.span()).subspan(offset), 3 * dim, stream.handle);
            stream.sync();
            pools.require_equal();
        }
    }
}

TEMPLATE_TEST_CASE("batched write covers every head in one launch", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(12);
    Stream stream;
    const std::int32_t heads = 3, dim = 32, tokens = 21;
    for (const bool shared_table : {true, false}) {
        INFO((shared_table ? "one table, shared slots" : "a table and slots per head") << ", " << type_name<TestType>());
        Pools<TestType> pools(16, 8, heads, dim, Layout::HND, rng);
        std::vector<std::vector<std::int32_t>> tables;
        for (int h = 0; h < heads; ++h) tables.push_back(page_table(4, 16, rng));
        std::vector<DeviceBuffer<std::int32_t>> device_tables;
        device_tables.reserve(tables.size());
        std::vector<PageTableView> views;
        for (const auto& t : tables) {
            device_tables.emplace_back(t);
            views.push_back({device_tables.back().data(), static_cast<std::int32_t>(t.size())});
        }
        const DeviceBuffer<PageTableView> device_views(views);
        // Slots: [tokens] shared, or [tokens][heads].
        std::vector<std::int32_t> slots;
        std::vector<std::vector<std::int32_t>> per_head(heads);
        for (int h = 0; h < heads; ++h) per_head[static_cast<std::size_t>(h)] = distinct_slots(tokens, 32, rng);
        if (shared_table) {
            slots = per_head[0];
            for (auto& s : per_head) s = slots;
        } else {
            for (int i = 0; i < tokens; ++i) {
                for (int h = 0; h < heads; ++h) slots.push_back(per_head[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)]);
            }
        }
        const DeviceBuffer<std::int32_t> device_slots(slots);
        // [tokens][heads][dim] rows with 4 floats of padding per token.
        const std::int64_t token_stride = heads * dim + 4;
        const std::vector<float> keys = random_floats(static_cast<std::size_t>(tokens * token_stride), rng);
        const std::vector<float> values = random_floats(keys.size(), rng);
        const DeviceBuffer<float> device_keys(keys), device_values(values);

        for (int h = 0; h < heads; ++h) {
            const auto& table = tables[shared_table ? 0 : static_cast<std::size_t>(h)];
            CpuBackend().write(pools.host_stream(table, h), per_head[static_cast<std::size_t>(h)],
                               std::span(keys).subspan(static_cast<std::size_t>(h * dim)),
                               std::span(values).subspan(static_cast<std::size_t>(h * dim)),
                               static_cast<std::int32_t>(token_stride));
        }
        const kvsparse::HeadBatchView<TestType> batch{pools.device_pool(pools.device_keys),
                                                      pools.device_pool(pools.device_values),
                                                      device_views.data(),
                                                      shared_table ? 0 : 1,
                                                      0,
                                                      1,
                                                      heads};
        CudaBackend().write(batch, std::span<const std::int32_t>(device_slots.span()),
                            std::span<const float>(device_keys.span()), std::span<const float>(device_values.span()),
                            tokens, token_stride, dim, stream.handle);
        stream.sync();
        pools.require_equal();
    }
}

TEMPLATE_TEST_CASE("copy_slots stages overlapping moves like CpuBackend", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(13);
    Stream stream;
    for (const std::int32_t dim : {64, 3}) {
        INFO("dim " << dim << ", " << type_name<TestType>());
        Pools<TestType> pools(10, 16, 2, dim, Layout::NHD, rng);
        const std::vector<std::int32_t> table = page_table(6, 10, rng);
        const DeviceBuffer<std::int32_t> device_table(table);
        // A cycle: every destination is another move's source.
        const std::vector<std::int32_t> from = distinct_slots(25, 96, rng);
        std::vector<std::int32_t> to(from.begin() + 1, from.end());
        to.push_back(from.front());
        const DeviceBuffer<std::int32_t> device_from(from), device_to(to);

        CpuBackend().copy_slots(pools.host_stream(table, 0), from, to);
        const std::size_t bytes = CudaBackend::copy_workspace_bytes<TestType>(25, dim);
        const DeviceBuffer<std::byte> scratch(bytes);
        const CudaBackend backend(scratch.span());
        backend.copy_slots(pools.device_stream(device_table, 0), std::span<const std::int32_t>(device_from.span()),
                           std::span<const std::int32_t>(device_to.span()), stream.handle);
        stream.sync();
        pools.require_equal();

        // Without scratch it refuses rather than racing.
        CHECK_THROWS_AS(CudaBackend().copy_slots(pools.device_stream(device_table, 0),
                                                 std::span<const std::int32_t>(device_from.span()),
                                                 std::span<const std::int32_t>(device_to.span()), stream.handle),
                        kvsparse::invalid_argument);
    }
}

TEST_CASE("rope rotates like CpuBackend", "[cuda]") {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(14);
    Stream stream;
    for (const RopeStyle style : {RopeStyle::interleaved, RopeStyle::half_split}) {
        for (const float theta : {10000.0f, 500000.0f}) {
            for (const std::int32_t dim : {64, 128, 7}) {
                INFO("style " << static_cast<int>(style) << ", theta " << theta << ", dim " << dim);
                const std::int32_t tokens = 9, heads = 5;
                std::vector<float> x = random_floats(static_cast<std::size_t>(tokens * heads * dim), rng, 3.0f);
                const std::vector<std::int32_t> positions{0, 1, 2, 17, 511, 4096, 131071, 1000000, 2000000000};
                DeviceBuffer<float> device_x(x);
                const DeviceBuffer<std::int32_t> device_positions(positions);
                const Rope rope{style, theta};
                CpuBackend().rope(x, heads, dim, positions, rope);
                CudaBackend().rope(device_x.span(), heads, dim, std::span<const std::int32_t>(device_positions.span()),
                                   rope, stream.handle);
                stream.sync();
                // The device's double sin and cos may round a turn to a float one ulp away from the host's:
                // an error of about one ulp of the inputs (up to 3), whatever the size of the result.
                CHECK(worst_relative(device_x.download(), x, 1.0f) <= 1e-6f);
            }
        }
    }
}

TEMPLATE_TEST_CASE("shift_keys re-rotates stored keys like CpuBackend", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(15);
    Stream stream;
    for (const RopeStyle style : {RopeStyle::interleaved, RopeStyle::half_split}) {
        for (const std::int32_t delta : {-1017, 3, 250000}) {
            INFO("style " << static_cast<int>(style) << ", delta " << delta << ", " << type_name<TestType>());
            const Rope rope{style, 10000.0f};
            Pools<TestType> pools(8, 16, 2, 64, Layout::NHD, rng);
            const std::vector<std::int32_t> table = page_table(4, 8, rng);
            const DeviceBuffer<std::int32_t> device_table(table);
            const std::vector<std::int32_t> slots = distinct_slots(40, 64, rng);
            const DeviceBuffer<std::int32_t> device_slots(slots);
            CpuBackend().shift_keys(pools.host_stream(table, 1), slots, delta, rope);
            CudaBackend().shift_keys(pools.device_stream(device_table, 1),
                                     std::span<const std::int32_t>(device_slots.span()), delta, rope, stream.handle);
            stream.sync();
            CHECK(worst_relative(pools.device_keys.download(), pools.host_keys) <= storage_epsilon<TestType>());
            CHECK(first_bit_difference(pools.device_values.download(), pools.host_values) == -1);
        }
    }
}

TEMPLATE_TEST_CASE("batched shift_keys covers every head in one launch", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(16);
    Stream stream;
    const std::int32_t heads = 4, per_head = 19, delta = -77;
    const Rope rope{RopeStyle::half_split, 10000.0f};
    for (const bool shared : {true, false}) {
        INFO((shared ? "one slot list" : "a slot list per head") << ", " << type_name<TestType>());
        Pools<TestType> pools(6, 16, heads, 32, Layout::NHD, rng);
        const std::vector<std::int32_t> table = page_table(3, 6, rng);
        const DeviceBuffer<std::int32_t> device_table(table);
        const std::vector<PageTableView> views{{device_table.data(), 3}};
        const DeviceBuffer<PageTableView> device_views(views);
        std::vector<std::int32_t> slots;
        for (int h = 0; h < (shared ? 1 : heads); ++h) {
            const auto list = distinct_slots(per_head, 48, rng);
            slots.insert(slots.end(), list.begin(), list.end());
        }
        const DeviceBuffer<std::int32_t> device_slots(slots);
        for (int h = 0; h < heads; ++h) {
            const auto list = std::span(slots).subspan(shared ? 0 : static_cast<std::size_t>(h * per_head),
                                                       static_cast<std::size_t>(per_head));
            CpuBackend().shift_keys(pools.host_stream(table, h), list, delta, rope);
        }
        const kvsparse::HeadBatchView<TestType> batch{pools.device_pool(pools.device_keys),
                                                      pools.device_pool(pools.device_values),
                                                      device_views.data(),
                                                      0,
                                                      0,
                                                      1,
                                                      heads};
        CudaBackend().shift_keys(batch, std::span<const std::int32_t>(device_slots.span()), per_head, delta, rope,
                                 stream.handle);
        stream.sync();
        CHECK(worst_relative(pools.device_keys.download(), pools.host_keys) <= storage_epsilon<TestType>());
    }
}

TEMPLATE_TEST_CASE("attend matches CpuBackend", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(17);
    Stream stream;
    struct Case {
        std::int32_t group, dim, n;
        bool rotate, probabilities;
        RopeStyle style = RopeStyle::interleaved;
        Layout layout = Layout::NHD;
    };
    // n = 200: three full chunks of 64 slots and a partial one; dim 7: an odd element left unrotated and
    // no 16-byte loads; dim 136: a second, partial segment of 16-byte loads; group 5 and 9: a partial
    // tile of query heads; n = 9000: 141 chunks for the merge, and the merge's second tile of 256 chunks
    // at n = 20000.
    for (const Case c : {Case{4, 64, 200, false, false}, Case{4, 64, 200, true, true}, Case{1, 128, 1, false, true},
                         Case{8, 32, 64, false, true}, Case{2, 7, 130, true, true}, Case{4, 64, 0, false, true},
                         Case{5, 136, 1000, false, true, RopeStyle::interleaved, Layout::HND},
                         Case{4, 128, 9000, true, false, RopeStyle::half_split}, Case{9, 128, 20000, false, true},
                         Case{1, 16, 333, false, false, RopeStyle::interleaved, Layout::HND}}) {
        INFO("group " << c.group << ", dim " << c.dim << ", n " << c.n << ", rotate " << c.rotate << ", probabilities "
                      << c.probabilities << ", " << type_name<TestType>());
        const std::int32_t pages = std::max(16, (c.n + 15) / 16);
        Pools<TestType> pools(pages + 4, 16, 2, c.dim, c.layout, rng);  // attends head 1 of 2
        const std::vector<std::int32_t> table = page_table(pages, pages + 4, rng);
        const DeviceBuffer<std::int32_t> device_table(table);
        const std::vector<std::int32_t> slots = distinct_slots(c.n, pages * 16, rng);
        const std::vector<float> queries = random_floats(static_cast<std::size_t>(c.group * c.dim), rng, 2.0f);
        std::vector<std::int32_t> rotation;
        if (c.rotate) {
            std::uniform_int_distribution<std::int32_t> turn(-300, 300);
            for (std::int32_t i = 0; i < c.n; ++i) rotation.push_back(turn(rng));
        }
        std::vector<float> probabilities;
        if (c.probabilities) probabilities = random_floats(static_cast<std::size_t>(c.n), rng);
        std::vector<float> out(queries.size(), 7.0f);
        const Rope rope{c.style, 10000.0f};
        const float scale = 1.0f / std::sqrt(static_cast<float>(c.dim));

        const DeviceBuffer<std::int32_t> device_slots(slots), device_rotation(rotation);
        const DeviceBuffer<float> device_queries(queries);
        DeviceBuffer<float> device_probabilities(probabilities), device_out(out);
        const kvsparse::AttendArgs<TestType> device_args{pools.device_stream(device_table, 1),
                                                         std::span<const std::int32_t>(device_slots.span()),
                                                         std::span<const float>(device_queries.span()),
                                                         c.group,
                                                         scale,
                                                         std::span<const std::int32_t>(device_rotation.span()),
                                                         rope,
                                                         device_out.span(),
                                                         device_probabilities.span()};
        DeviceBuffer<std::byte> workspace(CudaBackend::workspace_bytes(c.group, c.n, c.dim));
        CudaBackend().attend(device_args, workspace.span(), stream.handle);

        std::vector<std::byte> host_workspace(CpuBackend::workspace_bytes(c.group, c.n, c.dim));
        const kvsparse::AttendArgs<TestType> host_args{pools.host_stream(table, 1), slots, queries, c.group, scale,
                                                       rotation, rope, out, probabilities};
        CpuBackend().attend(host_args, host_workspace);
        stream.sync();

        require_attention_close(device_out, out, device_probabilities, probabilities);
        pools.require_equal();  // attention reads only
    }
}

TEMPLATE_TEST_CASE("batched attend equals one attend per KV head", "[cuda]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(19);
    Stream stream;
    const std::int32_t heads = 3, group = 4, dim = 64, n = 300, pages = 24;
    for (const bool rotate : {false, true}) {
        INFO("rotate " << rotate << ", " << type_name<TestType>());
        // kvsparse's own layout: every head in one pool, a table per head, slots chosen per head.
        Pools<TestType> pools(pages * heads, 16, heads, dim, Layout::NHD, rng);
        std::vector<std::vector<std::int32_t>> tables;
        std::vector<DeviceBuffer<std::int32_t>> device_tables;
        device_tables.reserve(heads);
        std::vector<PageTableView> views;
        std::vector<std::int32_t> slots, rotation;
        std::uniform_int_distribution<std::int32_t> turn(-300, 300);
        for (int h = 0; h < heads; ++h) {
            tables.push_back(page_table(pages, pages * heads, rng));
            device_tables.emplace_back(tables.back());
            views.push_back({device_tables.back().data(), pages});
            const std::vector<std::int32_t> mine = distinct_slots(n, pages * 16, rng);
            slots.insert(slots.end(), mine.begin(), mine.end());
            for (std::int32_t i = 0; rotate && i < n; ++i) rotation.push_back(turn(rng));
        }
        const DeviceBuffer<PageTableView> device_views(views);
        const std::vector<float> queries = random_floats(static_cast<std::size_t>(heads * group * dim), rng, 2.0f);
        std::vector<float> probabilities = random_floats(static_cast<std::size_t>(heads * n), rng);
        std::vector<float> out(queries.size(), 7.0f);
        const Rope rope{RopeStyle::half_split, 10000.0f};
        const float scale = 1.0f / std::sqrt(static_cast<float>(dim));

        const DeviceBuffer<std::int32_t> device_slots(slots), device_rotation(rotation);
        const DeviceBuffer<float> device_queries(queries);
        DeviceBuffer<float> device_probabilities(probabilities), device_out(out);
        const kvsparse::BatchAttendArgs<TestType> batch{{pools.device_pool(pools.device_keys),
                                                         pools.device_pool(pools.device_values), device_views.data(), 1, 0,
                                                         1, heads},
                                                        n,
                                                        std::span<const std::int32_t>(device_slots.span()),
                                                        std::span<const float>(device_queries.span()),
                                                        group,
                                                        scale,
                                                        std::span<const std::int32_t>(device_rotation.span()),
                                                        rope,
                                                        device_out.span(),
                                                        device_probabilities.span()};
        DeviceBuffer<std::byte> workspace(heads * CudaBackend::workspace_bytes(group, n, dim));
        CudaBackend().attend(batch, workspace.span(), stream.handle);

        std::vector<std::byte> host_workspace(CpuBackend::workspace_bytes(group, n, dim));
        for (int h = 0; h < heads; ++h) {
            const auto rows = static_cast<std::size_t>(h * n);
            const auto outputs = static_cast<std::size_t>(h * group * dim);
            const std::span<const std::int32_t> head_rotation =
                rotate ? std::span<const std::int32_t>(rotation).subspan(rows, static_cast<std::size_t>(n))
                       : std::span<const std::int32_t>{};
            const kvsparse::AttendArgs<TestType> host_args{
                pools.host_stream(tables[static_cast<std::size_t>(h)], h),
                std::span<const std::int32_t>(slots).subspan(rows, static_cast<std::size_t>(n)),
                std::span<const float>(queries).subspan(outputs, static_cast<std::size_t>(group * dim)),
                group,
                scale,
                head_rotation,
                rope,
                std::span<float>(out).subspan(outputs, static_cast<std::size_t>(group * dim)),
                std::span<float>(probabilities).subspan(rows, static_cast<std::size_t>(n))};
            CpuBackend().attend(host_args, host_workspace);
        }
        stream.sync();

        require_attention_close(device_out, out, device_probabilities, probabilities);
        pools.require_equal();  // attention reads only
    }
}

TEMPLATE_TEST_CASE("page_scores equal CpuBackend's bit for bit", "[cuda][quest]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(5);
    for (const int dim : {8, 16, 64, 128, 136}) {
        for (const int rows : {1, 2, 3, 4, 7, 8, 9}) {
            for (const auto mode : {kvsparse::GqaAggregation::max, kvsparse::GqaAggregation::sum,
                                    kvsparse::GqaAggregation::per_query_head}) {
                CAPTURE(dim, rows, static_cast<int>(mode));
                const int pages = 37;
                std::vector<TestType> data;
                const auto host = test_inputs::random_bounds(data, pages, dim, rng);
                const std::vector<float> q = test_inputs::random_queries(rows, dim, rng);
                const std::size_t n = static_cast<std::size_t>(pages * rows);
                std::vector<float> want(n, -1.0f);
                CpuBackend::page_scores(host, pages, q, rows, mode, want);

                const DeviceBuffer<TestType> device_bounds(data);
                const DeviceBuffer<float> device_q(q);
                DeviceBuffer<float> device_scores(std::vector<float>(n, -1.0f));
                const auto bounds = kvsparse::KeyBounds<const TestType>::packed(device_bounds.data(), pages, 16, dim);
                CudaBackend().page_scores(bounds, pages, std::span<const float>(device_q.span()), rows, mode,
                                          device_scores.span());
                const std::vector<float> got = device_scores.download();
                CHECK(std::memcmp(want.data(), got.data(), n * sizeof(float)) == 0);
            }
        }
    }
}

TEMPLATE_TEST_CASE("batch_page_scores equal one page_scores per head", "[cuda][quest]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(6);
    const int heads = 3, pages = 29, dim = 64, rows = 4, stride_pages = 31;  // heads' bounds 31 pages apart
    // A head stride of whole pages (16-byte loads), or one element more (element loads).
    for (const auto& [mode, extra] : {std::pair{kvsparse::GqaAggregation::max, 0}, std::pair{kvsparse::GqaAggregation::per_query_head, 0},
                                     std::pair{kvsparse::GqaAggregation::max, 1}}) {
        CAPTURE(static_cast<int>(mode), extra);
        std::vector<TestType> data;
        const auto all = test_inputs::random_bounds(data, heads * stride_pages + 1, dim, rng);
        const std::vector<float> q = test_inputs::random_queries(heads * rows, dim, rng);
        const std::size_t per_head = static_cast<std::size_t>(pages) * (mode == kvsparse::GqaAggregation::per_query_head ? rows : 1);
        std::vector<float> want(heads * per_head, -1.0f);
        const std::int64_t head_stride = std::int64_t{stride_pages} * all.page_stride + extra;
        for (int h = 0; h < heads; ++h) {
            auto head_bounds = all;
            head_bounds.data += h * head_stride;
            head_bounds.pages = pages;
            CpuBackend::page_scores(head_bounds, pages,
                                    std::span<const float>(q).subspan(static_cast<std::size_t>(h * rows * dim),
                                                                      static_cast<std::size_t>(rows * dim)),
                                    rows, mode, std::span<float>(want).subspan(h * per_head, per_head));
        }
        const DeviceBuffer<TestType> device_bounds(data);
        const DeviceBuffer<float> device_q(q);
        DeviceBuffer<float> device_scores(std::vector<float>(want.size(), -1.0f));
        const auto bounds = kvsparse::KeyBounds<const TestType>::packed(device_bounds.data(), pages, 16, dim);
        CudaBackend().batch_page_scores(bounds, head_stride, heads, pages, std::span<const float>(device_q.span()), rows,
                                        mode, device_scores.span());
        const std::vector<float> got = device_scores.download();
        CHECK(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0);
    }
}

TEMPLATE_TEST_CASE("append_key_bounds folds keys like the host", "[cuda][quest]", float, kvsparse::half, bfloat16) {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-3.0f, 3.0f);
    const int dim = 24, page_size = 8, stride = 3 * dim, tokens = 203;
    const int pages = (tokens + page_size - 1) / page_size;
    std::vector<TestType> host_data(kvsparse::KeyBounds<TestType>::elements(pages, dim), kvsparse::from_float<TestType>(9.0f));
    const auto host = kvsparse::KeyBounds<TestType>::packed(host_data.data(), pages, page_size, dim);
    DeviceBuffer<TestType> device_data(host_data);  // stale values: the first key of a page must overwrite them
    const auto device = kvsparse::KeyBounds<TestType>::packed(device_data.data(), pages, page_size, dim);
    for (int first = 0; first < tokens;) {
        const int count = std::min(tokens - first, 1 + static_cast<int>(rng() % 40));  // chunks across pages
        std::vector<float> keys(static_cast<std::size_t>(count * stride));
        for (float& x : keys) x = u(rng);
        for (int i = 0; i < count; ++i) kvsparse::append_key_bounds(host, first + i, keys.data() + i * stride);
        const DeviceBuffer<float> device_keys(keys);
        CudaBackend().append_key_bounds(device, first, count, std::span<const float>(device_keys.span()), stride);
        first += count;
    }
    const std::vector<TestType> got = device_data.download();
    CHECK(std::memcmp(got.data(), host_data.data(), host_data.size() * sizeof(TestType)) == 0);
}

TEST_CASE("top_pages selects the pages CpuBackend selects", "[cuda][quest]") {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(9);
    const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f};
    for (int round = 0; round < 120; ++round) {
        // Mostly under 3000 scores; every tenth round up to 24000, and the edges of the last pass's tiles.
        const int tile = kvsparse::cuda::kTopPagesThreads;
        const int n = round == 0   ? tile
                      : round == 1 ? tile + 1
                      : round % 10 == 9 ? 1 + static_cast<int>(rng() % 24000)
                                        : 1 + static_cast<int>(rng() % 3000);
        const int k = static_cast<int>(rng() % static_cast<unsigned>(n + 3)) - 1;  // -1 .. n + 1
        const int distinct = 1 + static_cast<int>(rng() % 8);                     // few values: many ties
        std::vector<float> scores(static_cast<std::size_t>(n));
        for (float& s : scores) {
            s = rng() % 5 == 0 ? specials[rng() % 7]
                               : static_cast<float>(static_cast<int>(rng() % static_cast<unsigned>(distinct)) - 3) * 0.5f +
                                     (round % 2 == 0 ? 0.0f : static_cast<float>(rng() % 1000) * 1e-3f);
        }
        std::vector<std::int32_t> want(static_cast<std::size_t>(n));
        const int want_count = CpuBackend::top_pages(scores, n, k, want);

        const DeviceBuffer<float> device_scores(scores);
        DeviceBuffer<std::int32_t> order(std::vector<std::int32_t>(static_cast<std::size_t>(n), -7));
        const int got_count = CudaBackend().top_pages(std::span<const float>(device_scores.span()), n, k, order.span());
        const std::vector<std::int32_t> got = order.download();
        CAPTURE(round, n, k);
        REQUIRE(got_count == want_count);
        CHECK(std::vector<std::int32_t>(got.begin(), got.begin() + got_count) ==
              std::vector<std::int32_t>(want.begin(), want.begin() + want_count));
    }
}

TEST_CASE("batch_top_pages selects each head's pages as CpuBackend does", "[cuda][quest]") {
    SKIP_WITHOUT_DEVICE();
    std::mt19937 rng(10);
    const int heads = 5;
    for (const int n : {300, 4096, 20000}) {
        for (const int k : {1, 37, n - 1}) {
            CAPTURE(n, k);
            std::vector<float> scores(static_cast<std::size_t>(heads * n));
            for (float& x : scores) x = static_cast<float>(static_cast<int>(rng() % 50) - 25) * 0.25f;  // many ties
            std::vector<std::int32_t> want(scores.size());
            for (int h = 0; h < heads; ++h) {
                const auto at = static_cast<std::size_t>(h * n);
                CpuBackend::top_pages(std::span<const float>(scores).subspan(at, static_cast<std::size_t>(n)), n, k,
                                      std::span<std::int32_t>(want).subspan(at, static_cast<std::size_t>(n)));
            }
            const DeviceBuffer<float> device_scores(scores);
            DeviceBuffer<std::int32_t> order(std::vector<std::int32_t>(scores.size(), -7));
            REQUIRE(CudaBackend().batch_top_pages(std::span<const float>(device_scores.span()), heads, n, k, order.span()) == k);
            const std::vector<std::int32_t> got = order.download();
            for (int h = 0; h < heads; ++h) {
                const auto at = static_cast<std::ptrdiff_t>(h * n);
                CHECK(std::vector<std::int32_t>(got.begin() + at, got.begin() + at + k) ==
                      std::vector<std::int32_t>(want.begin() + at, want.begin() + at + k));
            }
        }
    }
}

// Tagged [launch-failure]: bench/gpu.sh leaves it out of the memcheck run, which reports the refused call.
TEST_CASE("CudaBackend launch failures throw kvsparse::error with the CUDA error", "[cuda][launch-failure]") {
    SKIP_WITHOUT_DEVICE();
    // Shared memory for 256 query heads of dimension 256 exceeds every GPU's per-block limit.
    const std::int32_t group = 256, dim = 256, n = 4;
    std::mt19937 rng(18);
    Pools<float> pools(1, 16, 1, dim, Layout::NHD, rng);
    const DeviceBuffer<std::int32_t> table(std::vector<std::int32_t>{0});
    const DeviceBuffer<std::int32_t> slots(std::vector<std::int32_t>{0, 1, 2, 3});
    DeviceBuffer<float> queries(static_cast<std::size_t>(group * dim)), out(static_cast<std::size_t>(group * dim));
    DeviceBuffer<std::byte> workspace(CudaBackend::workspace_bytes(group, n, dim));
    const kvsparse::AttendArgs<float> args{pools.device_stream(table, 0), std::span<const std::int32_t>(slots.span()),
                                           std::span<const float>(queries.span()), group, 1.0f, {}, Rope{},
                                           out.span(), {}};
    try {
        CudaBackend().attend(args, workspace.span());
        FAIL("attend did not throw");
    } catch (const kvsparse::invalid_argument&) {
        FAIL("a launch failure must not be reported as invalid_argument");
    } catch (const kvsparse::error& e) {
        CHECK(std::string(e.what()).find("attend_chunk_kernel") != std::string::npos);
    }
    // The failure is cleared: the next launch works.
    DeviceBuffer<float> x(std::vector<float>(8, 1.0f));
    const DeviceBuffer<std::int32_t> position(std::vector<std::int32_t>{3});
    CHECK_NOTHROW(CudaBackend().rope(x.span(), 1, 8, std::span<const std::int32_t>(position.span()), Rope{}));
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

// Runs everywhere: sizes are checked on the host before anything is enqueued.
TEST_CASE("CudaBackend rejects inconsistent sizes before launching", "[cuda]") {
    std::vector<float> storage(64);
    const std::vector<std::int32_t> table{0};
    const StreamView<float> view{PagePoolView<float>::packed(storage.data(), Layout::NHD, 1, 4, 1, 8),
                                 PagePoolView<float>::packed(storage.data() + 32, Layout::NHD, 1, 4, 1, 8),
                                 PageTableView{table.data(), 1}, 0};
    const std::vector<std::int32_t> slots{0, 1};
    const std::vector<float> rows(8);  // two rows of 8 need 16 floats at stride 8
    CHECK_THROWS_AS(CudaBackend().write(view, slots, rows, rows, 8), kvsparse::invalid_argument);

    const std::vector<float> queries(16);
    std::vector<float> out(16);
    const kvsparse::AttendArgs<float> args{view, slots, queries, 2, 1.0f, {}, Rope{}, out, {}};
    std::vector<std::byte> small(4);
    CHECK_THROWS_AS(CudaBackend().attend(args, small), kvsparse::invalid_argument);

    std::vector<float> x(10);
    const std::vector<std::int32_t> positions{0, 1};
    CHECK_THROWS_AS(CudaBackend().rope(x, 1, 8, positions, Rope{}), kvsparse::invalid_argument);
    CHECK_THROWS_AS(CudaBackend().copy_slots(view, slots, std::vector<std::int32_t>{1}), kvsparse::invalid_argument);

    const auto bounds = kvsparse::KeyBounds<const float>::packed(storage.data(), 4, 16, 8);
    std::vector<float> scores(4);
    const std::vector<float> one_row(8);
    using kvsparse::GqaAggregation;
    CHECK_THROWS_AS(CudaBackend().page_scores(bounds, 5, one_row, 1, GqaAggregation::max, scores), kvsparse::invalid_argument);
    CHECK_THROWS_AS(CudaBackend().page_scores(bounds, 4, queries, 1, GqaAggregation::max, scores), kvsparse::invalid_argument);
    CHECK_THROWS_AS(CudaBackend().page_scores(bounds, 4, queries, 2, GqaAggregation::per_query_head, scores),
                    kvsparse::invalid_argument);
    const auto writable = kvsparse::KeyBounds<float>::packed(storage.data(), 4, 16, 8);
    CHECK_THROWS_AS(CudaBackend().append_key_bounds(writable, 0, 2, one_row, 8), kvsparse::invalid_argument);  // 1 row
    CHECK_THROWS_AS(CudaBackend().append_key_bounds(writable, 60, 8, queries, 1), kvsparse::invalid_argument);  // page 4
}

static_assert(kvsparse::kv_backend<CudaBackend>);
