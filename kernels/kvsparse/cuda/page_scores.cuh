#pragma once
// Quest's upper-bound page scores on the GPU (CudaBackend::page_scores), in the order that
// CpuBackend::page_scores defines, so that both backends select the same pages on exact ties: element d
// goes to lane d % 16 through page_score_add (key_bounds.hpp, shared with the CPU), each lane in order
// of d; lanes j and j + 8 are added; the eight sums are combined as ((h0 + h1) + (h2 + h3)) + ((h4 + h5)
// + (h6 + h7)); the rows aggregate in row order.
//
// Half a warp per page, one summation lane per thread, up to four query rows at once (each bound is widened
// once for them). The tree is four shuffles within the half, each an add of two sums the CPU also adds.
// Grid y is the KV head of a batch: head h's bounds start h * head_stride elements after head 0's, its
// queries are rows [h * rows, h * rows + rows), its scores follow head h - 1's.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"

namespace kvsparse::cuda {

inline constexpr int kPageScoresPages = kThreads / 16;  // pages per block, one per half-warp
inline constexpr int kPageScoresRows = 4;                // query rows a lane sums at once

/// Shared memory of one block: its pages' bounds.
template <storage_type T>
constexpr std::size_t page_scores_shared_bytes(std::int32_t head_dim) {
    return std::size_t{kPageScoresPages} * 2 * static_cast<std::size_t>(head_dim) * sizeof(T);
}

/// Block: kPageScoresPages consecutive pages, their bounds first copied to shared memory by the whole
/// block (16 bytes a thread where `Wide`), so that the reads are few and all in flight at once.
template <storage_type T, bool Wide>
__global__ void page_scores_kernel(KeyBounds<const T> bounds, std::int64_t head_stride, std::int32_t pages,
                                   const float* queries, std::int32_t rows, GqaAggregation mode, float* scores) {
    constexpr unsigned all = 0xffffffffu;
    extern __shared__ __align__(16) unsigned char staged_bytes[];
    T* staged = reinterpret_cast<T*>(staged_bytes);  // [pages][2][dim]: kmin, kmax
    const auto head = static_cast<std::int64_t>(blockIdx.y);
    bounds.data += head * head_stride;
    queries += head * rows * bounds.head_dim;
    scores += head * pages * (mode == GqaAggregation::per_query_head ? rows : 1);
    const std::int32_t dim = bounds.head_dim;
    const std::int32_t first = static_cast<std::int32_t>(blockIdx.x) * kPageScoresPages;
    const std::int32_t here = min(kPageScoresPages, pages - first);
    constexpr int width = Wide ? 16 / static_cast<int>(sizeof(T)) : 1;
    const std::int32_t per_page = 2 * dim / width;
    for (std::int32_t i = static_cast<std::int32_t>(threadIdx.x); i < here * per_page; i += kThreads) {
        const std::int32_t p = i / per_page, e = (i - p * per_page) * width;
        const T* from = bounds.kmin(first + p) + e;  // kmax follows kmin
        T* to = staged + static_cast<std::int64_t>(p) * 2 * dim + e;
        if constexpr (Wide) {
            *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
        } else {
            *to = *from;
        }
    }
    __syncthreads();

    const int local = static_cast<int>(threadIdx.x / 16);  // this half-warp's page in the block
    const bool mine = local < here;  // a half past the last page still takes part in the shuffles
    const std::int32_t page = first + local;
    const int j = static_cast<int>(threadIdx.x % 16);
    const T* kmin = staged + static_cast<std::int64_t>(mine ? local : 0) * 2 * dim;
    const T* kmax = kmin + dim;
    float aggregate = mode == GqaAggregation::sum ? 0.0f : -INFINITY;
    for (std::int32_t r0 = 0; r0 < rows; r0 += kPageScoresRows) {
        float acc[kPageScoresRows] = {};
        if (mine) {
            for (std::int32_t d = j; d < dim; d += 16) {
                const float lo = widen(kmin[d]), hi = widen(kmax[d]);
                for (int i = 0; i < kPageScoresRows; ++i) {
                    if (r0 + i < rows) acc[i] = page_score_add(acc[i], queries[static_cast<std::int64_t>(r0 + i) * dim + d], lo, hi);
                }
            }
        }
        for (int i = 0; i < kPageScoresRows; ++i) {
            acc[i] += __shfl_down_sync(all, acc[i], 8, 16);  // h_j = l_j + l_(j+8)
            acc[i] += __shfl_down_sync(all, acc[i], 1, 16);  // h0 + h1, h2 + h3, ...
            acc[i] += __shfl_down_sync(all, acc[i], 2, 16);  // (h0 + h1) + (h2 + h3), (h4 + h5) + (h6 + h7)
            acc[i] += __shfl_down_sync(all, acc[i], 4, 16);  // the whole tree, in lane 0 of the half
        }
        if (j != 0 || !mine) continue;
        for (int i = 0; i < kPageScoresRows && r0 + i < rows; ++i) {
            if (mode == GqaAggregation::per_query_head) {
                scores[static_cast<std::int64_t>(r0 + i) * pages + page] = acc[i];
            } else if (mode == GqaAggregation::sum) {
                aggregate += acc[i];
            } else {
                aggregate = acc[i] > aggregate ? acc[i] : aggregate;
            }
        }
    }
    if (j == 0 && mine && mode != GqaAggregation::per_query_head) scores[page] = aggregate;
}

template <storage_type T>
void launch_page_scores(const KeyBounds<const T>& bounds, std::int64_t head_stride, std::int32_t heads,
                        std::int32_t pages, const float* queries, std::int32_t rows, GqaAggregation mode, float* scores,
                        cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((pages + kPageScoresPages - 1) / kPageScoresPages), static_cast<unsigned>(heads));
    const std::size_t shared = page_scores_shared_bytes<T>(bounds.head_dim);
    // A page's kmin and kmax are adjacent (KeyBounds::kmax), so a page is one run of 2 * head_dim.
    constexpr auto width = static_cast<std::int64_t>(16 / sizeof(T));
    const bool wide = aligned_for(bounds.data, width) && bounds.page_stride % width == 0 &&
                      (2 * std::int64_t{bounds.head_dim}) % width == 0 && head_stride % width == 0;
    if (wide) {
        page_scores_kernel<T, true><<<grid, kThreads, shared, stream>>>(bounds, head_stride, pages, queries, rows, mode, scores);
    } else {
        page_scores_kernel<T, false><<<grid, kThreads, shared, stream>>>(bounds, head_stride, pages, queries, rows, mode, scores);
    }
    check_launch("page_scores_kernel");
}

}  // namespace kvsparse::cuda
