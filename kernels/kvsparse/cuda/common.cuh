#pragma once
// Shared pieces of the CUDA kernels: error checks, grid sizing, vector loads and stores, and the two
// ways a launch finds its KV heads (one StreamView, or a batch of heads in one pool).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kvsparse/dtype.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

/// Many KV heads stored in one pair of page pools, so that one launch covers them all. Head h of the
/// batch is pool head `first_head + h * head_step` and finds its pages through `tables[h * table_step]`
/// (a device array of page tables). Engines whose pages hold every head and share one table per
/// sequence (vLLM): head_step 1, table_step 0. kvsparse's own cache (one head per page, one table per
/// head): head_step 0, table_step 1.
template <storage_type T>
struct HeadBatchView {
    PagePoolView<T> keys;
    PagePoolView<T> values;
    const PageTableView* tables = nullptr;  ///< device memory
    std::int32_t table_step = 1;
    std::int32_t first_head = 0;
    std::int32_t head_step = 1;
    std::int32_t num_heads = 0;

    KVSPARSE_HD StreamView<T> stream(std::int32_t h) const {
        return StreamView<T>{keys, values, tables[h * table_step], first_head + h * head_step};
    }
};

static_assert(std::is_trivially_copyable_v<HeadBatchView<half>>);

namespace cuda {

/// One StreamView passed by value: the single-stream primitives use the batched kernels through it.
template <storage_type T>
struct OneStream {
    StreamView<T> view;
    KVSPARSE_HD StreamView<T> stream(std::int32_t) const { return view; }
};

/// Throws kvsparse::error "<what>: <CUDA error string>" unless `status` is cudaSuccess.
inline void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        (void)cudaGetLastError();  // clear it, or the next launch check would report it again
        throw error(std::string("kvsparse CUDA: ") + what + ": " + cudaGetErrorName(status) + ": " +
                    cudaGetErrorString(status));
    }
}

/// After a launch: bad configurations fail here; faults inside the kernel surface at the caller's next
/// synchronization, which this library never does on its own.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

inline constexpr int kThreads = 256;

/// Blocks for a grid-stride loop over `work` items; capped, since each thread loops anyway.
inline unsigned blocks_for(std::int64_t work, int threads = kThreads) {
    const std::int64_t blocks = (work + threads - 1) / threads;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks));
}

__device__ inline std::int64_t global_thread() {
    return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline std::int64_t grid_threads() { return static_cast<std::int64_t>(gridDim.x) * blockDim.x; }

/// True when `p` and every stride (in elements) allow accesses of `width` elements at once.
template <class T>
bool aligned_for(const T* p, std::int64_t width) {
    return reinterpret_cast<std::uintptr_t>(p) % (static_cast<std::uintptr_t>(width) * sizeof(T)) == 0;
}
template <storage_type T>
bool pool_aligned_for(const PagePoolView<T>& pool, std::int64_t width) {
    return aligned_for(pool.data, width) && pool.page_stride % width == 0 && pool.token_stride % width == 0 &&
           pool.head_stride % width == 0 && pool.head_dim % width == 0;
}

/// to_float on the device, float16 in hardware: widening is exact, so the value is to_float's.
template <storage_type T>
__device__ inline float widen(T x) {
    if constexpr (std::is_same_v<T, half>) {
        return __half2float(__ushort_as_half(x.bits));
    } else {
        return to_float(x);
    }
}

// ---- V consecutive elements as floats: V is 4 (one 16-byte float load, one 16- or 8-byte store) or 1 ----

template <int V>
struct Floats {
    float x[static_cast<unsigned>(V)];
};

template <int V>
__device__ inline Floats<V> load_floats(const float* p) {
    Floats<V> f;
    if constexpr (V == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        f.x[0] = v.x;
        f.x[1] = v.y;
        f.x[2] = v.z;
        f.x[3] = v.w;
    } else {
        for (int i = 0; i < V; ++i) f.x[i] = p[i];
    }
    return f;
}

/// Narrow with the library's own from_float, so a stored value is bit for bit what CpuBackend stores.
template <int V, storage_type T>
__device__ inline void store_floats(T* p, const Floats<V>& f) {
    if constexpr (V == 4 && std::is_same_v<T, float>) {
        *reinterpret_cast<float4*>(p) = make_float4(f.x[0], f.x[1], f.x[2], f.x[3]);
    } else if constexpr (V == 4) {
        const auto bits = [&](int i) { return static_cast<std::uint32_t>(from_float<T>(f.x[i]).bits); };
        *reinterpret_cast<uint2*>(p) = make_uint2(bits(0) | (bits(1) << 16), bits(2) | (bits(3) << 16));
    } else {
        for (int i = 0; i < V; ++i) p[i] = from_float<T>(f.x[i]);
    }
}

}  // namespace cuda
}  // namespace kvsparse
