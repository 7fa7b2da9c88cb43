#pragma once
// Quest's top-k on the GPU (CudaBackend::top_pages), the same pages as CpuBackend::top_pages: the k best
// scores, equal scores to the lower index, NaN as -inf, ascending. One block per row of scores (a KV
// head), any length, no workspace: a radix select, as on the CPU. Scores become order-preserving keys
// (page_score_key, shared with the CPU); four passes over the row, one per 8-bit digit from the top,
// histogram the keys that still match the digits chosen so far and pick the digit holding the k-th
// largest key (a block scan over the histogram). That leaves the k-th key itself, T, and how many of the keys equal to T are taken. A last
// pass in index order, a tile of the row at a time, takes every key above T and the first of those equal
// to it; block scans give each taken page its place, so the pages come out ascending.

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::cuda {

inline constexpr int kTopPagesThreads = 1024;

// Kernels in a header are templates (here on the index type), so that every translation unit may
// instantiate them.

/// Block b: order[b * n, b * n + k) = the k best of scores[b * n, b * n + n) (0 < k < n), ascending.
template <class Index>
__global__ void __launch_bounds__(kTopPagesThreads) top_pages_kernel(const float* scores, Index n, Index k, Index* order) {
    using Scan = cub::BlockScan<Index, kTopPagesThreads>;
    __shared__ typename Scan::TempStorage scan;
    __shared__ Index histogram[256];
    __shared__ std::uint32_t prefix_shared;
    __shared__ Index still_needed_shared;
    scores += static_cast<std::int64_t>(blockIdx.x) * n;
    order += static_cast<std::int64_t>(blockIdx.x) * n;
    const int tid = static_cast<int>(threadIdx.x);

    std::uint32_t prefix = 0, mask = 0;  // the digits of T chosen so far
    Index still_needed = k;              // keys to take among those matching the prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += kTopPagesThreads) histogram[d] = 0;
        __syncthreads();
        for (Index base = 0; base < n; base += kTopPagesThreads) {
            // Lanes with the same digit add once: scores of one magnitude share their top digits.
            const Index i = base + tid;
            const std::uint32_t key = i < n ? page_score_key(scores[i]) : 0u;
            const bool counts = i < n && (key & mask) == prefix;
            const unsigned digit = counts ? (key >> shift) & 255u : 256u;
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            if (counts && __ffs(static_cast<int>(peers)) - 1 == tid % 32) {
                atomicAdd(&histogram[digit], static_cast<Index>(__popc(peers)));
            }
        }
        __syncthreads();
        // Thread t < 256 holds digit 255 - t: after a scan, `above` counts the matching keys with a larger
        // digit, and the thread whose digit holds the still_needed-th key is the one with above <
        // still_needed <= above + its count.
        const Index count = tid < 256 ? histogram[255 - tid] : Index{0};
        Index above = 0;
        Scan(scan).ExclusiveSum(count, above);
        if (tid < 256 && above < still_needed && still_needed <= above + count) {
            prefix_shared = prefix | (static_cast<std::uint32_t>(255 - tid) << shift);
            still_needed_shared = still_needed - above;
        }
        __syncthreads();
        prefix = prefix_shared;
        still_needed = still_needed_shared;
        mask |= 255u << shift;
    }

    // prefix is T; take every key above it and the first still_needed keys equal to it, in index order.
    Index equal_before = 0, taken_before = 0;  // over the tiles done
    for (Index base = 0; base < n; base += kTopPagesThreads) {
        const Index i = base + tid;
        const std::uint32_t key = i < n ? page_score_key(scores[i]) : 0u;
        const bool equal = i < n && key == prefix;
        Index equal_rank = 0, equal_total = 0;
        Scan(scan).ExclusiveSum(Index{equal}, equal_rank, equal_total);
        __syncthreads();  // scan is reused below
        const bool take = i < n && (key > prefix || (equal && equal_before + equal_rank < still_needed));
        Index place = 0, taken_total = 0;
        Scan(scan).ExclusiveSum(Index{take}, place, taken_total);
        __syncthreads();
        if (take) order[taken_before + place] = i;
        equal_before += equal_total;
        taken_before += taken_total;
    }
}

template <class Index>
__global__ void iota_kernel(Index* out, Index n) {
    out += static_cast<std::int64_t>(blockIdx.y) * n;
    for (std::int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = static_cast<Index>(i);
}

/// For each of `heads` rows of n scores: order[0, k) = the k best of scores[0, n) (0 < k < n), ascending.
inline void launch_top_pages(const float* scores, std::int32_t heads, std::int32_t n, std::int32_t k,
                             std::int32_t* order, cudaStream_t stream) {
    top_pages_kernel<<<static_cast<unsigned>(heads), kTopPagesThreads, 0, stream>>>(scores, n, k, order);
    check_launch("top_pages_kernel");
}

/// out[h * n + i] = i for each of `heads` rows.
inline void launch_iota(std::int32_t* out, std::int32_t heads, std::int32_t n, cudaStream_t stream) {
    const dim3 grid(blocks_for(n), static_cast<unsigned>(heads));
    iota_kernel<<<grid, kThreads, 0, stream>>>(out, n);
    check_launch("iota_kernel");
}

}  // namespace kvsparse::cuda
