#pragma once
// CpuBackend: the backend primitives in portable C++. Work runs synchronously in call order, so its
// stream type is an empty tag.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "kvsparse/concepts.hpp"
#include "kvsparse/detail/cpu_attention.hpp"
#include "kvsparse/detail/cpu_convert.hpp"
#include "kvsparse/detail/cpu_page_select.hpp"
#include "kvsparse/detail/thread_pool.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

class CpuBackend {
public:
    struct stream_type {};

    /// `threads`: threads KVCache spreads its per-KV-head work over (the calling thread included);
    /// 0 takes the hardware's, 1 keeps everything on the calling thread. Results do not depend on it.
    struct Options {
        int threads = 0;
    };

    CpuBackend() = default;
    explicit CpuBackend(Options options) : threads_(options.threads) {}

    /// Threads parallel_for uses.
    int threads() const { return threads_ > 0 ? threads_ : detail::ThreadPool::default_threads(); }

    /// Runs task(i) for every i in [0, n) on the backend's threads: a pool started by the first call that
    /// needs it and kept from then on (copies of the backend share it), so a decode step starts no thread
    /// and allocates nothing. The tasks must be independent; the first exception one throws is rethrown.
    template <class Task>
    void parallel_for(std::int64_t n, Task&& task) {
        if (n > 1 && threads() > 1) {
            if (!pool_) pool_ = std::make_shared<detail::ThreadPool>(threads());
            pool_->parallel_for(n, task);
        } else {
            for (std::int64_t i = 0; i < n; ++i) task(i);
        }
    }

    /// Scratch `attend` needs for `group` query heads over `slots` keys of dimension `head_dim`.
    /// (Scores, a chunk's weights with the running maximum and sum, one widened key, and the cos/sin of
    /// one key rotation: detail::cpu::scratch_floats.)
    static std::size_t workspace_bytes(std::int32_t group, std::int32_t slots, std::int32_t head_dim) {
        return sizeof(float) * detail::cpu::scratch_floats(static_cast<std::size_t>(group), static_cast<std::size_t>(slots),
                                                           static_cast<std::size_t>(head_dim));
    }

    /// Store token i's key and value (rows `i * src_stride` of `keys` / `values`) into `slots[i]`.
    template <storage_type T>
    void write(const StreamView<T>& stream, std::span<const std::int32_t> slots, std::span<const float> keys,
               std::span<const float> values, std::int32_t src_stride, stream_type = {}) const {
        const std::int32_t dim = stream.keys.head_dim;
        for (std::size_t i = 0; i < slots.size(); ++i) {
            const float* k = keys.data() + i * static_cast<std::size_t>(src_stride);
            const float* v = values.data() + i * static_cast<std::size_t>(src_stride);
            detail::cpu::narrow(k, stream.key(slots[i]), static_cast<std::size_t>(dim));
            detail::cpu::narrow(v, stream.value(slots[i]), static_cast<std::size_t>(dim));
        }
    }

    /// Move the tokens in `from[i]` to `to[i]`; all sources are read before any destination is written.
    template <storage_type T>
    void copy_slots(const StreamView<T>& stream, std::span<const std::int32_t> from, std::span<const std::int32_t> to,
                    stream_type = {}) const {
        const std::size_t dim = static_cast<std::size_t>(stream.keys.head_dim);
        std::vector<T> staged(2 * dim * from.size());
        for (std::size_t i = 0; i < from.size(); ++i) {
            std::memcpy(&staged[2 * dim * i], stream.key(from[i]), dim * sizeof(T));
            std::memcpy(&staged[2 * dim * i + dim], stream.value(from[i]), dim * sizeof(T));
        }
        for (std::size_t i = 0; i < to.size(); ++i) {
            std::memcpy(stream.key(to[i]), &staged[2 * dim * i], dim * sizeof(T));
            std::memcpy(stream.value(to[i]), &staged[2 * dim * i + dim], dim * sizeof(T));
        }
    }

    /// Rotate x[token][head][dim] in place, token i at positions[i].
    void rope(std::span<float> x, std::int32_t heads, std::int32_t dim, std::span<const std::int32_t> positions,
              Rope rope, stream_type = {}) const {
        for (std::size_t i = 0; i < positions.size(); ++i) {
            for (std::int32_t h = 0; h < heads; ++h) {
                rope_rotate(x.data() + (i * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) *
                                           static_cast<std::size_t>(dim),
                            dim, positions[i], rope);
            }
        }
    }

    /// K-shift: re-rotate the cached keys in `slots` by `delta` positions.
    template <storage_type T>
    void shift_keys(const StreamView<T>& stream, std::span<const std::int32_t> slots, std::int32_t delta, Rope rope,
                    stream_type = {}) const {
        for (const std::int32_t slot : slots) rope_rotate(stream.key(slot), stream.keys.head_dim, delta, rope);
    }

    /// Softmax attention of `group` query heads over the keys in `slots`; see AttendArgs.
    template <storage_type T>
    void attend(const AttendArgs<T>& a, std::span<std::byte> workspace, stream_type = {}) const {
        // Vectorized kernels (AVX2/FMA/F16C when the CPU has them, else portable loops): see
        // detail/cpu_attention.hpp.
        detail::cpu::attend(a, workspace);
    }

    // ---- per-page key bounds and page selection (detail/cpu_page_select.hpp) -------------------------

    /// Folds one key into page `page` of `bounds`. The key (float32 or a storage type) is narrowed to T
    /// exactly as `write` stores it, so the bounds are the exact element-wise min/max of the stored keys
    /// and need no rounding of their own. `first`: the page's first key initializes its bounds, whatever
    /// the memory held before (an older page's bounds are never merged into).
    template <storage_type T, storage_type K>
    static void update_key_bounds(const KeyBounds<T>& bounds, std::int32_t page, const K* key, bool first) {
        detail::pages::update_key_bounds(bounds, page, key, first);
    }

    /// Upper-bound scores of pages [0, pages) for `rows` query rows [rows][head_dim] (REFERENCE.md,
    /// QuestPageSelector): U_r(i) = sum_d max(q_rd * kmax_d, q_rd * kmin_d), no 1/sqrt(D), added in the
    /// fixed order that page_score_add and detail::pages::page_rows_portable define (CudaBackend follows
    /// it too). Each page's bounds are read from memory once for all rows. max / sum: scores[i] is the
    /// maximum / sum over the rows; per_query_head: scores[r * pages + i].
    template <class T>
    static void page_scores(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries,
                            std::int32_t rows, GqaAggregation mode, std::span<float> scores) {
        detail::pages::page_scores(bounds, pages, queries, rows, mode, scores);
    }

    /// Top-k with the tie rule: the `k` best of the `n` scores (higher first; equal scores: the lower
    /// index wins; NaN counts as -inf), in ascending index order in order[0, k); returns min(k, n).
    /// `order` has room for n. A radix select, O(n) with no comparison sort.
    static std::int32_t top_pages(std::span<const float> scores, std::int32_t n, std::int32_t k,
                                  std::span<std::int32_t> order) {
        return detail::pages::top_pages(scores, n, k, order);
    }

private:
    int threads_ = 0;
    std::shared_ptr<detail::ThreadPool> pool_;
};

static_assert(kv_backend<CpuBackend>);

}  // namespace kvsparse
