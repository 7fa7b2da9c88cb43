#pragma once
// Writing tokens into paged storage: the append (float32 rows -> stored K/V of any storage type, many
// tokens and heads per launch) and the staged slot copy behind copy_slots.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse::cuda {

/// The float32 rows an append reads and the slots they go to. Row (token i, head h) starts at
/// `keys + i * token_stride + h * head_stride` (same for values) and goes to slot
/// `slots[slot_per_head ? i * heads + h : i]` of head h.
struct WriteRows {
    const std::int32_t* slots = nullptr;
    bool slot_per_head = false;
    const float* keys = nullptr;
    const float* values = nullptr;
    std::int64_t token_stride = 0;
    std::int64_t head_stride = 0;
    std::int32_t tokens = 0;
    std::int32_t heads = 1;
    std::int32_t dim = 0;
};

/// One thread converts and stores V elements of one (token, head) row, key and value. Consecutive
/// threads walk along a row, then across heads, then tokens, so reads and writes both coalesce.
template <int V, storage_type T, class Heads>
__global__ void write_kernel(Heads heads, WriteRows rows) {
    const std::int64_t per_row = rows.dim / V;
    const std::int64_t total = std::int64_t{rows.tokens} * rows.heads * per_row;
    for (std::int64_t i = global_thread(); i < total; i += grid_threads()) {
        const std::int64_t row = i / per_row;
        const std::int32_t d = static_cast<std::int32_t>(i - row * per_row) * V;
        const std::int32_t token = static_cast<std::int32_t>(row / rows.heads);
        const std::int32_t h = static_cast<std::int32_t>(row - std::int64_t{token} * rows.heads);
        const std::int32_t slot = rows.slots[rows.slot_per_head ? row : token];
        const StreamView<T> s = heads.stream(h);
        const std::int64_t src = token * rows.token_stride + h * rows.head_stride + d;
        store_floats<V>(s.key(slot) + d, load_floats<V>(rows.keys + src));
        store_floats<V>(s.value(slot) + d, load_floats<V>(rows.values + src));
    }
}

/// Enqueues the append; 4-wide accesses when every pointer and stride allows them.
template <storage_type T, class Heads>
void launch_write(const Heads& heads, const PagePoolView<T>& keys, const PagePoolView<T>& values,
                  const WriteRows& rows, cudaStream_t stream) {
    if (rows.tokens == 0 || rows.heads == 0 || rows.dim == 0) return;
    const bool wide = rows.dim % 4 == 0 && aligned_for(rows.keys, 4) && aligned_for(rows.values, 4) &&
                      rows.token_stride % 4 == 0 && rows.head_stride % 4 == 0 && pool_aligned_for(keys, 4) &&
                      pool_aligned_for(values, 4);
    const std::int64_t elements = std::int64_t{rows.tokens} * rows.heads * rows.dim;
    if (wide) {
        write_kernel<4, T><<<blocks_for(elements / 4), kThreads, 0, stream>>>(heads, rows);
    } else {
        write_kernel<1, T><<<blocks_for(elements), kThreads, 0, stream>>>(heads, rows);
    }
    check_launch("write_kernel");
}

// ---- copy_slots: gather every source into scratch, then scatter, so overlapping moves are safe -----------

/// scratch[i][0] = key of slots[i], scratch[i][1] = its value, as raw words of the stored type.
template <class Word, storage_type T>
__global__ void gather_kernel(StreamView<T> s, const std::int32_t* slots, std::int32_t count,
                              std::int32_t words_per_row, Word* scratch) {
    const std::int64_t total = std::int64_t{count} * 2 * words_per_row;
    for (std::int64_t i = global_thread(); i < total; i += grid_threads()) {
        const std::int64_t row = i / words_per_row;
        const std::int64_t w = i - row * words_per_row;
        const std::int32_t slot = slots[row / 2];
        const T* src = (row & 1) ? s.value(slot) : s.key(slot);
        scratch[i] = reinterpret_cast<const Word*>(src)[w];
    }
}

template <class Word, storage_type T>
__global__ void scatter_kernel(StreamView<T> s, const std::int32_t* slots, std::int32_t count,
                               std::int32_t words_per_row, const Word* scratch) {
    const std::int64_t total = std::int64_t{count} * 2 * words_per_row;
    for (std::int64_t i = global_thread(); i < total; i += grid_threads()) {
        const std::int64_t row = i / words_per_row;
        const std::int64_t w = i - row * words_per_row;
        const std::int32_t slot = slots[row / 2];
        T* dst = (row & 1) ? s.value(slot) : s.key(slot);
        reinterpret_cast<Word*>(dst)[w] = scratch[i];
    }
}

/// Scratch bytes a copy of `count` tokens of `head_dim` elements stages through.
template <storage_type T>
constexpr std::size_t copy_scratch_bytes(std::int32_t count, std::int32_t head_dim) {
    return 2 * static_cast<std::size_t>(count) * static_cast<std::size_t>(head_dim) * sizeof(T);
}

template <class Word, storage_type T>
void launch_copy_words(const StreamView<T>& s, const std::int32_t* from, const std::int32_t* to, std::int32_t count,
                       std::byte* scratch, cudaStream_t stream) {
    const auto words = static_cast<std::int32_t>(static_cast<std::size_t>(s.keys.head_dim) * sizeof(T) / sizeof(Word));
    const unsigned blocks = blocks_for(std::int64_t{count} * 2 * words);
    Word* staged = reinterpret_cast<Word*>(scratch);
    gather_kernel<Word><<<blocks, kThreads, 0, stream>>>(s, from, count, words, staged);
    check_launch("gather_kernel");
    scatter_kernel<Word><<<blocks, kThreads, 0, stream>>>(s, to, count, words, staged);
    check_launch("scatter_kernel");
}

/// Enqueues the copy of `count` tokens from slots `from[i]` to `to[i]`, staged through `scratch`
/// (copy_scratch_bytes<T>(count, head_dim) bytes of device memory), in the widest word all addresses allow.
template <storage_type T>
void launch_copy_slots(const StreamView<T>& s, const std::int32_t* from, const std::int32_t* to, std::int32_t count,
                       std::byte* scratch, cudaStream_t stream) {
    if (count == 0 || s.keys.head_dim == 0) return;
    const auto fits = [&](std::size_t bytes) {
        if (bytes % sizeof(T) != 0) return false;
        const auto width = static_cast<std::int64_t>(bytes / sizeof(T));
        return pool_aligned_for(s.keys, width) && pool_aligned_for(s.values, width) &&
               reinterpret_cast<std::uintptr_t>(scratch) % bytes == 0;
    };
    if (fits(16)) {
        launch_copy_words<uint4>(s, from, to, count, scratch, stream);
    } else if (fits(8)) {
        launch_copy_words<uint2>(s, from, to, count, scratch, stream);
    } else if (fits(4)) {
        launch_copy_words<std::uint32_t>(s, from, to, count, scratch, stream);
    } else {
        launch_copy_words<std::uint16_t>(s, from, to, count, scratch, stream);
    }
}

}  // namespace kvsparse::cuda
