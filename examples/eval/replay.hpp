#pragma once
// Replay a trace through policies and measure them against dense attention.
//
// Every layer is replayed on its own (policy decisions are per layer and KV head, so layers are
// independent): for each policy a KVCache<Policy, CpuBackend> gets positions [0, prefill) as one
// prefill call, then one decode step per position t >= prefill: append k[l, t], v[l, t]; select (timed);
// attend with q[l, t]. In lockstep, the tool computes the dense reference for q[l, t] over [0, t] in
// double precision and compares (REFERENCE.md, "Quality metrics"):
//   recall of query head h  = sum over the selected positions j of p*(j)
//   output error            = ||o - o*|| / ||o*||     (0 when both are 0)
//   needle recall           = the mean recall of the queries the trace marks as aligned with a needle
// Layers run in parallel on up to `threads` threads (threads beyond the layer count go to each cache's
// KV heads); the figures do not depend on the thread count (selection times aside).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include <kvsparse/kvsparse.hpp>

#include "common/npy.hpp"
#include "common/parallel.hpp"
#include "common/policy_spec.hpp"
#include "common/progress.hpp"
#include "eval/trace.hpp"

namespace kvsparse::tools {

/// One policy's figures over the whole trace.
struct PolicyResult {
    std::string spec;
    double recall_mean = 0;         ///< over decode steps, layers and query heads
    double recall_min = 0;          ///< over the same
    /// Mean recall over the decode queries the trace marks as aligned with a needle (Trace::needle_queries);
    /// NaN when it marks none.
    double needle_recall_mean = std::numeric_limits<double>::quiet_NaN();
    double output_error_mean = 0;   ///< over the same
    std::int64_t peak_tokens = 0;   ///< most tokens one (layer, KV head) stream held after any call
    std::int64_t peak_bytes = 0;    ///< most key/value bytes the sequence held (all layers) after any call
    double select_ns_per_step = 0;  ///< KVCache::select time of one decode step, summed over layers
};

struct ReplayOptions {
    int threads = 1;
    /// Where to write i.npy, uint8 [L, T, Hq, T], for the i-th policy; none when empty.
    std::optional<std::filesystem::path> masks_dir;
    /// Show a progress bar (only ever when stderr is a terminal and the run passes a second).
    bool progress = true;
};

/// The page size of the replay caches (it sets the granularity of peak_bytes).
inline constexpr std::int32_t replay_page_size = 16;

namespace detail {

/// One policy replayed on one layer of a trace, behind a small interface so that the replay loop
/// handles every policy type alike.
class PolicyRun {
public:
    virtual ~PolicyRun() = default;
    virtual void prefill(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                         std::span<float> out) = 0;
    virtual void append(std::span<const float> k, std::span<const float> v) = 0;
    /// Runs KVCache::select and returns the nanoseconds it took; attended() then gives the sets.
    virtual std::int64_t select(std::span<const float> queries) = 0;
    /// Positions query head `q_head` attends at this step (ascending). All query heads of a KV head
    /// share its set (REFERENCE.md); a policy that selects per query head overrides this.
    virtual std::span<const std::int32_t> attended(std::int32_t q_head) const = 0;
    virtual void attend(std::span<const float> q, std::span<float> out) = 0;
    virtual MemoryStats memory() const = 0;
    virtual bool prefill_visible(std::int32_t kv_head, std::int32_t i, std::int32_t j) const = 0;
};

/// The cache a policy needs for one layer of `trace`: pages for what each stream may hold (a prefill
/// is stored whole before the policy cuts it back), and the trace's RoPE for in-cache positions (the
/// trace's keys are already rotated, so the cache only turns them by position deltas).
template <kv_policy P>
CacheConfig replay_cache_config(const Trace& trace, const P& policy, std::int32_t layer) {
    CacheConfig config;
    config.shape = trace.shape;
    config.page_size = replay_page_size;
    std::int64_t pages = 0;
    for (std::int32_t h = 0; h < trace.shape.kv_heads; ++h) {
        const std::int64_t slots =
            std::max<std::int64_t>(trace.prefill, std::min<std::int64_t>(policy.capacity(layer, h), trace.tokens));
        pages += (slots + replay_page_size - 1) / replay_page_size + 1;
    }
    if (pages > std::numeric_limits<std::int32_t>::max()) throw invalid_argument("trace too long for one page pool");
    config.num_pages = static_cast<std::int32_t>(pages);
    if (policy.rotates_in_cache()) {
        config.rope = trace.effective_rope();
        config.inputs_rotated = true;
    }
    return config;
}

template <kv_policy P>
class PolicyRunOf final : public PolicyRun {
public:
    PolicyRunOf(const Trace& trace, const P& policy, std::int32_t layer, int threads)
        : cache_(replay_cache_config(trace, policy, layer), policy, CpuBackend({.threads = threads})),
          sequence_(cache_.add_sequence()),
          layer_(layer),
          group_(trace.shape.group_size()) {}

    void prefill(std::span<const float> q, std::span<const float> k, std::span<const float> v,
                 std::span<float> out) override {
        cache_.prefill(sequence_, layer_, q, k, v, out);
    }
    void append(std::span<const float> k, std::span<const float> v) override { cache_.append(sequence_, layer_, k, v); }
    std::int64_t select(std::span<const float> queries) override {
        const auto start = std::chrono::steady_clock::now();
        cache_.select(sequence_, layer_, queries, selection_);
        const auto stop = std::chrono::steady_clock::now();
        return std::chrono::duration_cast<std::chrono::nanoseconds>(stop - start).count();
    }
    std::span<const std::int32_t> attended(std::int32_t q_head) const override {
        return selection_.positions_of(q_head / group_, q_head % group_);
    }
    void attend(std::span<const float> q, std::span<float> out) override { cache_.attend(sequence_, layer_, q, out); }
    MemoryStats memory() const override { return cache_.memory(sequence_); }
    bool prefill_visible(std::int32_t kv_head, std::int32_t i, std::int32_t j) const override {
        return kvsparse::prefill_visible(cache_.policy(), layer_, kv_head, i, j);
    }

private:
    KVCache<P, CpuBackend, float> cache_;
    SequenceId sequence_;
    std::int32_t layer_;
    std::int32_t group_;
    Selection selection_;
};

/// A replay of `layer` through `policy`, its cache on `threads` threads of its own.
inline std::unique_ptr<PolicyRun> make_run(const AnyPolicy& policy, const Trace& trace, std::int32_t layer, int threads) {
    return std::visit(
        [&](const auto& p) -> std::unique_ptr<PolicyRun> {
            return std::make_unique<PolicyRunOf<std::decay_t<decltype(p)>>>(trace, p, layer, threads);
        },
        policy);
}

/// a . b in double over n elements, four partial sums (the compiler vectorizes them).
inline double dot(const double* a, const float* b, std::size_t n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * static_cast<double>(b[i]);
        s1 += a[i + 1] * static_cast<double>(b[i + 1]);
        s2 += a[i + 2] * static_cast<double>(b[i + 2]);
        s3 += a[i + 3] * static_cast<double>(b[i + 3]);
    }
    for (; i < n; ++i) s0 += a[i] * static_cast<double>(b[i]);
    return (s0 + s1) + (s2 + s3);
}

/// Dense attention of one layer, computed in double precision from the trace's float32 values. Keys
/// and values are regrouped per KV head ([Hkv][T][D]); the query heads of a group go through the keys
/// and values together, in blocks that stay in the L1 cache.
class DenseReference {
public:
    DenseReference(const Trace& trace, std::int32_t layer)
        : T_(static_cast<std::size_t>(trace.tokens)),
          D_(static_cast<std::size_t>(trace.shape.head_dim)),
          Hkv_(static_cast<std::size_t>(trace.shape.kv_heads)),
          G_(static_cast<std::size_t>(trace.shape.group_size())),
          scale_(1.0 / std::sqrt(static_cast<double>(trace.shape.head_dim))) {
        keys_.resize(Hkv_ * T_ * D_);
        values_.resize(keys_.size());
        for (std::size_t j = 0; j < T_; ++j) {
            const auto k = trace.keys(layer, static_cast<std::int32_t>(j));
            const auto v = trace.values(layer, static_cast<std::int32_t>(j));
            for (std::size_t g = 0; g < Hkv_; ++g) {
                std::copy_n(k.data() + g * D_, D_, keys_.data() + (g * T_ + j) * D_);
                std::copy_n(v.data() + g * D_, D_, values_.data() + (g * T_ + j) * D_);
            }
        }
        queries_.resize(Hkv_ * G_ * D_);
        probabilities_.resize(Hkv_ * G_ * T_);
        outputs_.resize(Hkv_ * G_ * D_);
    }

    /// Softmax over [0, t] and the output for every query head of q [Hq][D].
    void compute(std::span<const float> q, std::int32_t t) {
        const std::size_t n = static_cast<std::size_t>(t) + 1;
        constexpr std::size_t block = 32;
        std::copy(q.begin(), q.end(), queries_.begin());
        for (std::size_t g = 0; g < Hkv_; ++g) {
            const float* k = keys_.data() + g * T_ * D_;
            const float* v = values_.data() + g * T_ * D_;
            const std::size_t first = g * G_;  // first query head of the group
            for (std::size_t j0 = 0; j0 < n; j0 += block) {
                const std::size_t j1 = std::min(n, j0 + block);
                for (std::size_t r = first; r < first + G_; ++r) {
                    const double* qr = queries_.data() + r * D_;
                    double* p = probabilities_.data() + r * T_;
                    for (std::size_t j = j0; j < j1; ++j) p[j] = dot(qr, k + j * D_, D_) * scale_;
                }
            }
            for (std::size_t r = first; r < first + G_; ++r) {
                double* p = probabilities_.data() + r * T_;
                const double top = *std::max_element(p, p + n);
                double sum = 0;
                for (std::size_t j = 0; j < n; ++j) {
                    p[j] = std::exp(p[j] - top);
                    sum += p[j];
                }
                const double inverse = 1.0 / sum;
                for (std::size_t j = 0; j < n; ++j) p[j] *= inverse;
                std::fill_n(outputs_.data() + r * D_, D_, 0.0);
            }
            for (std::size_t j0 = 0; j0 < n; j0 += block) {
                const std::size_t j1 = std::min(n, j0 + block);
                for (std::size_t r = first; r < first + G_; ++r) {
                    const double* p = probabilities_.data() + r * T_;
                    double* o = outputs_.data() + r * D_;
                    for (std::size_t j = j0; j < j1; ++j) {
                        const double pj = p[j];
                        const float* vj = v + j * D_;
                        for (std::size_t d = 0; d < D_; ++d) o[d] += pj * static_cast<double>(vj[d]);
                    }
                }
            }
        }
    }

    const double* probabilities(std::int32_t h) const {
        return probabilities_.data() + static_cast<std::size_t>(h) * T_;
    }
    const double* output(std::int32_t h) const { return outputs_.data() + static_cast<std::size_t>(h) * D_; }

private:
    std::size_t T_, D_, Hkv_, G_;
    double scale_;
    std::vector<float> keys_, values_;
    std::vector<double> queries_, probabilities_, outputs_;
};

/// What one layer contributes to one policy's figures.
struct LayerFigures {
    double recall_sum = 0;
    double recall_min = std::numeric_limits<double>::infinity();
    double error_sum = 0;
    double needle_recall_sum = 0;
    std::int64_t needle_queries = 0;
    std::int64_t select_ns = 0;
    std::int64_t peak_tokens = 0;
    std::vector<std::int64_t> bytes;  ///< after the prefill (index 0) and after each decode step
};

inline double output_error(const float* o, const double* reference, std::size_t dim) {
    double diff = 0, norm = 0;
    for (std::size_t d = 0; d < dim; ++d) {
        const double e = static_cast<double>(o[d]) - reference[d];
        diff += e * e;
        norm += reference[d] * reference[d];
    }
    if (norm == 0) return diff == 0 ? 0.0 : std::numeric_limits<double>::infinity();
    return std::sqrt(diff / norm);
}

/// A mask file: the .npy header, then L*T rows of Hq*T bytes; each layer's rows are written by its own
/// stream at its own offset.
class MaskFile {
public:
    MaskFile(std::filesystem::path path, const Trace& trace) : path_(std::move(path)) {
        const std::int64_t L = trace.shape.layers, T = trace.tokens, Hq = trace.shape.q_heads;
        const std::vector<std::int64_t> shape{L, T, Hq, T};
        const std::string head = npy::header(npy::DType::uint8, shape);
        header_bytes_ = static_cast<std::int64_t>(head.size());
        layer_bytes_ = T * Hq * T;
        std::ofstream out(path_, std::ios::binary | std::ios::trunc);
        out.write(head.data(), static_cast<std::streamsize>(head.size()));
        out.close();
        if (!out) throw format_error(path_.string() + ": cannot write");
        std::filesystem::resize_file(path_, static_cast<std::uintmax_t>(header_bytes_ + L * layer_bytes_));
    }

    /// A stream positioned at the first row of `layer`.
    std::fstream open_layer(std::int32_t layer) const {
        std::fstream f(path_, std::ios::in | std::ios::out | std::ios::binary);
        if (!f) throw format_error(path_.string() + ": cannot open for writing");
        f.seekp(header_bytes_ + layer * layer_bytes_);
        return f;
    }

private:
    std::filesystem::path path_;
    std::int64_t header_bytes_ = 0;
    std::int64_t layer_bytes_ = 0;
};

inline void write_row(std::fstream& f, const std::vector<std::uint8_t>& row) {
    f.write(reinterpret_cast<const char*>(row.data()), static_cast<std::streamsize>(row.size()));
    if (!f) throw format_error("mask file: write failed");
}

/// Replays layer `layer` of the trace through every policy, each cache on `threads` threads.
inline std::vector<LayerFigures> replay_layer(const Trace& trace, const std::vector<AnyPolicy>& policies,
                                              std::int32_t layer, const std::vector<MaskFile>& masks,
                                              ProgressBar& progress, int threads) {
    const std::int32_t T = trace.tokens, P = trace.prefill, Hq = trace.shape.q_heads, G = trace.shape.group_size();
    const std::size_t D = static_cast<std::size_t>(trace.shape.head_dim);
    const std::size_t n = policies.size();

    std::vector<std::unique_ptr<PolicyRun>> runs;
    for (const AnyPolicy& policy : policies) runs.push_back(make_run(policy, trace, layer, threads));
    std::vector<std::fstream> mask_streams;
    for (const MaskFile& m : masks) mask_streams.push_back(m.open_layer(layer));
    std::vector<std::uint8_t> row(static_cast<std::size_t>(Hq) * static_cast<std::size_t>(T));

    std::vector<LayerFigures> figures(n);
    for (LayerFigures& f : figures) f.bytes.reserve(static_cast<std::size_t>(T - P) + 1);
    const auto sample_memory = [&](std::size_t i) {
        const MemoryStats m = runs[i]->memory();
        figures[i].peak_tokens = std::max<std::int64_t>(figures[i].peak_tokens, m.max_stream_tokens);
        figures[i].bytes.push_back(m.bytes);
    };

    // Prefill: one call with the whole prompt; its mask rows are the prefill pattern.
    if (P > 0) {
        std::vector<float> out(static_cast<std::size_t>(P) * static_cast<std::size_t>(Hq) * D);
        for (std::size_t i = 0; i < n; ++i) {
            runs[i]->prefill(trace.queries(layer, 0, P), trace.keys(layer, 0, P), trace.values(layer, 0, P), out);
            if (!masks.empty()) {
                for (std::int32_t r = 0; r < P; ++r) {
                    std::fill(row.begin(), row.end(), std::uint8_t{0});
                    // Visibility depends on the KV head only: one query per (KV head, r, j), G rows filled.
                    for (std::int32_t kv = 0; kv < trace.shape.kv_heads; ++kv) {
                        for (std::int32_t j = 0; j <= r; ++j) {
                            if (!runs[i]->prefill_visible(kv, r, j)) continue;
                            for (std::int32_t h = kv * G; h < (kv + 1) * G; ++h)
                                row[static_cast<std::size_t>(h) * static_cast<std::size_t>(T) +
                                    static_cast<std::size_t>(j)] = 1;
                        }
                    }
                    write_row(mask_streams[i], row);
                }
            }
        }
        progress.advance(P);
    }
    for (std::size_t i = 0; i < n; ++i) sample_memory(i);

    // Decode steps.
    DenseReference reference(trace, layer);
    std::vector<float> out(static_cast<std::size_t>(Hq) * D);
    for (std::int32_t t = P; t < T; ++t) {
        const auto q = trace.queries(layer, t);
        reference.compute(q, t);
        for (std::size_t i = 0; i < n; ++i) {
            PolicyRun& run = *runs[i];
            LayerFigures& f = figures[i];
            run.append(trace.keys(layer, t), trace.values(layer, t));
            f.select_ns += run.select(q);
            run.attend(q, out);
            if (!masks.empty()) std::fill(row.begin(), row.end(), std::uint8_t{0});
            for (std::int32_t h = 0; h < Hq; ++h) {
                const double* p = reference.probabilities(h);
                double recall = 0;
                for (const std::int32_t j : run.attended(h)) {
                    recall += p[j];
                    if (!masks.empty())
                        row[static_cast<std::size_t>(h) * static_cast<std::size_t>(T) + static_cast<std::size_t>(j)] =
                            1;
                }
                f.recall_sum += recall;
                f.recall_min = std::min(f.recall_min, recall);
                if (trace.needle_query(layer, t, h)) {
                    f.needle_recall_sum += recall;
                    ++f.needle_queries;
                }
                f.error_sum += output_error(out.data() + static_cast<std::size_t>(h) * D, reference.output(h), D);
            }
            if (!masks.empty()) write_row(mask_streams[i], row);
            sample_memory(i);
        }
        progress.advance(1);
    }
    return figures;
}

}  // namespace detail

/// Replays `trace` through `policies` (specs[i] names policies[i]) and returns one result per policy.
inline std::vector<PolicyResult> replay(const Trace& trace, const std::vector<std::string>& specs,
                                        const std::vector<AnyPolicy>& policies, const ReplayOptions& options) {
    trace.validate();
    if (specs.size() != policies.size()) throw invalid_argument("replay: one spec per policy");
    const std::int32_t L = trace.shape.layers;

    std::vector<detail::MaskFile> masks;
    if (options.masks_dir) {
        std::filesystem::create_directories(*options.masks_dir);
        for (std::size_t i = 0; i < policies.size(); ++i)
            masks.emplace_back(*options.masks_dir / (std::to_string(i) + ".npy"), trace);
    }

    ProgressBar progress("kvsparse-eval", std::int64_t{L} * trace.tokens, options.progress && stderr_is_terminal());
    std::vector<std::vector<detail::LayerFigures>> layers(static_cast<std::size_t>(L));
    // Layers in parallel; the threads left over go to each layer's caches (their KV heads in parallel),
    // so the two levels together never ask for more than `threads`.
    const int layer_threads = std::max(1, std::min(options.threads, L));
    const int cache_threads = std::max(1, options.threads / layer_threads);
    parallel_for(L, layer_threads, [&](std::int64_t l) {
        layers[static_cast<std::size_t>(l)] =
            detail::replay_layer(trace, policies, static_cast<std::int32_t>(l), masks, progress, cache_threads);
    });
    progress.finish();

    // Combine in layer order, so the figures do not depend on the threads.
    const double queries = static_cast<double>(trace.decode_steps()) * L * trace.shape.q_heads;
    std::vector<PolicyResult> results;
    for (std::size_t i = 0; i < policies.size(); ++i) {
        PolicyResult r;
        r.spec = specs[i];
        double recall = 0, error = 0, needle_recall = 0;
        std::int64_t needle_queries = 0;
        double min_recall = std::numeric_limits<double>::infinity();
        std::int64_t select_ns = 0;
        std::vector<std::int64_t> bytes(static_cast<std::size_t>(trace.decode_steps()) + 1, 0);
        for (const auto& layer : layers) {
            const detail::LayerFigures& f = layer[i];
            recall += f.recall_sum;
            error += f.error_sum;
            needle_recall += f.needle_recall_sum;
            needle_queries += f.needle_queries;
            min_recall = std::min(min_recall, f.recall_min);
            select_ns += f.select_ns;
            r.peak_tokens = std::max(r.peak_tokens, f.peak_tokens);
            for (std::size_t s = 0; s < bytes.size(); ++s) bytes[s] += f.bytes[s];
        }
        r.recall_mean = recall / queries;
        r.recall_min = min_recall;
        r.output_error_mean = error / queries;
        if (needle_queries > 0) r.needle_recall_mean = needle_recall / static_cast<double>(needle_queries);
        r.select_ns_per_step = static_cast<double>(select_ns) / trace.decode_steps();
        r.peak_bytes = *std::max_element(bytes.begin(), bytes.end());
        results.push_back(std::move(r));
    }
    return results;
}

}  // namespace kvsparse::tools
