#pragma once
// Quest's top-k on the GPU (CudaBackend::top_pages), the same pages as CpuBackend::top_pages: the k best
// scores, equal scores to the lower index, NaN as -inf, ascending. Scores become order-preserving keys
// (page_score_key, shared with the CPU); CUB's radix sort, which is stable, orders (key, index) pairs by
// descending key, so equal keys keep their ascending indices; the first k indices are then sorted.

#include <cuda_runtime.h>

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
    for (std::int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = static_cast<Index>(i);
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

/// order[0, k) = the k best of scores[0, n) (0 < k < n), ascending; `workspace` laid out by `layout`.
inline void launch_top_pages(const float* scores, std::int32_t n, std::int32_t k, std::int32_t* order,
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

inline void launch_iota(std::int32_t* out, std::int32_t n, cudaStream_t stream) {
    iota_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, n);
    check_launch("iota_kernel");
}

}  // namespace kvsparse::cuda
