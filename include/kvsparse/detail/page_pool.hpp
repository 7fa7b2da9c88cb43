#pragma once
// The page pool behind KVCache: fixed storage for keys and values, and a free list of page ids.

#include <cstdint>
#include <span>
#include <vector>

#include "kvsparse/detail/huge_page_allocator.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse::detail {

template <storage_type T>
class PagePool {
public:
    PagePool(std::int32_t num_pages, std::int32_t page_size, std::int32_t head_dim)
        : page_size_(page_size),
          head_dim_(head_dim),
          keys_(static_cast<std::size_t>(num_pages) * static_cast<std::size_t>(page_size) * static_cast<std::size_t>(head_dim)),
          values_(keys_.size()) {
        free_.reserve(static_cast<std::size_t>(num_pages));
        // Hand out low page ids first.
        for (std::int32_t p = num_pages - 1; p >= 0; --p) free_.push_back(p);
        num_pages_ = num_pages;
    }

    std::int32_t free_pages() const { return static_cast<std::int32_t>(free_.size()); }
    std::int64_t pages_for(std::int64_t slots) const { return (slots + page_size_ - 1) / page_size_; }
    std::int64_t page_bytes() const { return 2 * std::int64_t{page_size_} * head_dim_ * static_cast<std::int64_t>(sizeof(T)); }

    /// Caller has checked free_pages().
    std::int32_t take() {
        const std::int32_t page = free_.back();
        free_.pop_back();
        return page;
    }
    void release(std::span<const std::int32_t> pages) { free_.insert(free_.end(), pages.begin(), pages.end()); }

    /// One head per page: NHD and HND coincide.
    PagePoolView<T> keys() { return PagePoolView<T>::packed(keys_.data(), Layout::NHD, num_pages_, page_size_, 1, head_dim_); }
    PagePoolView<T> values() { return PagePoolView<T>::packed(values_.data(), Layout::NHD, num_pages_, page_size_, 1, head_dim_); }

private:
    std::int32_t num_pages_ = 0;
    std::int32_t page_size_ = 0;
    std::int32_t head_dim_ = 0;
    std::vector<T, HugePageAllocator<T>> keys_;  // huge pages where the system gives them (scattered reads)
    std::vector<T, HugePageAllocator<T>> values_;
    std::vector<std::int32_t> free_;
};

}  // namespace kvsparse::detail
