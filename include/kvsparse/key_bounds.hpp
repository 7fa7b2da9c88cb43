#pragma once
// Per-page key bounds (Quest's metadata) and page-level selection outputs.
//
// A stream's slots are cut into bounds pages of `page_size` slots (the policy's page, which need not be
// the cache's storage page). For every page the bounds hold the element-wise minimum and maximum of the
// keys stored in it, as stored (in the storage type, after RoPE): two vectors of head_dim elements.
// Because they are min/max of values already in the storage type, they are exact in that type: no
// rounding happens when they are kept in float16 or bfloat16.
//
// KeyBounds<T> is the writable, typed view (a cache or an engine updates it on append); KeyBoundsView is
// the read-only view with a dtype tag that StreamState carries to a policy's select, together with the
// scratch the selection needs, so nothing is allocated while selecting. PageLists are caller-owned
// FlashInfer-style outputs (indptr / indices / last_page_len) for engines that run their own kernels.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "kvsparse/detail/macros.hpp"
#include "kvsparse/dtype.hpp"

namespace kvsparse {

/// How the query heads of a GQA group share one page selection (REFERENCE.md, QuestPageSelector).
enum class GqaAggregation : std::uint8_t {
    max,             ///< per page, the largest score of the group's heads (still an upper bound for each)
    sum,             ///< per page, the sum of the group's scores
    per_query_head,  ///< every query head selects on its own (the original Quest)
};

/// One step of Quest's page score U = sum_d max(q_d * kmax_d, q_d * kmin_d): acc plus q_d times the bound
/// on the side of q_d's sign, fused (one rounding, so no compiler can contract it differently). Float
/// products round monotonically, so the product is the larger of the two (for a query element of -0,
/// both are zeros). The order the terms are added in is fixed (CpuBackend::page_scores): every backend
/// must follow it to select the same pages on ties.
KVSPARSE_HD inline float page_score_add(float acc, float q, float kmin, float kmax) {
    const float bound = (detail::float_bits(q) >> 31) != 0 ? kmin : kmax;
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(q, bound, acc);
#else
    return std::fma(q, bound, acc);
#endif
}

/// An order-preserving unsigned image of a page score, for top-k selection on every backend: a > b
/// exactly when page_score_key(a) > page_score_key(b), with NaN taken as -inf and -0 as +0 (equal
/// floats, so equal keys, and the tie rule decides).
KVSPARSE_HD inline std::uint32_t page_score_key(float score) {
    std::uint32_t bits = detail::float_bits(score);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits = 0xff800000u;  // NaN: -inf
    if ((bits & 0x7fffffffu) == 0) bits = 0;                      // -0: +0
    return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

/// Folds one stored key element into its page's bounds `lo` / `hi`; the page's first key initializes
/// them (never merged into what the memory held before). The CPU and CUDA backends both fold with it.
template <class T>
KVSPARSE_HD inline void fold_key_bound(T& lo, T& hi, T stored, bool first) {
    if (first) {
        lo = hi = stored;
        return;
    }
    const float x = to_float(stored);
    if (x < to_float(lo)) lo = stored;
    if (x > to_float(hi)) hi = stored;
}

/// Writable bounds of one stream: page p's kmin at `data + p * page_stride`, its kmax `head_dim`
/// elements later. T may be const (read-only use).
template <class T>
struct KeyBounds {
    static_assert(storage_type<std::remove_const_t<T>>, "KeyBounds holds float, half or bfloat16");

    T* data = nullptr;
    std::int32_t pages = 0;         ///< pages the buffer has room for
    std::int32_t page_size = 0;     ///< slots per bounds page, a power of two
    std::int32_t head_dim = 0;
    std::int64_t page_stride = 0;   ///< elements from one page's bounds to the next (>= 2 * head_dim)

    /// Elements a densely packed buffer needs for `pages` pages.
    static constexpr std::size_t elements(std::int32_t pages, std::int32_t head_dim) {
        return 2 * static_cast<std::size_t>(pages) * static_cast<std::size_t>(head_dim);
    }
    /// Densely packed bounds: [pages][2][head_dim], kmin then kmax.
    static constexpr KeyBounds packed(T* data, std::int32_t pages, std::int32_t page_size, std::int32_t head_dim) {
        return {data, pages, page_size, head_dim, 2 * std::int64_t{head_dim}};
    }

    KVSPARSE_HD T* kmin(std::int32_t page) const { return data + page * page_stride; }
    KVSPARSE_HD T* kmax(std::int32_t page) const { return kmin(page) + head_dim; }

    /// Read-only view of the same bounds.
    KeyBounds<const std::remove_const_t<T>> read_only() const { return {data, pages, page_size, head_dim, page_stride}; }
};

/// The bounds a policy's select reads, in whichever storage type they are kept, and the scratch it may
/// use. Empty (`pages == 0`) when the stream keeps no bounds.
struct KeyBoundsView {
    const void* data = nullptr;
    dtype type = dtype::float32;
    std::int32_t pages = 0;        ///< pages holding bounds: ceil(slots / page_size)
    std::int32_t page_size = 0;
    std::int32_t head_dim = 0;
    std::int64_t page_stride = 0;
    std::span<float> scores;       ///< scratch: at least pages * (query heads of the group) floats
    std::span<std::int32_t> order; ///< scratch: at least `pages` int32

    /// The first `pages` pages of `bounds`, with the caller's scratch.
    template <class T>
    static KeyBoundsView of(const KeyBounds<T>& bounds, std::int32_t pages, std::span<float> scores,
                            std::span<std::int32_t> order) {
        return {bounds.data, dtype_of<std::remove_const_t<T>>, pages, bounds.page_size, bounds.head_dim,
                bounds.page_stride, scores, order};
    }

    /// The same bounds, typed; the caller has checked `type == dtype_of<T>`.
    template <storage_type T>
    KeyBounds<const T> typed() const {
        return {static_cast<const T*>(data), pages, page_size, head_dim, page_stride};
    }
};

/// Calls f(KeyBounds<const T>) with the view's storage type.
template <class F>
decltype(auto) visit_bounds(const KeyBoundsView& view, F&& f) {
    switch (view.type) {
        case dtype::float16:
            return f(view.typed<half>());
        case dtype::bfloat16:
            return f(view.typed<bfloat16>());
        case dtype::float32:
        default:
            return f(view.typed<float>());
    }
}

/// FlashInfer-style page lists in caller buffers: row r selects pages indices[indptr[r] .. indptr[r+1]),
/// ascending; every selected page but the last is full, and the last holds last_page_len[r] tokens.
/// Rows are (sequence, KV head) pairs, or (sequence, query head) when each query head selects on its own.
/// The policy that writes them reports the sizes (e.g. QuestPageSelector::page_list_sizes).
struct PageLists {
    std::span<std::int32_t> indptr;         ///< [rows + 1]; indptr[0] is 0
    std::span<std::int32_t> indices;        ///< page numbers of the stream, in units of the policy's page
    std::span<std::int32_t> last_page_len;  ///< [rows]
};

/// Buffer sizes, in elements, for PageLists.
struct PageListSizes {
    std::size_t rows = 0;
    std::size_t indptr = 0;
    std::size_t indices = 0;
    std::size_t last_page_len = 0;
};

static_assert(std::is_trivially_copyable_v<KeyBounds<half>>);
static_assert(std::is_trivially_copyable_v<KeyBoundsView>);

}  // namespace kvsparse
