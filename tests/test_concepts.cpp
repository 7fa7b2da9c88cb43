// The concepts accept every shipped policy and backend, and reject types that lack any one requirement.
// Each broken type is the valid minimal one with exactly one part missing or wrong, so a rejection
// can only come from that part.

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "catch.hpp"

#include <kvsparse/kvsparse.hpp>

namespace {

using kvsparse::StreamState;

// ---- policies, assembled from one mixin per requirement ----------------------------------------------

struct Capacity {
    std::int32_t capacity(std::int32_t, std::int32_t) const { return 8; }
};
struct Place {
    std::int32_t place(const StreamState& s) const { return s.next_position % 8; }
};
struct Retain {
    bool retain(const StreamState&, std::int32_t) const { return true; }
};
struct PrefillRanges {
    kvsparse::PrefillRanges prefill_ranges(std::int32_t, std::int32_t, std::int32_t i) const {
        return kvsparse::PrefillRanges::causal(i);
    }
};
struct Select {
    std::int32_t select(const StreamState&, std::span<const float>, std::span<std::int32_t>) const { return 0; }
};
struct Rotates {
    bool rotates_in_cache() const { return false; }
};
struct PerQueryHead {
    bool per_query_head() const { return false; }
};
struct Accumulates {
    bool accumulates_attention() const { return false; }
};
struct BoundsPageSize {
    std::int32_t bounds_page_size(std::int32_t, std::int32_t) const { return 0; }
};

// Wrong variants of the same members.
struct CapacityWide {
    std::int64_t capacity(std::int32_t, std::int32_t) const { return 8; }
};
struct PlaceMutating {
    std::int32_t place(const StreamState&) { return 0; }  // not callable on a const policy
};
struct RetainInt {
    int retain(const StreamState&, std::int32_t) const { return 1; }
};
struct PrefillRangesPredicate {  // the old per-(i, j) predicate no longer qualifies
    bool prefill_visible(std::int32_t, std::int32_t, std::int32_t, std::int32_t) const { return true; }
};
struct MemoSize {
    std::int32_t memo_size(std::int32_t, std::int32_t, std::int32_t) const { return 0; }
};
struct MemoSizeTwoArgs {
    std::int32_t memo_size(std::int32_t, std::int32_t) const { return 0; }
};
struct SelectIntoPointer {
    std::int32_t select(const StreamState&, std::span<const float>, std::int32_t*) const { return 0; }
};
struct SelectWithoutQueries {
    std::int32_t select(const StreamState&, std::span<std::int32_t>) const { return 0; }
};
struct RotatesVoid {
    void rotates_in_cache() const {}
};
struct AccumulatesInt {
    int accumulates_attention() const { return 0; }
};
struct BoundsPageSizeWide {
    std::int64_t bounds_page_size(std::int32_t, std::int32_t) const { return 0; }
};
struct BoundsPageSizeNoArgs {
    std::int32_t bounds_page_size() const { return 0; }
};
struct NotCopyable {
    NotCopyable() = default;
    NotCopyable(const NotCopyable&) = delete;
};

template <class... Parts>
struct PolicyOf : Parts... {};

using MinimalPolicy = PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>;

// ---- backends -----------------------------------------------------------------------------------------

struct Tag {};
struct StreamType {
    using stream_type = Tag;
};
struct WorkspaceBytes {
    static std::size_t workspace_bytes(std::int32_t, std::int32_t, std::int32_t) { return 0; }
};
struct Write {
    template <kvsparse::storage_type T>
    void write(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::span<const float>,
               std::span<const float>, std::int32_t, Tag = {}) const {}
};
struct CopySlots {
    template <kvsparse::storage_type T>
    void copy_slots(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::span<const std::int32_t>,
                    Tag = {}) const {}
};
struct RopeOp {
    void rope(std::span<float>, std::int32_t, std::int32_t, std::span<const std::int32_t>, kvsparse::Rope, Tag = {}) const {}
};
struct ShiftKeys {
    template <kvsparse::storage_type T>
    void shift_keys(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::int32_t, kvsparse::Rope,
                    Tag = {}) const {}
};
struct Attend {
    template <kvsparse::storage_type T>
    void attend(const kvsparse::AttendArgs<T>&, std::span<std::byte>, Tag = {}) const {}
};

struct WorkspaceBytesInt {
    static int workspace_bytes(std::int32_t, std::int32_t, std::int32_t) { return 0; }
};
struct WorkspaceBytesMember {  // needs an object: B::workspace_bytes(...) is ill-formed
    std::size_t workspace_bytes(std::int32_t, std::int32_t, std::int32_t) const { return 0; }
};
struct AttendHalfOnly {
    void attend(const kvsparse::AttendArgs<kvsparse::half>&, std::span<std::byte>, Tag = {}) const {}
};
struct WriteWithoutStride {
    template <kvsparse::storage_type T>
    void write(const kvsparse::StreamView<T>&, std::span<const std::int32_t>, std::span<const float>,
               std::span<const float>, Tag = {}) const {}
};

template <class... Parts>
struct BackendOf : Parts... {};

using MinimalBackend = BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, RopeOp, ShiftKeys, Attend>;

template <class P, class B = kvsparse::CpuBackend>
concept cache_accepts = requires { typename kvsparse::KVCache<P, B>; };

template <class T>
concept cache_stores = requires { typename kvsparse::KVCache<kvsparse::Dense, kvsparse::CpuBackend, T>; };

}  // namespace

// ---- shipped types ----------------------------------------------------------------------------------------

static_assert(kvsparse::kv_policy<kvsparse::Dense>);
static_assert(kvsparse::kv_policy<kvsparse::SlidingWindow>);
static_assert(kvsparse::kv_policy<kvsparse::AttentionSink>);
static_assert(kvsparse::kv_policy<kvsparse::H2OHeavyHitter>);
static_assert(kvsparse::kv_policy<kvsparse::QuestPageSelector>);
static_assert(kvsparse::kv_policy<kvsparse::LServeHybrid>);
static_assert(kvsparse::kv_backend<kvsparse::CpuBackend>);
static_assert(cache_accepts<kvsparse::Dense>);
static_assert(cache_accepts<kvsparse::SlidingWindow>);
static_assert(cache_accepts<kvsparse::AttentionSink>);
static_assert(cache_accepts<kvsparse::H2OHeavyHitter>);
static_assert(cache_accepts<kvsparse::QuestPageSelector>);
static_assert(std::is_trivially_copyable_v<kvsparse::KeyBoundsView>);

static_assert(kvsparse::storage_type<float>);
static_assert(kvsparse::storage_type<kvsparse::half>);
static_assert(kvsparse::storage_type<kvsparse::bfloat16>);
static_assert(!kvsparse::storage_type<double>);
static_assert(!kvsparse::storage_type<std::uint16_t>);
static_assert(!kvsparse::storage_type<const float>);
static_assert(cache_stores<kvsparse::half> && cache_stores<kvsparse::bfloat16> && !cache_stores<double>);

static_assert(std::is_trivially_copyable_v<kvsparse::PagePoolView<float>>);
static_assert(std::is_trivially_copyable_v<kvsparse::StreamView<kvsparse::bfloat16>>);
static_assert(std::is_trivially_copyable_v<kvsparse::AttendArgs<float>>);

// ---- hand-made policies: the complete one passes, each broken one fails ----------------------------------

static_assert(kvsparse::kv_policy<MinimalPolicy>);
static_assert(cache_accepts<MinimalPolicy>);
static_assert(!kvsparse::kv_policy<PolicyOf<Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);     // no capacity
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);  // no place
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);   // no retain
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);           // no prefill_ranges
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);   // no select
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);    // no rotates_in_cache
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, Accumulates, BoundsPageSize, MemoSize>>);  // no per_query_head
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, SelectWithoutQueries, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<CapacityWide, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, PlaceMutating, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, RetainInt, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRangesPredicate, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, SelectIntoPointer, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, RotatesVoid, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<NotCopyable, Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!cache_accepts<PolicyOf<Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, BoundsPageSize, MemoSize>>);  // no accumulates_attention
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, AccumulatesInt, BoundsPageSize, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, MemoSize>>);  // no bounds_page_size
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSizeWide, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSizeNoArgs, MemoSize>>);
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize>>);  // no memo_size
static_assert(!kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Rotates, PerQueryHead, Accumulates, BoundsPageSize, MemoSizeTwoArgs>>);
static_assert(!kvsparse::kv_policy<int>);

// ---- hand-made backends ------------------------------------------------------------------------------------

static_assert(kvsparse::kv_backend<MinimalBackend>);
static_assert(cache_accepts<kvsparse::Dense, MinimalBackend>);
static_assert(!kvsparse::kv_backend<BackendOf<WorkspaceBytes, Write, CopySlots, RopeOp, ShiftKeys, Attend>>);  // no stream_type
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, Write, CopySlots, RopeOp, ShiftKeys, Attend>>);  // no workspace_bytes
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, CopySlots, RopeOp, ShiftKeys, Attend>>);  // no write
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, Write, RopeOp, ShiftKeys, Attend>>);  // no copy_slots
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, ShiftKeys, Attend>>);  // no rope
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, RopeOp, Attend>>);  // no shift_keys
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, RopeOp, ShiftKeys>>);  // no attend
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytesInt, Write, CopySlots, RopeOp, ShiftKeys, Attend>>);
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytesMember, Write, CopySlots, RopeOp, ShiftKeys, Attend>>);
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, RopeOp, ShiftKeys, AttendHalfOnly>>);
static_assert(!kvsparse::kv_backend<BackendOf<StreamType, WorkspaceBytes, WriteWithoutStride, CopySlots, RopeOp, ShiftKeys, Attend>>);
static_assert(!cache_accepts<kvsparse::Dense, BackendOf<StreamType, WorkspaceBytes, Write, CopySlots, RopeOp, ShiftKeys>>);
static_assert(!kvsparse::kv_backend<kvsparse::Dense>);

TEST_CASE("concepts: shipped policies and the CPU backend qualify / broken types do not", "[concepts]") {
    // The checks above are compile-time; this case records them in the test list and exercises the
    // runtime side of a minimal custom policy through KVCache.
    STATIC_REQUIRE(kvsparse::kv_policy<kvsparse::AttentionSink>);
    STATIC_REQUIRE_FALSE(kvsparse::kv_policy<PolicyOf<Capacity, Place, Retain, PrefillRanges, Select, Accumulates, BoundsPageSize, MemoSize>>);
    kvsparse::KVCache<kvsparse::Dense, MinimalBackend> cache(kvsparse::CacheConfig{{1, 1, 1, 2}, 1, 4, {}},
                                                             kvsparse::Dense{});
    const auto seq = cache.add_sequence();
    const float kv[2] = {1.0f, 2.0f};
    cache.append(seq, 0, kv, kv);  // the custom backend's write is a no-op; bookkeeping still advances
    CHECK(cache.length(seq, 0) == 1);
}
