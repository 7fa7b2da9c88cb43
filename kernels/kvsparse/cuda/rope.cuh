#pragma once
// RoPE on float32 activations and the K-shift on stored keys. The math is rope.hpp's rope_turn and
// rope_apply, the same functions CpuBackend runs, one pair per thread.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvsparse/cuda/common.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse::cuda {

/// Heads one RoPE thread turns with the same angle: its double-precision sin/cos is the costly part.
inline constexpr int kRopeHeadsPerThread = 4;

/// x[token][heads][dim], token i at positions[i]. Thread: one pair of one token, for up to H heads.
/// Consecutive threads take consecutive pairs, so each head row coalesces. (A template, so that the
/// header can define it in every translation unit.)
template <int H>
__global__ void rope_kernel(float* x, std::int32_t tokens, std::int32_t heads, std::int32_t dim,
                            const std::int32_t* positions, Rope rope) {
    const std::int32_t pairs = dim / 2;
    const std::int32_t groups = (heads + H - 1) / H;
    const std::int64_t total = std::int64_t{tokens} * groups * pairs;
    for (std::int64_t i = global_thread(); i < total; i += grid_threads()) {
        const auto pair = static_cast<std::int32_t>(i % pairs);
        const std::int64_t r = i / pairs;
        const auto group = static_cast<std::int32_t>(r % groups);
        const std::int64_t token = r / groups;
        const RopeTurn turn = rope_turn(pair, dim, positions[token], rope.theta);
        const std::int32_t a = rope_first(rope.style, pair);
        const std::int32_t b = rope_second(rope.style, pair, dim);
        const std::int32_t last = min(heads, (group + 1) * H);
        for (std::int32_t h = group * H; h < last; ++h) {
            float* row = x + (token * heads + h) * dim;
            float xa = row[a];
            float xb = row[b];
            rope_apply(xa, xb, turn);
            row[a] = xa;
            row[b] = xb;
        }
    }
}

inline void launch_rope(float* x, std::int32_t tokens, std::int32_t heads, std::int32_t dim,
                        const std::int32_t* positions, Rope rope, cudaStream_t stream) {
    const std::int32_t pairs = dim / 2;
    if (tokens == 0 || heads == 0 || pairs == 0) return;
    const std::int32_t groups = (heads + kRopeHeadsPerThread - 1) / kRopeHeadsPerThread;
    const unsigned blocks = blocks_for(std::int64_t{tokens} * groups * pairs);
    rope_kernel<kRopeHeadsPerThread><<<blocks, kThreads, 0, stream>>>(x, tokens, heads, dim, positions, rope);
    check_launch("rope_kernel");
}

/// Grid cap for the K-shift: every block first computes the dim/2 turns, so fewer, longer-lived blocks
/// compute fewer of them.
inline constexpr unsigned kShiftMaxBlocks = 1024;

/// Re-rotate the stored keys of slots[...] by `delta`. The angle depends only on the pair, so each block
/// computes the dim/2 turns once into shared memory; a thread then turns one pair of one key.
/// Head h shifts `slots[k]` (shared list) or `slots[h * per_head + k]`, k < per_head.
template <storage_type T, class Heads>
__global__ void shift_kernel(Heads heads, std::int32_t num_heads, const std::int32_t* slots, std::int32_t per_head,
                             bool shared_slots, std::int32_t dim, std::int32_t delta, Rope rope) {
    extern __shared__ float2 turns[];  // (cos, sin) per pair
    const std::int32_t pairs = dim / 2;
    for (std::int32_t p = static_cast<std::int32_t>(threadIdx.x); p < pairs; p += static_cast<std::int32_t>(blockDim.x)) {
        const RopeTurn t = rope_turn(p, dim, delta, rope.theta);
        turns[p] = make_float2(t.c, t.s);
    }
    __syncthreads();
    const std::int64_t total = std::int64_t{num_heads} * per_head * pairs;
    for (std::int64_t i = global_thread(); i < total; i += grid_threads()) {
        const auto pair = static_cast<std::int32_t>(i % pairs);
        const std::int64_t r = i / pairs;
        const auto k = static_cast<std::int32_t>(r % per_head);
        const auto h = static_cast<std::int32_t>(r / per_head);
        T* key = heads.stream(h).key(slots[shared_slots ? k : r]);
        const std::int32_t a = rope_first(rope.style, pair);
        const std::int32_t b = rope_second(rope.style, pair, dim);
        float xa = widen(key[a]);
        float xb = widen(key[b]);
        rope_apply(xa, xb, RopeTurn{turns[pair].x, turns[pair].y});
        key[a] = from_float<T>(xa);
        key[b] = from_float<T>(xb);
    }
}

/// Shared memory the K-shift needs for `dim`.
constexpr std::size_t shift_shared_bytes(std::int32_t dim) {
    return static_cast<std::size_t>(dim / 2) * sizeof(float2);
}

template <storage_type T, class Heads>
void launch_shift(const Heads& heads, std::int32_t num_heads, const std::int32_t* slots, std::int32_t per_head,
                  bool shared_slots, std::int32_t dim, std::int32_t delta, Rope rope, cudaStream_t stream) {
    const std::int32_t pairs = dim / 2;
    if (num_heads == 0 || per_head == 0 || pairs == 0) return;
    const std::int64_t total = std::int64_t{num_heads} * per_head * pairs;
    const unsigned blocks = blocks_for(total) < kShiftMaxBlocks ? blocks_for(total) : kShiftMaxBlocks;
    shift_kernel<T><<<blocks, kThreads, shift_shared_bytes(dim), stream>>>(heads, num_heads, slots, per_head,
                                                                           shared_slots, dim, delta, rope);
    check_launch("shift_kernel");
}

}  // namespace kvsparse::cuda
