#pragma once
// Gathered decode attention: the query heads of one KV head over a list of slots, as CpuBackend::attend,
// for one KV head or a batch of them in the same launches (grid y: the head).
// Split over the slots (flash-decoding): each block takes a chunk of kAttendChunk slots and keeps its own
// softmax max, sum and partial output; a merge kernel rescales and adds the chunks. When per-slot
// probabilities are wanted, the raw scores stay in the workspace and a third kernel turns them into the
// group's summed probabilities once the global max and sum are known.
//
// Decode reads each key and value row once, so the kernel is about keeping many row loads in flight:
// half a warp reads one row in 16-byte pieces, and each half-warp issues all eight of its rows' loads
// before it uses any (a chunk is eight rows for each of the block's eight half-warps).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse::cuda {

inline constexpr int kAttendThreads = 128;                   // 4 warps, 8 half-warps
inline constexpr int kAttendWarps = kAttendThreads / 32;
inline constexpr int kRowLanes = 16;                         // lanes that share one row
inline constexpr int kRowGroups = kAttendThreads / kRowLanes;
inline constexpr int kRowsPerGroup = 8;                      // rows whose loads one half-warp keeps in flight
inline constexpr std::int32_t kAttendChunk = kRowGroups * kRowsPerGroup;  // slots per block: 64
inline constexpr int kHeadTile = 4;                          // query heads a thread accumulates at once
inline constexpr int kMergeThreads = 1024;                   // 32 warps over the chunks, one 32-element slice

/// Device pointers and sizes of the attention of KV head 0 (slots, queries, out, probabilities and the
/// workspace parts, as attend_layout places them); head h's follow at fixed strides (at_head).
/// `Streams` is OneStream<T> or HeadBatchView<T>.
template <storage_type T, class Streams>
struct AttendParams {
    Streams streams;
    std::int32_t heads = 1;
    const std::int32_t* slots = nullptr;     // [heads][n]
    std::int32_t n = 0;
    const float* queries = nullptr;          // [heads][group][dim]
    std::int32_t group = 1;
    std::int32_t dim = 0;
    float scale = 1.0f;
    const std::int32_t* key_rotation = nullptr;  // per slot, [heads][n], or null
    Rope rope{};
    float* out = nullptr;                    // [heads][group][dim]
    float* probabilities = nullptr;          // per slot, [heads][n], or null
    std::int32_t chunks = 0;
    float* scores = nullptr;                 // [group][n]    scaled q.k, kept for the probabilities
    float* part_out = nullptr;               // [chunks][group][dim]
    float* part_max = nullptr;               // [chunks][group]
    float* part_sum = nullptr;               // [chunks][group]
    float* total_max = nullptr;              // [group]
    float* total_sum = nullptr;              // [group]

    /// Head h's parameters: every pointer moved to that head's part.
    __device__ AttendParams at_head(std::int32_t h) const;
};

constexpr std::int32_t attend_chunks(std::int32_t n) { return (n + kAttendChunk - 1) / kAttendChunk; }

/// Floats of workspace for `group` heads over `n` slots of dimension `dim`.
constexpr std::size_t attend_workspace_floats(std::int32_t group, std::int32_t n, std::int32_t dim) {
    const auto g = static_cast<std::size_t>(group);
    const auto c = static_cast<std::size_t>(attend_chunks(n));
    return g * static_cast<std::size_t>(n) + c * g * (static_cast<std::size_t>(dim) + 2) + 2 * g;
}

/// Points the workspace parts of `p` into `workspace` (attend_workspace_floats floats per head).
template <storage_type T, class Streams>
void attend_layout(AttendParams<T, Streams>& p, float* workspace) {
    const auto g = static_cast<std::size_t>(p.group);
    const auto c = static_cast<std::size_t>(p.chunks);
    p.scores = workspace;
    p.part_out = p.scores + g * static_cast<std::size_t>(p.n);
    p.part_max = p.part_out + c * g * static_cast<std::size_t>(p.dim);
    p.part_sum = p.part_max + c * g;
    p.total_max = p.part_sum + c * g;
    p.total_sum = p.total_max + g;
}

template <storage_type T, class Streams>
__device__ AttendParams<T, Streams> AttendParams<T, Streams>::at_head(std::int32_t h) const {
    AttendParams p = *this;
    const std::int64_t rows = std::int64_t{h} * n, heads_out = std::int64_t{h} * group * dim;
    const auto work = static_cast<std::int64_t>(attend_workspace_floats(group, n, dim)) * h;
    p.slots += rows;
    p.queries += heads_out;
    if (p.key_rotation != nullptr) p.key_rotation += rows;
    p.out += heads_out;
    if (p.probabilities != nullptr) p.probabilities += rows;
    p.scores += work;
    p.part_out += work;
    p.part_max += work;
    p.part_sum += work;
    p.total_max += work;
    p.total_sum += work;
    return p;
}

/// Elements per 16-byte load: 8 of a 16-bit type, 4 floats; 1 where rows are not aligned for that.
template <storage_type T>
inline constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(T));

/// Dynamic shared memory of the chunk kernel: the group's queries, the chunk's weights per head, and,
/// when keys are turned first, the chunk's turned keys.
constexpr std::size_t attend_shared_bytes(std::int32_t group, std::int32_t dim, bool rotate) {
    const auto g = static_cast<std::size_t>(group);
    const auto d = static_cast<std::size_t>(dim);
    return (g * d + g * kAttendChunk + (rotate ? kAttendChunk * d : 0)) * sizeof(float);
}

/// Sum over each group of `Lanes` consecutive lanes (32: the warp; kRowLanes: each half-warp's own).
template <int Lanes = 32>
__device__ inline float lanes_sum(float x) {
    for (int offset = Lanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ inline float warp_max(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

/// V elements from `p` as floats; V > 1 needs `p` aligned to 16 bytes. float16 widens in hardware
/// (exact, like the library's to_float).
template <int V, storage_type T>
__device__ inline Floats<V> load_widened(const T* p) {
    Floats<V> f;
    if constexpr (V == 1) {
        f.x[0] = widen(*p);
    } else if constexpr (std::is_same_v<T, float>) {
        static_assert(V == 4);
        f = load_floats<4>(p);
    } else {
        static_assert(V == 8);
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
        for (int i = 0; i < 4; ++i) {
            if constexpr (std::is_same_v<T, half>) {
                const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
                f.x[2 * i] = pair.x;
                f.x[2 * i + 1] = pair.y;
            } else {
                f.x[2 * i] = __uint_as_float(words[i] << 16);
                f.x[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
            }
        }
    }
    return f;
}

/// One block per chunk of kAttendChunk slots. Half-warp r takes rows r, r + 8, ..., r + 56 of the chunk;
/// its lane l covers elements [l * V, l * V + V) of each 16 * V-element segment of a row. Scores: the
/// lanes' partial dot products meet by shuffles. Softmax statistics: a warp per query head. Partial
/// output: each lane sums its rows' weighted values, then the half-warps meet by a shuffle and through
/// shared memory in a fixed order. With key rotation the chunk's keys are first turned into shared
/// memory (rope_rotate's math, bit for bit) and read from there.
template <storage_type T, class Streams, int V, bool Rotate>
__global__ void __launch_bounds__(kAttendThreads) attend_chunk_kernel(AttendParams<T, Streams> batch) {
    const auto h = static_cast<std::int32_t>(blockIdx.y);
    const StreamView<T> stream = batch.streams.stream(h);
    const AttendParams<T, Streams> p = batch.at_head(h);
    extern __shared__ __align__(16) float shared[];
    float* q = shared;                              // [group][dim]
    float* weight = q + p.group * p.dim;            // [group][chunk]
    float* turned = weight + p.group * kAttendChunk;  // [chunk][dim], when Rotate
    __shared__ float partial[kAttendWarps][kHeadTile][kRowLanes * V];

    const std::int32_t chunk = static_cast<std::int32_t>(blockIdx.x);
    const std::int32_t first = chunk * kAttendChunk;
    const std::int32_t count = min(kAttendChunk, p.n - first);
    const int tid = static_cast<int>(threadIdx.x);
    const int lane = tid % kRowLanes;
    const int row_group = tid / kRowLanes;
    const int warp = tid / 32;

    for (int i = tid; i < p.group * p.dim; i += kAttendThreads) q[i] = p.queries[i];

    // This lane's rows: slot lookups first, so that the loads below do not wait on each other.
    const T* key_rows[kRowsPerGroup];
    const T* value_rows[kRowsPerGroup];
    for (int u = 0; u < kRowsPerGroup; ++u) {
        const int row = u * kRowGroups + row_group;
        const std::int32_t slot = p.slots[first + min(row, count - 1)];  // past the end: a valid row, unused
        key_rows[u] = stream.key(slot);
        value_rows[u] = stream.value(slot);
    }
    // The values are read only after the scores: ask for them now, so that they wait in L2.
    for (std::int32_t d = lane * V; d < p.dim; d += kRowLanes * V) {
        for (int u = 0; u < kRowsPerGroup; ++u) asm volatile("prefetch.global.L2 [%0];" ::"l"(value_rows[u] + d));
    }
    if constexpr (Rotate) {
        const std::int32_t pairs = p.dim / 2;
        for (int i = tid; i < count * pairs; i += kAttendThreads) {
            const int row = i / pairs;
            const std::int32_t pair = i - row * pairs;
            const T* k = stream.key(p.slots[first + row]);
            const std::int32_t a = rope_first(p.rope.style, pair);
            const std::int32_t b = rope_second(p.rope.style, pair, p.dim);
            float xa = widen(k[a]);
            float xb = widen(k[b]);
            rope_apply(xa, xb, rope_turn(pair, p.dim, p.key_rotation[first + row], p.rope.theta));
            turned[row * p.dim + a] = xa;
            turned[row * p.dim + b] = xb;
        }
        if (p.dim % 2 != 0) {  // an odd last element stays as it is
            for (int row = tid; row < count; row += kAttendThreads) {
                turned[row * p.dim + p.dim - 1] = widen(stream.key(p.slots[first + row])[p.dim - 1]);
            }
        }
    }
    __syncthreads();

    const std::int32_t segment = kRowLanes * V;
    for (std::int32_t g0 = 0; g0 < p.group; g0 += kHeadTile) {
        float dot[kRowsPerGroup][kHeadTile] = {};
        for (std::int32_t base = 0; base < p.dim; base += segment) {
            const std::int32_t d = base + lane * V;
            if (d >= p.dim) continue;
            Floats<V> k[kRowsPerGroup];
            for (int u = 0; u < kRowsPerGroup; ++u) {
                if constexpr (Rotate) {
                    for (int v = 0; v < V; ++v) k[u].x[v] = turned[min(u * kRowGroups + row_group, count - 1) * p.dim + d + v];
                } else {
                    k[u] = load_widened<V>(key_rows[u] + d);
                }
            }
            for (int h = 0; h < kHeadTile; ++h) {
                if (g0 + h >= p.group) break;
                const float* qh = q + (g0 + h) * p.dim + d;
                for (int u = 0; u < kRowsPerGroup; ++u) {
                    for (int v = 0; v < V; ++v) dot[u][h] = fmaf(qh[v], k[u].x[v], dot[u][h]);
                }
            }
        }
        for (int u = 0; u < kRowsPerGroup; ++u) {
            const int row = u * kRowGroups + row_group;
            for (int h = 0; h < kHeadTile; ++h) {
                const float s = lanes_sum<kRowLanes>(dot[u][h]) * p.scale;
                if (lane == 0 && row < count && g0 + h < p.group) {
                    weight[(g0 + h) * kAttendChunk + row] = s;
                    if (p.probabilities != nullptr) p.scores[static_cast<std::int64_t>(g0 + h) * p.n + first + row] = s;
                }
            }
        }
    }
    __syncthreads();

    for (std::int32_t g = warp; g < p.group; g += kAttendWarps) {
        float* w = weight + g * kAttendChunk;
        float top = -INFINITY;
        for (int j = static_cast<int>(tid % 32); j < count; j += 32) top = fmaxf(top, w[j]);
        top = warp_max(top);
        float sum = 0.0f;
        for (int j = static_cast<int>(tid % 32); j < count; j += 32) {
            w[j] = expf(w[j] - top);
            sum += w[j];
        }
        sum = lanes_sum(sum);
        if (tid % 32 == 0) {
            p.part_max[chunk * p.group + g] = top;
            p.part_sum[chunk * p.group + g] = sum;
        }
    }
    __syncthreads();

    for (std::int32_t g0 = 0; g0 < p.group; g0 += kHeadTile) {
        for (std::int32_t base = 0; base < p.dim; base += segment) {
            const std::int32_t d = base + lane * V;
            float acc[kHeadTile][V] = {};
            if (d < p.dim) {
                Floats<V> value[kRowsPerGroup];
                for (int u = 0; u < kRowsPerGroup; ++u) value[u] = load_widened<V>(value_rows[u] + d);
                for (int u = 0; u < kRowsPerGroup; ++u) {
                    const int row = u * kRowGroups + row_group;
                    if (row >= count) break;  // rows ascend with u
                    for (int h = 0; h < kHeadTile; ++h) {
                        if (g0 + h >= p.group) break;
                        const float w = weight[(g0 + h) * kAttendChunk + row];
                        for (int v = 0; v < V; ++v) acc[h][v] = fmaf(w, value[u].x[v], acc[h][v]);
                    }
                }
            }
            // The warp's two half-warps, then the four warps in order.
            for (int h = 0; h < kHeadTile; ++h) {
                for (int v = 0; v < V; ++v) acc[h][v] += __shfl_xor_sync(0xffffffffu, acc[h][v], kRowLanes);
            }
            if (tid % 32 < kRowLanes) {
                for (int h = 0; h < kHeadTile; ++h) {
                    for (int v = 0; v < V; ++v) partial[warp][h][lane * V + v] = acc[h][v];
                }
            }
            __syncthreads();
            for (int i = tid; i < kHeadTile * segment; i += kAttendThreads) {
                const int h = i / segment;
                const std::int32_t e = base + i % segment;
                if (g0 + h >= p.group || e >= p.dim) continue;
                float total = partial[0][h][i % segment];
                for (int w = 1; w < kAttendWarps; ++w) total += partial[w][h][i % segment];
                p.part_out[(static_cast<std::int64_t>(chunk) * p.group + g0 + h) * p.dim + e] = total;
            }
            __syncthreads();  // partial is reused by the next segment
        }
    }
}

/// Block reduction over kMergeThreads threads, in a fixed order.
__device__ inline float block_reduce(float x, bool take_max, float* scratch) {
    constexpr int warps = kMergeThreads / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    x = take_max ? warp_max(x) : lanes_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float r = scratch[0];
    for (int w = 1; w < warps; ++w) r = take_max ? fmaxf(r, scratch[w]) : r + scratch[w];
    __syncthreads();  // scratch is reused by the next reduction
    return r;
}

/// Grid (group, ceil(dim / 32), heads): block (g, s, h) merges elements [32 s, 32 s + 32) of head g's output. The
/// global max and sum over the chunks, then each warp adds every 32nd chunk's rescaled partial output,
/// and the warps meet in a fixed order; out = that times 1/sum (CpuBackend also multiplies by the inverse).
template <storage_type T, class Streams>
__global__ void __launch_bounds__(kMergeThreads) attend_merge_kernel(AttendParams<T, Streams> batch) {
    const AttendParams<T, Streams> p = batch.at_head(static_cast<std::int32_t>(blockIdx.z));
    constexpr int warps = kMergeThreads / 32;
    __shared__ float scratch[warps];
    __shared__ float sums[warps][32];
    const std::int32_t g = static_cast<std::int32_t>(blockIdx.x);
    const int tid = static_cast<int>(threadIdx.x);
    const int lane = tid % 32;
    const int warp = tid / 32;
    const std::int32_t d = static_cast<std::int32_t>(blockIdx.y) * 32 + lane;

    float top = -INFINITY;
    for (std::int32_t c = tid; c < p.chunks; c += kMergeThreads) top = fmaxf(top, p.part_max[c * p.group + g]);
    top = block_reduce(top, true, scratch);
    float sum = 0.0f;
    for (std::int32_t c = tid; c < p.chunks; c += kMergeThreads) {
        sum += p.part_sum[c * p.group + g] * expf(p.part_max[c * p.group + g] - top);
    }
    sum = block_reduce(sum, false, scratch);

    float acc = 0.0f;
    if (d < p.dim) {
#pragma unroll 8
        for (std::int32_t c = warp; c < p.chunks; c += warps) {
            const float rescale = expf(p.part_max[c * p.group + g] - top);
            acc = fmaf(p.part_out[(static_cast<std::int64_t>(c) * p.group + g) * p.dim + d], rescale, acc);
        }
    }
    sums[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && d < p.dim) {
        float total = sums[0][lane];
        for (int w = 1; w < warps; ++w) total += sums[w][lane];
        p.out[g * p.dim + d] = total * (1.0f / sum);
    }
    if (tid == 0 && blockIdx.y == 0) {
        p.total_max[g] = top;
        p.total_sum[g] = sum;
    }
}

/// probabilities[j] += sum over the group of exp(score - max) / sum; a thread per slot, grid y the head.
template <storage_type T, class Streams>
__global__ void attend_probabilities_kernel(AttendParams<T, Streams> batch) {
    const AttendParams<T, Streams> p = batch.at_head(static_cast<std::int32_t>(blockIdx.y));
    for (std::int64_t j = global_thread(); j < p.n; j += grid_threads()) {
        float mass = 0.0f;
        for (std::int32_t g = 0; g < p.group; ++g) {
            mass += expf(p.scores[g * static_cast<std::int64_t>(p.n) + j] - p.total_max[g]) * (1.0f / p.total_sum[g]);
        }
        p.probabilities[j] += mass;
    }
}

template <storage_type T, class Streams, int V, bool Rotate>
void launch_attend_chunks(const AttendParams<T, Streams>& p, cudaStream_t stream) {
    const std::size_t shared = attend_shared_bytes(p.group, p.dim, Rotate);
    if (shared > 48 * 1024) {
        // Beyond the default limit the kernel has to opt in (up to the device's maximum).
        check(cudaFuncSetAttribute(attend_chunk_kernel<T, Streams, V, Rotate>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared)),
              "attend_chunk_kernel shared memory");
    }
    const dim3 grid(static_cast<unsigned>(p.chunks), static_cast<unsigned>(p.heads));
    attend_chunk_kernel<T, Streams, V, Rotate><<<grid, kAttendThreads, shared, stream>>>(p);
    check_launch("attend_chunk_kernel");
}

/// Enqueues the attention; `p` has its workspace parts laid out (attend_layout), n > 0 and heads > 0;
/// `keys` and `values` are the pools its streams read.
template <storage_type T, class Streams>
void launch_attend(const AttendParams<T, Streams>& p, const PagePoolView<T>& keys, const PagePoolView<T>& values,
                   cudaStream_t stream) {
    constexpr int wide = kVectorWidth<T>;
    const bool vectors = pool_aligned_for(keys, wide) && pool_aligned_for(values, wide);
    if (p.key_rotation != nullptr) {
        if (vectors) launch_attend_chunks<T, Streams, wide, true>(p, stream);
        else launch_attend_chunks<T, Streams, 1, true>(p, stream);
    } else {
        if (vectors) launch_attend_chunks<T, Streams, wide, false>(p, stream);
        else launch_attend_chunks<T, Streams, 1, false>(p, stream);
    }
    const dim3 merge_grid(static_cast<unsigned>(p.group), static_cast<unsigned>((p.dim + 31) / 32),
                          static_cast<unsigned>(p.heads));
    attend_merge_kernel<T, Streams><<<merge_grid, kMergeThreads, 0, stream>>>(p);
    check_launch("attend_merge_kernel");
    if (p.probabilities != nullptr) {
        const dim3 grid(blocks_for(p.n), static_cast<unsigned>(p.heads));
        attend_probabilities_kernel<T, Streams><<<grid, kThreads, 0, stream>>>(p);
        check_launch("attend_probabilities_kernel");
    }
}

}  // namespace kvsparse::cuda
