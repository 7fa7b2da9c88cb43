// kvsparse-llama (examples/llama): the stories260K model through KVCache reproduces its published
// figures; the tokenizer merges exactly as the quadratic llama2.c loop; bad files are format errors.
// Data: ../shared/data beside the source tree (KVSPARSE_LLAMA_DATA, set by CMake).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "catch.hpp"
#include "error_message.hpp"

#include "common/policy_spec.hpp"
#include "eval/replay.hpp"
#include "llama/engine.hpp"
#include "llama/gate_calibration.hpp"
#include "llama/model.hpp"
#include "llama/tokenizer.hpp"
#include "llama/trace_dump.hpp"

namespace fs = std::filesystem;
using namespace kvsparse;
using namespace kvsparse::llama;

namespace {

const fs::path data_dir = KVSPARSE_LLAMA_DATA;

struct Fixture {
    Model model = Model::load(data_dir / "stories260K.bin");
    Tokenizer tokenizer = Tokenizer::load(data_dir / "tok512.bin", model.config().vocab);
};

/// Loaded once for the whole binary.
const Fixture& fixture() {
    static const Fixture f;
    return f;
}

std::string read(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// Mean next-token loss of `tokens` fed one at a time through `spec` (what stream-ppl computes).
double mean_loss(const std::string& spec, const std::vector<std::int32_t>& tokens) {
    const Fixture& f = fixture();
    const auto engine = make_engine(parse_engine_spec(spec), f.model, static_cast<std::int32_t>(tokens.size()));
    double sum = 0;
    for (std::size_t t = 0; t + 1 < tokens.size(); ++t) sum += next_token_loss(engine->step(tokens[t]), tokens[t + 1]);
    return sum / static_cast<double>(tokens.size() - 1);
}

std::vector<std::int32_t> first_tokens(const std::string& text, std::size_t n) {
    std::vector<std::int32_t> tokens = fixture().tokenizer.encode(text);
    REQUIRE(tokens.size() >= n);
    tokens.resize(n);
    return tokens;
}

/// The merge loop as llama2.c writes it: rescan every pair, merge the best (leftmost on ties), repeat.
std::vector<std::int32_t> quadratic_encode(const Tokenizer& tok, const std::string& text) {
    std::vector<std::int32_t> ids = tok.encode("");  // BOS
    std::vector<std::int32_t> s;
    std::vector<std::string> pieces;
    for (std::int32_t i = 0; i < tok.size(); ++i) pieces.push_back(tok.piece(i));
    const auto find = [&](const std::string& p) -> std::int32_t {
        const auto it = std::find(pieces.begin(), pieces.end(), p);
        return it == pieces.end() ? -1 : static_cast<std::int32_t>(it - pieces.begin());
    };
    s.push_back(find(" "));
    for (std::size_t i = 0; i < text.size();) {
        std::size_t n = 1;
        while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
        const std::int32_t id = find(text.substr(i, n));
        if (id >= 0) {
            s.push_back(id);
        } else {
            for (std::size_t b = 0; b < n; ++b) s.push_back(3 + static_cast<unsigned char>(text[i + b]));
        }
        i += n;
    }
    while (true) {
        std::int32_t best = -1, best_id = -1;
        for (std::size_t i = 0; i + 1 < s.size(); ++i) {
            const std::int32_t id = find(pieces[static_cast<std::size_t>(s[i])] + pieces[static_cast<std::size_t>(s[i + 1])]);
            if (id >= 0 && (best_id < 0 || tok.score(id) > tok.score(best_id))) {
                best = static_cast<std::int32_t>(i);
                best_id = id;
            }
        }
        if (best < 0) break;
        s[static_cast<std::size_t>(best)] = best_id;
        s.erase(s.begin() + best + 1);
    }
    ids.insert(ids.end(), s.begin(), s.end());
    return ids;
}

/// A fresh directory under the system's temporary directory, removed afterwards.
struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("kvsparse_test_llama_" + std::to_string(counter++) + "_" +
                std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }
    fs::path write(const std::string& name, const std::string& bytes) const {
        std::ofstream(path / name, std::ios::binary) << bytes;
        return path / name;
    }
};
}  // namespace

TEST_CASE("llama greedy generation from BOS reproduces the published sample", "[llama]") {
    const Fixture& f = fixture();
    const auto engine = make_engine(parse_engine_spec("dense"), f.model, 64);
    std::vector<std::int32_t> tokens{Tokenizer::bos};
    std::string text;
    while (tokens.size() < 40) {
        const auto logits = engine->step(tokens.back());
        const auto next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        text += f.tokenizer.decode(tokens.back(), next);
        tokens.push_back(next);
    }
    CHECK(text.rfind("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.", 0) == 0);
}

TEST_CASE("llama dense loss on the sample is the published 1.387", "[llama]") {
    // The published 1.387 is the first 511 predictions of the sample without its "<|endoftext|>" lines
    // (docs/streaming.md). Read as plain text, as stream-ppl reads every file, it is 1.719: the 12
    // predictions of the marker's 11 tokens and the newline after it cost 145 nats. That second figure
    // is this engine's own (a regression pin); only 1.387 is independent.
    std::string text = read(data_dir / "tinystories_sample.txt");
    const double as_is = mean_loss("dense", first_tokens(text, 512));
    const std::string marker = "<|endoftext|>\n";
    for (std::size_t at; (at = text.find(marker)) != std::string::npos;) text.erase(at, marker.size());
    const double stripped = mean_loss("dense", first_tokens(text, 512));
    CHECK(std::abs(stripped - 1.387) <= 0.003);
    CHECK(std::abs(as_is - 1.719) <= 0.003);
}

TEST_CASE("llama StreamingLLM figures at budget 128 agree with the independent ones", "[llama]") {
    // tinystories_160k.txt, 4096 tokens: window 5.636, sink 4 + window in_cache 5.688, absolute 37.43
    // (dense, 53.67, takes seconds and is left to docs/streaming.md). Within 0.5%.
    const auto tokens = first_tokens(read(data_dir / "tinystories_160k.txt"), 4096);
    CHECK(std::exp(mean_loss("window:window=128", tokens)) == Approx(5.636).epsilon(0.005));
    CHECK(std::exp(mean_loss("sink:sinks=4,window=124,positions=in_cache", tokens)) == Approx(5.688).epsilon(0.005));
    CHECK(std::exp(mean_loss("sink:sinks=4,window=124", tokens)) == Approx(37.43).epsilon(0.005));
}

TEST_CASE("llama recompute equals dense while the window covers the sequence", "[llama]") {
    const auto tokens = first_tokens(read(data_dir / "tinystories_sample.txt"), 48);
    const Fixture& f = fixture();
    const auto dense = make_engine(parse_engine_spec("dense"), f.model, 48);
    const auto recompute = make_engine(parse_engine_spec("recompute:window=48"), f.model, 48);
    const auto recompute_short = make_engine(parse_engine_spec("recompute:window=8"), f.model, 48);
    for (std::size_t t = 0; t + 1 < tokens.size(); ++t) {
        const auto a = dense->step(tokens[t]);
        const std::vector<float> expected(a.begin(), a.end());
        const auto b = recompute->step(tokens[t]);
        CHECK(std::equal(expected.begin(), expected.end(), b.begin()));
        const auto c = recompute_short->step(tokens[t]);
        if (t < 8) CHECK(std::equal(expected.begin(), expected.end(), c.begin()));
    }
}

TEST_CASE("llama tokenizer merges like the quadratic loop", "[llama]") {
    const Tokenizer& tok = fixture().tokenizer;
    const std::string sample = read(data_dir / "tinystories_sample.txt").substr(0, 1500) +
                               " caf\xc3\xa9 \xe2\x80\x9cquoted\xe2\x80\x9d \xf0\x9f\x99\x82 <|endoftext|>\n\t\x01";
    CHECK(tok.encode(sample) == quadratic_encode(tok, sample));
    CHECK(tok.encode("") == std::vector<std::int32_t>{Tokenizer::bos});
    // Whole files encode quickly (well under a second for 160k characters in a Release build).
    CHECK(tok.encode(read(data_dir / "tinystories_160k.txt")).size() > 30000);
}

TEST_CASE("llama dump-trace replays densely with full recall", "[llama]") {
    const auto tokens = first_tokens(read(data_dir / "tinystories_sample.txt"), 96);
    const tools::Trace trace = record_trace(fixture().model, tokens);
    CHECK(trace.shape.layers == 5);
    CHECK(trace.shape.q_heads == 8);
    CHECK(trace.shape.kv_heads == 4);
    CHECK(trace.shape.head_dim == 8);
    CHECK(trace.tokens == 96);
    TempDir dir;
    tools::save_trace(trace, dir.path / "trace");
    const tools::Trace loaded = tools::load_trace(dir.path / "trace");
    CHECK(loaded.q == trace.q);
    REQUIRE(loaded.rope.has_value());

    std::vector<tools::AnyPolicy> policies{tools::make_policy(tools::parse_policy_spec("dense")),
                                           tools::make_policy(tools::parse_policy_spec("window:window=16"))};
    tools::ReplayOptions options;
    options.progress = false;
    const auto results = tools::replay(loaded, {"dense", "window:window=16"}, policies, options);
    CHECK(results[0].recall_mean == Approx(1.0).epsilon(1e-6));
    CHECK(results[0].output_error_mean < 1e-5);
    CHECK(results[1].recall_mean < 1.0);
}

TEST_CASE("llama model and tokenizer files are checked", "[llama]") {
    const std::string model = read(data_dir / "stories260K.bin");
    const std::string tokenizer = read(data_dir / "tok512.bin");
    TempDir dir;
    CHECK_THAT(error_message_of<format_error>([&] { Model::load(dir.write("short.bin", model.substr(0, model.size() - 4))); }),
               Catch::Contains("needs exactly 1056540 bytes, the file has 1056536 (truncated)"));
    CHECK_THAT(error_message_of<format_error>([&] { Model::load(dir.write("long.bin", model + "x")); }),
               Catch::Contains("the file has 1056541 (trailing data"));
    CHECK_THAT(error_message_of<format_error>([&] { Model::load(dir.write("header.bin", model.substr(0, 20))); }),
               Catch::Contains("truncated: 20 bytes"));
    CHECK_THAT(error_message_of<format_error>([&] { Model::load(data_dir / "tok512.bin"); }),
               Catch::Contains("not a llama2.c checkpoint"));
    CHECK_THAT(error_message_of<format_error>([&] { Model::load(dir.path / "missing.bin"); }), Catch::Contains("cannot open"));
    CHECK_THAT(error_message_of<format_error>([&] { Tokenizer::load(dir.write("tok.bin", tokenizer.substr(0, 3000)), 512); }),
               Catch::Contains("truncated"));
    CHECK_THAT(error_message_of<format_error>([&] { Tokenizer::load(data_dir / "tok512.bin", 500); }),
               Catch::Contains("does not match the model's vocabulary"));
    CHECK_THAT(error_message_of<format_error>([&] { Tokenizer::load(data_dir / "stories260K.bin", 512); }),
               Catch::Contains("stories260K.bin"));
}

TEST_CASE("llama policy specs include the recompute baseline", "[llama]") {
    CHECK(parse_engine_spec("recompute:window=64").recompute_window == 64);
    CHECK_FALSE(parse_engine_spec("sink:sinks=4,window=60,positions=in_cache").policy->text.empty());
    CHECK_THROWS_AS(parse_engine_spec("recompute:window=0"), invalid_argument);
    CHECK_THROWS_AS(parse_engine_spec("recompute:size=4"), invalid_argument);
    CHECK_THROWS_AS(parse_engine_spec("recompute"), invalid_argument);
    CHECK_THROWS_AS(parse_engine_spec("nonsense:x=1"), invalid_argument);
}

TEST_CASE("llama calibrate-gates measures deterministic gate values that lserve uses", "[llama]") {
    const Fixture& f = fixture();
    const auto tokens = first_tokens(read(data_dir / "tinystories_sample.txt"), 200);
    const GateValues alpha = calibrate_gates(f.model, tokens, 4, 60);
    REQUIRE(alpha.size() == 5);
    for (const std::vector<float>& row : alpha) {
        REQUIRE(row.size() == 4);
        for (const float a : row) {
            CHECK(a >= 0.0f);
            CHECK(a <= 1.0f);
        }
    }
    CHECK(calibrate_gates(f.model, tokens, 4, 60) == alpha);
    // The heads differ: some are more local than others (else the ranking would be all ties).
    float lo = 1, hi = 0;
    for (const auto& row : alpha) {
        lo = std::min(lo, *std::min_element(row.begin(), row.end()));
        hi = std::max(hi, *std::max_element(row.begin(), row.end()));
    }
    CHECK(hi > lo);
    // Too short a text for the window is an error, not zeros.
    CHECK_THROWS_AS(calibrate_gates(f.model, std::span(tokens).first(64), 4, 60), invalid_argument);
    // The TSV reads back (six decimals).
    const GateValues back = parse_gate_values(gate_values_tsv(alpha));
    REQUIRE(back.size() == alpha.size());
    for (std::size_t l = 0; l < back.size(); ++l) {
        for (std::size_t h = 0; h < back[l].size(); ++h) CHECK(back[l][h] == Approx(alpha[l][h]).margin(1e-6));
    }

    // lserve needs them; with them, sparsity 1 (every head streams) is sink + window at absolute positions
    // and sparsity 0 with a budget covering the sequence is dense.
    CHECK_THROWS_AS(make_engine(parse_engine_spec("lserve:sink=4,local=60,budget=64"), f.model, 200), invalid_argument);
    const auto loss = [&](const std::string& spec) {
        const auto engine = make_engine(parse_engine_spec(spec), f.model, 200, alpha);
        double sum = 0;
        for (std::size_t t = 0; t + 1 < tokens.size(); ++t) sum += next_token_loss(engine->step(tokens[t]), tokens[t + 1]);
        return sum / static_cast<double>(tokens.size() - 1);
    };
    const double streaming = loss("lserve:sink=4,local=60,logical_page=16,physical_page=32,budget=96,sparsity=1");
    CHECK(streaming == Approx(loss("sink:sinks=4,window=60")).epsilon(1e-5));
    CHECK(streaming != Approx(loss("dense")).epsilon(1e-3));
    CHECK(loss("lserve:sink=4,local=60,logical_page=16,physical_page=64,budget=256,sparsity=0") ==
          Approx(loss("dense")).epsilon(1e-5));
    // The default comparison brings lserve in when gate values exist, and it builds for this model.
    bool found = false;
    for (const std::string& spec : tools::default_policy_specs(128, true, true)) {
        if (spec.rfind("lserve", 0) != 0) continue;
        found = true;
        CHECK_NOTHROW(make_engine(parse_engine_spec(spec), f.model, 200, alpha));
    }
    CHECK(found);
}
