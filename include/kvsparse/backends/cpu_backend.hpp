#pragma once
// CpuBackend: the backend primitives in portable C++. Work runs synchronously in call order, so its
// stream type is an empty tag.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "kvsparse/concepts.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/views.hpp"

namespace kvsparse {

class CpuBackend {
public:
    struct stream_type {};

    /// Scratch `attend` needs for `group` query heads over `slots` keys of dimension `head_dim`.
    /// (Scores, one widened key, and the cos/sin of one key rotation.)
    static std::size_t workspace_bytes(std::int32_t group, std::int32_t slots, std::int32_t head_dim) {
        return sizeof(float) * (static_cast<std::size_t>(group) * static_cast<std::size_t>(slots) +
                                2 * static_cast<std::size_t>(head_dim));
    }

    /// Store token i's key and value (rows `i * src_stride` of `keys` / `values`) into `slots[i]`.
    template <storage_type T>
    void write(const StreamView<T>& stream, std::span<const std::int32_t> slots, std::span<const float> keys,
               std::span<const float> values, std::int32_t src_stride, stream_type = {}) const {
        const std::int32_t dim = stream.keys.head_dim;
        for (std::size_t i = 0; i < slots.size(); ++i) {
            const float* k = keys.data() + i * static_cast<std::size_t>(src_stride);
            const float* v = values.data() + i * static_cast<std::size_t>(src_stride);
            T* kd = stream.key(slots[i]);
            T* vd = stream.value(slots[i]);
            for (std::int32_t d = 0; d < dim; ++d) {
                kd[d] = from_float<T>(k[d]);
                vd[d] = from_float<T>(v[d]);
            }
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
        const std::size_t n = a.slots.size();
        const std::size_t dim = static_cast<std::size_t>(a.stream.keys.head_dim);
        const std::size_t group = static_cast<std::size_t>(a.group);
        float* scores = reinterpret_cast<float*>(workspace.data());  // [group][n]
        float* key = scores + group * n;                             // one widened key
        float* cosines = key + dim;                                  // turns of the last key rotation
        float* sines = cosines + dim / 2;
        std::fill(a.out.begin(), a.out.end(), 0.0f);
        if (n == 0) return;

        // Pass 1: scores. Each key is widened (and rotated) once and shared by the whole group.
        // Rotations come in runs of equal deltas (in-cache positions: one for the sinks, one for the
        // window), so the turns are computed once per run; the result equals rope_rotate bit for bit.
        const std::int32_t pairs = static_cast<std::int32_t>(dim / 2);
        bool have_turns = false;
        std::int32_t turned_by = 0;
        for (std::size_t j = 0; j < n; ++j) {
            const T* k = a.stream.key(a.slots[j]);
            for (std::size_t d = 0; d < dim; ++d) key[d] = to_float(k[d]);
            if (!a.key_rotation.empty()) {
                const std::int32_t delta = a.key_rotation[j];
                if (!have_turns || delta != turned_by) {
                    for (std::int32_t p = 0; p < pairs; ++p) {
                        const RopeTurn turn = rope_turn(p, static_cast<std::int32_t>(dim), delta, a.rope.theta);
                        cosines[p] = turn.c;
                        sines[p] = turn.s;
                    }
                    have_turns = true;
                    turned_by = delta;
                }
                for (std::int32_t p = 0; p < pairs; ++p) {
                    float& xa = key[rope_first(a.rope.style, p)];
                    float& xb = key[rope_second(a.rope.style, p, static_cast<std::int32_t>(dim))];
                    rope_apply(xa, xb, RopeTurn{cosines[p], sines[p]});
                }
            }
            for (std::size_t g = 0; g < group; ++g) {
                const float* q = a.queries.data() + g * dim;
                float dot = 0.0f;
                for (std::size_t d = 0; d < dim; ++d) dot += q[d] * key[d];
                scores[g * n + j] = dot * a.scale;
            }
        }
        // Softmax per query head.
        for (std::size_t g = 0; g < group; ++g) {
            float* s = scores + g * n;
            const float top = *std::max_element(s, s + n);
            float sum = 0.0f;
            for (std::size_t j = 0; j < n; ++j) {
                s[j] = std::exp(s[j] - top);
                sum += s[j];
            }
            const float inverse = 1.0f / sum;
            for (std::size_t j = 0; j < n; ++j) s[j] *= inverse;
        }
        // Pass 2: weighted values, and the group's summed probabilities on request.
        for (std::size_t j = 0; j < n; ++j) {
            const T* v = a.stream.value(a.slots[j]);
            for (std::size_t d = 0; d < dim; ++d) key[d] = to_float(v[d]);
            float mass = 0.0f;
            for (std::size_t g = 0; g < group; ++g) {
                const float p = scores[g * n + j];
                float* o = a.out.data() + g * dim;
                for (std::size_t d = 0; d < dim; ++d) o[d] += p * key[d];
                mass += p;
            }
            if (!a.probabilities.empty()) a.probabilities[j] += mass;
        }
    }
};

static_assert(kv_backend<CpuBackend>);

}  // namespace kvsparse
