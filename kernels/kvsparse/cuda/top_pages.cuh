#pragma once
// Quest's top-k on the GPU (CudaBackend::top_pages), the same pages as CpuBackend::top_pages: the k best
// scores, equal scores to the lower index, NaN as -inf, ascending. Scores become order-preserving keys
// (page_score_key, shared with the CPU); CUB's radix sort, which is stable, orders (key, index) pairs by
// descending key, so equal keys keep their ascending indices; the first k indices are then sorted.
// Up to kBlockTopPages scores (Quest's 2048 pages at 32K tokens) one block does it all in one launch:
// CUB's block radix sort (stable as well), then the chosen indices in order by a block scan; a batch of
// heads is then one launch too, a block per head.

#include <cuda_runtime.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::cuda {

// Kernels in a header are templates (here on the index type), so that every translation unit may
// instantiate them.
template <class Index>
__global__ void page_keys_kernel(const float* scores, Index n, std::uint32_t* keys, Index* index) {
    for (std::int64_t i = global_thread(); i < n; i += grid_threads()) {
        keys[i] = page_score_key(scores[i]);
        index[i] = static_cast<Index>(i);
    }
}

template <class Index>
__global__ void iota_kernel(Index* out, Index n) {
    out += static_cast<std::int64_t>(blockIdx.y) * n;
    for (std::int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = static_cast<Index>(i);
}

inline constexpr int kBlockTopPagesThreads = 512;
inline constexpr int kBlockTopPagesItems = 8;  // per thread, consecutive indices
inline constexpr std::int32_t kBlockTopPages = kBlockTopPagesThreads * kBlockTopPagesItems;

/// order[0, k) for n <= kBlockTopPages in one block, block b for scores and order [b * n, b * n + n).
/// Missing items get key 0, below every score's key (-inf's is 0x007fffff), and indices past n, so they
/// sort last.
template <class Index>
__global__ void __launch_bounds__(kBlockTopPagesThreads) block_top_pages_kernel(const float* scores, Index n, Index k,
                                                                               Index* order) {
    scores += static_cast<std::int64_t>(blockIdx.x) * n;
    order += static_cast<std::int64_t>(blockIdx.x) * n;
    using Sort = cub::BlockRadixSort<std::uint32_t, kBlockTopPagesThreads, kBlockTopPagesItems, Index>;
    using Scan = cub::BlockScan<Index, kBlockTopPagesThreads>;
    __shared__ union {
        typename Sort::TempStorage sort;
        typename Scan::TempStorage scan;
    } temp;
    __shared__ unsigned char chosen[kBlockTopPages];

    const Index first = static_cast<Index>(threadIdx.x) * kBlockTopPagesItems;
    std::uint32_t keys[kBlockTopPagesItems];
    Index index[kBlockTopPagesItems];
    for (int j = 0; j < kBlockTopPagesItems; ++j) {
        index[j] = first + j;
        keys[j] = index[j] < n ? page_score_key(scores[index[j]]) : 0u;
        chosen[first + j] = 0;
    }
    __syncthreads();  // chosen is cleared before any thread marks it
    Sort(temp.sort).SortDescending(keys, index);  // blocked: thread t holds ranks [t * items, t * items + items)
    for (int j = 0; j < kBlockTopPagesItems; ++j) {
        if (first + j < k) chosen[index[j]] = 1;
    }
    __syncthreads();
    Index count = 0;
    for (int j = 0; j < kBlockTopPagesItems; ++j) count += chosen[first + j];
    Index position = 0;
    Scan(temp.scan).ExclusiveSum(count, position);
    for (int j = 0; j < kBlockTopPagesItems; ++j) {
        if (chosen[first + j] != 0) order[position++] = first + j;
    }
}

/// The workspace of one top_pages call over n scores: four arrays of n and CUB's scratch, each 256-byte
/// aligned.
struct TopPagesLayout {
    static constexpr std::size_t align = 256;
    std::size_t n = 0, cub_bytes = 0;

    static std::size_t rounded(std::size_t bytes) { return (bytes + align - 1) / align * align; }
    std::size_t array_bytes() const { return rounded(n * 4); }
    std::size_t total() const { return 4 * array_bytes() + rounded(cub_bytes); }

    /// CUB's scratch for both sorts of n items, as CUB sizes it for the current device.
    static TopPagesLayout of(std::int32_t n) {
        TopPagesLayout layout;
        layout.n = static_cast<std::size_t>(n);
        std::size_t pairs = 0, keys = 0;
        check(cub::DeviceRadixSort::SortPairsDescending(nullptr, pairs, static_cast<const std::uint32_t*>(nullptr),
                                                        static_cast<std::uint32_t*>(nullptr),
                                                        static_cast<const std::int32_t*>(nullptr),
                                                        static_cast<std::int32_t*>(nullptr), n),
              "top_pages: sizing the pair sort");
        check(cub::DeviceRadixSort::SortKeys(nullptr, keys, static_cast<const std::int32_t*>(nullptr),
                                             static_cast<std::int32_t*>(nullptr), n),
              "top_pages: sizing the index sort");
        layout.cub_bytes = pairs > keys ? pairs : keys;
        return layout;
    }
};

/// One head's top-k by CUB's device-wide sorts.
inline void launch_sorted_top_pages(const float* scores, std::int32_t n, std::int32_t k, std::int32_t* order,
                                    std::byte* workspace, const TopPagesLayout& layout, cudaStream_t stream) {
    const std::size_t array = layout.array_bytes();
    auto* keys_in = reinterpret_cast<std::uint32_t*>(workspace);
    auto* keys_out = reinterpret_cast<std::uint32_t*>(workspace + array);
    auto* index_in = reinterpret_cast<std::int32_t*>(workspace + 2 * array);
    auto* index_out = reinterpret_cast<std::int32_t*>(workspace + 3 * array);
    void* temp = workspace + 4 * array;
    std::size_t temp_bytes = layout.cub_bytes;
    page_keys_kernel<<<blocks_for(n), kThreads, 0, stream>>>(scores, n, keys_in, index_in);
    check_launch("page_keys_kernel");
    check(cub::DeviceRadixSort::SortPairsDescending(temp, temp_bytes, keys_in, keys_out, index_in, index_out, n, 0, 32,
                                                    stream),
          "top_pages: pair sort");
    temp_bytes = layout.cub_bytes;
    check(cub::DeviceRadixSort::SortKeys(temp, temp_bytes, index_out, order, k, 0, 32, stream), "top_pages: index sort");
}

/// For each of `heads` rows of n scores: order[0, k) = the k best of scores[0, n) (0 < k < n), ascending;
/// `workspace` laid out by `layout` (used by one head after another).
inline void launch_top_pages(const float* scores, std::int32_t heads, std::int32_t n, std::int32_t k,
                             std::int32_t* order, std::byte* workspace, const TopPagesLayout& layout,
                             cudaStream_t stream) {
    if (n <= kBlockTopPages) {
        block_top_pages_kernel<<<static_cast<unsigned>(heads), kBlockTopPagesThreads, 0, stream>>>(scores, n, k, order);
        check_launch("block_top_pages_kernel");
        return;
    }
    for (std::int32_t h = 0; h < heads; ++h) {
        const std::int64_t offset = std::int64_t{h} * n;
        launch_sorted_top_pages(scores + offset, n, k, order + offset, workspace, layout, stream);
    }
}

/// out[h * n + i] = i for each of `heads` rows.
inline void launch_iota(std::int32_t* out, std::int32_t heads, std::int32_t n, cudaStream_t stream) {
    const dim3 grid(blocks_for(n), static_cast<unsigned>(heads));
    iota_kernel<<<grid, kThreads, 0, stream>>>(out, n);
    check_launch("iota_kernel");
}

}  // namespace kvsparse::cuda
