#pragma once
// Non-owning, trivially copyable views of paged K/V memory. They hold raw pointers (host or device)
// and strides, so an engine's own cache and kvsparse's KVCache are addressed the same way.

#include <cstdint>
#include <type_traits>

#include "kvsparse/detail/macros.hpp"
#include "kvsparse/dtype.hpp"

namespace kvsparse {

/// Order of the axes inside one page.
enum class Layout : std::uint8_t {
    NHD,  ///< [page][token][head][dim]: vLLM, FlashInfer's default
    HND,  ///< [page][head][token][dim]
};

/// A pool of pages holding keys (or values) of `num_heads` heads; any strides, in elements.
template <storage_type T>
struct PagePoolView {
    T* data = nullptr;
    std::int64_t page_stride = 0;
    std::int64_t token_stride = 0;
    std::int64_t head_stride = 0;
    std::int32_t num_pages = 0;
    std::int32_t page_size = 0;
    std::int32_t num_heads = 0;
    std::int32_t head_dim = 0;

    /// Densely packed pool in the given layout.
    static constexpr PagePoolView packed(T* data, Layout layout, std::int32_t num_pages, std::int32_t page_size,
                                         std::int32_t num_heads, std::int32_t head_dim) {
        const std::int64_t d = head_dim;
        const std::int64_t page = std::int64_t{page_size} * num_heads * d;
        if (layout == Layout::NHD) return {data, page, num_heads * d, d, num_pages, page_size, num_heads, head_dim};
        return {data, page, d, std::int64_t{page_size} * d, num_pages, page_size, num_heads, head_dim};
    }

    /// First element of the vector for (page, token in page, head).
    KVSPARSE_HD T* at(std::int32_t page, std::int32_t token, std::int32_t head) const {
        return data + page * page_stride + token * token_stride + head * head_stride;
    }
};

/// Pages of one sequence (or one stream), in order: logical slot s lives in page `pages[s / page_size]`.
struct PageTableView {
    const std::int32_t* pages = nullptr;
    std::int32_t num_pages = 0;
};

/// One KV head of one sequence: slot -> key and value vectors.
template <storage_type T>
struct StreamView {
    PagePoolView<T> keys;
    PagePoolView<T> values;
    PageTableView table;
    std::int32_t head = 0;

    KVSPARSE_HD T* key(std::int32_t slot) const {
        return keys.at(table.pages[slot / keys.page_size], slot % keys.page_size, head);
    }
    KVSPARSE_HD T* value(std::int32_t slot) const {
        return values.at(table.pages[slot / values.page_size], slot % values.page_size, head);
    }
    KVSPARSE_HD std::int32_t capacity() const { return table.num_pages * keys.page_size; }
};

static_assert(std::is_trivially_copyable_v<PagePoolView<float>>);
static_assert(std::is_trivially_copyable_v<PageTableView>);
static_assert(std::is_trivially_copyable_v<StreamView<half>>);

}  // namespace kvsparse
