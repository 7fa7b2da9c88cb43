#pragma once
// HugePageAllocator: a std::allocator for large, long-lived buffers (KVCache's page pool and key bounds).
// Blocks of 1 MiB or more are rounded up to whole 2 MiB pages, aligned to 2 MiB and, on Linux, marked
// MADV_HUGEPAGE before anything touches them, so that transparent huge pages back them where the system
// allows it ("madvise" mode, the common default). A cache page is a few KiB and the pages a decode step
// reads are scattered over the pool (Quest's selected pages are anywhere): with 4 KiB memory pages every
// one of them costs a TLB miss. A stream's key bounds are read start to end, but with 4 KiB pages every
// 4 KiB of them costs a page walk, from memory once the decode step's K/V reads have pushed the page
// tables out of the caches (Quest at 32K: 1 MiB of bounds per head scored in 67 us, 44 us on huge
// pages). Below 1 MiB, elsewhere, or when the hint is refused, this is the plain (aligned) operator new.

#include <cstddef>
#include <memory>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvsparse::detail {

template <class T>
struct HugePageAllocator {
    using value_type = T;
    static constexpr std::size_t huge_page = std::size_t{2} << 20;
    static constexpr std::size_t smallest = huge_page / 2;  // wastes at most half of a block rounded up

    HugePageAllocator() = default;
    template <class U>
    HugePageAllocator(const HugePageAllocator<U>&) noexcept {}

    T* allocate(std::size_t n) {
        const std::size_t bytes = n * sizeof(T);
        if (bytes < smallest) return std::allocator<T>{}.allocate(n);
        const std::size_t rounded = (bytes + huge_page - 1) / huge_page * huge_page;
        void* p = ::operator new(rounded, std::align_val_t{huge_page});
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        ::madvise(p, rounded, MADV_HUGEPAGE);  // a hint; where it is refused nothing changes
#endif
        return static_cast<T*>(p);
    }

    void deallocate(T* p, std::size_t n) noexcept {
        if (n * sizeof(T) < smallest) {
            std::allocator<T>{}.deallocate(p, n);
        } else {
            ::operator delete(p, std::align_val_t{huge_page});
        }
    }

    friend bool operator==(const HugePageAllocator&, const HugePageAllocator&) noexcept { return true; }
};

}  // namespace kvsparse::detail
