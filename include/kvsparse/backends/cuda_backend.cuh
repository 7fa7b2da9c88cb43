#pragma once
// CudaBackend: the backend primitives as CUDA kernels (kernels/kvsparse/cuda). Include only from CUDA
// translation units and link kvsparse::cuda.
//
// Every call enqueues its kernels on the stream passed last (default: the legacy default stream) and
// returns; nothing synchronizes and nothing allocates. All pointers, those in the views and the data of
// every span, are device memory (or memory the device can address); the host only reads span sizes.
// Faults inside a kernel surface at the caller's next synchronization; launch failures throw
// kvsparse::error with the CUDA error string; inconsistent sizes throw kvsparse::invalid_argument.
// The kernels include cuda_fp16.h (attention widens float16 in hardware), whose global `half` is
// CUDA's: spell out kvsparse::half in translation units that include this header.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "kvsparse/concepts.hpp"
#include "kvsparse/cuda/append.cuh"
#include "kvsparse/cuda/attend.cuh"
#include "kvsparse/cuda/common.cuh"
#include "kvsparse/cuda/key_bounds.cuh"
#include "kvsparse/cuda/page_scores.cuh"
#include "kvsparse/cuda/rope.cuh"
#include "kvsparse/cuda/top_pages.cuh"
#include "kvsparse/dtype.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

/// AttendArgs for every KV head of a HeadBatchView at once (one set of launches): head h attends its
/// `n` slots `slots[h * n, h * n + n)` with queries `[h][group][head_dim]` into out `[h][group][head_dim]`;
/// key_rotation and probabilities, when given, are `[heads][n]`.
template <storage_type T>
struct BatchAttendArgs {
    HeadBatchView<T> heads;
    std::int32_t n = 0;
    std::span<const std::int32_t> slots;  ///< [heads][n]
    std::span<const float> queries;       ///< [heads][group][head_dim], already rotated
    std::int32_t group = 1;
    float scale = 1.0f;
    std::span<const std::int32_t> key_rotation;  ///< [heads][n], or empty
    Rope rope{};
    std::span<float> out;             ///< [heads][group][head_dim]
    std::span<float> probabilities;   ///< [heads][n], += sum over the group; or empty
};

class CudaBackend {
public:
    using stream_type = cudaStream_t;

    CudaBackend() = default;
    /// `copy_scratch`: device memory that copy_slots without a workspace argument stages tokens through,
    /// sized once by the caller with copy_workspace_bytes for the largest copy.
    explicit CudaBackend(std::span<std::byte> copy_scratch) : copy_scratch_(copy_scratch) {}

    /// Workspace `attend` needs for `group` query heads over `slots` keys of dimension `head_dim`; a
    /// batched attend needs that once per KV head.
    static std::size_t workspace_bytes(std::int32_t group, std::int32_t slots, std::int32_t head_dim) {
        return sizeof(float) * cuda::attend_workspace_floats(group, slots, head_dim);
    }

    /// Workspace `copy_slots` needs to move `count` tokens of `head_dim` elements of type T.
    template <storage_type T>
    static std::size_t copy_workspace_bytes(std::int32_t count, std::int32_t head_dim) {
        return cuda::copy_scratch_bytes<T>(count, head_dim);
    }

    /// Store token i's key and value (rows `i * src_stride` of `keys` / `values`) into `slots[i]`.
    /// Slots must be distinct: the tokens are stored in parallel.
    template <storage_type T>
    void write(const StreamView<T>& stream, std::span<const std::int32_t> slots, std::span<const float> keys,
               std::span<const float> values, std::int32_t src_stride, stream_type cuda_stream = nullptr) const {
        const std::int32_t dim = same_dims(stream.keys, stream.values);
        const auto tokens = count_of(slots.size(), "slots.size()");
        detail::require(src_stride >= 0, "src_stride", src_stride, "must not be negative");
        require_rows(keys, "keys.size()", tokens, src_stride, 0, 1, dim);
        require_rows(values, "values.size()", tokens, src_stride, 0, 1, dim);
        const cuda::WriteRows rows{slots.data(), false, keys.data(), values.data(), src_stride, 0, tokens, 1, dim};
        cuda::launch_write(cuda::OneStream<T>{stream}, stream.keys, stream.values, rows, cuda_stream);
    }

    /// Batched append, one launch for `tokens` tokens of every head of `heads`: row (token i, head h) of
    /// `keys` / `values` starts at `i * token_stride + h * head_stride`. `slots` holds either one slot
    /// per token, used by every head (heads sharing slot numbers), or one per (token, head), [tokens][heads]
    /// (heads placing tokens independently, as kvsparse policies do). Slots of a head must be distinct.
    template <storage_type T>
    void write(const HeadBatchView<T>& heads, std::span<const std::int32_t> slots, std::span<const float> keys,
               std::span<const float> values, std::int32_t tokens, std::int64_t token_stride, std::int64_t head_stride,
               stream_type cuda_stream = nullptr) const {
        const std::int32_t dim = same_dims(heads.keys, heads.values);
        detail::require(tokens >= 0, "tokens", tokens, "must not be negative");
        detail::require(heads.num_heads >= 0, "heads.num_heads", heads.num_heads, "must not be negative");
        const std::int64_t per_token = slots.size() == static_cast<std::size_t>(tokens) ? 1 : heads.num_heads;
        detail::require(static_cast<std::int64_t>(slots.size()) == std::int64_t{tokens} * per_token, "slots.size()",
                        slots.size(), "must be tokens or tokens * heads.num_heads");
        detail::require(token_stride >= 0 && head_stride >= 0, "token_stride", token_stride,
                        "strides must not be negative");
        require_rows(keys, "keys.size()", tokens, token_stride, head_stride, heads.num_heads, dim);
        require_rows(values, "values.size()", tokens, token_stride, head_stride, heads.num_heads, dim);
        const cuda::WriteRows rows{slots.data(), per_token != 1, keys.data(), values.data(), token_stride,
                                   head_stride, tokens, heads.num_heads, dim};
        cuda::launch_write(heads, heads.keys, heads.values, rows, cuda_stream);
    }

    /// Move the tokens in `from[i]` to `to[i]`; all sources are read before any destination is written
    /// (staged through the scratch given at construction). Destinations must be distinct.
    template <storage_type T>
    void copy_slots(const StreamView<T>& stream, std::span<const std::int32_t> from, std::span<const std::int32_t> to,
                    stream_type cuda_stream = nullptr) const {
        copy_slots(stream, from, to, copy_scratch_, cuda_stream);
    }

    /// copy_slots staged through `workspace` (copy_workspace_bytes<T>(from.size(), head_dim) bytes of
    /// 16-byte aligned device memory).
    template <storage_type T>
    void copy_slots(const StreamView<T>& stream, std::span<const std::int32_t> from, std::span<const std::int32_t> to,
                    std::span<std::byte> workspace, stream_type cuda_stream = nullptr) const {
        const std::int32_t dim = same_dims(stream.keys, stream.values);
        const auto count = count_of(from.size(), "from.size()");
        detail::require(to.size() == from.size(), "to.size()", to.size(), "must equal from.size()");
        if (count == 0) return;
        const std::size_t needed = copy_workspace_bytes<T>(count, dim);
        if (workspace.size() < needed) {
            throw invalid_argument("copy_slots workspace = " + std::to_string(workspace.size()) +
                                   " bytes: must be at least copy_workspace_bytes = " + std::to_string(needed) +
                                   " (construct CudaBackend with device scratch, or pass a workspace)");
        }
        detail::require(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, "copy_slots workspace", "address",
                        "must be 16-byte aligned");
        cuda::launch_copy_slots(stream, from.data(), to.data(), count, workspace.data(), cuda_stream);
    }

    /// Rotate x[token][head][dim] in place, token i at positions[i].
    void rope(std::span<float> x, std::int32_t heads, std::int32_t dim, std::span<const std::int32_t> positions,
              Rope rope, stream_type cuda_stream = nullptr) const {
        const auto tokens = count_of(positions.size(), "positions.size()");
        detail::require(heads >= 0, "heads", heads, "must not be negative");
        detail::require(dim >= 0, "dim", dim, "must not be negative");
        detail::require(x.size() >= static_cast<std::size_t>(tokens) * static_cast<std::size_t>(heads) *
                                        static_cast<std::size_t>(dim),
                        "x.size()", x.size(), "must hold positions.size() * heads * dim floats");
        cuda::launch_rope(x.data(), tokens, heads, dim, positions.data(), rope, cuda_stream);
    }

    /// K-shift: re-rotate the cached keys in `slots` by `delta` positions.
    template <storage_type T>
    void shift_keys(const StreamView<T>& stream, std::span<const std::int32_t> slots, std::int32_t delta, Rope rope,
                    stream_type cuda_stream = nullptr) const {
        const auto count = count_of(slots.size(), "slots.size()");
        require_shift_dim(stream.keys.head_dim);
        cuda::launch_shift<T>(cuda::OneStream<T>{stream}, 1, slots.data(), count, true, stream.keys.head_dim, delta,
                              rope, cuda_stream);
    }

    /// Batched K-shift, one launch for every head of `heads`: `slots` holds either one list of `per_head`
    /// slots that every head shifts (heads sharing slot numbers), or one list per head, [heads][per_head].
    template <storage_type T>
    void shift_keys(const HeadBatchView<T>& heads, std::span<const std::int32_t> slots, std::int32_t per_head,
                    std::int32_t delta, Rope rope, stream_type cuda_stream = nullptr) const {
        detail::require(per_head >= 0, "per_head", per_head, "must not be negative");
        detail::require(heads.num_heads >= 0, "heads.num_heads", heads.num_heads, "must not be negative");
        const bool shared = slots.size() == static_cast<std::size_t>(per_head);
        detail::require(shared || slots.size() == static_cast<std::size_t>(per_head) * static_cast<std::size_t>(heads.num_heads),
                        "slots.size()", slots.size(), "must be per_head or per_head * heads.num_heads");
        require_shift_dim(heads.keys.head_dim);
        cuda::launch_shift<T>(heads, heads.num_heads, slots.data(), per_head, shared, heads.keys.head_dim, delta, rope,
                              cuda_stream);
    }

    /// Softmax attention of `group` query heads over the keys in `slots`; see AttendArgs. `workspace`:
    /// workspace_bytes(group, slots, head_dim) bytes of 4-byte aligned device memory.
    template <storage_type T>
    void attend(const AttendArgs<T>& a, std::span<std::byte> workspace, stream_type cuda_stream = nullptr) const {
        const auto n = count_of(a.slots.size(), "slots.size()");
        attend(cuda::OneStream<T>{a.stream}, a.stream.keys, a.stream.values, 1, n, a.slots, a.queries, a.group, a.scale,
               a.key_rotation, a.rope, a.out, a.probabilities, workspace, cuda_stream);
    }

    /// The attention of every KV head of `a.heads` in one set of launches; see BatchAttendArgs.
    /// `workspace`: heads.num_heads * workspace_bytes(group, n, head_dim) bytes, 4-byte aligned.
    template <storage_type T>
    void attend(const BatchAttendArgs<T>& a, std::span<std::byte> workspace, stream_type cuda_stream = nullptr) const {
        detail::require(a.heads.num_heads >= 0, "heads.num_heads", a.heads.num_heads, "must not be negative");
        detail::require(a.n >= 0, "n", a.n, "must not be negative");
        attend(a.heads, a.heads.keys, a.heads.values, a.heads.num_heads, a.n, a.slots, a.queries, a.group, a.scale,
               a.key_rotation, a.rope, a.out, a.probabilities, workspace, cuda_stream);
    }

    /// For engines that own their cache, on the device: folds the keys appended at positions [first, first
    /// + count) of an append-only stream (slot == position), rows of `keys` `key_stride` floats apart, into
    /// their pages of `bounds`; a page's first position initializes it. The same bounds, bit for bit, as
    /// append_key_bounds on the host, key by key.
    template <storage_type T>
    void append_key_bounds(const KeyBounds<T>& bounds, std::int32_t first, std::int32_t count, std::span<const float> keys,
                           std::int64_t key_stride, stream_type cuda_stream = nullptr) const {
        detail::require(first >= 0, "first", first, "must not be negative");
        detail::require(count >= 0, "count", count, "must not be negative");
        if (count == 0) return;
        detail::require(bounds.page_size > 0 && (first + count - 1) / bounds.page_size < bounds.pages, "bounds.pages",
                        bounds.pages, "too few for the appended positions");
        detail::require(key_stride >= bounds.head_dim, "key_stride", key_stride, "must be at least bounds.head_dim");
        detail::require(static_cast<std::int64_t>(keys.size()) >= (count - 1) * key_stride + bounds.head_dim, "keys.size()",
                        keys.size(), "must hold count rows at key_stride");
        cuda::launch_append_key_bounds(bounds, first, count, keys.data(), key_stride, cuda_stream);
    }

    /// Quest's upper-bound page scores of pages [0, pages) of `bounds` (device memory) for `rows` query
    /// rows `queries` [rows][head_dim], aggregated by `mode` into `scores` (`per_query_head`: row r's at
    /// [r * pages, (r + 1) * pages)); bit for bit CpuBackend::page_scores, so both select the same pages.
    template <class T>
    void page_scores(const KeyBounds<T>& bounds, std::int32_t pages, std::span<const float> queries, std::int32_t rows,
                     GqaAggregation mode, std::span<float> scores, stream_type cuda_stream = nullptr) const {
        batch_page_scores(bounds, 0, 1, pages, queries, rows, mode, scores, cuda_stream);
    }

    /// page_scores of `heads` KV heads in one launch (a layer's heads at a decode step): head h's bounds
    /// start `head_stride` elements after head h - 1's (same pages, page size and head_dim), its queries
    /// are [h][rows][head_dim], its scores [h][pages] ([h][rows][pages] per query head).
    template <class T>
    void batch_page_scores(const KeyBounds<T>& bounds, std::int64_t head_stride, std::int32_t heads, std::int32_t pages,
                           std::span<const float> queries, std::int32_t rows, GqaAggregation mode, std::span<float> scores,
                           stream_type cuda_stream = nullptr) const {
        detail::require(heads >= 0, "heads", heads, "must not be negative");
        detail::require(head_stride >= 0, "head_stride", head_stride, "must not be negative");
        detail::require(pages >= 0 && pages <= bounds.pages, "pages", pages, "must be in [0, bounds.pages]");
        detail::require(rows >= 1, "rows", rows, "must be at least 1");
        detail::require(bounds.head_dim >= 0 && cuda::page_scores_shared_bytes<std::remove_const_t<T>>(bounds.head_dim) <= 48 * 1024,
                        "bounds.head_dim", bounds.head_dim, "too large for page_scores' shared memory");
        const auto h = static_cast<std::size_t>(heads);
        detail::require(queries.size() == h * static_cast<std::size_t>(rows) * static_cast<std::size_t>(bounds.head_dim),
                        "queries.size()", queries.size(), "must be heads * rows * bounds.head_dim");
        const std::size_t needed = h * static_cast<std::size_t>(pages) *
                                   (mode == GqaAggregation::per_query_head ? static_cast<std::size_t>(rows) : 1);
        detail::require(scores.size() >= needed, "scores.size()", scores.size(),
                        "must hold heads * pages (times rows per query head)");
        if (pages == 0 || heads == 0) return;
        cuda::launch_page_scores(bounds.read_only(), head_stride, heads, pages, queries.data(), rows, mode, scores.data(),
                                 cuda_stream);
    }

    /// Top-k with the tie rule, as CpuBackend::top_pages: the `k` best of `scores[0, n)` (higher first;
    /// equal scores: the lower index wins; NaN counts as -inf) into order[0, k), ascending; returns
    /// min(k, n) (0 for k <= 0). `order` has room for n.
    std::int32_t top_pages(std::span<const float> scores, std::int32_t n, std::int32_t k, std::span<std::int32_t> order,
                           stream_type cuda_stream = nullptr) const {
        return batch_top_pages(scores, 1, n, k, order, cuda_stream);
    }

    /// top_pages of `heads` rows of scores, [heads][n], into order [heads][n] (row h's k pages first), in
    /// one launch (a block per row). Returns min(k, n) (0 for k <= 0).
    std::int32_t batch_top_pages(std::span<const float> scores, std::int32_t heads, std::int32_t n, std::int32_t k,
                                 std::span<std::int32_t> order, stream_type cuda_stream = nullptr) const {
        detail::require(heads >= 0, "heads", heads, "must not be negative");
        detail::require(n >= 0 && scores.size() >= static_cast<std::size_t>(heads) * static_cast<std::size_t>(n), "n", n,
                        "must be in [0, scores.size() / heads]");
        detail::require(order.size() >= static_cast<std::size_t>(heads) * static_cast<std::size_t>(n), "order.size()",
                        order.size(), "must be at least heads * n");
        if (k <= 0 || n == 0 || heads == 0) return 0;
        if (k >= n) {
            cuda::launch_iota(order.data(), heads, n, cuda_stream);
            return n;
        }
        cuda::launch_top_pages(scores.data(), heads, n, k, order.data(), cuda_stream);
        return k;
    }

private:
    static void check(cudaError_t status, const char* what) { cuda::check(status, what); }

    /// Both attends: `heads` KV heads of `n` slots each, all arrays [heads][...].
    template <storage_type T, class Streams>
    static void attend(const Streams& streams, const PagePoolView<T>& keys, const PagePoolView<T>& values,
                       std::int32_t heads, std::int32_t n, std::span<const std::int32_t> slots,
                       std::span<const float> queries, std::int32_t group, float scale,
                       std::span<const std::int32_t> key_rotation, Rope rope, std::span<float> out,
                       std::span<float> probabilities, std::span<std::byte> workspace, cudaStream_t cuda_stream) {
        const std::int32_t dim = same_dims(keys, values);
        detail::require(group >= 1, "group", group, "must be at least 1");
        const auto rows = static_cast<std::size_t>(heads) * static_cast<std::size_t>(n);
        const std::size_t q_size = static_cast<std::size_t>(heads) * static_cast<std::size_t>(group) * static_cast<std::size_t>(dim);
        detail::require(slots.size() == rows, "slots.size()", slots.size(), "must be heads * n");
        detail::require(queries.size() == q_size, "queries.size()", queries.size(), "must be heads * group * head_dim");
        detail::require(out.size() == q_size, "out.size()", out.size(), "must be heads * group * head_dim");
        detail::require(key_rotation.empty() || key_rotation.size() == rows, "key_rotation.size()", key_rotation.size(),
                        "must be 0 or the number of slots");
        detail::require(probabilities.empty() || probabilities.size() == rows, "probabilities.size()",
                        probabilities.size(), "must be 0 or the number of slots");
        if (heads == 0) return;
        if (n == 0) {
            check(cudaMemsetAsync(out.data(), 0, out.size_bytes(), cuda_stream), "attend: clearing out");
            return;
        }
        detail::require(workspace.size() >= static_cast<std::size_t>(heads) * workspace_bytes(group, n, dim),
                        "workspace.size()", workspace.size(), "must be at least heads * workspace_bytes(group, n, head_dim)");
        detail::require(reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(float) == 0, "workspace", "address",
                        "must be 4-byte aligned");
        cuda::AttendParams<T, Streams> p;
        p.streams = streams;
        p.heads = heads;
        p.slots = slots.data();
        p.n = n;
        p.queries = queries.data();
        p.group = group;
        p.dim = dim;
        p.scale = scale;
        p.key_rotation = key_rotation.empty() ? nullptr : key_rotation.data();
        p.rope = rope;
        p.out = out.data();
        p.probabilities = probabilities.empty() ? nullptr : probabilities.data();
        p.chunks = cuda::attend_chunks(n);
        cuda::attend_layout(p, reinterpret_cast<float*>(workspace.data()));
        cuda::launch_attend(p, keys, values, cuda_stream);
    }

    static std::int32_t count_of(std::size_t size, const char* field) {
        detail::require(size <= static_cast<std::size_t>(INT32_MAX), field, size, "must fit in int32");
        return static_cast<std::int32_t>(size);
    }

    template <storage_type T>
    static std::int32_t same_dims(const PagePoolView<T>& keys, const PagePoolView<T>& values) {
        detail::require(keys.head_dim >= 0, "keys.head_dim", keys.head_dim, "must not be negative");
        detail::require(values.head_dim == keys.head_dim, "values.head_dim", values.head_dim,
                        "must equal keys.head_dim");
        return keys.head_dim;
    }

    /// `span` holds every row read: (tokens - 1) * token_stride + (heads - 1) * head_stride + dim.
    static void require_rows(std::span<const float> span, const char* field, std::int32_t tokens,
                             std::int64_t token_stride, std::int64_t head_stride, std::int32_t heads, std::int32_t dim) {
        if (tokens == 0 || heads == 0 || dim == 0) return;
        const std::int64_t last = std::int64_t{tokens - 1} * token_stride + std::int64_t{heads - 1} * head_stride + dim;
        detail::require(static_cast<std::int64_t>(span.size()) >= last, field, span.size(),
                        "too small for the rows its strides address");
    }

    static void require_shift_dim(std::int32_t dim) {
        detail::require(dim >= 0 && cuda::shift_shared_bytes(dim) <= 48 * 1024, "head_dim", dim,
                        "must be in [0, 12288] for shift_keys");
    }

    std::span<std::byte> copy_scratch_;
};

static_assert(kv_backend<CudaBackend>);

}  // namespace kvsparse
