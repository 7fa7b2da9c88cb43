#pragma once
// Quest's per-page key bounds on the GPU (CudaBackend::append_key_bounds): the keys appended at
// positions [first, first + count) of an append-only stream (slot == position) folded into the min / max
// of their pages, exactly as CpuBackend::update_key_bounds folds them one at a time: each key narrowed to
// the storage type as a write narrows it, a page's first position initializing it (fold_key_bound,
// shared with the CPU). One thread per (page,
// element) walks that page's new keys in order, so pages that several keys of a call share need no
// atomics.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::cuda {

template <storage_type T>
__global__ void append_key_bounds_kernel(KeyBounds<T> bounds, std::int32_t first, std::int32_t count, const float* keys,
                                         std::int64_t key_stride, std::int64_t pages) {
    const std::int32_t P = bounds.page_size, dim = bounds.head_dim;
    const std::int32_t first_page = first / P;
    for (std::int64_t i = global_thread(); i < pages * dim; i += grid_threads()) {
        const auto page = static_cast<std::int32_t>(first_page + i / dim);
        const auto d = static_cast<std::int32_t>(i % dim);
        T lo = bounds.kmin(page)[d], hi = bounds.kmax(page)[d];
        const std::int32_t begin = page * P > first ? page * P : first;
        const std::int32_t end = (page + 1) * P < first + count ? (page + 1) * P : first + count;
        for (std::int32_t position = begin; position < end; ++position) {
            const T stored = from_float<T>(keys[static_cast<std::int64_t>(position - first) * key_stride + d]);
            fold_key_bound(lo, hi, stored, position % P == 0);
        }
        bounds.kmin(page)[d] = lo;
        bounds.kmax(page)[d] = hi;
    }
}

template <storage_type T>
void launch_append_key_bounds(const KeyBounds<T>& bounds, std::int32_t first, std::int32_t count, const float* keys,
                              std::int64_t key_stride, cudaStream_t stream) {
    const std::int64_t pages = (first + count - 1) / bounds.page_size - first / bounds.page_size + 1;
    append_key_bounds_kernel<T><<<blocks_for(pages * bounds.head_dim), kThreads, 0, stream>>>(bounds, first, count, keys,
                                                                                               key_stride, pages);
    check_launch("append_key_bounds_kernel");
}

}  // namespace kvsparse::cuda
