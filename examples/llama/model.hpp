#pragma once
// The Llama network of a llama2.c checkpoint, in plain C++: embedding, then per layer RMSNorm ->
// q, k, v -> attention -> output projection, RMSNorm -> SwiGLU feed-forward; final RMSNorm and a
// classifier. Nothing here knows about caches or policies: attention is a callback the caller supplies,
// given the layer and this token's q, k, v *before* RoPE (engine.hpp hands them to a KVCache).
//
// Checkpoint file (llama2.c "version 0", float32, little-endian):
//   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len   (vocab_size < 0: the
//   classifier is stored separately; > 0: tied to the embedding)
//   float32 tensors, each type for all layers in turn, matrices row-major (out, in):
//     token_embedding [vocab][dim], rms_att [L][dim], wq [L][dim][dim], wk [L][kv_dim][dim],
//     wv [L][kv_dim][dim], wo [L][dim][dim], rms_ffn [L][dim], w1 [L][hidden][dim], w2 [L][dim][hidden],
//     w3 [L][hidden][dim], rms_final [dim], two unused RoPE tables [seq_len][head_dim / 2] each,
//     and, when not tied, wcls [vocab][dim].
// The file size must equal this layout exactly; anything else is a kvsparse::format_error.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <kvsparse/error.hpp>
#include <kvsparse/shape.hpp>

namespace kvsparse::llama {

struct ModelConfig {
    std::int32_t dim = 0;
    std::int32_t hidden = 0;
    std::int32_t layers = 0;
    std::int32_t heads = 0;
    std::int32_t kv_heads = 0;
    std::int32_t vocab = 0;
    std::int32_t seq_len = 0;  ///< the context it was trained on
    bool tied_classifier = true;

    std::int32_t head_dim() const { return dim / heads; }
    std::int32_t kv_dim() const { return kv_heads * head_dim(); }
    ModelShape attention_shape() const { return {layers, heads, kv_heads, head_dim()}; }
};

/// Per-token activations; one per thread running the model.
struct Activations {
    std::vector<float> x, xb, xb2, q, k, v, att, hb, hb2;

    explicit Activations(const ModelConfig& c)
        : x(dim(c)), xb(dim(c)), xb2(dim(c)), q(dim(c)), k(kv(c)), v(kv(c)), att(dim(c)), hb(hid(c)), hb2(hid(c)) {}

private:
    static std::size_t dim(const ModelConfig& c) { return static_cast<std::size_t>(c.dim); }
    static std::size_t kv(const ModelConfig& c) { return static_cast<std::size_t>(c.kv_dim()); }
    static std::size_t hid(const ModelConfig& c) { return static_cast<std::size_t>(c.hidden); }
};

class Model {
public:
    static constexpr float rms_eps = 1e-5f;

    /// Reads a checkpoint; throws format_error naming the file and what is wrong with it.
    static Model load(const std::filesystem::path& path) {
        const std::string where = path.string();
        std::ifstream in(path, std::ios::binary);
        if (!in) throw format_error(where + ": cannot open the model");
        in.seekg(0, std::ios::end);
        const std::int64_t size = in.tellg();
        in.seekg(0, std::ios::beg);
        constexpr std::int64_t header_bytes = 7 * 4;
        if (size < header_bytes) {
            throw format_error(where + ": truncated: " + std::to_string(size) +
                               " bytes, a llama2.c checkpoint starts with a 28-byte header");
        }
        std::int32_t h[7];
        in.read(reinterpret_cast<char*>(h), sizeof h);
        const std::string header = "header (dim " + std::to_string(h[0]) + ", hidden " + std::to_string(h[1]) +
                                   ", layers " + std::to_string(h[2]) + ", heads " + std::to_string(h[3]) +
                                   ", kv_heads " + std::to_string(h[4]) + ", vocab " + std::to_string(h[5]) +
                                   ", seq_len " + std::to_string(h[6]) + ")";
        const auto bad = [&](const std::string& why) {
            return format_error(where + ": not a llama2.c checkpoint: " + header + ": " + why);
        };
        constexpr std::int32_t limit = 1 << 20;  // far beyond any model this format carries
        for (int i = 0; i < 7; ++i) {
            const std::int32_t v = i == 5 && h[i] < 0 && h[i] >= -limit ? -h[i] : h[i];
            if (v <= 0 || v > limit) throw bad("every field must be in [1, 2^20] (vocab: its magnitude)");
        }
        Model m;
        ModelConfig& c = m.config_;
        c = {h[0], h[1], h[2], h[3], h[4], h[5] < 0 ? -h[5] : h[5], h[6], h[5] > 0};
        if (c.dim % c.heads != 0) throw bad("dim must be a multiple of heads");
        if (c.heads % c.kv_heads != 0) throw bad("heads must be a multiple of kv_heads");
        if (c.head_dim() % 2 != 0) throw bad("the head dimension must be even for RoPE");

        const std::int64_t expected = header_bytes + 4 * m.layout();
        if (size != expected) {
            throw format_error(where + ": " + header + " needs exactly " + std::to_string(expected) +
                               " bytes, the file has " + std::to_string(size) +
                               (size < expected ? " (truncated)" : " (trailing data, or not this format)"));
        }
        m.data_.resize(static_cast<std::size_t>((size - header_bytes) / 4));
        in.read(reinterpret_cast<char*>(m.data_.data()), size - header_bytes);
        if (!in) throw format_error(where + ": read failed");
        m.bind();
        return m;
    }

    // The tensors point into data_: a model moves but does not copy.
    Model(Model&&) = default;
    Model& operator=(Model&&) = default;
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    const ModelConfig& config() const { return config_; }

    /// One token at the next position. `attention(layer, q, k, v, out)` gets the token's q [heads][head_dim]
    /// and k, v [kv_heads][head_dim] before RoPE and writes out [heads][head_dim]. Logits [vocab] are
    /// written unless `logits` is empty (a caller that only builds context skips the classifier).
    template <class Attention>
    void forward(std::int32_t token, Activations& a, Attention&& attention, std::span<float> logits) const {
        const ModelConfig& c = config_;
        const std::size_t dim = static_cast<std::size_t>(c.dim);
        const std::size_t kv_dim = static_cast<std::size_t>(c.kv_dim());
        const std::size_t hidden = static_cast<std::size_t>(c.hidden);
        std::copy_n(embedding_ + static_cast<std::size_t>(token) * dim, dim, a.x.begin());
        for (std::int32_t l = 0; l < c.layers; ++l) {
            const std::size_t L = static_cast<std::size_t>(l);
            rmsnorm(a.xb, a.x, rms_att_ + L * dim);
            matvec(a.q, wq_ + L * dim * dim, a.xb);
            matvec(a.k, wk_ + L * kv_dim * dim, a.xb);
            matvec(a.v, wv_ + L * kv_dim * dim, a.xb);
            attention(l, std::span<const float>(a.q), std::span<const float>(a.k), std::span<const float>(a.v),
                      std::span<float>(a.att));
            matvec(a.xb2, wo_ + L * dim * dim, a.att);
            for (std::size_t i = 0; i < dim; ++i) a.x[i] += a.xb2[i];

            rmsnorm(a.xb, a.x, rms_ffn_ + L * dim);
            matvec(a.hb, w1_ + L * hidden * dim, a.xb);
            matvec(a.hb2, w3_ + L * hidden * dim, a.xb);
            for (std::size_t i = 0; i < hidden; ++i) {
                const float g = a.hb[i];
                a.hb[i] = g / (1.0f + std::exp(-g)) * a.hb2[i];  // SiLU(w1 x) * (w3 x)
            }
            matvec(a.xb, w2_ + L * dim * hidden, a.hb);
            for (std::size_t i = 0; i < dim; ++i) a.x[i] += a.xb[i];
        }
        if (logits.empty()) return;
        rmsnorm(a.xb, a.x, rms_final_);
        matvec(logits, classifier_, a.xb);
    }

private:
    Model() = default;

    /// Floats after the header, in file order; sets the tensor offsets.
    std::int64_t layout() {
        const ModelConfig& c = config_;
        const std::int64_t d = c.dim, h = c.hidden, L = c.layers, kv = c.kv_dim(), V = c.vocab;
        std::int64_t at = 0;
        const auto take = [&](std::int64_t n) {
            const std::int64_t start = at;
            at += n;
            return start;
        };
        offsets_ = {take(V * d),      take(L * d),     take(L * d * d), take(L * kv * d), take(L * kv * d),
                    take(L * d * d),  take(L * d),     take(L * h * d), take(L * d * h),  take(L * h * d),
                    take(d),          0};
        take(2 * std::int64_t{c.seq_len} * (c.head_dim() / 2));  // RoPE tables: unused, RoPE is computed
        offsets_[11] = c.tied_classifier ? offsets_[0] : take(V * d);
        return at;
    }

    void bind() {
        const float* p = data_.data();
        const auto at = [&](int i) { return p + offsets_[static_cast<std::size_t>(i)]; };
        embedding_ = at(0), rms_att_ = at(1), wq_ = at(2), wk_ = at(3), wv_ = at(4), wo_ = at(5);
        rms_ffn_ = at(6), w1_ = at(7), w2_ = at(8), w3_ = at(9), rms_final_ = at(10), classifier_ = at(11);
    }

    static void rmsnorm(std::span<float> out, std::span<const float> x, const float* weight) {
        float ss = 0.0f;
        for (const float v : x) ss += v * v;
        const float scale = 1.0f / std::sqrt(ss / static_cast<float>(x.size()) + rms_eps);
        for (std::size_t i = 0; i < x.size(); ++i) out[i] = weight[i] * (scale * x[i]);
    }

    /// out = W x, W row-major [out.size()][x.size()]. Eight partial sums per row, so the compiler
    /// vectorizes it without -ffast-math.
    static void matvec(std::span<float> out, const float* w, std::span<const float> x) {
        const std::size_t n = x.size();
        const std::size_t blocked = n - n % 8;
        for (std::size_t r = 0; r < out.size(); ++r) {
            const float* row = w + r * n;
            float acc[8] = {};
            for (std::size_t i = 0; i < blocked; i += 8) {
                for (std::size_t j = 0; j < 8; ++j) acc[j] += row[i + j] * x[i + j];
            }
            float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (std::size_t i = blocked; i < n; ++i) sum += row[i] * x[i];
            out[r] = sum;
        }
    }

    ModelConfig config_;
    std::vector<float> data_;
    std::vector<std::int64_t> offsets_;
    const float *embedding_ = nullptr, *rms_att_ = nullptr, *wq_ = nullptr, *wk_ = nullptr, *wv_ = nullptr,
                *wo_ = nullptr, *rms_ffn_ = nullptr, *w1_ = nullptr, *w2_ = nullptr, *w3_ = nullptr,
                *rms_final_ = nullptr, *classifier_ = nullptr;
};

/// Next-token loss: -log softmax(logits)[target], in double.
inline double next_token_loss(std::span<const float> logits, std::int32_t target) {
    const float top = *std::max_element(logits.begin(), logits.end());
    double sum = 0;
    for (const float x : logits) sum += std::exp(static_cast<double>(x) - top);
    return std::log(sum) - (static_cast<double>(logits[static_cast<std::size_t>(target)]) - top);
}

}  // namespace kvsparse::llama
