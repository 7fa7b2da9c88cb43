#pragma once
// The llama2.c tokenizer: a SentencePiece-style BPE vocabulary with scores and byte fallback.
//
// File: int32 max_token_length, then per token: float32 score, int32 length, `length` bytes.
// Token 1 is BOS, 2 EOS, 3..258 the bytes <0x00>..<0xFF>.
//
// encode(text) works as llama2.c does: BOS; then, for a non-empty text, the single-space token (the
// "dummy prefix", so the text reads as if it began with a space); then one token per UTF-8 code point
// that is in the vocabulary, or one byte token per byte when it is not; then, repeatedly, the adjacent
// pair whose concatenation is a vocabulary entry with the highest score is merged (leftmost first among
// equal scores) until no pair merges. Nothing in the text is special (an "<|endoftext|>" line is text).
// The merges run on a priority queue over a linked list, O(n log n), so a 160k-character file encodes
// in a few milliseconds; the order of merges is exactly that of the quadratic rescan.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <kvsparse/error.hpp>

namespace kvsparse::llama {

class Tokenizer {
public:
    static constexpr std::int32_t bos = 1;
    static constexpr std::int32_t eos = 2;
    static constexpr std::int32_t first_byte_token = 3;

    /// Reads a tokenizer of `vocab` tokens (the model says how many); throws format_error.
    static Tokenizer load(const std::filesystem::path& path, std::int32_t vocab) {
        const std::string where = path.string();
        std::ifstream in(path, std::ios::binary);
        if (!in) throw format_error(where + ": cannot open the tokenizer");
        std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        std::size_t at = 0;
        const auto read_i32 = [&](const char* what, std::size_t token) {
            if (file.size() - at < 4) {
                throw format_error(where + ": truncated at byte " + std::to_string(at) + " (" + what + " of token " +
                                   std::to_string(token) + "); expected " + std::to_string(vocab) + " tokens");
            }
            std::int32_t v = 0;
            std::memcpy(&v, file.data() + at, 4);
            at += 4;
            return v;
        };
        Tokenizer t;
        const std::int32_t max_length = read_i32("max token length", 0);
        if (max_length <= 0 || max_length > 1 << 16) {
            throw format_error(where + ": not a llama2.c tokenizer: max token length " + std::to_string(max_length));
        }
        for (std::size_t i = 0; i < static_cast<std::size_t>(vocab); ++i) {
            float score = 0;
            const std::int32_t bits = read_i32("score", i);
            std::memcpy(&score, &bits, 4);
            const std::int32_t length = read_i32("length", i);
            if (length < 0 || length > max_length || file.size() - at < static_cast<std::size_t>(length)) {
                throw format_error(where + ": token " + std::to_string(i) + " has length " + std::to_string(length) +
                                   (length < 0 || length > max_length ? " (max " + std::to_string(max_length) + ")"
                                                                      : ", past the end of the file (truncated)"));
            }
            t.scores_.push_back(score);
            t.pieces_.emplace_back(file.data() + at, static_cast<std::size_t>(length));
            at += static_cast<std::size_t>(length);
        }
        if (at != file.size()) {
            throw format_error(where + ": " + std::to_string(file.size() - at) + " bytes after " + std::to_string(vocab) +
                               " tokens: the tokenizer does not match the model's vocabulary");
        }
        if (vocab < first_byte_token + 256) {
            throw format_error(where + ": " + std::to_string(vocab) + " tokens, fewer than BOS, EOS and 256 byte tokens");
        }
        for (std::size_t i = 0; i < t.pieces_.size(); ++i) t.ids_.emplace(t.pieces_[i], static_cast<std::int32_t>(i));
        return t;
    }

    std::int32_t size() const { return static_cast<std::int32_t>(pieces_.size()); }
    const std::string& piece(std::int32_t id) const { return pieces_[static_cast<std::size_t>(id)]; }
    float score(std::int32_t id) const { return scores_[static_cast<std::size_t>(id)]; }

    /// BOS, then `text` as described at the top.
    std::vector<std::int32_t> encode(std::string_view text) const {
        std::vector<std::int32_t> out{bos};
        if (text.empty()) return out;

        // Symbols: the dummy prefix, then code points (or their bytes).
        std::vector<std::int32_t> ids;
        ids.reserve(text.size() + 1);
        const std::int32_t space = lookup(" ");
        ids.push_back(space >= 0 ? space : first_byte_token + ' ');
        for (std::size_t i = 0; i < text.size();) {
            std::size_t n = 1;
            while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
            const std::int32_t id = lookup(text.substr(i, n));
            if (id >= 0) {
                ids.push_back(id);
            } else {
                for (std::size_t b = 0; b < n; ++b) {
                    ids.push_back(first_byte_token + static_cast<unsigned char>(text[i + b]));
                }
            }
            i += n;
        }

        // Merges: a doubly linked list of symbols and a queue of candidate pairs, best score first, then
        // leftmost. A queued pair is stale once either side has changed; it is then skipped.
        const std::int32_t n = static_cast<std::int32_t>(ids.size());
        std::vector<std::int32_t> prev(ids.size()), next(ids.size());
        for (std::int32_t i = 0; i < n; ++i) {
            prev[static_cast<std::size_t>(i)] = i - 1;
            next[static_cast<std::size_t>(i)] = i + 1 < n ? i + 1 : -1;
        }
        struct Pair {
            float score;
            std::int32_t left, right, left_id, right_id, merged;
            bool operator<(const Pair& o) const {  // priority_queue pops the largest
                return score != o.score ? score < o.score : left > o.left;
            }
        };
        std::priority_queue<Pair> queue;
        std::string joined;
        const auto offer = [&](std::int32_t left, std::int32_t right) {
            if (left < 0 || right < 0) return;
            const std::int32_t a = ids[static_cast<std::size_t>(left)], b = ids[static_cast<std::size_t>(right)];
            joined.assign(piece(a));
            joined += piece(b);
            const std::int32_t merged = lookup(joined);
            if (merged >= 0) queue.push({scores_[static_cast<std::size_t>(merged)], left, right, a, b, merged});
        };
        for (std::int32_t i = 0; i + 1 < n; ++i) offer(i, i + 1);
        while (!queue.empty()) {
            const Pair p = queue.top();
            queue.pop();
            const auto L = static_cast<std::size_t>(p.left), R = static_cast<std::size_t>(p.right);
            if (ids[L] != p.left_id || ids[R] != p.right_id || next[L] != p.right) continue;  // stale
            ids[L] = p.merged;
            ids[R] = -1;
            next[L] = next[R];
            if (next[R] >= 0) prev[static_cast<std::size_t>(next[R])] = p.left;
            offer(prev[L], p.left);
            offer(p.left, next[L]);
        }
        for (std::int32_t i = 0; i >= 0; i = next[static_cast<std::size_t>(i)]) out.push_back(ids[static_cast<std::size_t>(i)]);
        return out;
    }

    /// The text of `id` as it follows `previous`: byte tokens give their byte, and the first piece after
    /// BOS loses its leading space (the dummy prefix).
    std::string decode(std::int32_t previous, std::int32_t id) const {
        if (id >= first_byte_token && id < first_byte_token + 256) {
            return std::string(1, static_cast<char>(id - first_byte_token));
        }
        std::string_view p = piece(id);
        if (previous == bos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
        return std::string(p);
    }

private:
    std::int32_t lookup(std::string_view s) const {
        const auto it = ids_.find(std::string(s));
        return it == ids_.end() ? -1 : it->second;
    }

    std::vector<std::string> pieces_;
    std::vector<float> scores_;
    std::unordered_map<std::string, std::int32_t> ids_;
};

}  // namespace kvsparse::llama
