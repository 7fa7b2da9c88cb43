#pragma once
// Gathered decode attention: the query heads of one KV head over a list of slots, as CpuBackend::attend.
// Split over the slots (flash-decoding): each block scores a chunk of slots and keeps its own softmax
// max, sum and partial output; a merge kernel rescales and adds the chunks. When per-slot probabilities
// are wanted, the raw scores stay in the workspace and a third kernel turns them into the group's summed
// probabilities once the global max and sum are known.

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse::cuda {

inline constexpr int kAttendThreads = 128;                    // 4 warps
inline constexpr int kAttendWarps = kAttendThreads / 32;
inline constexpr std::int32_t kAttendChunk = 64;              // slots per block

/// Device pointers and sizes of one attention; the workspace parts follow attend_layout.
template <storage_type T>
struct AttendParams {
    StreamView<T> stream;
    const std::int32_t* slots = nullptr;
    std::int32_t n = 0;
    const float* queries = nullptr;          // [group][dim]
    std::int32_t group = 1;
    std::int32_t dim = 0;
    float scale = 1.0f;
    const std::int32_t* key_rotation = nullptr;  // per slot, or null
    Rope rope{};
    float* out = nullptr;                    // [group][dim]
    float* probabilities = nullptr;          // per slot, or null
    std::int32_t chunks = 0;
    float* scores = nullptr;                 // [group][n]    scaled q.k, kept for the probabilities
    float* part_out = nullptr;               // [chunks][group][dim]
    float* part_max = nullptr;               // [chunks][group]
    float* part_sum = nullptr;               // [chunks][group]
    float* total_max = nullptr;              // [group]
    float* total_sum = nullptr;              // [group]
};

constexpr std::int32_t attend_chunks(std::int32_t n) { return (n + kAttendChunk - 1) / kAttendChunk; }

/// Floats of workspace for `group` heads over `n` slots of dimension `dim`.
constexpr std::size_t attend_workspace_floats(std::int32_t group, std::int32_t n, std::int32_t dim) {
    const auto g = static_cast<std::size_t>(group);
    const auto c = static_cast<std::size_t>(attend_chunks(n));
    return g * static_cast<std::size_t>(n) + c * g * (static_cast<std::size_t>(dim) + 2) + 2 * g;
}

/// Points the workspace parts of `p` into `workspace` (attend_workspace_floats floats).
template <storage_type T>
void attend_layout(AttendParams<T>& p, float* workspace) {
    const auto g = static_cast<std::size_t>(p.group);
    const auto c = static_cast<std::size_t>(p.chunks);
    p.scores = workspace;
    p.part_out = p.scores + g * static_cast<std::size_t>(p.n);
    p.part_max = p.part_out + c * g * static_cast<std::size_t>(p.dim);
    p.part_sum = p.part_max + c * g;
    p.total_max = p.part_sum + c * g;
    p.total_sum = p.total_max + g;
}

/// Dynamic shared memory of the chunk kernel: key and value row pointers, slot queries, one widened key
/// per warp, and the chunk's scores.
constexpr std::size_t attend_shared_bytes(std::int32_t group, std::int32_t dim) {
    const auto g = static_cast<std::size_t>(group);
    const auto d = static_cast<std::size_t>(dim);
    return 2 * kAttendChunk * sizeof(void*) + (g * d + kAttendWarps * d + g * kAttendChunk) * sizeof(float);
}

__device__ inline float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ inline float warp_max(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

/// One block per chunk of kAttendChunk slots. Scores: a warp per slot widens (and, with key_rotation,
/// turns) the key once into shared memory, then dots it with every query head of the group. Softmax
/// statistics: a warp per query head. Partial output: a thread per (head, dim) element.
template <storage_type T>
__global__ void __launch_bounds__(kAttendThreads) attend_chunk_kernel(AttendParams<T> p) {
    extern __shared__ __align__(16) unsigned char shared[];
    const T** key_rows = reinterpret_cast<const T**>(shared);
    const T** value_rows = key_rows + kAttendChunk;
    float* q = reinterpret_cast<float*>(value_rows + kAttendChunk);  // [group][dim]
    float* keys = q + p.group * p.dim;                                // [warps][dim]
    float* weight = keys + kAttendWarps * p.dim;                      // [group][chunk]

    const std::int32_t chunk = static_cast<std::int32_t>(blockIdx.x);
    const std::int32_t first = chunk * kAttendChunk;
    const std::int32_t count = min(kAttendChunk, p.n - first);
    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid / 32;
    const int lane = tid % 32;

    for (int i = tid; i < p.group * p.dim; i += kAttendThreads) q[i] = p.queries[i];
    for (int j = tid; j < count; j += kAttendThreads) {
        const std::int32_t slot = p.slots[first + j];
        key_rows[j] = p.stream.key(slot);
        value_rows[j] = p.stream.value(slot);
    }
    __syncthreads();

    float* key = keys + warp * p.dim;
    for (int j = warp; j < count; j += kAttendWarps) {
        const T* k = key_rows[j];
        if (p.key_rotation != nullptr) {
            // rope_rotate's math, one pair per lane; an odd last element stays as it is.
            const double turn_by = p.key_rotation[first + j];
            const std::int32_t pairs = p.dim / 2;
            for (std::int32_t pair = lane; pair < pairs; pair += 32) {
                const std::int32_t a = rope_first(p.rope.style, pair);
                const std::int32_t b = rope_second(p.rope.style, pair, p.dim);
                float xa = to_float(k[a]);
                float xb = to_float(k[b]);
                rope_apply(xa, xb, rope_turn(pair, p.dim, turn_by, p.rope.theta));
                key[a] = xa;
                key[b] = xb;
            }
            if (p.dim % 2 != 0 && lane == 0) key[p.dim - 1] = to_float(k[p.dim - 1]);
        } else {
            for (std::int32_t d = lane; d < p.dim; d += 32) key[d] = to_float(k[d]);
        }
        __syncwarp();
        for (std::int32_t g = 0; g < p.group; ++g) {
            const float* qg = q + g * p.dim;
            float dot = 0.0f;
            for (std::int32_t d = lane; d < p.dim; d += 32) dot += qg[d] * key[d];
            dot = warp_sum(dot) * p.scale;
            if (lane == 0) {
                weight[g * kAttendChunk + j] = dot;
                if (p.probabilities != nullptr) p.scores[static_cast<std::int64_t>(g) * p.n + first + j] = dot;
            }
        }
        __syncwarp();  // the next slot overwrites this warp's key
    }
    __syncthreads();

    for (std::int32_t g = warp; g < p.group; g += kAttendWarps) {
        float* w = weight + g * kAttendChunk;
        float top = -INFINITY;
        for (int j = lane; j < count; j += 32) top = fmaxf(top, w[j]);
        top = warp_max(top);
        float sum = 0.0f;
        for (int j = lane; j < count; j += 32) {
            w[j] = expf(w[j] - top);
            sum += w[j];
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            p.part_max[chunk * p.group + g] = top;
            p.part_sum[chunk * p.group + g] = sum;
        }
    }
    __syncthreads();

    for (int i = tid; i < p.group * p.dim; i += kAttendThreads) {
        const std::int32_t g = i / p.dim;
        const std::int32_t d = i - g * p.dim;
        const float* w = weight + g * kAttendChunk;
        float acc = 0.0f;
        for (int j = 0; j < count; ++j) acc += w[j] * to_float(value_rows[j][d]);
        p.part_out[(static_cast<std::int64_t>(chunk) * p.group + g) * p.dim + d] = acc;
    }
}

/// Block reduction helpers for the merge (kAttendThreads threads).
__device__ inline float block_reduce(float x, bool take_max, float* scratch) {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    x = take_max ? warp_max(x) : warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < kAttendWarps; ++w) r = take_max ? fmaxf(r, scratch[w]) : r + scratch[w];
    __syncthreads();  // scratch is reused by the next reduction
    return r;
}

/// One block per query head: global max and sum over the chunks, then out = sum of rescaled partial
/// outputs times 1/sum (CpuBackend also multiplies by the inverse).
template <storage_type T>
__global__ void __launch_bounds__(kAttendThreads) attend_merge_kernel(AttendParams<T> p) {
    __shared__ float scratch[kAttendWarps];
    const std::int32_t g = static_cast<std::int32_t>(blockIdx.x);
    const int tid = static_cast<int>(threadIdx.x);
    float top = -INFINITY;
    for (std::int32_t c = tid; c < p.chunks; c += kAttendThreads) top = fmaxf(top, p.part_max[c * p.group + g]);
    top = block_reduce(top, true, scratch);
    float sum = 0.0f;
    for (std::int32_t c = tid; c < p.chunks; c += kAttendThreads) {
        sum += p.part_sum[c * p.group + g] * expf(p.part_max[c * p.group + g] - top);
    }
    sum = block_reduce(sum, false, scratch);
    const float inverse = 1.0f / sum;
    for (std::int32_t d = tid; d < p.dim; d += kAttendThreads) {
        float acc = 0.0f;
        for (std::int32_t c = 0; c < p.chunks; ++c) {
            acc += p.part_out[(static_cast<std::int64_t>(c) * p.group + g) * p.dim + d] *
                   expf(p.part_max[c * p.group + g] - top);
        }
        p.out[g * p.dim + d] = acc * inverse;
    }
    if (tid == 0) {
        p.total_max[g] = top;
        p.total_sum[g] = sum;
    }
}

/// probabilities[j] += sum over the group of exp(score - max) / sum; a thread per slot.
template <storage_type T>
__global__ void attend_probabilities_kernel(AttendParams<T> p) {
    for (std::int64_t j = global_thread(); j < p.n; j += grid_threads()) {
        float mass = 0.0f;
        for (std::int32_t g = 0; g < p.group; ++g) {
            mass += expf(p.scores[g * static_cast<std::int64_t>(p.n) + j] - p.total_max[g]) * (1.0f / p.total_sum[g]);
        }
        p.probabilities[j] += mass;
    }
}

/// Enqueues the attention; `p` has its workspace parts laid out (attend_layout) and n > 0.
template <storage_type T>
void launch_attend(const AttendParams<T>& p, cudaStream_t stream) {
    const std::size_t shared = attend_shared_bytes(p.group, p.dim);
    if (shared > 48 * 1024) {
        // Beyond the default limit the kernel has to opt in (up to the device's maximum).
        check(cudaFuncSetAttribute(attend_chunk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared)),
              "attend_chunk_kernel shared memory");
    }
    attend_chunk_kernel<T><<<static_cast<unsigned>(p.chunks), kAttendThreads, shared, stream>>>(p);
    check_launch("attend_chunk_kernel");
    attend_merge_kernel<T><<<static_cast<unsigned>(p.group), kAttendThreads, 0, stream>>>(p);
    check_launch("attend_merge_kernel");
    if (p.probabilities != nullptr) {
        attend_probabilities_kernel<T><<<blocks_for(p.n), kThreads, 0, stream>>>(p);
        check_launch("attend_probabilities_kernel");
    }
}

}  // namespace kvsparse::cuda
