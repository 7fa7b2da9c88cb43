#pragma once
// A diagnostic next to the seam, not part of it: how much attention the decode queries give the first
// `first` positions of the sequence (StreamingLLM's "attention sinks"), per layer and per segment of
// positions. After each attend it asks the cache for the set it just used (KVCache::select), and
// recomputes that attention's probabilities with the backend primitive, keys rotated exactly as the
// cache rotated them (absolute positions, or ranks in the set for in-cache positions). A query head's
// mass is the sum of its probabilities on positions < `first`; the figure is the mean over query heads
// and steps.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <kvsparse/kvsparse.hpp>

namespace kvsparse::llama {

class AttentionMass {
public:
    AttentionMass(ModelShape shape, std::int32_t first, std::int32_t segment)
        : shape_(shape), first_(first), segment_(segment), sums_(static_cast<std::size_t>(shape.layers)),
          counts_(static_cast<std::size_t>(shape.layers)) {}

    std::int32_t first() const { return first_; }
    std::int32_t segment() const { return segment_; }

    /// Mean mass on positions < first() of layer `layer`, per segment of query positions.
    std::vector<double> per_segment(std::int32_t layer) const {
        const auto L = static_cast<std::size_t>(layer);
        std::vector<double> out(sums_[L].size());
        for (std::size_t s = 0; s < out.size(); ++s) out[s] = counts_[L][s] ? sums_[L][s] / counts_[L][s] : 0.0;
        return out;
    }

    /// The attention that `cache` just computed for `layer` (queries `q` before RoPE).
    template <class Cache>
    void measure(Cache& cache, SequenceId sequence, std::int32_t layer, std::span<const float> q) {
        const std::int32_t t = cache.length(sequence, layer) - 1;
        const Rope rope = *cache.config().rope;
        const std::int32_t dim = shape_.head_dim;
        const std::int32_t group = shape_.group_size();
        cache.select(sequence, layer, q, selection_);
        const bool in_cache = cache.policy().rotates_in_cache();

        rotated_.assign(q.begin(), q.end());  // as attention sees them: rotated at position t
        for (std::int32_t h = 0; h < shape_.q_heads; ++h) rope_rotate(rotated_.data() + h * dim, dim, t, rope);

        double mass = 0;
        for (std::int32_t kv = 0; kv < shape_.kv_heads; ++kv) {
            const std::int32_t rows = selection_.rows_per_kv_head;
            const std::int32_t heads = rows == 1 ? group : 1;
            for (std::int32_t member = 0; member < rows; ++member) {
                const auto slots = selection_.slots_of(kv, member);
                const auto positions = selection_.positions_of(kv, member);
                const std::int32_t n = static_cast<std::int32_t>(slots.size());
                const auto first_head = static_cast<std::size_t>(kv * group + member);
                query_.assign(rotated_.begin() + static_cast<std::ptrdiff_t>(first_head * static_cast<std::size_t>(dim)),
                              rotated_.begin() + static_cast<std::ptrdiff_t>((first_head + static_cast<std::size_t>(heads)) *
                                                                             static_cast<std::size_t>(dim)));
                turns_.clear();
                if (in_cache) {  // key i at rank i, the query at rank n - 1
                    for (std::int32_t g = 0; g < heads; ++g) rope_rotate(query_.data() + g * dim, dim, n - 1 - t, rope);
                    for (std::int32_t i = 0; i < n; ++i) turns_.push_back(i - positions[static_cast<std::size_t>(i)]);
                }
                probabilities_.assign(slots.size(), 0.0f);
                out_.assign(query_.size(), 0.0f);
                workspace_.resize(CpuBackend::workspace_bytes(heads, n, dim));
                AttendArgs<float> args;
                args.stream = cache.stream_view(sequence, layer, kv);
                args.slots = slots;
                args.queries = query_;
                args.group = heads;
                args.scale = 1.0f / std::sqrt(static_cast<float>(dim));
                args.key_rotation = turns_;
                args.rope = rope;
                args.out = out_;
                args.probabilities = probabilities_;
                CpuBackend{}.attend(args, workspace_);
                for (std::size_t i = 0; i < slots.size(); ++i) {
                    if (positions[i] < first_) mass += probabilities_[i];
                }
            }
        }
        const auto L = static_cast<std::size_t>(layer);
        const auto s = static_cast<std::size_t>(t / segment_);
        if (sums_[L].size() <= s) {
            sums_[L].resize(s + 1, 0.0);
            counts_[L].resize(s + 1, 0);
        }
        sums_[L][s] += mass / shape_.q_heads;
        counts_[L][s] += 1;
    }

private:
    ModelShape shape_;
    std::int32_t first_;
    std::int32_t segment_;
    std::vector<std::vector<double>> sums_;
    std::vector<std::vector<std::int64_t>> counts_;
    Selection selection_;
    std::vector<float> rotated_, query_, probabilities_, out_;
    std::vector<std::int32_t> turns_;
    std::vector<std::byte> workspace_;
};

}  // namespace kvsparse::llama
